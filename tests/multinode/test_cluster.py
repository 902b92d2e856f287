"""Three nodes, one PostgreSQL, one token directory: what one node does, all see."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import read_secret_args, unique
from tests.daemon.api.helpers import err, ok
from tests.multinode.conftest import Cluster

ENC = {"alg": "AES", "mode": "GCM", "plain": b"secret data"}


def conns(cluster: Cluster, key: str | None = None) -> dict:
    return {n: cluster[n].connect(key or cluster.admin_key) for n in "ABC"}


def new_key(conn, **fields):
    body = {"name": unique("k"), "obj_type": "AES", "key_size": 256, **fields}
    return ok(conn.call("POST", "/crypto/v1/keys", body))


def test_key_made_on_a_encrypts_on_b_and_c(cluster: Cluster) -> None:
    c = conns(cluster)
    gid = ok(c["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    key = new_key(c["A"], group_id=gid, key_ops=["ENCRYPT", "DECRYPT", "EXPORT"])
    outs = {}
    for n in "BC":  # at once: no waiting for the others to hear of it
        outs[n] = ok(c[n].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))
    value = ok(c["C"].call("POST", "/crypto/v1/keys/export", {"kid": key["kid"]}))["value"]
    for out in outs.values():  # checked with cryptography, not with the daemon
        plain = AESGCM(value).decrypt(out["iv"], out["cipher"] + out["tag"], None)
        assert plain == ENC["plain"]
    # and by name on another node
    ok(c["B"].call("POST", "/crypto/v1/encrypt", {"key": {"name": key["name"]}, **ENC}))


def test_disable_on_b_is_refused_by_a_and_c_once_b_answers(cluster: Cluster) -> None:
    c = conns(cluster)
    gid = ok(c["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    key = new_key(c["A"], group_id=gid)
    for n in "ABC":
        ok(c[n].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))
    out = ok(c["B"].call("PATCH", f"/crypto/v1/keys/{key['kid']}", {"enabled": False}))
    assert "unconfirmed_nodes" not in out, out
    for n in "ABC":  # as soon as B answered: no sleep
        err(
            c[n].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}),
            "forbidden",
        )
    ok(c["C"].call("PATCH", f"/crypto/v1/keys/{key['kid']}", {"enabled": True}))
    for n in "ABC":
        ok(c[n].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))


def test_key_ops_narrowing_on_b_is_refused_everywhere(cluster: Cluster) -> None:
    c = conns(cluster)
    gid = ok(c["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    key = new_key(c["C"], group_id=gid, key_ops=["ENCRYPT", "DECRYPT"])
    ct = ok(c["A"].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))
    ok(c["B"].call("PATCH", f"/crypto/v1/keys/{key['kid']}", {"key_ops": ["DECRYPT"]}))
    for n in "ABC":
        err(
            c[n].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}),
            "key_op_not_permitted",
        )
        dec = {
            "key": {"kid": key["kid"]},
            "alg": "AES",
            "mode": "GCM",
            "cipher": ct["cipher"],
            "iv": ct["iv"],
            "tag": ct["tag"],
        }
        assert ok(c[n].call("POST", "/crypto/v1/decrypt", dec))["plain"] == ENC["plain"]


def test_an_apps_session_works_on_every_node(cluster: Cluster) -> None:
    c = conns(cluster)
    gid = ok(c["A"].call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]
    app = ok(c["A"].call("POST", "/sys/v1/apps", {"name": unique("app"), "groups": [gid]}))
    key = new_key(c["C"], group_id=gid)
    b = cluster["B"].connect(app["credential"]["api_key"])  # the session is B's
    token = ok(b.call("POST", "/sys/v1/session/auth", {"api_key": app["credential"]["api_key"]}))[
        "access_token"
    ]
    from tests.conftest import Raw

    for n in "AC":  # the bearer token, on nodes that did not issue it
        r = Raw(cluster[n].socket)
        ok(r.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}, auth=token))
        # allowed, and denied: a key outside the app's groups is not found
        other = new_key(c[n], group_id=ok(c["A"].call("GET", "/sys/v1/groups"))[0]["group_id"])
        err(
            r.call("POST", "/crypto/v1/encrypt", {"key": {"kid": other["kid"]}, **ENC}, auth=token),
            "not_found",
        )
        r.close()
    # a disabled app is refused on every node once the disable is answered
    ok(c["A"].call("PATCH", f"/sys/v1/apps/{app['app_id']}", {"enabled": False}))
    for n in "ABC":
        r = Raw(cluster[n].socket)
        resp = r.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}, auth=token)
        assert resp["status"] == 401, resp
        r.close()


def test_a_rekey_on_one_node_is_seen_everywhere(cluster: Cluster) -> None:
    c = conns(cluster)
    gid = ok(c["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    key = new_key(c["A"], group_id=gid)
    ct = ok(c["C"].call("POST", "/crypto/v1/encrypt", {"key": {"name": key["name"]}, **ENC}))
    new = ok(c["B"].call("POST", "/crypto/v1/keys/rekey", {"name": key["name"]}))
    assert new["kid"] != key["kid"]
    for n in "ABC":
        info = ok(c[n].call("POST", "/crypto/v1/keys/info", {"name": key["name"]}))
        assert info["kid"] == new["kid"]
        out = ok(c[n].call("POST", "/crypto/v1/encrypt", {"key": {"name": key["name"]}, **ENC}))
        dec = {
            "key": {"kid": new["kid"]},
            "alg": "AES",
            "mode": "GCM",
            **{k: out[k] for k in ("cipher", "iv", "tag")},
        }
        assert ok(c[n].call("POST", "/crypto/v1/decrypt", dec))["plain"] == ENC["plain"]
        old = {
            "key": {"kid": key["kid"]},
            "alg": "AES",
            "mode": "GCM",
            **{k: ct[k] for k in ("cipher", "iv", "tag")},
        }
        assert ok(c[n].call("POST", "/crypto/v1/decrypt", old))["plain"] == ENC["plain"]


def test_delete_on_one_node_is_gone_everywhere(cluster: Cluster) -> None:
    c = conns(cluster)
    gid = ok(c["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    key = new_key(c["A"], group_id=gid)
    kept = new_key(c["B"], group_id=gid)  # the token lists it, whatever ran before
    ok(c["B"].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))
    resp = c["C"].call("DELETE", f"/crypto/v1/keys/{key['kid']}")
    assert resp["status"] in (200, 204), resp
    for n in "ABC":
        err(
            c[n].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}),
            "not_found",
        )
    # the token object is gone too (the deleter found it by CKA_ID)
    from tests.multinode.conftest import token_ids

    listed = token_ids(cluster)
    assert kept["kid"].encode().hex() in listed  # the other keys are listed
    assert key["kid"].encode().hex() not in listed  # and not this one


def test_the_audit_chain_is_one_across_nodes(cluster: Cluster) -> None:
    c = conns(cluster)
    for n in "ABC":
        ok(c[n].call("GET", "/sys/v1/groups"))
        gid = ok(c[n].call("GET", "/sys/v1/groups"))[0]["group_id"]
        new_key(c[n], group_id=gid)
    outs = [ok(c[n].call("GET", "/sys/v1/logs/verify")) for n in "ABC"]
    for out in outs:
        assert out["ok"] is True, out
    assert outs[2]["records"] >= outs[0]["records"] > 0
    # records of every node, in one chain, listed by any node
    actors = {r.get("actor_id") for r in ok(c["B"].call("GET", "/sys/v1/logs", {"limit": 1000}))}
    assert len(actors) >= 1
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "strongroomd",
            "--config",
            str(cluster["B"].config),
            "audit",
            "verify",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "audit chain intact" in proc.stdout


def test_a_logout_on_one_node_ends_the_session_on_every_node(cluster: Cluster) -> None:
    from tests.conftest import Raw

    c = conns(cluster)
    gid = ok(c["A"].call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]
    app = ok(c["A"].call("POST", "/sys/v1/apps", {"name": unique("app"), "groups": [gid]}))
    key = new_key(c["A"], group_id=gid)
    b = cluster["B"].connect(app["credential"]["api_key"])
    token = ok(b.call("POST", "/sys/v1/session/auth", {"api_key": app["credential"]["api_key"]}))[
        "access_token"
    ]
    others = {n: Raw(cluster[n].socket) for n in "AC"}
    for r in others.values():  # A and C have it cached now
        ok(r.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}, auth=token))
    resp = b.call("POST", "/sys/v1/session/terminate", auth=token)
    assert resp["status"] in (200, 204), resp
    for r in others.values():  # as soon as B answered
        resp = r.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}, auth=token)
        assert resp["status"] == 401, resp
        r.close()


def test_a_bearer_token_from_one_node_works_over_another_nodes_http_gateway(
    cluster: Cluster,
) -> None:
    import base64

    from tests.daemon.gateway.conftest import Http, gateway_url

    d = cluster._node("D", "http_enabled = true\nhttp_port = 0\n").start()
    try:
        c = conns(cluster)
        gid = ok(c["A"].call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]
        app = ok(c["A"].call("POST", "/sys/v1/apps", {"name": unique("app"), "groups": [gid]}))
        key = new_key(c["A"], group_id=gid)
        b = cluster["B"].connect(app["credential"]["api_key"])
        token = ok(
            b.call("POST", "/sys/v1/session/auth", {"api_key": app["credential"]["api_key"]})
        )["access_token"]
        h = Http(gateway_url(d), token=token)  # B's session, over D's gateway
        body = {
            "key": {"kid": key["kid"]},
            "alg": "AES",
            "mode": "GCM",
            "plain": base64.b64encode(b"over http").decode(),
        }
        resp = h.call("POST", "/crypto/v1/encrypt", body)
        assert resp["status"] == 200, resp
        other = new_key(c["A"], group_id=ok(c["A"].call("GET", "/sys/v1/groups"))[0]["group_id"])
        resp = h.call("POST", "/crypto/v1/encrypt", {**body, "key": {"kid": other["kid"]}})
        assert resp["status"] == 404, resp  # outside the app's groups: denied
        h.close()
    finally:
        assert d.stop() == 0


def test_changes_on_every_node_at_once_keep_one_chain(cluster: Cluster) -> None:
    import threading

    gid = ok(conns(cluster)["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    made: list[str] = []

    def work(node: str) -> None:
        conn = cluster[node].connect(cluster.admin_key)
        for _ in range(8):
            made.append(new_key(conn, group_id=gid)["kid"])
            ok(conn.call("GET", "/sys/v1/logs/verify"))  # flushes: batches interleave
        conn.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in "ABCABC"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(made) == 48
    c = conns(cluster)
    out = ok(c["C"].call("GET", "/sys/v1/logs/verify"))
    assert out["ok"] is True and out["unwritten"] == 0, out
    logged = {r.get("object_id") for r in ok(c["A"].call("GET", "/sys/v1/logs", {"limit": 10000}))}
    assert set(made) <= logged  # every creation's record, whichever node wrote it


def test_export_taken_away_on_b_is_refused_everywhere_and_by_the_token(cluster: Cluster) -> None:

    c = conns(cluster)
    gid = ok(c["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    key = new_key(c["A"], group_id=gid, key_ops=["ENCRYPT", "DECRYPT", "EXPORT"])
    for n in "AC":  # allowed first (hot copies exist on A and C)
        ok(c[n].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))
        ok(c[n].call("POST", "/crypto/v1/keys/export", {"kid": key["kid"]}))
    ok(c["B"].call("PATCH", f"/crypto/v1/keys/{key['kid']}", {"key_ops": ["ENCRYPT", "DECRYPT"]}))
    for n in "ABC":
        err(
            c[n].call("POST", "/crypto/v1/keys/export", {"kid": key["kid"]}), "key_op_not_permitted"
        )
        ok(c[n].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))
    read = cluster.pkcs11_tool(*read_secret_args(key["kid"]))
    assert read.returncode != 0 and not read.stdout  # the token will not give it either


def test_a_revoke_on_b_is_honoured_everywhere_at_once(cluster: Cluster) -> None:
    c = conns(cluster)
    gid = ok(c["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    key = new_key(c["C"], group_id=gid)
    ct = ok(c["A"].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))
    ok(c["B"].call("POST", f"/crypto/v1/keys/{key['kid']}/revoke", {"code": "KeyCompromise"}))
    dec = {
        "key": {"kid": key["kid"]},
        "alg": "AES",
        "mode": "GCM",
        **{k: ct[k] for k in ("cipher", "iv", "tag")},
    }
    for n in "ABC":
        err(
            c[n].call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}),
            "forbidden",
        )  # protects nothing new
        assert ok(c[n].call("POST", "/crypto/v1/decrypt", dec))["plain"] == ENC["plain"]
        got = ok(c[n].call("GET", f"/crypto/v1/keys/{key['kid']}"))
        assert got["state"] == "Compromised"


def test_statistics_count_every_nodes_uses(cluster: Cluster) -> None:
    """One audit log, so one node's /sys/v1/stats counts what every node served
    (they were read from a local SQLite file that a node on PostgreSQL does not have)."""
    import time

    c = conns(cluster)
    gid = ok(c["A"].call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]
    app = ok(c["A"].call("POST", "/sys/v1/apps", {"name": unique("app"), "groups": [gid]}))
    key = new_key(c["B"], group_id=gid)
    uses = {"A": 2, "B": 3, "C": 4}
    for n, times in uses.items():
        conn = cluster[n].connect(app["credential"]["api_key"])
        for _ in range(times):
            ok(conn.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))
        items = [{"kid": key["kid"], "request": {"plain": b"z"}}] * 5
        ok(conn.call("POST", "/crypto/v1/keys/batch/encrypt", items))  # 5 transactions
        conn.close()
    now = int(time.time())
    window = {"range_from": now - 600, "range_to": now + 600, "num_points": 1}
    total = sum(uses.values()) + 3 * 5

    def count(n: str) -> dict:
        (bucket,) = ok(c[n].call("GET", f"/sys/v1/stats/{key['kid']}/key", window))["time"][
            "buckets"
        ]
        return bucket

    # Uses are group-committed by the node that served them (every 50 ms): the
    # last node's records reach the shared log a moment after its answers.
    deadline = time.monotonic() + 30
    while count("A")["doc_count"] < total and time.monotonic() < deadline:
        time.sleep(0.05)
    for n in "ABC":
        bucket = count(n)
        assert bucket["doc_count"] == total, (n, bucket)
        assert [(b["key"], b["doc_count"]) for b in bucket["total_txn"]["buckets"]] == [
            (app["app_id"], total)
        ]
        (per_app,) = ok(c[n].call("GET", "/sys/v1/stats/apps", window))["time"]["buckets"]
        mine = [b for b in per_app["total_txn"]["buckets"] if b["key"] == app["app_id"]]
        assert [b["doc_count"] for b in mine] == [total]
    # Denied: an app reads no statistics on any node.
    conn = cluster["C"].connect(app["credential"]["api_key"])
    err(conn.call("GET", "/sys/v1/stats/apps", window), "forbidden")
    conn.close()
