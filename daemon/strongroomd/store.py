"""SQLite metadata: groups, principals, key rows, plugins, audit records.

Every row the daemon serves from is kept in memory and written through:
requests never wait on SQLite to read. Writes run on one thread of their own
(fsync must not stall the event loop) and are durable (WAL,
``synchronous=FULL``) before the call returns.

Rows are values: a change writes a new row object, never edits a cached one.
Each row carries a ``version``; a change is a compare-and-set on it
(``UPDATE ... WHERE id = ? AND version = ?``), a new row is a plain
``INSERT`` and a name taken is a :class:`~strongroomd.errors.Conflict`, never
a silent replace. :meth:`Store.change` is the one way to change a row: it
serializes the writers of one object, applies the change to the row as it is
*now* (not as some handler read it before an ``await``), and refuses a write
whose version moved underneath it (another daemon on the same database).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import contextvars
import functools
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from strongroomd.errors import Conflict, NotFound

T = TypeVar("T")
R = TypeVar("R", "GroupRow", "PrincipalRow", "KeyRow", "PluginRow")

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

#: Schema changes after the first schema, in order; ``PRAGMA user_version``
#: counts how many a database has had.
MIGRATIONS: list[str] = [
    # 1: a row version on every table whose rows change (compare-and-set); a
    # plugin's own version already counts its changes and serves as its row version.
    """
    ALTER TABLE groups ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE principals ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE keys ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    """,
    # 2: key lifecycle (DSM's states and dates, links between versions, rotation).
    """
    ALTER TABLE keys ADD COLUMN state TEXT NOT NULL DEFAULT 'Active';
    ALTER TABLE keys ADD COLUMN activation_date TEXT;
    ALTER TABLE keys ADD COLUMN deactivation_date TEXT;
    ALTER TABLE keys ADD COLUMN compromise_date TEXT;
    ALTER TABLE keys ADD COLUMN destruction_date TEXT;
    ALTER TABLE keys ADD COLUMN deletion_date TEXT;
    ALTER TABLE keys ADD COLUMN revocation_reason TEXT;
    ALTER TABLE keys ADD COLUMN links TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE keys ADD COLUMN rotation_policy TEXT;
    ALTER TABLE keys ADD COLUMN scheduled_rotation TEXT;
    """,
    # 3: DSM's app permissions per group ({group id: [permission, ...]}). Every app
    # keeps exactly the rights it had: all of DSM's permissions in each of its groups.
    """
    ALTER TABLE principals ADD COLUMN permissions TEXT NOT NULL DEFAULT '{}';
    UPDATE principals SET permissions = (
        SELECT json_group_object(g.value, json('["SIGN","VERIFY","ENCRYPT","DECRYPT",
            "WRAPKEY","UNWRAPKEY","DERIVEKEY","MACGENERATE","MACVERIFY","EXPORT","MANAGE",
            "AGREEKEY","MASKDECRYPT","AUDIT","TRANSFORM","CREATE_SOBJECTS","COPY_SOBJECTS",
            "ROTATE_SOBJECTS","ACTIVATE_SOBJECTS","REVOKE_SOBJECTS","REVERT_SOBJECTS",
            "MOVE_SOBJECTS","UPDATE_SOBJECTS_PROFILE","UPDATE_SOBJECTS_ENABLED_STATE",
            "UPDATE_SOBJECT_POLICIES","UPDATE_KEY_OPS","DELETE_KEY_MATERIAL","DELETE_SOBJECTS",
            "DESTROY_SOBJECTS","RESTORE_EXTERNAL_SOBJECTS","CALCULATE_DIGEST","ENCAPSULATE",
            "DECAPSULATE"]'))
        FROM json_each(principals.groups) AS g)
    WHERE kind = 'app';
    """,
    # plugins: the origins each one's request{} may reach (issue 11); none by default.
    """
    ALTER TABLE plugins ADD COLUMN request_allowlist TEXT NOT NULL DEFAULT '[]';
    """,
    # 5: statistics read a time range of the audit log (api/stats.py), not all of it.
    """
    CREATE INDEX IF NOT EXISTS audit_time ON audit(time);
    """,
]


STAMP = "%Y%m%dT%H%M%SZ"


def now_stamp(t: float | None = None) -> str:
    """DSM's timestamp form, e.g. 20261126T154900Z."""
    return time.strftime(STAMP, time.gmtime(t))


@functools.lru_cache(maxsize=4096)
def stamp_time(stamp: str) -> float:
    """Seconds since the epoch of a DSM timestamp (ValueError if it is not one).

    Cached: every key use compares its dates with the clock, and ``strptime``
    took 7.7 us of the event loop's time per request.
    """
    return float(calendar.timegm(time.strptime(stamp, STAMP)))


@dataclass(slots=True)
class GroupRow:
    id: str
    name: str
    description: str
    created_at: str
    version: int = 1


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
    version: int = 1
    #: An app's DSM permissions per group: {group id: [permission, ...]}.
    permissions: dict[str, list[str]] = field(default_factory=dict)


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
    version: int = 1
    #: DSM's lifecycle: PreActive, Active, Deactivated, Compromised, Destroyed (the
    #: state as stored; dates can make it effectively later, see keyring.state_of).
    state: str = "Active"
    activation_date: str | None = None
    deactivation_date: str | None = None
    compromise_date: str | None = None
    destruction_date: str | None = None
    #: Set while deletion is scheduled: the key is unusable and goes at that time.
    deletion_date: str | None = None
    revocation_reason: dict[str, Any] | None = None
    #: DSM's KeyLinks: "replacement" / "replaced" between versions of a rotated key.
    links: dict[str, Any] = field(default_factory=dict)
    rotation_policy: dict[str, Any] | None = None
    scheduled_rotation: str | None = None


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
    #: Origins its request{} may reach (strongroomd.outbound); empty: none.
    request_allowlist: list[str] = field(default_factory=list)


_JSON = {
    "groups",
    "permissions",
    "key_ops",
    "custom_metadata",
    "creator",
    "limits",
    "request_allowlist",
    "links",
    "revocation_reason",
    "rotation_policy",
}
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
        if k in _JSON:
            kw[k] = json.loads(v) if v is not None else None
        else:
            kw[k] = bool(v) if k in _BOOL else v
    return cls(**kw)


_TABLES: dict[type, tuple[str, str]] = {
    GroupRow: ("groups", "id"),
    PrincipalRow: ("principals", "id"),
    KeyRow: ("keys", "kid"),
    PluginRow: ("plugins", "id"),
}
_WHAT = {GroupRow: "group", PrincipalRow: "app", KeyRow: "key", PluginRow: "plugin"}
_SKIP = ("transient",)


class Stale(Conflict):
    """The row changed underneath a write (another daemon wrote it first)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the {what} was changed concurrently; read it again and retry")


def _pk(row: Any) -> str:
    return getattr(row, _TABLES[type(row)][1])


#: A row change, as other nodes hear of it: (table, primary key).
Note = tuple[str, str]


def _note(row: Any) -> Note:
    return (_TABLES[type(row)][0], _pk(row))


#: Nodes that did not confirm the changes of the current request
#: (shared database only: the dispatcher sets a fresh list per request and adds
#: it to the answer as ``unconfirmed_nodes``).
unconfirmed: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "unconfirmed", default=None
)


class SharedStore(Protocol):
    """What only a store that several nodes share has
    (:class:`strongroomd.pgstore.PgStore`): observers of other nodes' changes,
    sessions in the database, key reservations, the one audit chain, the
    clock's lock. Reached through :attr:`Store.sharing`, which is None on
    SQLite, so mypy checks every call against these signatures and the code
    that makes them says what it does alone."""

    #: Called (table, id, old row or None, new row or None) after another node's change.
    observers: list[Callable[[str, str, Any, Any], Any]]
    #: Called with another node's message about sessions ({"s": hash}, {"p": id}, {"all": True}).
    session_observers: list[Callable[[dict[str, Any]], None]]

    async def session_put(
        self, token: str, principal_id: str, expires: float, secret_hash: bytes | None
    ) -> bool: ...
    async def session_get(self, token: str) -> tuple[str, float] | None: ...
    async def session_refresh(self, token: str, expires: float) -> None: ...
    async def session_drop(
        self, token: str | None = None, principal_id: str | None = None
    ) -> None: ...
    async def reserve_kid(self, kid: str) -> None: ...
    async def release_kid(self, kid: str) -> None: ...
    async def claimed(self, kids: set[str], grace: float = 60.0) -> set[str]: ...
    async def append_audit(
        self, batch: list[tuple[Any, ...]], stamp: Callable[[float], str]
    ) -> tuple[int, bytes]: ...
    async def last_audit_of_node(self, exclude: Sequence[str]) -> Any: ...
    async def leads(self) -> bool: ...


class Store:
    """In-memory rows, written through to SQLite on a dedicated thread."""

    #: Whether other daemons share this database (``strongroomd.pgstore``).
    shared = False

    @property
    def sharing(self) -> SharedStore | None:
        """This store's shared-database side (:class:`SharedStore`), or None alone."""
        return None

    #: Whether this node may serve key use and changes (always, alone).
    live = True
    #: What the database raises for a taken name (UNIQUE).
    IntegrityError: type[Exception] | tuple[type[Exception], ...] = sqlite3.IntegrityError
    #: Whose SQL :meth:`reader` speaks (``sqlite`` or ``postgresql``).
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self.groups: dict[str, GroupRow] = {}
        self.principals: dict[str, PrincipalRow] = {}
        self.keys: dict[str, KeyRow] = {}
        self.key_names: dict[str, str] = {}
        self.plugins: dict[str, PluginRow] = {}
        self._locks: dict[str, list[Any]] = {}  # object id -> [lock, wanted by]
        #: Held across a check and the write it guards when the check spans rows
        #: (a group is empty, a name is free among apps), so groups, apps and
        #: plugins change one at a time. They change rarely; keys never take it.
        self.catalog = asyncio.Lock()

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
        self._migrate(db)
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

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring the schema up to date, one numbered step per transaction."""
        db.executescript(SCHEMA)
        (done,) = db.execute("PRAGMA user_version").fetchone()
        for n, step in enumerate(MIGRATIONS[done:], start=done + 1):
            db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in filter(str.strip, step.split(";")):
                    db.execute(stmt)
                db.execute(f"PRAGMA user_version = {n}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

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

    @contextlib.asynccontextmanager
    async def first_start(self) -> AsyncIterator[None]:
        """Held while start-up decides whether to make the admin and makes it.
        Nothing to hold here: one daemon per state directory (its flock), and so
        per SQLite file. Several nodes on one database hold a lock in it
        (:meth:`strongroomd.pgstore.PgStore.first_start`)."""
        yield

    def _tx(self, statements: list[tuple[str, Any]], checked: list[str] | None = None) -> list[int]:
        """Run statements in one transaction; the row counts, in order.

        ``checked``: the first ``len(checked)`` statements are compare-and-sets
        of those kinds of row: one that touches no row rolls everything back
        (:class:`Stale`).
        """
        db = self._db
        assert db is not None
        checked = checked or []
        db.execute("BEGIN IMMEDIATE")
        try:
            counts = []
            for i, (sql, params) in enumerate(statements):
                n = db.execute(sql, params).rowcount
                if i < len(checked) and n != 1:
                    raise Stale(checked[i])
                counts.append(n)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return counts

    async def execute(
        self,
        statements: list[tuple[str, Any]],
        checked: list[str] | None = None,
        notes: Sequence[Note] = (),
    ) -> list[int]:
        """Statements in one transaction (see :meth:`_tx`); ``notes`` say what changed,
        for a store that other nodes share (ignored here: one process)."""
        return await self._run(self._tx, statements, checked)

    async def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        def q() -> list[sqlite3.Row]:
            assert self._db is not None
            return self._db.execute(sql, params).fetchall()

        return await self._run(q)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Any]:
        """A read-only connection of its own (DB-API, :attr:`dialect`'s SQL), for a
        long read in a worker thread that must not hold up the store's writer."""
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            yield db
        finally:
            db.close()

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn(db)`` on the database thread (for batched audit writes)."""
        assert self._db is not None
        db = self._db
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, db)

    async def verify_audit(self, head: tuple[int, bytes] | None) -> tuple[int, Any, list[int]]:
        """(records checked, first break or None, unclean stops) of the audit chain,
        read on a connection of its own (this thread keeps writing meanwhile)."""
        from strongroomd.audit import unclean_stops, verify_file

        checked, brk = await asyncio.to_thread(verify_file, self.path, head)
        return checked, brk, await asyncio.to_thread(unclean_stops, self.path)

    # -- rows: insert, compare-and-set, delete ---------------------------------
    def _cache(self, cls: type) -> dict[str, Any]:
        return {
            GroupRow: self.groups,
            PrincipalRow: self.principals,
            KeyRow: self.keys,
            PluginRow: self.plugins,
        }[cls]

    def _remember(self, row: Any) -> None:
        if isinstance(row, KeyRow):
            old = self.keys.get(row.kid)
            if old is not None and old.name != row.name:
                self.key_names.pop(old.name, None)
            self.key_names[row.name] = row.kid
        self._cache(type(row))[_pk(row)] = row

    def _forget(self, row: Any) -> None:
        self._cache(type(row)).pop(_pk(row), None)
        if isinstance(row, KeyRow) and self.key_names.get(row.name) == row.kid:
            del self.key_names[row.name]

    @contextlib.asynccontextmanager
    async def writing(self, object_id: str) -> AsyncIterator[None]:
        """Be the one writer of an object (its lock exists only while wanted)."""
        entry = self._locks.get(object_id)
        if entry is None:
            entry = self._locks[object_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[object_id]

    async def insert(self, row: R) -> R:
        """Add a new row; a taken name or id is a 409, never a replace."""
        assert not getattr(row, "transient", False)
        table, _ = _TABLES[type(row)]
        d = _to_db(row, _SKIP)
        cols, marks = ", ".join(d), ", ".join(f":{c}" for c in d)
        sql = f"INSERT INTO {table} ({cols}) VALUES ({marks})"  # noqa: S608
        try:
            await self.execute([(sql, d)], notes=[_note(row)])
        except self.IntegrityError:
            raise Conflict(
                f"a {_WHAT[type(row)]} named {row.name!r} exists", code="name_exists"
            ) from None
        self._remember(row)
        return row

    @staticmethod
    def _update_sql(old: Any, new: Any) -> tuple[str, dict[str, Any]]:
        table, pk = _TABLES[type(old)]
        d = _to_db(new, _SKIP)
        sets = ", ".join(f"{c} = :{c}" for c in d if c != pk)
        sql = f"UPDATE {table} SET {sets} WHERE {pk} = :{pk} AND version = :_was"  # noqa: S608
        return sql, {**d, "_was": old.version}

    async def _write(self, old: R, new: R) -> R:
        try:
            await self.execute([self._update_sql(old, new)], [_WHAT[type(old)]], notes=[_note(old)])
        except self.IntegrityError:
            raise Conflict(
                f"a {_WHAT[type(old)]} named {new.name!r} exists", code="name_exists"
            ) from None
        self._remember(new)
        return new

    async def commit(self, changes: list[tuple[Any, Any]], inserts: list[Any]) -> None:
        """Several rows in one transaction: each change a compare-and-set (the new
        row's version is the old one's + 1, set here), then the inserts. All or
        nothing: a key rotation renames the old version and adds the new one at once."""
        news = [replace(new, version=old.version + 1) for old, new in changes]
        statements = [
            self._update_sql(old, new) for (old, _), new in zip(changes, news, strict=True)
        ]
        for row in inserts:
            table, _ = _TABLES[type(row)]
            d = _to_db(row, _SKIP)
            cols, marks = ", ".join(d), ", ".join(f":{c}" for c in d)
            statements.append((f"INSERT INTO {table} ({cols}) VALUES ({marks})", d))  # noqa: S608

        notes = [_note(old) for old, _ in changes] + [_note(row) for row in inserts]
        try:
            await self.execute(statements, [_WHAT[type(old)] for old, _ in changes], notes)
        except self.IntegrityError:
            raise Conflict("a name is taken", code="name_exists") from None
        for row in [*news, *inserts]:
            self._remember(row)

    async def change(self, cls: type[R], object_id: str, fn: Callable[[R], R | Awaitable[R]]) -> R:
        """Change one row: ``fn`` gets the row as it is now and returns the new one.

        Writers of one object run one at a time, and ``fn`` sees the row after
        the previous writer's change, so nothing a handler read before an
        ``await`` is ever written back. ``fn`` may be async (e.g. to change the
        token first); it raises to change nothing.
        """
        async with self.writing(object_id):
            cur = self._cache(cls).get(object_id)
            if cur is None:
                raise NotFound(f"no such {_WHAT[cls]}")
            new = fn(cur)
            if isinstance(new, Awaitable):
                new = await new
            if self._cache(cls).get(object_id) is not cur:  # changed behind the lock
                raise Stale(_WHAT[cls])
            return await self._write(cur, replace(new, version=cur.version + 1))

    async def delete(self, row: R) -> None:
        """Remove a row, if it is still the version the caller decided on."""
        table, pk = _TABLES[type(row)]
        sql = f"DELETE FROM {table} WHERE {pk} = ? AND version = ?"  # noqa: S608
        await self.execute([(sql, (_pk(row), row.version))], [_WHAT[type(row)]], notes=[_note(row)])
        self._forget(row)
