"""The keyring's promises under concurrency, against a real daemon.

Races are made deterministic: the test holds the token's write lock
(``state/token.lock``, which every token write takes shared on the token
thread), so the first write parks the token thread and everything behind it
waits exactly where the test wants it. Each test here failed on the code
before the keyring owned every key change.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import Daemon, Raw, start_daemon, unique
from tests.daemon.api.helpers import err, new_app, new_group, ok


@contextlib.contextmanager
def token_held(d: Daemon) -> Iterator[None]:
    """Park the token thread at its next write until the block ends."""
    fd = os.open(d.state_dir / "token.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def token_parked(d: Daemon, timeout: float = 60.0) -> None:
    """Until the token thread waits on the test's hold of ``token.lock`` (a condition,
    not a timing): /proc/locks lists a blocked flock with ``->``. Under
    :func:`token_held` only the one token thread ever waits there, so this says the
    request sent last (and the only one that writes to the token) is parked."""
    inode = os.stat(d.state_dir / "token.lock").st_ino
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/locks") as f:
            if any("->" in ln and f":{inode} " in ln for ln in f):
                return
        assert time.monotonic() < deadline, "the token thread never reached the lock"
        time.sleep(0.01)


def parked(d: Daemon, conn: Raw, group: str) -> int:
    """Send a key creation that parks the token thread; returns its request id."""
    rid = conn.send(
        "POST", "/crypto/v1/keys", {"name": unique("plug"), "obj_type": "AES", "group_id": group}
    )
    token_parked(d)
    return rid


def replies(conn: Raw, n: int) -> dict[int, dict]:
    out = {}
    for _ in range(n):
        r = conn.recv()
        out[r["id"]] = r
    return out


def aes(conn: Raw, kid: str, plain: bytes = b"acknowledged") -> dict:
    return ok(
        conn.call("POST", "/crypto/v1/encrypt", {"key": {"kid": kid}, "alg": "AES", "plain": plain})
    )


def _sealed(enc: dict) -> dict:
    return {k: enc[k] for k in ("cipher", "iv", "tag")}


def test_one_name_two_creators_one_wins_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        g1, g2 = new_group(admin), new_group(admin)
        a1, a2 = new_app(d, admin, [g1]), new_app(d, admin, [g2])
        acked: list[tuple[str, dict, bytes]] = []
        conflicts = []
        for i in range(5):
            name = unique("same")
            with token_held(d):
                plug = parked(d, admin, g1)
                r1 = a1.conn.send("POST", "/crypto/v1/keys", {"name": name, "obj_type": "AES"})
                time.sleep(0.05)
                r2 = a2.conn.send("POST", "/crypto/v1/keys", {"name": name, "obj_type": "AES"})
                # The second creator is answered while the first still waits on the token.
                second = a2.conn.recv()
            assert second["id"] == r2
            assert second["status"] == 409, second
            assert second["body"]["error"] == "name_exists"
            # The 409 says only that the name is taken: no kid, no group.
            assert g1 not in str(second["body"]) and "kid" not in second["body"], second
            conflicts.append(second)
            first = a1.conn.recv()
            assert first["id"] == r1 and first["status"] == 200, first
            assert replies(admin, 1)[plug]["status"] == 200
            kid = first["body"]["kid"]
            acked.append((kid, aes(a1.conn, kid, b"data %d" % i), b"data %d" % i))
        assert len(conflicts) == 5
        assert d.stop() == 0
        d.start()
        a1.conn = Raw(d.socket)
        a1.conn.login(a1.api_key)
        for kid, enc, plain in acked:
            out = ok(
                a1.conn.call(
                    "POST",
                    "/crypto/v1/decrypt",
                    {"key": {"kid": kid}, "alg": "AES", "mode": "GCM", **_sealed(enc)},
                )
            )
            assert out["plain"] == plain
    finally:
        d.stop()


def test_a_rename_waiting_on_the_token_cannot_undo_an_admin(daemon: Daemon, admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    app = new_app(daemon, admin_raw, [g])
    key = ok(
        app.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("k"), "obj_type": "AES", "key_ops": ["ENCRYPT", "EXPORT"]},
        )
    )
    kid, new_name = key["kid"], unique("renamed")
    with token_held(daemon):
        rename = app.conn.send("PATCH", f"/crypto/v1/keys/{kid}", {"name": new_name})
        token_parked(daemon)  # the rename is at the token first
        lock = admin_raw.send(
            "PATCH", f"/crypto/v1/keys/{kid}", {"enabled": False, "key_ops": ["ENCRYPT"]}
        )
    assert replies(app.conn, 1)[rename]["status"] == 200
    out = replies(admin_raw, 1)[lock]
    assert out["status"] == 200, out
    final = ok(admin_raw.call("GET", f"/crypto/v1/keys/{kid}"))
    assert final["name"] == new_name
    assert final["enabled"] is False
    assert final["key_ops"] == ["ENCRYPT"]
    err(app.call("POST", "/crypto/v1/keys/export", {"kid": kid}), "key_op_not_permitted")
    # The token agrees: the object is no longer extractable, even with the PIN.
    read = daemon.read_secret(kid)
    assert read.returncode != 0 and not read.stdout, read


def test_a_rename_waiting_on_the_token_cannot_bring_a_deleted_key_back(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        g = new_group(admin)
        app = new_app(d, admin, [g])
        kid = ok(app.call("POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES"}))[
            "kid"
        ]
        with token_held(d):
            rename = app.conn.send("PATCH", f"/crypto/v1/keys/{kid}", {"name": unique("r")})
            token_parked(d)  # the rename is at the token first (else the delete wins: 404)
            delete = admin.send("DELETE", f"/crypto/v1/keys/{kid}")
        assert replies(app.conn, 1)[rename]["status"] == 200
        assert replies(admin, 1)[delete]["status"] == 204
        err(admin.call("GET", f"/crypto/v1/keys/{kid}"), "not_found")
        assert d.stop() == 0
        d.start()
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        err(admin.call("GET", f"/crypto/v1/keys/{kid}"), "not_found")
        assert kid not in str(ok(admin.call("GET", "/crypto/v1/keys")))
    finally:
        d.stop()


def test_a_transient_key_is_its_makers_even_on_a_shared_connection(
    daemon: Daemon, admin_raw: Raw
) -> None:
    g1, g2 = new_group(admin_raw), new_group(admin_raw)
    a, b = new_app(daemon, admin_raw, [g1]), new_app(daemon, admin_raw, [g2])
    token_a = a.conn.login(a.api_key)["access_token"]
    token_b = b.conn.login(b.api_key)["access_token"]
    shared = Raw(daemon.socket)  # one connection, two principals by per-request auth
    try:
        made = ok(
            shared.call(
                "POST",
                "/crypto/v1/keys",
                {"name": "t", "obj_type": "AES", "transient": True},
                auth=token_a,
            )
        )
        tk = made["transient_key"]
        enc = ok(
            shared.call(
                "POST",
                "/crypto/v1/encrypt",
                {"key": {"transient_key": tk}, "alg": "AES", "plain": b"a's secret"},
                auth=token_a,
            )
        )
        # B can neither persist, use nor list A's transient key.
        err(
            shared.call(
                "POST",
                "/crypto/v1/keys/persist",
                {"key": {"transient_key": tk}, "name": unique("stolen"), "group_id": g2},
                auth=token_b,
            ),
            "not_found",
        )
        err(
            shared.call(
                "POST",
                "/crypto/v1/decrypt",
                {"key": {"kid": tk}, "alg": "AES", "mode": "GCM", **_sealed(enc)},
                auth=token_b,
            ),
            "not_found",
        )
        listed = ok(shared.call("GET", "/crypto/v1/keys", {}, auth=token_b))
        assert tk not in [k["kid"] for k in listed]
        # A still can (the allowed direction).
        assert tk in [k["kid"] for k in ok(shared.call("GET", "/crypto/v1/keys", {}, auth=token_a))]
        kept = ok(
            shared.call(
                "POST",
                "/crypto/v1/keys/persist",
                {"key": {"transient_key": tk}, "name": unique("kept")},
                auth=token_a,
            )
        )
        assert kept["group_id"] == g1
    finally:
        shared.close()


def test_a_login_checked_before_a_reset_gets_no_session(daemon: Daemon, admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    app = new_app(daemon, admin_raw, [g])
    app_id = app.id
    # Fill both scrypt slots with failing logins so the real one is still hashing
    # (or queued) when the admin resets the secret.
    flood = [Raw(daemon.socket) for _ in range(16)]
    try:
        for c in flood:
            c.send("POST", "/sys/v1/session/auth", {"app_id": app_id, "secret": "wrong"})
        victim = Raw(daemon.socket)
        rid = victim.send("POST", "/sys/v1/session/auth", {"api_key": app.api_key})
        reset = ok(admin_raw.call("POST", f"/sys/v1/apps/{app_id}/reset_secret"))
        late = victim.recv()
        assert late["id"] == rid
        assert late["status"] == 401, late
        # The new key works (the allowed direction).
        fresh = Raw(daemon.socket)
        fresh.login(reset["credential"]["api_key"])
        fresh.close()
        victim.close()
    finally:
        for c in flood:
            c.close()
