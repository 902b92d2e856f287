"""One app cannot stall another through the token thread (issue 8, case 5).

Against a real daemon. The token thread is held deterministically: every
token write takes the state directory's token lock shared on the thread, so
a test holding it exclusively parks the thread on the next write. Work from
two apps is queued meanwhile (the ``strongroom_token_jobs`` gauge says when
it is all there), the lock is released, and the ORDER in which replies come
back on one connection (per-request ``auth``) is checked, never latency.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.conftest import Daemon, Raw, start_daemon, unique
from tests.daemon.api.helpers import new_app, new_group, new_key, ok
from tests.daemon.test_keyring import token_parked
from tests.daemon.test_metrics import gateway_url

CONFIG = """
http_enabled = true
http_port = 0
token_slow_per_principal = 3
"""


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("fair"), config=CONFIG)
    yield daemon
    daemon.stop()


@contextmanager
def token_held(d: Daemon) -> Iterator[None]:
    """The token thread parks on the next token write until the block ends."""
    fd = os.open(d.state_dir / "token.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def jobs(d: Daemon) -> dict[str, float]:
    with urllib.request.urlopen(gateway_url(d) + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^strongroom_token_jobs\{lane="(\w+)"\} (\S+)$', text, re.M)
    }


def wait_queued(d: Daemon, short: int, slow: int) -> None:
    """Until the token thread has been handed exactly these jobs (a condition, not a timing).

    Handed is not taken: a job counts once it is in the thread's inbox. That the
    thread is parked on the first one is :func:`token_parked`'s condition (waiting
    for a count of 1 instead let a slow thread take the first job together with
    the ones sent next, and reorder their turns)."""
    deadline = time.monotonic() + 30
    while (got := jobs(d)) != {"short": short, "slow": slow}:
        assert time.monotonic() < deadline, got
        time.sleep(0.02)


class World:
    def __init__(self, d: Daemon) -> None:
        self.admin = Raw(d.socket)
        self.admin.login(d.admin_key)
        group = new_group(self.admin)
        self.a = new_app(d, self.admin, [group])
        self.b = new_app(d, self.admin, [group])
        self.b_key = new_key(self.b.conn, group)["kid"]
        self.b_auth = Raw(d.socket).login(self.b.api_key)["access_token"]
        self.group = group
        # B's key is hot now: each later encrypt with it is one short job.
        rid = self.encrypt(self.b.conn)
        assert ok(self.b.conn.recv()) and self.b.conn.pending == []
        assert rid

    def encrypt(self, conn: Raw, **extra: Any) -> int:
        body = {"key": {"kid": self.b_key}, "alg": "AES", "mode": "GCM", "plain": b"x" * 32}
        return conn.send("POST", "/crypto/v1/encrypt", body, **extra)


@pytest.fixture(scope="module")
def world(d: Daemon) -> World:
    return World(d)


def replies(conn: Raw, n: int) -> list[dict[str, Any]]:
    return [conn.recv() for _ in range(n)]


def rsa(conn: Raw) -> int:
    body = {"name": unique("rsa"), "obj_type": "RSA", "key_size": 2048, "transient": True}
    return conn.send("POST", "/crypto/v1/keys", body)


def test_an_encrypt_waits_for_one_key_generation_not_a_queue(d: Daemon, world: World) -> None:
    conn = world.a.conn  # A's connection; B's request rides on it with per-request auth
    with token_held(d):
        gens = [rsa(conn)]  # parks the token thread (alone: nothing else is queued yet)
        token_parked(d)
        gens += [rsa(conn) for _ in range(2)]
        enc = world.encrypt(conn, auth=world.b_auth)
        wait_queued(d, short=1, slow=3)
    got = replies(conn, 4)
    assert [r["status"] for r in got] == [200] * 4, got
    order = [r["id"] for r in got]
    # The encrypt ran right after the generation that was running (whose reply may
    # come later: the key is recorded after the token call); the next generation
    # started only once the encrypt's result was handed back.
    assert order.index(enc) < order.index(gens[1]) < order.index(gens[2]), order


def test_principals_take_turns_in_the_short_lane(d: Daemon, world: World) -> None:
    conn = world.a.conn
    body = {"name": unique("k"), "obj_type": "AES", "key_size": 256, "group_id": world.group}
    with token_held(d):
        first = conn.send("POST", "/crypto/v1/keys", body)  # parks the token thread
        token_parked(d)
        mine = [world.encrypt(conn) for _ in range(30)]  # A may use B's key: same group
        enc = world.encrypt(conn, auth=world.b_auth)
        wait_queued(d, short=32, slow=0)
    got = replies(conn, 32)
    assert all(r["status"] == 200 for r in got), got
    encrypts = [r["id"] for r in got if r["id"] != first]  # the creation replies later
    assert encrypts[:2] == [mine[0], enc], encrypts


def test_a_full_slow_lane_answers_busy_at_once(d: Daemon, world: World) -> None:
    conn = world.a.conn
    with token_held(d):
        gens = [rsa(conn)]
        token_parked(d)
        gens += [rsa(conn) for _ in range(2)]  # A's share (token_slow_per_principal = 3)
        wait_queued(d, short=0, slow=3)
        extra = rsa(conn)
        refused = conn.recv()  # while the token thread is still parked
        assert refused["id"] == extra and refused["status"] == 429, refused
        assert refused["body"]["error"] == "busy"
        other = rsa(world.b.conn)  # another principal still gets a turn
        wait_queued(d, short=0, slow=4)
    assert sorted(r["id"] for r in replies(conn, 3)) == gens
    assert world.b.conn.recv()["id"] == other
