"""Rotate the admin API key, with the daemon running or stopped.

``strongroomd admin rotate`` first tries the state directory's lock. When a
daemon holds it, the rotation goes through that daemon: the command logs in
over its socket with the current ``admin.key`` and calls
``POST /sys/v1/admin/rotate`` (:mod:`strongroomd.api.admin`); the daemon, which
alone writes the database while it runs, changes the hash, writes the new
``admin.key`` (0600) and audits the request. (A lost or broken ``admin.key``
cannot log in: then stop the daemon and rotate offline.)

Offline, with the lock held so no daemon can start meanwhile: a fresh secret,
its salted hash in the database, the key in ``<state_dir>/admin.key`` (0600)
and an ``admin.rotate`` record appended to the audit chain. Either way the old
key stops working at once.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path

from strongroomd import state
from strongroomd.audit import COLUMNS, GENESIS, record_hash
from strongroomd.auth import api_key, new_secret
from strongroomd.config import Config, ConfigError


def rotate(cfg: Config) -> Path:
    """Give the admin a new API key; return the file that holds it."""
    if not cfg.db_path.is_file():
        raise ConfigError(f"no database at {cfg.db_path}: start the daemon once first")
    lock = os.open(cfg.state_dir / "strongroomd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _rotate_online(cfg)
        db = sqlite3.connect(cfg.db_path, isolation_level=None)
        try:
            return _rotate(cfg, db)
        finally:
            db.close()
    finally:
        os.close(lock)


def _rotate_online(cfg: Config) -> Path:
    from strongroom import Client, ConnectError, StrongroomError, Unauthenticated

    offline = "stop the daemon and run `strongroomd admin rotate` again to rotate offline"
    try:
        key = state.read_secret(cfg.admin_key_path)
    except (OSError, ConfigError):
        raise ConfigError(
            f"a daemon is running on {cfg.state_dir}, and {cfg.admin_key_path} cannot be read "
            f"to ask it; {offline}"
        ) from None
    try:
        with Client(cfg.socket_path, api_key=key) as client:
            answer = client.request("POST", "/sys/v1/admin/rotate")
    except Unauthenticated:
        raise ConfigError(f"{cfg.admin_key_path} is not a working admin key; {offline}") from None
    except ConnectError as exc:
        raise ConfigError(
            f"a daemon holds {cfg.state_dir} but its socket {cfg.socket_path} does not answer "
            f"({exc}); give --socket, or {offline}"
        ) from None
    except StrongroomError as exc:
        raise ConfigError(f"the daemon refused the rotation: {exc}") from None
    return Path(answer["key_file"])


def _rotate(cfg: Config, db: sqlite3.Connection) -> Path:
    rows = db.execute(
        "SELECT id FROM principals WHERE kind = 'admin' ORDER BY created_at"
    ).fetchall()
    if not rows:
        raise ConfigError("there is no admin yet: start the daemon once to make one")
    admin_id = rows[0][0]
    secret, salt, digest = new_secret()
    # The new key is on disk before the database changes: a crash in between
    # leaves the old key working and the new one unused in admin.key.new.
    pending = cfg.admin_key_path.with_name("admin.key.new")
    state.write_secret(pending, api_key(admin_id, secret) + "\n")
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            "UPDATE principals SET secret_hash = ?, salt = ? WHERE id = ?", (digest, salt, admin_id)
        )
        last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
        t = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        rec = (seq, stamp, "admin", admin_id, "admin.rotate", admin_id, 200, None, None, None)
        marks = ", ".join("?" * (len(COLUMNS) + 2))
        db.execute(
            f"INSERT INTO audit ({', '.join(COLUMNS)}, prev_hash, hash) VALUES ({marks})",  # noqa: S608
            (*rec, prev, record_hash(prev, rec)),
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, cfg.admin_key_path)
    return cfg.admin_key_path
