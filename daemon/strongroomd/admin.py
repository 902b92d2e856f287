"""Offline administration: rotate the admin API key.

``strongroomd admin rotate`` runs with the daemon stopped (it takes the state
directory's lock, so it cannot race a running daemon): a fresh secret, its
salted hash in the database, the key in ``<state_dir>/admin.key`` (0600) and
an ``admin.rotate`` record appended to the audit chain. The old key stops
working at once; sessions do not survive a restart anyway.
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
            raise ConfigError(
                f"a daemon is running on {cfg.state_dir}; stop it first "
                "(systemctl stop strongroomd)"
            ) from None
        db = sqlite3.connect(cfg.db_path, isolation_level=None)
        try:
            return _rotate(cfg, db)
        finally:
            db.close()
    finally:
        os.close(lock)


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
