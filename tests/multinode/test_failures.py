"""Nodes and the database failing: kill -9 of a node mid-burst, PostgreSQL down,
a node that stops answering (SIGSTOP)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import ok
from tests.multinode.conftest import Cluster, token_ids, wait_for

ENC = {"alg": "AES", "mode": "GCM", "plain": b"secret data"}


def encrypt(conn: Raw, kid: str) -> dict:
    return conn.call("POST", "/crypto/v1/encrypt", {"key": {"kid": kid}, **ENC})


def until_served(conn: Raw, kid: str, timeout: float = 30.0) -> int:
    """Ask until the node stops answering 503 (catching up); its first other status.
    A 200 on the way would be a disabled key served from a stale cache: it fails."""
    deadline = time.monotonic() + timeout
    while True:
        status = encrypt(conn, kid)["status"]
        assert status in (503, 403), status
        if status != 503 or time.monotonic() > deadline:
            return status
        time.sleep(0.01)


def burst(cluster: Cluster, node: str, gid: str, acked: list[str], stop: threading.Event) -> None:
    """Create keys on ``node`` until told to stop or the node dies; note each answered one."""
    try:
        conn = cluster[node].connect(cluster.admin_key)
        while not stop.is_set():
            body = {"name": unique("burst"), "obj_type": "AES", "key_size": 128, "group_id": gid}
            resp = conn.call("POST", "/crypto/v1/keys", body)
            if resp["status"] == 200:
                acked.append(resp["body"]["kid"])
    except (ConnectionError, OSError):
        return  # the node was killed


def test_kill9_during_a_burst_loses_no_acknowledged_key(cluster: Cluster) -> None:
    admin = cluster["A"].connect(cluster.admin_key)
    gid = ok(admin.call("GET", "/sys/v1/groups"))[0]["group_id"]
    on_a: list[str] = []
    on_b: list[str] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=burst, args=(cluster, n, gid, acked, stop))
        for n, acked in (("A", on_a), ("B", on_b), ("B", on_b))
    ]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(on_b) >= 10, timeout=60)
    cluster["B"].kill9()  # mid-creation, most likely
    b_dead_at = len(on_b)
    # B restarts while A goes on creating: its reconcile must spare A's fresh keys.
    # (A's creations in flight meanwhile wait for B's confirmation: B counts as live
    # until its heartbeat is node_timeout old, or its next run confirms them.)
    cluster["B"].start()
    a_at_start = len(on_a)
    assert wait_for(lambda: len(on_a) >= a_at_start + 5, timeout=60)
    stop.set()
    for t in threads:
        t.join(60)
    assert len(on_b) >= b_dead_at > 0
    conns = {n: cluster[n].connect(cluster.admin_key) for n in "ABC"}
    for kid in on_a + on_b:  # every acknowledged key works on every node
        for n in "ABC":
            assert encrypt(conns[n], kid)["status"] == 200, (n, kid)
    log = cluster["B"].log.read_text()
    removed = set(re.findall(r"removing token object ([0-9a-f-]{36})", log))
    assert not removed & set(on_a + on_b)


def test_postgres_down_then_back(cluster: Cluster) -> None:
    conns = {n: cluster[n].connect(cluster.admin_key) for n in "ABC"}
    gid = ok(conns["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    kids = []
    for n in "ABC":
        body = {"name": unique("pg"), "obj_type": "AES", "key_size": 256, "group_id": gid}
        kids.append(ok(conns[n].call("POST", "/crypto/v1/keys", body))["kid"])
    cluster.pg.stop()
    try:
        for n in "ABC":  # each node sees it lost the database and refuses use
            last = wait_for(lambda n=n: encrypt(conns[n], kids[0])["status"] == 503, timeout=30)
            assert last, n
            resp = encrypt(conns[n], kids[0])
            assert resp["status"] == 503 and resp["body"]["error"] == "unavailable", resp
    finally:
        cluster.pg.start()
    for n in "ABC":  # then serve again, with every key acknowledged before
        assert wait_for(lambda n=n: encrypt(conns[n], kids[0])["status"] == 200, timeout=60), n
        for kid in kids:
            assert encrypt(conns[n], kid)["status"] == 200
    assert wait_for(lambda: ok(conns["B"].call("GET", "/sys/v1/logs/verify"))["ok"], timeout=30)


def test_a_node_that_does_not_confirm_is_named_and_never_serves_stale(cluster: Cluster) -> None:
    conns = {n: cluster[n].connect(cluster.admin_key) for n in "ABC"}
    gid = ok(conns["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    body = {"name": unique("stop"), "obj_type": "AES", "key_size": 256, "group_id": gid}
    kid = ok(conns["A"].call("POST", "/crypto/v1/keys", body))["kid"]
    assert encrypt(conns["C"], kid)["status"] == 200
    pid = cluster["C"].proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        out = ok(conns["A"].call("PATCH", f"/crypto/v1/keys/{kid}", {"enabled": False}))
        assert out["unconfirmed_nodes"] == ["C"], out  # after confirm_timeout (3 s)
        assert encrypt(conns["B"], kid)["status"] == 403
    finally:
        os.kill(pid, signal.SIGCONT)
    # C, resumed, refuses (503 while it catches up), and never serves the disabled key
    assert until_served(conns["C"], kid) == 403


def test_a_node_that_missed_notifications_rereads_what_it_caches(cluster: Cluster) -> None:
    """C's connections are cut while it is paused, a key is disabled meanwhile: the
    notification is lost for C, which must re-read its rows before serving again."""
    import psycopg

    conns = {n: cluster[n].connect(cluster.admin_key) for n in "ABC"}
    gid = ok(conns["A"].call("GET", "/sys/v1/groups"))[0]["group_id"]
    body = {"name": unique("lost"), "obj_type": "AES", "key_size": 256, "group_id": gid}
    kid = ok(conns["A"].call("POST", "/crypto/v1/keys", body))["kid"]
    assert encrypt(conns["C"], kid)["status"] == 200
    pid = cluster["C"].proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with psycopg.connect(cluster.url, autocommit=True) as db:
            cut = db.execute(  # every connection of C (named by its node)
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'strongroomd:C'"
            ).fetchall()
        assert len(cut) == 2  # its store connection and its listening one
        out = ok(conns["A"].call("PATCH", f"/crypto/v1/keys/{kid}", {"enabled": False}))
        assert out["unconfirmed_nodes"] == ["C"], out
    finally:
        os.kill(pid, signal.SIGCONT)
    assert until_served(conns["C"], kid) == 403


MAKE_OBJECTS = """
import sys, pkcs11
from pkcs11 import Attribute, KeyType
lib = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so")
with lib.get_token(token_label="strongroom").open(rw=True, user_pin=sys.argv[1]) as s:
    for kid in sys.argv[2:]:
        s.generate_key(KeyType.AES, 128, store=True, label="bare",
                       template={Attribute.ID: kid.encode(), Attribute.TOKEN: True})
"""


def test_reconcile_spares_objects_another_node_is_writing(cluster: Cluster) -> None:
    """Token objects without rows, as B's start-up finds them: one reserved by a live
    node X (its row is being written: kept), one reserved by B before a crash and
    one reserved by nobody (orphans: removed)."""
    import subprocess
    import sys
    import uuid

    import psycopg

    busy, own, bare = (str(uuid.uuid4()) for _ in range(3))
    subprocess.run(
        [sys.executable, "-c", MAKE_OBJECTS, "test-user-pin-1234", busy, own, bare],
        env={**os.environ, **cluster.env},
        check=True,
        capture_output=True,
    )
    with psycopg.connect(cluster.url, autocommit=True) as db:
        db.execute(
            "INSERT INTO nodes (id) VALUES ('X') ON CONFLICT (id) DO UPDATE SET heartbeat = now()"
        )
        db.execute("INSERT INTO pending_keys (kid, node) VALUES (%s, 'X'), (%s, 'B')", (busy, own))
    assert cluster["B"].stop() == 0
    cluster["B"].start()
    listed = token_ids(cluster)
    assert busy.encode().hex() in listed  # kept: X is writing its row
    assert own.encode().hex() not in listed and bare.encode().hex() not in listed
    log = cluster["B"].log.read_text()
    assert f"removing token object {own}" in log and f"removing token object {bare}" in log
    assert f"removing token object {busy}" not in log
    with psycopg.connect(cluster.url, autocommit=True) as db:
        left = {r[0] for r in db.execute("SELECT kid FROM pending_keys")}
        db.execute("DELETE FROM nodes WHERE id = 'X'")  # no later change waits for it
    assert busy in left and own not in left
