"""Three nodes, one PostgreSQL, one token directory: what one node does, all see."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import unique
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
