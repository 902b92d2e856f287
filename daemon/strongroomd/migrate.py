"""``strongroomd migrate --to postgresql://...``: one node's SQLite data into PostgreSQL.

The daemon must be stopped (the state directory's lock is taken). First a
consistent copy of the SQLite file is written next to it (0600), then the
schema is brought up to date on both sides, and every row (groups, apps and
admins, keys, plugins, the whole audit chain with its hashes) is copied in one
PostgreSQL transaction into an empty database. Nothing is changed on the token:
kids stay as they are, and the keys' material never moves, so what was
encrypted before decrypts after. The SQLite file is left as it was.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from strongroomd.config import Config, ConfigError, redact_url

#: Tables copied, in an order that needs no foreign key to be deferred.
TABLES = ("groups", "principals", "keys", "plugins", "audit")


def backup_sqlite(db_path: Path) -> Path:
    """A consistent copy of the database file (SQLite's online backup), 0600."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = db_path.with_name(f"{db_path.name}.before-postgresql-{stamp}")
    out, n = base, 1
    while True:
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            n += 1
            out = base.with_name(f"{base.name}.{n}")
    os.close(fd)
    src = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(out)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return out


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]


def migrate(cfg: Config, url: str) -> dict[str, Any]:
    """Copy the state directory's SQLite database into the (empty) PostgreSQL at ``url``."""
    import psycopg

    from strongroomd.pgstore import PgStore

    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("--to must be a postgresql:// URL")
    if not cfg.db_path.is_file():
        raise ConfigError(f"no database at {cfg.db_path} to migrate")
    try:
        pg = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot connect to {redact_url(url)}: {exc}") from None
    with pg:
        PgStore._migrate_pg(pg)
        for table in TABLES:  # checked again in the copy's transaction
            (n,) = pg.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
            if n:
                raise ConfigError(
                    f"{redact_url(url)} already holds {table}: migrate into an empty database"
                )
        saved = backup_sqlite(cfg.db_path)
        counts = _copy(cfg.db_path, pg, url)
    return {"backup": str(saved), **counts}


def _copy(db_path: Path, pg: Any, url: str) -> dict[str, int]:
    """Every row, in one PostgreSQL transaction; the chain's head set to its last record."""
    from strongroomd.pgstore import FIRST_START_LOCK
    from strongroomd.store import Store

    # The SQLite schema up to date first (its own migrations), so columns match.
    db = sqlite3.connect(db_path, isolation_level=None)
    counts: dict[str, int] = {}
    try:
        Store._migrate(db)
        with pg.transaction():
            # A node starting on this database meanwhile waits, then finds the admin
            # copied here; one that came first makes the check below refuse.
            pg.execute("SELECT pg_advisory_xact_lock(%s)", (FIRST_START_LOCK,))
            for table in TABLES:
                (n,) = pg.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
                if n:
                    raise ConfigError(
                        f"{redact_url(url)} already holds {table}: migrate into an empty database"
                    )
            for table in TABLES:
                cols = _columns(db, table)
                rows = db.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall()  # noqa: S608
                marks = ", ".join(["%s"] * len(cols))
                sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})"  # noqa: S608
                with pg.cursor() as cur:
                    cur.executemany(sql, rows)
                counts[table] = len(rows)
            head = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            if head is not None:  # the chain goes on from the last record copied
                pg.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE one = 1", head)
    finally:
        db.close()
    return counts
