"""PostgreSQL metadata for several daemons (nodes) sharing one database and one token.

The same rows, caches and compare-and-set writes as :class:`strongroomd.store.Store`
(this is a subclass: only the database under it differs), plus what sharing needs:

- Every write's transaction ends with ``pg_notify('strongroom', ...)`` naming
  the rows it changed; PostgreSQL delivers it at commit, to every node
  listening. A node that hears of a change re-reads those rows and replaces its
  cached ones (never older than the one it has).
- A change is answered only once every live node confirmed it has applied it
  (a NOTIFY back), or after ``confirm_timeout`` with the nodes that have not
  (the answer's ``unconfirmed_nodes``). So a key made on one node is usable
  on every node the moment its creation is answered, and a disable, revoke,
  delete or key_ops narrowing is refused everywhere by then. Changes of one
  node's rows are rare next to key use; a round trip to the others (a few
  milliseconds) is what each costs.
- Nodes register in ``nodes`` with a heartbeat; "live" is a heartbeat newer
  than ``node_timeout``. A node that cannot reach the database, lost its
  listening connection, or has not caught up after reconnecting is not
  :attr:`live` and refuses key use and changes (503) until it has re-read
  every row it caches.
- Sessions live in ``sessions`` (a SHA-256 of the bearer token), so a session
  issued by one node works on all of them.
- The audit chain stays one chain: a batch takes the row lock on
  ``audit_head`` (``SELECT ... FOR UPDATE``), numbers and hashes its records
  after the current head, inserts them and moves the head, in one transaction.
- A group cannot be deleted on one node while another puts an app, a plugin
  or a key in it. A key's group is a foreign key (shared step 2). Apps and
  plugins hold their groups as a JSON list, which no foreign key can reference,
  so two triggers (shared step 3) give the same guarantee with row locks, in
  the transaction of the write itself (READ COMMITTED, PostgreSQL's default):
  a membership write (an app or plugin inserted, or its ``groups`` changed)
  first takes ``SELECT ... FOR SHARE`` on every group it names and fails
  (404, as for a group that does not exist) if one is missing; a group's
  DELETE holds the row's lock, and an AFTER trigger then looks, with a fresh
  snapshot, for an app or plugin naming it and fails (``409
  group_not_empty``) if there is one. Whichever locks the group's row first,
  the other waits for its commit and then sees it: the two cannot both
  succeed, and nothing is left naming a deleted group. Writes that leave
  ``groups`` unchanged take no lock. (On one node the catalog lock,
  :attr:`strongroomd.store.Store.catalog`, already serializes these checks
  and writes; the triggers hold across nodes.)
- ``pending_keys`` holds the kid of every key whose token object is being
  made, before it is made: a node's start-up reconcile never removes a token
  object another node is about to write the row of.

All database calls of a node run on one thread (like SQLite's); the
listening connection has a thread of its own that only hands notifications
to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pge

from strongroomd.errors import Conflict, NotFound, Unavailable
from strongroomd.store import (
    MIGRATIONS,
    GroupRow,
    KeyRow,
    Note,
    PluginRow,
    PrincipalRow,
    SharedStore,
    Stale,
    Store,
    _from_db,
    unconfirmed,
)

log = logging.getLogger("strongroomd.pgstore")
T = TypeVar("T")

CHANNEL = "strongroom"
#: Notifications waiting to be applied, at most; beyond, the node re-reads everything.
MAX_INBOX = 10_000
#: The advisory lock a node holds while it decides whether to make the admin
#: (PgStore.first_start); ``strongroomd migrate`` holds it while it copies.
FIRST_START_LOCK = 4242003
#: Seconds between heartbeats (a node is dead to the others after node_timeout).
HEARTBEAT = 1.0
#: A connection idle this long is checked (SELECT 1) before it is used again.
IDLE_CHECK = 1.0


_TABLE_ROWS: dict[str, tuple[type, str]] = {
    "groups": (GroupRow, "id"),
    "principals": (PrincipalRow, "id"),
    "keys": (KeyRow, "kid"),
    "plugins": (PluginRow, "id"),
}

#: The first schema, as SQLite's store.SCHEMA has it, in PostgreSQL's types.
BASE = """
CREATE TABLE groups (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL);
CREATE TABLE principals (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '', groups TEXT NOT NULL DEFAULT '[]',
    default_group TEXT, secret_hash BYTEA, salt BYTEA, enabled INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL);
CREATE TABLE keys (
    kid TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, obj_type TEXT NOT NULL,
    key_size INTEGER, elliptic_curve TEXT, key_ops TEXT NOT NULL, group_id TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '', custom_metadata TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL, creator TEXT NOT NULL, enabled INTEGER NOT NULL,
    pub_key BYTEA, public_only INTEGER NOT NULL DEFAULT 0, missing INTEGER NOT NULL DEFAULT 0);
CREATE TABLE plugins (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, description TEXT NOT NULL DEFAULT '',
    code TEXT NOT NULL, groups TEXT NOT NULL, default_group TEXT, enabled INTEGER NOT NULL,
    version INTEGER NOT NULL, limits TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL);
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY, time TEXT NOT NULL, actor_kind TEXT, actor_id TEXT,
    action TEXT NOT NULL, object_id TEXT, status INTEGER NOT NULL, code TEXT,
    invocation_id TEXT, detail TEXT, prev_hash BYTEA, hash BYTEA);
CREATE INDEX audit_object ON audit(object_id);
CREATE INDEX audit_actor ON audit(actor_id);
CREATE INDEX audit_invocation ON audit(invocation_id)
"""

#: What only a shared database has. Numbered apart from SQLite's migrations.
SHARED = [
    # 1: nodes, sessions, key reservations, the audit chain's head and writers.
    """
    CREATE TABLE nodes (id TEXT PRIMARY KEY, started TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat TIMESTAMPTZ NOT NULL DEFAULT now());
    CREATE TABLE sessions (token_hash BYTEA PRIMARY KEY, principal_id TEXT NOT NULL,
        expires DOUBLE PRECISION NOT NULL);
    CREATE INDEX sessions_principal ON sessions(principal_id);
    CREATE TABLE pending_keys (kid TEXT PRIMARY KEY, node TEXT NOT NULL,
        since TIMESTAMPTZ NOT NULL DEFAULT now());
    CREATE TABLE audit_head (one INTEGER PRIMARY KEY CHECK (one = 1), seq BIGINT NOT NULL,
        hash BYTEA NOT NULL);
    INSERT INTO audit_head (one, seq, hash)
        SELECT 1, coalesce(max(seq), 0),
               coalesce((SELECT hash FROM audit ORDER BY seq DESC LIMIT 1),
                        '\\x0000000000000000000000000000000000000000000000000000000000000000')
        FROM audit;
    ALTER TABLE audit ADD COLUMN node TEXT;
    ALTER TABLE audit ADD COLUMN origin TEXT UNIQUE
    """,
    # 2: a key's group exists, across nodes: one node's "the group is empty" check
    # and another's key creation in it cannot both succeed.
    """
    ALTER TABLE keys ADD CONSTRAINT keys_group_exists FOREIGN KEY (group_id)
        REFERENCES groups(id)
    """,
    # 3: an app's or plugin's groups exist, across nodes (the module's docstring says how).
    """
    CREATE FUNCTION strongroom_member_groups_exist() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        wanted TEXT[] := ARRAY(SELECT DISTINCT json_array_elements_text(NEW.groups::json));
        found INTEGER;
    BEGIN
        SELECT count(*) INTO found
            FROM (SELECT id FROM groups WHERE id = ANY(wanted) FOR SHARE) AS held;
        IF found < cardinality(wanted) THEN
            RAISE EXCEPTION 'a group of % % does not exist (deleted on another node)',
                TG_TABLE_NAME, NEW.id
                USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'member_groups_exist';
        END IF;
        RETURN NEW;
    END $$;
    CREATE FUNCTION strongroom_group_unused() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM principals WHERE groups::jsonb ? OLD.id)
           OR EXISTS (SELECT 1 FROM plugins WHERE groups::jsonb ? OLD.id) THEN
            RAISE EXCEPTION 'group % still has members (added on another node)', OLD.id
                USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'group_has_members';
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER principals_groups_exist BEFORE INSERT ON principals
        FOR EACH ROW EXECUTE FUNCTION strongroom_member_groups_exist();
    CREATE TRIGGER principals_groups_change BEFORE UPDATE ON principals
        FOR EACH ROW WHEN (OLD.groups IS DISTINCT FROM NEW.groups)
        EXECUTE FUNCTION strongroom_member_groups_exist();
    CREATE TRIGGER plugins_groups_exist BEFORE INSERT ON plugins
        FOR EACH ROW EXECUTE FUNCTION strongroom_member_groups_exist();
    CREATE TRIGGER plugins_groups_change BEFORE UPDATE ON plugins
        FOR EACH ROW WHEN (OLD.groups IS DISTINCT FROM NEW.groups)
        EXECUTE FUNCTION strongroom_member_groups_exist();
    CREATE TRIGGER groups_unused AFTER DELETE ON groups
        FOR EACH ROW EXECUTE FUNCTION strongroom_group_unused()
    """,
]


def _app_permissions() -> str:
    """SQLite's migration 3 in PostgreSQL: every app gets all of DSM's permissions
    in each of its groups (the list is taken from the SQLite step itself)."""
    m = re.search(r"json\('(\[.*?\])'\)", MIGRATIONS[2], re.S)
    assert m is not None, "migration 3 changed: give its PostgreSQL form here"
    everything = " ".join(m.group(1).split())
    return f"""
    ALTER TABLE principals ADD COLUMN permissions TEXT NOT NULL DEFAULT '{{}}';
    UPDATE principals SET permissions = coalesce((
        SELECT json_object_agg(g, '{everything}'::json)::text
        FROM json_array_elements_text(principals.groups::json) AS g), '{{}}')
    WHERE kind = 'app'
    """  # noqa: S608 - the project's own constant, not input


#: SQLite migrations that are more than schema changes, in PostgreSQL's words
#: (a step that only ALTERs or CREATEs is translated as it is).
PG_FORMS: dict[int, Callable[[], str]] = {3: _app_permissions}
_DDL = re.compile(r"^\s*(ALTER|CREATE|DROP)\b", re.I)


def migrations() -> list[tuple[str, str]]:
    """Every step, by name, in order: the base schema, SQLite's migrations (the same
    columns, translated), then the shared ones. Names, not one counter, so a
    migration added to SQLite's list later is applied here too, in its turn.
    A SQLite step that changes data needs its form in :data:`PG_FORMS`
    (tests/multinode/test_store.py fails until it has one)."""
    steps = [("base", BASE)]
    for n, sql in enumerate(MIGRATIONS, start=1):
        if n in PG_FORMS:
            steps.append((f"sqlite:{n}", PG_FORMS[n]()))
            continue
        stmts = [st for st in sql.split(";") if st.strip()]
        if not all(_DDL.match(st) for st in stmts):
            raise RuntimeError(f"SQLite migration {n} has no PostgreSQL form (pgstore.PG_FORMS)")
        steps.append((f"sqlite:{n}", _pg_types(sql)))
    steps += [(f"shared:{n}", sql) for n, sql in enumerate(SHARED, start=1)]
    return steps


def _pg_types(sql: str) -> str:
    return re.sub(r"\bBLOB\b", "BYTEA", sql)


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def pg_sql(sql: str) -> str:
    """SQLite's placeholders (``?``, ``:name``) as psycopg's (``%s``, ``%(name)s``)."""
    return _NAMED.sub(r"%(\1)s", sql.replace("?", "%s"))


class PgRow:
    """A result row that reads like ``sqlite3.Row``: by index, slice or column name."""

    __slots__ = ("_cols", "_values")

    def __init__(self, cols: dict[str, int], values: Sequence[Any]) -> None:
        self._cols, self._values = cols, tuple(values)

    def __getitem__(self, k: Any) -> Any:
        return self._values[self._cols[k]] if isinstance(k, str) else self._values[k]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Any:
        return iter(self._values)

    def keys(self) -> list[str]:
        return list(self._cols)


def _rows(cursor: Any) -> Callable[[Sequence[Any]], PgRow]:
    cols = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: PgRow(cols, values)


_DELETES_GROUP = re.compile(r"\s*DELETE\s+FROM\s+groups\b", re.I)


def _group_race(deleting: bool) -> Exception:
    """A group deleted on one node while another put a key, an app or a plugin in
    it (shared steps 2 and 3): the write that came second gets what one node
    answers in that order, 409 group_not_empty for the delete, 404 for a write
    into a group that is gone. (The database's own error says which constraint,
    not which side of it: ``deleting`` does.)"""
    if deleting:
        return Conflict(
            "the group has keys or members (added on another node meanwhile)",
            code="group_not_empty",
        )
    return NotFound("no such group (deleted on another node meanwhile)")


#: A session, stored only while its principal is enabled with the secret checked
#: (the principal's row share-locked meanwhile: PgStore.session_put says why).
SESSION_PUT = (
    "INSERT INTO sessions (token_hash, principal_id, expires) "
    "SELECT %s, id, %s FROM principals WHERE id = %s AND enabled = 1 "
    "AND secret_hash = %s FOR SHARE"
)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class PgStore(Store):
    """Rows cached in memory, written through to a PostgreSQL that other nodes share."""

    shared = True
    IntegrityError = pge.UniqueViolation
    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        node: str,
        *,
        node_timeout: float = 10.0,
        confirm_timeout: float = 6.0,
    ) -> None:
        super().__init__(path=None)  # type: ignore[arg-type]
        self.url = url
        self.node = node
        self.node_timeout = node_timeout
        self.confirm_timeout = confirm_timeout
        #: This run of the node: audit records' origins are unique per run.
        self.boot = uuid.uuid4().hex[:12]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening = False  # the listening connection is up and caught up
        #: Monotonic time this node last heard its own ping: its heartbeat was
        #: written and its listening connection delivers (both work, recently).
        self._ping_ok = 0.0
        self._used = 0.0  # monotonic time the connection was last handed out
        self._lead_on: Any = None  # the connection holding the clock-work lock
        self._inbox: deque[dict[str, Any]] = deque()
        #: When the notification being applied now was heard (None: none is).
        self._applying: float | None = None
        self._resync = False
        self._wake = asyncio.Event()
        self._caught_up = asyncio.Event()
        #: Changes heard of but dropped before they were applied (a full re-read
        #: took their place): confirmed once it is done. Bounded by MAX_INBOX.
        self._owed: set[str] = set()
        self._acks: dict[str, set[str]] = {}
        self._ack_wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        #: Called (kind, id, old row or None, new row or None) after a row changed
        #: elsewhere was applied; the keyring learns and forgets token objects here.
        self.observers: list[Callable[[str, str, Any, Any], Any]] = []
        #: Called with a message from another node about sessions ({"s": hash} or {"p": id}).
        self.session_observers: list[Callable[[dict[str, Any]], None]] = []

    @property
    def sharing(self) -> SharedStore:
        """Itself: mypy checks here that this class has every :class:`SharedStore` method."""
        return self

    # -- health ----------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """Whether this node may serve key use and changes: it has caught up, and
        heard its own ping (sent with each heartbeat, through the database, to its
        listening connection) within ``node_timeout / 2``.

        A node out of touch longer than that refuses by itself. Since another
        node waits ``confirm_timeout`` (> ``node_timeout / 2`` + a heartbeat) for
        confirmations, a node named in ``unconfirmed_nodes`` has stopped serving
        by the time that answer is given, and serves again only after re-reading
        every row.
        """
        now, window = time.monotonic(), self.node_timeout / 2
        if not self._listening or now - self._ping_ok >= window:
            return False
        # Hearing is not enough: a change heard and not applied for that long (the
        # token thread or the database busy) makes this node as stale as a deaf one.
        oldest = self._inbox[0]["_t"] if self._inbox else None
        if self._applying is not None and (oldest is None or self._applying < oldest):
            oldest = self._applying
        return oldest is None or now - oldest < window

    # -- connections -------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        db = psycopg.connect(
            self.url, autocommit=True, connect_timeout=5, application_name=self.app_name
        )
        db.row_factory = _rows
        return db

    @property
    def app_name(self) -> str:
        """How this node's connections show in pg_stat_activity."""
        return f"strongroomd:{self.node}"[:63]

    def _ensure(self) -> psycopg.Connection[Any]:
        """The node's connection. One idle for a second is checked first (a
        restarted server or a cut connection shows up here, and is replaced,
        instead of failing the next request's write half-way)."""
        now = time.monotonic()
        if self._db is not None and not self._db.closed and now - self._used > IDLE_CHECK:
            try:
                self._db.execute("SELECT 1")
            except psycopg.OperationalError:
                with contextlib.suppress(Exception):
                    self._db.close()
                self._db = None
        if self._db is None or self._db.closed:
            self._db = self._connect()
        self._used = now
        return self._db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            try:
                self._ensure()
                return fn(*args)
            except pge.ForeignKeyViolation as exc:  # a write not made by _tx
                deleting = exc.diag.constraint_name == "group_has_members"
                raise _group_race(deleting) from None
            except psycopg.OperationalError as exc:
                db, self._db = self._db, None
                if db is not None:
                    with contextlib.suppress(Exception):
                        db.close()
                raise Unavailable(f"the database is unreachable ({type(exc).__name__})") from None

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    # -- lifecycle ---------------------------------------------------------------------
    def _open(self) -> None:
        db = self._ensure()
        self._migrate_pg(db)
        self._beat(db)
        self._load(db)

    @staticmethod
    def _migrate_pg(db: psycopg.Connection[Any]) -> None:
        """Apply the steps not applied yet, all in one transaction (PostgreSQL's DDL
        is transactional: all or nothing); an advisory lock keeps two nodes
        starting at once from both applying one."""
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(4242001)")
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY)")
            done = {r[0] for r in db.execute("SELECT name FROM schema_migrations")}
            for name, step in migrations():
                if name in done:
                    continue
                # A step with a function body ($$ ... $$, semicolons inside) is sent
                # whole (no parameters: PostgreSQL's simple protocol takes several).
                stmts = [step] if "$$" in step else filter(str.strip, step.split(";"))
                for stmt in stmts:
                    db.execute(stmt)
                db.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))

    def _beat(self, db: psycopg.Connection[Any]) -> None:
        """The heartbeat, and a ping to this node's own listening connection."""
        ping = json.dumps({"ping": self.node, "b": self.boot}, separators=(",", ":"))
        with db.transaction():
            db.execute(
                "INSERT INTO nodes (id) VALUES (%s) ON CONFLICT (id) DO UPDATE "
                "SET heartbeat = now()",
                (self.node,),
            )
            db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, ping))

    def _fetch_all(self, db: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            for table, (cls, pk) in _TABLE_ROWS.items():
                rows = {}
                for rec in db.execute(f"SELECT * FROM {table}"):  # noqa: S608
                    row = _from_db(cls, rec)
                    rows[getattr(row, pk)] = row
                out[table] = rows
        return out

    def _load(self, db: psycopg.Connection[Any]) -> None:
        for table, rows in self._fetch_all(db).items():
            cache = self._cache(_TABLE_ROWS[table][0])
            cache.clear()
            cache.update(rows)
        self.key_names.clear()
        self.key_names.update({r.name: r.kid for r in self.keys.values()})

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Listen first: a change committed while the rows load is heard, not lost.
        self._listener = threading.Thread(target=self._listen, name="pg-listen", daemon=True)
        self._listener.start()
        await self._run(self._open)
        self._tasks = [
            asyncio.create_task(self._apply_loop(), name="pg-apply"),
            asyncio.create_task(self._heartbeat_loop(), name="pg-heartbeat"),
        ]
        # Serve once listening and caught up (or, failing that, start anyway: the
        # node refuses key use with 503 until it is).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._caught_up.wait(), 10.0)

    @contextlib.asynccontextmanager
    async def first_start(self) -> AsyncIterator[None]:
        """Nodes started at the same instant on an empty database take turns here
        (a session advisory lock, on a connection of its own so this node's
        thread keeps confirming the others' changes while it waits). Inside,
        the groups and admins are re-read from the database: a node that comes
        second finds the admin the first one made, even before hearing of it,
        and makes none. The lock goes with the connection (a node that dies
        holding it frees it). Migrations have their own (``_migrate_pg``)."""

        def lock() -> psycopg.Connection[Any]:
            db = psycopg.connect(
                self.url, autocommit=True, connect_timeout=5, application_name=self.app_name
            )
            try:
                db.execute("SELECT pg_advisory_lock(%s)", (FIRST_START_LOCK,))
            except BaseException:
                db.close()
                raise
            return db

        try:
            held = await asyncio.to_thread(lock)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"the database is unreachable ({type(exc).__name__})") from None
        try:
            await self._catch_up("groups", "principals")
            yield
        finally:
            await asyncio.to_thread(held.close)  # ends the session: the lock is free

    async def _catch_up(self, *tables: str) -> None:
        """Cache the rows of ``tables`` as the database has them now (newer versions
        and rows not heard of yet; deletions come with their notifications)."""

        def q() -> dict[str, list[Any]]:
            db = self._ensure()
            return {
                t: [_from_db(_TABLE_ROWS[t][0], rec) for rec in db.execute(f"SELECT * FROM {t}")]  # noqa: S608
                for t in tables
            }

        for table, rows in (await self._run(q)).items():
            cache = self._cache(_TABLE_ROWS[table][0])
            for row in rows:
                pk = getattr(row, _TABLE_ROWS[table][1])
                old = cache.get(pk)
                if old is None or old.version < row.version:
                    await self._replace(table, pk, old, row)

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._run(
                lambda: self._ensure().execute("DELETE FROM nodes WHERE id = %s", (self.node,))
            )
        if self._db is not None:
            db = self._db
            await self._loop.run_in_executor(self._pool, db.close)  # type: ignore[union-attr]
            self._db = None
        self._pool.shutdown(wait=True)
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, 5)

    # -- writes -------------------------------------------------------------------------
    def _tx(self, statements: list[tuple[str, Any]], checked: list[str] | None = None) -> list[int]:
        db = self._ensure()
        checked = checked or []
        counts = []
        try:
            with db.transaction():
                for i, (sql, params) in enumerate(statements):
                    n = db.execute(pg_sql(sql), params).rowcount
                    if i < len(checked) and n != 1:
                        raise Stale(checked[i])
                    counts.append(n)
        except pge.ForeignKeyViolation:
            deleting = any(_DELETES_GROUP.match(sql) for sql, _ in statements)
            raise _group_race(deleting) from None
        return counts

    async def execute(
        self,
        statements: list[tuple[str, Any]],
        checked: list[str] | None = None,
        notes: Sequence[Note] = (),
    ) -> list[int]:
        """One transaction; its notification goes out at commit. It returns once
        every live node applied the change (or after ``confirm_timeout``, naming
        the others in :data:`unconfirmed`)."""
        if not notes:
            return await self._run(self._tx, statements, checked)
        change = uuid.uuid4().hex
        wait = True
        payload = json.dumps(
            {"n": self.node, "c": change, "w": wait, "r": [list(n) for n in notes]},
            separators=(",", ":"),
        )
        if wait:
            self._acks[change] = set()
            self._ack_wake[change] = asyncio.Event()
        try:
            counts = await self._run(
                self._tx,
                [*statements, ("SELECT pg_notify(%s, %s)", (CHANNEL, payload))],
                checked,
            )
            if wait:
                missing = await self._confirmations(change)
                if missing:
                    log.warning(
                        "change %s not confirmed by %s within %.1f s",
                        change,
                        ", ".join(missing),
                        self.confirm_timeout,
                    )
                    sink = unconfirmed.get()
                    if sink is not None:
                        sink.extend(missing)
        finally:
            self._acks.pop(change, None)
            self._ack_wake.pop(change, None)
        return counts[: len(statements)]

    async def _confirmations(self, change: str) -> list[str]:
        """Wait until every live node (but this one) acknowledged ``change``."""
        deadline = time.monotonic() + self.confirm_timeout
        expected = set(await self.live_nodes()) - {self.node}
        while True:
            missing = expected - self._acks[change]
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                return sorted(missing)
            event = self._ack_wake[change]
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, 0.5))
            if not self._acks[change] >= expected:
                # A node that stopped beating meanwhile is not waited for.
                expected &= set(await self.live_nodes())

    async def live_nodes(self) -> list[str]:
        def q() -> list[str]:
            rows = self._ensure().execute(
                "SELECT id FROM nodes WHERE heartbeat > now() - make_interval(secs => %s)",
                (self.node_timeout,),
            )
            return [r[0] for r in rows]

        return await self._run(q)

    async def query(self, sql: str, params: Any = ()) -> list[Any]:
        return await self._run(lambda: self._ensure().execute(pg_sql(sql), params).fetchall())

    @contextlib.contextmanager
    def reader(self) -> Iterator[Any]:
        """A read-only connection of its own, for a long read in a worker thread
        (the node's own connection keeps serving its writes meanwhile)."""
        with psycopg.connect(self.url, connect_timeout=5, application_name=self.app_name) as db:
            db.read_only = True
            yield db

    # -- hearing other nodes -------------------------------------------------------------
    def _listen(self) -> None:
        """The listening thread: hand every notification to the loop; reconnect."""
        loop = self._loop
        assert loop is not None
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, connect_timeout=5, application_name=self.app_name
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Anything missed while not listening: re-read it all.
                    loop.call_soon_threadsafe(self._need_resync)
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=0.5):
                            loop.call_soon_threadsafe(self._heard, n.payload)
                        conn.execute("SELECT 1")  # a dead server shows up here too
            except Exception as exc:
                if self._stop.is_set():
                    return
                loop.call_soon_threadsafe(self._lost, f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.5)

    def _lost(self, why: str) -> None:
        if self._listening:
            log.error("lost the database's notifications (%s); refusing use until caught up", why)
        self._listening = False

    def _need_resync(self) -> None:
        self._resync = True
        self._wake.set()

    def _heard(self, payload: str) -> None:
        try:
            msg = json.loads(payload)
        except ValueError:
            return
        if "ack" in msg:
            acks = self._acks.get(msg["ack"])
            if acks is not None:
                acks.add(msg["n"])
                self._ack_wake[msg["ack"]].set()
            return
        if "ping" in msg:
            if msg["ping"] == self.node and msg.get("b") == self.boot:
                self._ping_ok = time.monotonic()
                if self._listening:
                    self._caught_up.set()
            return
        if msg.get("n") == self.node or "r" not in msg:
            return
        if len(self._inbox) >= MAX_INBOX:
            self._drop_inbox()
            self._resync = True
        else:
            msg["_t"] = time.monotonic()  # when heard: see live
            self._inbox.append(msg)
        self._wake.set()

    def _drop_inbox(self) -> None:
        """Forget queued notifications (a full re-read replaces them); the changes
        among them that wait for confirmations are confirmed after it."""
        self._owed.update(m["c"] for m in self._inbox if m.get("w"))
        self._inbox.clear()

    async def _apply_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                if self._resync:
                    self._resync = False
                    self._drop_inbox()
                    await self._reload()
                    self._listening = True
                    log.info("caught up with the database: every cached row re-read")
                    with contextlib.suppress(Exception):  # live again once heard
                        await self._run(lambda: self._beat(self._ensure()))
                    owed, self._owed = self._owed, set()
                    for change in owed:
                        await self._ack(change)
                while self._inbox:
                    msg = self._inbox.popleft()
                    self._applying = msg["_t"]
                    try:
                        await self._apply(msg)
                    finally:
                        self._applying = None
            except Exception as exc:
                log.error("applying changes from other nodes failed: %s", exc)
                self._listening = False
                self._resync = True
                await asyncio.sleep(0.5)
                self._wake.set()

    async def _reload(self) -> None:
        fresh = await self._run(lambda: self._fetch_all(self._ensure()))
        for table, rows in fresh.items():
            cls = _TABLE_ROWS[table][0]
            cache = self._cache(cls)
            for pk in set(cache) - set(rows):
                await self._replace(table, pk, cache.get(pk), None)
            for pk, row in rows.items():
                old = cache.get(pk)
                if old is None or old.version != row.version or old != row:
                    await self._replace(table, pk, old, row)
        for fn in self.session_observers:
            fn({"all": True})

    async def _apply(self, msg: dict[str, Any]) -> None:
        confirmed = True
        for table, pk in msg["r"]:
            if table in ("sessions", "principal_sessions"):
                msg_ = {"s": pk} if table == "sessions" else {"p": pk}
                for fn in self.session_observers:
                    fn(msg_)
                continue
            if table not in _TABLE_ROWS:
                continue
            cls, col = _TABLE_ROWS[table]

            def q(table: str = table, col: str = col, pk: str = pk) -> Any:
                rows = (
                    self._ensure()
                    .execute(
                        f"SELECT * FROM {table} WHERE {col} = %s",  # noqa: S608
                        (pk,),
                    )
                    .fetchall()
                )
                return rows[0] if rows else None

            rec = await self._run(q)
            row = _from_db(cls, rec) if rec is not None else None
            old = self._cache(cls).get(pk)
            if row is not None and old is not None and row.version < old.version:
                continue  # this node already holds a newer one
            confirmed &= await self._replace(table, pk, old, row)
        if msg.get("w") and confirmed:
            await self._ack(msg["c"])

    async def _ack(self, change: str) -> None:
        ack = json.dumps({"ack": change, "n": self.node}, separators=(",", ":"))
        await self._run(lambda: self._ensure().execute("SELECT pg_notify(%s, %s)", (CHANNEL, ack)))

    async def _replace(self, table: str, pk: str, old: Any, new: Any) -> bool:
        """Put the row read from the database in the cache, after the observers
        (the keyring finds a new key's token object first); False if one of them
        could not do its part (the change is not confirmed)."""
        ok = True
        for fn in self.observers:
            out = fn(table, pk, old, new)
            if asyncio.iscoroutine(out):
                out = await out
            ok &= out is not False
        if new is None:
            if old is not None:
                self._forget(old)
        else:
            self._remember(new)
        return ok

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(HEARTBEAT)
            beats += 1
            if beats % 60 == 0:  # expired sessions go (any node may do it)
                with contextlib.suppress(Exception):
                    await self._run(
                        lambda: self._ensure().execute(
                            "DELETE FROM sessions WHERE expires < %s", (time.time(),)
                        )
                    )
            if time.monotonic() - self._ping_ok >= self.node_timeout / 2 and self._listening:
                # Not live for a while (stopped, starved, cut off): changes may have
                # been answered without this node; catch up on everything first.
                log.warning(
                    "out of touch for %.1f s or more: re-reading every row", self.node_timeout / 2
                )
                self._listening = False
                self._need_resync()
            try:
                await self._run(lambda: self._beat(self._ensure()))
            except Exception as exc:
                log.debug("heartbeat failed: %s", exc)

    async def leads(self) -> bool:
        """Whether this node does the clock's work (scheduled deletions and
        rotations): the holder of a session advisory lock on its connection,
        released by PostgreSQL when that connection ends (the node died or
        reconnected; another node takes over at its next tick)."""

        def q() -> bool:
            db = self._ensure()
            if self._lead_on is not db:  # not taken on this connection yet
                got = db.execute("SELECT pg_try_advisory_lock(4242002)").fetchone()[0]
                self._lead_on = db if got else None
            return self._lead_on is db

        return await self._run(q)

    # -- sessions -------------------------------------------------------------------------
    async def session_put(
        self, token: str, principal_id: str, expires: float, secret_hash: bytes | None
    ) -> bool:
        """Store a session, if its principal is, in the database now, enabled with
        the secret the login was checked against; False (nothing stored) if not.

        A secret reset, disable or deletion on another node ends sessions with a
        DELETE after its change is committed; a login on this node checked its
        cache, which may not have that change yet. The insert takes a share lock
        on the principal's row (``FOR SHARE``): if the change holds the row, the
        insert waits for its commit and then finds the new row (refused); if the
        insert holds it, the change waits, so the session is stored before the
        change commits and its DELETE removes it. A session never outlives the
        change that should have ended it."""
        args = (token_hash(token), expires, principal_id, secret_hash)
        n = await self._run(lambda: self._ensure().execute(SESSION_PUT, args).rowcount)
        return n == 1

    async def session_get(self, token: str) -> tuple[str, float] | None:
        def q() -> tuple[str, float] | None:
            rows = (
                self._ensure()
                .execute(
                    "SELECT principal_id, expires FROM sessions WHERE token_hash = %s",
                    (token_hash(token),),
                )
                .fetchall()
            )
            return (rows[0][0], rows[0][1]) if rows else None

        return await self._run(q)

    async def session_refresh(self, token: str, expires: float) -> None:
        await self._run(
            lambda: self._ensure().execute(
                "UPDATE sessions SET expires = %s WHERE token_hash = %s",
                (expires, token_hash(token)),
            )
        )

    async def session_drop(self, token: str | None = None, principal_id: str | None = None) -> None:
        """End a session, or every session of a principal, on every node: like a row
        change, answered once every live node dropped it from its cache."""
        if token is not None:
            h = token_hash(token)
            sql, arg, note = "DELETE FROM sessions WHERE token_hash = %s", h, ("sessions", h.hex())
        else:
            sql, arg, note = (
                "DELETE FROM sessions WHERE principal_id = %s",
                principal_id,
                ("principal_sessions", principal_id or ""),
            )
        await self.execute(
            [(sql, (arg,)), ("DELETE FROM sessions WHERE expires < %s", (time.time(),))],
            notes=[note],
        )

    # -- key reservations (start-up reconcile) ------------------------------------------
    async def reserve_kid(self, kid: str) -> None:
        """Before a token object is made under ``kid``: it is not an orphan."""
        await self._run(
            lambda: self._ensure().execute(
                "INSERT INTO pending_keys (kid, node) VALUES (%s, %s)", (kid, self.node)
            )
        )

    async def release_kid(self, kid: str) -> None:
        await self._run(
            lambda: self._ensure().execute("DELETE FROM pending_keys WHERE kid = %s", (kid,))
        )

    async def claimed(self, kids: set[str], grace: float = 60.0) -> set[str]:
        """Of ``kids`` (token objects this node found no row for): those another
        node has a row for, or is making now (reserved by a live node, or less
        than ``grace`` seconds ago). The rest are orphans; this node's own
        reservations from before a crash are released here."""
        if not kids:
            return set()

        def q() -> set[str]:
            db = self._ensure()
            listed = list(kids)
            # Reservations first, rows second: a node inserts a key's row before it
            # releases the reservation, so a release this read misses left a row
            # the next read finds. (Rows first could miss both: the row not yet
            # written, then the reservation already released.)
            busy = db.execute(
                "SELECT p.kid FROM pending_keys p LEFT JOIN nodes n ON n.id = p.node "
                "WHERE p.kid = ANY(%s) AND p.node <> %s AND (p.since > now() - "
                "make_interval(secs => %s) OR n.heartbeat > now() - make_interval(secs => %s))",
                (listed, self.node, grace, self.node_timeout),
            )
            rows = {r[0] for r in busy}
            made = db.execute("SELECT kid FROM keys WHERE kid = ANY(%s)", (listed,))
            rows |= {r[0] for r in made}
            db.execute(
                "DELETE FROM pending_keys WHERE node = %s AND kid = ANY(%s)", (self.node, listed)
            )
            return rows

        return await self._run(q)

    # -- audit ------------------------------------------------------------------------------
    async def append_audit(
        self, batch: list[tuple[Any, ...]], stamp: Callable[[float], str]
    ) -> tuple[int, bytes]:
        """Append records (local seq first, then time, then the other columns) to
        the one chain, under the row lock of its head; (seq, hash) of the last.

        The lock serializes the nodes' batches (one short transaction each per
        flush interval), so the chain stays a single line every node extends.
        A batch whose commit was reported failed but happened is not written twice
        (its records' origins are unique).
        """
        from strongroomd.audit import COLUMNS, record_hash

        origins = [f"{self.node}/{self.boot}/{raw[0]}" for raw in batch]
        cols = ", ".join(COLUMNS)
        marks = ", ".join(["%s"] * (len(COLUMNS) + 4))
        sql = f"INSERT INTO audit ({cols}, prev_hash, hash, node, origin) VALUES ({marks})"  # noqa: S608

        def tx() -> tuple[int, bytes]:
            db = self._ensure()
            with db.transaction():
                done = db.execute(
                    "SELECT seq, hash FROM audit WHERE origin = %s", (origins[-1],)
                ).fetchall()
                if done:
                    return done[0][0], done[0][1]
                seq, prev = db.execute(
                    "SELECT seq, hash FROM audit_head WHERE one = 1 FOR UPDATE"
                ).fetchone()
                rows = []
                for raw, origin in zip(batch, origins, strict=True):
                    seq += 1
                    rec = (seq, stamp(raw[1]), *raw[2:])
                    h = record_hash(prev, rec)
                    rows.append((*rec, prev, h, self.node, origin))
                    prev = h
                with db.cursor() as cur:
                    cur.executemany(sql, rows)
                db.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE one = 1", (seq, prev))
                return seq, prev

        return await self._run(tx)

    async def last_audit_of_node(self, exclude: Sequence[str]) -> Any:
        rows = await self._run(
            lambda: (
                self._ensure()
                .execute(
                    "SELECT seq, action, time FROM audit WHERE node = %s "
                    "AND NOT (action = ANY(%s)) ORDER BY seq DESC LIMIT 1",
                    (self.node, list(exclude)),
                )
                .fetchall()
            )
        )
        return rows[0] if rows else None

    async def verify_audit(self, head: tuple[int, bytes] | None) -> tuple[int, Any, list[int]]:
        """The whole chain (every node's records), on a connection of its own."""
        return await asyncio.to_thread(verify_url, self.url, head)


class _Snapshot:
    """``execute`` on a server-side cursor: the chain is streamed, not loaded whole."""

    def __init__(self, db: psycopg.Connection[Any]) -> None:
        self.db = db

    def execute(self, sql: str, params: Any = ()) -> Any:
        cur = self.db.cursor(name=f"verify_{uuid.uuid4().hex[:8]}")
        cur.itersize = 2000
        cur.execute(pg_sql(sql), params or None)
        return cur


def verify_url(url: str, head: tuple[int, bytes] | None = None) -> tuple[int, Any, list[int]]:
    """Check the audit chain of a PostgreSQL database: (records checked, first
    break or None, seqs of unclean stops), all from one snapshot."""
    from strongroomd.audit import UNCLEAN, ChainBreak, verify_chain

    with psycopg.connect(url, connect_timeout=5) as db:
        db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        checked, brk = verify_chain(_Snapshot(db))
        if brk is None:
            (last,) = db.execute("SELECT seq FROM audit_head").fetchone()
            (top,) = db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()
            if top != last:
                brk = ChainBreak(min(top, last) + 1, "is missing: the chain's head moved")
            elif head is not None and head[0] > 0:
                row = db.execute("SELECT hash FROM audit WHERE seq = %s", (head[0],)).fetchone()
                if row is None:
                    brk = ChainBreak(top + 1, "is missing: the newest records were removed")
                elif bytes(row[0]) != head[1]:
                    brk = ChainBreak(head[0], "its contents were changed")
        stops = [
            r[0]
            for r in db.execute("SELECT seq FROM audit WHERE action = %s ORDER BY seq", (UNCLEAN,))
        ]
        db.rollback()
    return checked, brk, stops
