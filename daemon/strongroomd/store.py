"""SQLite metadata: groups, principals, key rows, plugins, audit records.

The daemon is the database's only writer, so every row it serves from is
kept in memory and written through: requests never wait on SQLite to read.
Writes run on one thread of their own (fsync must not stall the event loop)
and are durable (WAL, ``synchronous=FULL``) before the call returns.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS principals (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '', groups TEXT NOT NULL DEFAULT '[]',
    default_group TEXT, secret_hash BLOB, salt BLOB, enabled INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    kid TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, obj_type TEXT NOT NULL,
    key_size INTEGER, elliptic_curve TEXT, key_ops TEXT NOT NULL, group_id TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '', custom_metadata TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL, creator TEXT NOT NULL, enabled INTEGER NOT NULL,
    pub_key BLOB, public_only INTEGER NOT NULL DEFAULT 0, missing INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS plugins (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '',
    code TEXT NOT NULL, groups TEXT NOT NULL, default_group TEXT, enabled INTEGER NOT NULL,
    version INTEGER NOT NULL, limits TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, actor_kind TEXT, actor_id TEXT,
    action TEXT NOT NULL, object_id TEXT, status INTEGER NOT NULL, code TEXT,
    invocation_id TEXT, detail TEXT, prev_hash BLOB, hash BLOB);
CREATE INDEX IF NOT EXISTS audit_object ON audit(object_id);
CREATE INDEX IF NOT EXISTS audit_actor ON audit(actor_id);
CREATE INDEX IF NOT EXISTS audit_invocation ON audit(invocation_id);
"""


def now_stamp() -> str:
    """DSM's timestamp form, e.g. 20261126T154900Z."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


@dataclass(slots=True)
class GroupRow:
    id: str
    name: str
    description: str
    created_at: str


@dataclass(slots=True)
class PrincipalRow:
    id: str
    kind: str  # "admin" | "app"
    name: str
    description: str
    groups: list[str]
    default_group: str | None
    secret_hash: bytes | None
    salt: bytes | None
    enabled: bool
    created_at: str


@dataclass(slots=True)
class KeyRow:
    kid: str
    name: str
    obj_type: str
    key_size: int | None
    elliptic_curve: str | None
    key_ops: list[str]
    group_id: str
    description: str
    custom_metadata: dict[str, str]
    created_at: str
    creator: dict[str, str]
    enabled: bool
    pub_key: bytes | None
    public_only: bool
    missing: bool = False
    transient: bool = field(default=False)


@dataclass(slots=True)
class PluginRow:
    id: str
    name: str
    description: str
    code: str
    groups: list[str]
    default_group: str | None
    enabled: bool
    version: int
    limits: dict[str, Any]
    created_at: str
    updated_at: str


_JSON = {"groups", "key_ops", "custom_metadata", "creator", "limits"}
_BOOL = {"enabled", "public_only", "missing"}


def _to_db(row: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    out = {}
    for f in fields(row):
        if f.name in skip:
            continue
        v = getattr(row, f.name)
        out[f.name] = json.dumps(v) if f.name in _JSON else (int(v) if f.name in _BOOL else v)
    return out


def _from_db(cls: type[T], rec: sqlite3.Row) -> T:
    kw = {}
    for k in rec.keys():  # noqa: SIM118 - sqlite3.Row is not a mapping
        v = rec[k]
        kw[k] = json.loads(v) if k in _JSON else (bool(v) if k in _BOOL else v)
    return cls(**kw)


class Store:
    """In-memory rows, written through to SQLite on a dedicated thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self.groups: dict[str, GroupRow] = {}
        self.principals: dict[str, PrincipalRow] = {}
        self.keys: dict[str, KeyRow] = {}
        self.key_names: dict[str, str] = {}
        self.plugins: dict[str, PluginRow] = {}

    # -- lifecycle ----------------------------------------------------------
    def _open(self) -> None:
        fresh = not self.path.exists()
        if fresh:
            self.path.touch(mode=0o600)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        self._db = db
        for rec in db.execute("SELECT * FROM groups"):
            self.groups[rec["id"]] = _from_db(GroupRow, rec)
        for rec in db.execute("SELECT * FROM principals"):
            self.principals[rec["id"]] = _from_db(PrincipalRow, rec)
        for rec in db.execute("SELECT * FROM keys"):
            row = _from_db(KeyRow, rec)
            self.keys[row.kid] = row
            self.key_names[row.name] = row.kid
        for rec in db.execute("SELECT * FROM plugins"):
            self.plugins[rec["id"]] = _from_db(PluginRow, rec)

    async def open(self) -> None:
        await self._run(self._open)
        for suffix in ("-wal", "-shm"):
            p = self.path.with_name(self.path.name + suffix)
            if p.exists():
                p.chmod(0o600)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._pool.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _tx(self, statements: list[tuple[str, Any]]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def execute(self, statements: list[tuple[str, Any]]) -> None:
        await self._run(self._tx, statements)

    async def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        def q() -> list[sqlite3.Row]:
            assert self._db is not None
            return self._db.execute(sql, params).fetchall()

        return await self._run(q)

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn(db)`` on the database thread (for batched audit writes)."""
        assert self._db is not None
        db = self._db
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, db)

    # -- generic upsert/delete with cache --------------------------------------
    @staticmethod
    def _upsert(table: str, row: Any, skip: Iterable[str] = ()) -> tuple[str, Any]:
        d = _to_db(row, skip)
        cols = ", ".join(d)
        marks = ", ".join(f":{c}" for c in d)
        return f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({marks})", d  # noqa: S608

    async def put_group(self, row: GroupRow) -> None:
        await self.execute([self._upsert("groups", row)])
        self.groups[row.id] = row

    async def delete_group(self, gid: str) -> None:
        await self.execute([("DELETE FROM groups WHERE id=?", (gid,))])
        self.groups.pop(gid, None)

    async def put_principal(self, row: PrincipalRow) -> None:
        await self.execute([self._upsert("principals", row)])
        self.principals[row.id] = row

    async def delete_principal(self, pid: str) -> None:
        await self.execute([("DELETE FROM principals WHERE id=?", (pid,))])
        self.principals.pop(pid, None)

    async def put_key(self, row: KeyRow) -> None:
        assert not row.transient
        await self.execute([self._upsert("keys", row, skip=("transient",))])
        old = self.keys.get(row.kid)
        if old is not None and old.name != row.name:
            self.key_names.pop(old.name, None)
        self.keys[row.kid] = row
        self.key_names[row.name] = row.kid

    async def delete_key(self, kid: str) -> None:
        await self.execute([("DELETE FROM keys WHERE kid=?", (kid,))])
        row = self.keys.pop(kid, None)
        if row is not None:
            self.key_names.pop(row.name, None)

    async def put_plugin(self, row: PluginRow) -> None:
        await self.execute([self._upsert("plugins", row)])
        self.plugins[row.id] = row

    async def delete_plugin(self, pid: str) -> None:
        await self.execute([("DELETE FROM plugins WHERE id=?", (pid,))])
        self.plugins.pop(pid, None)
