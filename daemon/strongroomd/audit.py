"""Audit records, hash-chained, written in batches, failing closed.

Each record carries the SHA-256 of its predecessor and its own hash over a
canonical encoding, so an edited, deleted or reordered record breaks the
chain at a place :func:`verify_chain` names.

Durability. Records are group-committed by one writer task every
``FLUSH_INTERVAL`` seconds (or sooner when many are pending), so a crypto
request never waits for an fsync: a ``kill -9`` can lose the records of the
last ``FLUSH_INTERVAL`` of key *use*. Changes (keys, apps, groups, plugins,
exports: every route that is neither a read nor a use, see :func:`kind_of`)
wait until their record is written before they are answered, so a change a
client was told about always has its record.

Failing closed. When a batch cannot be written (disk full, I/O error, a
locked database) the batch stays queued, in order, and the writer retries
with back-off until it can; meanwhile :meth:`Audit.admit` refuses uses and
changes with 503 ``unavailable``. Reads (:data:`Kind.READ`) are still served
while the queue has room; when the queue holds ``max_pending`` records every
request is refused: a record is never dropped. The failure and the recovery
are logged once each and shown in metrics (``strongroom_audit_*``).

Floods. Requests with no authenticated caller (unmatched paths, missing or
bad sessions) are only counted in metrics. Failed logins are recorded, but
aggregated: one record per source and ``LOGIN_WINDOW`` with a count
(:meth:`Audit.failed_login`), and at most ``LOGIN_SOURCES`` sources a window
get their own record, so no flood can fill the disk.

After a ``kill -9`` nothing on disk says which records of the last window
were lost; what start-up can tell is that the previous run did not end with
``daemon.stop``, and it records that (``daemon.unclean_stop``) so that
``/sys/v1/logs/verify`` can name every such gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from strongroomd import metrics
from strongroomd.errors import Unavailable
from strongroomd.store import SharedStore, Store

if TYPE_CHECKING:
    from strongroomd.context import Owner

log = logging.getLogger("strongroomd.audit")

FLUSH_INTERVAL = 0.05
FLUSH_AT = 2000
#: Longest pause between two tries to write while storage is failing (seconds).
RETRY_MAX = 1.0
#: Records queued in memory, at most (``audit_max_pending`` overrides it).
#: About 250 bytes each: 100,000 are ~25 MB, and two seconds of the fastest
#: operation measured (~45k AES-GCM/s), so a slow fsync refuses nothing.
MAX_PENDING = 100_000
#: Failed logins are counted per source over windows of this many seconds.
LOGIN_WINDOW = 60
#: Sources with a record of their own per window; the rest share one.
LOGIN_SOURCES = 32
#: Known principal ids named in one failed-login record (the rest are counted).
LOGIN_NAMES = 8
LOGIN_ACTION = "POST /sys/v1/session/auth"
STOP = "daemon.stop"
#: Records appended by offline tools while the daemon is stopped (strongroomd.admin).
OFFLINE = ("admin.rotate",)
UNCLEAN = "daemon.unclean_stop"
GENESIS = b"\0" * 32
COLUMNS = (
    "seq",
    "time",
    "actor_kind",
    "actor_id",
    "action",
    "object_id",
    "status",
    "code",
    "invocation_id",
    "detail",
)


class Kind(enum.Enum):
    """What a route does, for the audit: decides refusal and durability."""

    READ = "read"  # changes nothing, uses no key: served while the queue has room
    USE = "use"  # uses a key (crypto, plugins): refused while failing; group-committed
    CHANGE = "change"  # everything else: refused while failing; record written before reply


#: POST routes that only read.
_READ_POSTS = frozenset(
    {
        "/crypto/v1/keys/info",
        "/crypto/v1/keys/kcv/verify",  # a key given by value: no stored key is used
        "/sys/v1/session/auth",
        "/sys/v1/session/terminate",
        "/sys/v1/session/select_account",  # the one account: nothing changes
    }
)
#: Key-use routes outside /crypto/v1/ (plugins use keys through the same API), and
#: under /crypto/v1/keys: a key check value.
_USES = frozenset(
    {
        ("POST", "/sys/v1/plugins/{plugin_id}"),
        ("GET", "/sys/v1/plugins/invoke/{plugin_id}"),
        ("POST", "/sys/v1/plugins/invoke/{plugin_id}"),
        ("POST", "/sys/v1/plugins/test"),
        ("POST", "/crypto/v1/keys/kcv"),
    }
)
#: The per-key forms of the crypto operations (/crypto/v1/keys/{kid}/<op>[/<step>]) are uses.
_KEY_OPS = frozenset(
    {"encrypt", "decrypt", "sign", "verify", "mac", "macverify", "wrapkey", "unwrapkey"}
)
#: Crypto routes that use one key to make another. The new key is stored, so the
#: request is a change (its record is durable before the reply: a kill -9 cannot
#: keep the key and lose the record), unless the new key is transient.
KEY_MAKERS = frozenset(
    {
        "/crypto/v1/unwrapkey",
        "/crypto/v1/agree",
        "/crypto/v1/derive",
        "/crypto/v1/keys/{kid}/unwrapkey",
        "/crypto/v1/keys/{kid}/derive",
    }
)


def kind_of(method: str, route: str, body: Any = None) -> Kind:
    """Classify a request by route template. Unknown routes are changes: fail closed, durable.

    GET routes never use a key; logging in or out changes nothing stored;
    exporting or persisting a key is a change (its record is written first).
    Making a transient key is a use: it dies with the process, so a kill -9
    that loses its record loses the key too.
    """
    if route.endswith("/export"):
        return Kind.CHANGE  # a key's value leaves: recorded first, whatever the method
    if (method, route) in _USES:  # a plugin invoked by GET uses keys too
        return Kind.USE
    if route in KEY_MAKERS:
        return Kind.USE if _transient(body) else Kind.CHANGE
    if method == "GET" or (method == "POST" and route in _READ_POSTS):
        return Kind.READ
    if (
        (route.startswith("/crypto/v1/") and not route.startswith("/crypto/v1/keys"))
        or route.startswith("/crypto/v1/keys/batch/")
        or (route.startswith("/crypto/v1/keys/{kid}/") and route.split("/")[5] in _KEY_OPS)
    ):
        return Kind.USE
    if route == "/crypto/v1/keys" and _transient(body):
        return Kind.USE
    return Kind.CHANGE


def _transient(body: Any) -> bool:
    return isinstance(body, dict) and body.get("transient") is True


class AuditFailing(Unavailable):
    """The audit trail cannot take this request's record: 503, nothing stored."""


def record_hash(prev: bytes, rec: tuple[Any, ...]) -> bytes:
    return hashlib.sha256(prev + msgpack.packb(list(rec), use_bin_type=True)).digest()


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass(slots=True)
class ChainBreak:
    seq: int
    reason: str


def verify_chain(db: sqlite3.Connection) -> tuple[int, ChainBreak | None]:
    """Recompute the chain; return (records checked, first break or None)."""
    prev, expected_seq, n = GENESIS, None, 0
    cols = ", ".join(COLUMNS)
    for row in db.execute(f"SELECT {cols}, prev_hash, hash FROM audit ORDER BY seq"):  # noqa: S608
        rec, prev_hash, own = tuple(row[: len(COLUMNS)]), row[-2], row[-1]
        seq = rec[0]
        if expected_seq is not None and seq != expected_seq:
            return n, ChainBreak(expected_seq, f"record {expected_seq} is missing")
        if prev_hash != prev:
            return n, ChainBreak(seq, "does not follow the previous record (deleted or reordered)")
        if record_hash(prev, rec) != own:
            return n, ChainBreak(seq, "its contents were changed")
        prev, expected_seq, n = own, seq + 1, n + 1
    return n, None


def verify_file(path: Path, head: tuple[int, bytes] | None = None) -> tuple[int, ChainBreak | None]:
    """:func:`verify_chain` on a database file, opened read-only (the daemon may run).

    ``head``: the (seq, hash) of the newest record the daemon wrote, when it is
    the daemon asking; then removing the newest records is caught too, which
    the chain alone cannot show.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no database file {path}")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        db.execute("BEGIN")  # one snapshot for the chain and the head
        checked, brk = verify_chain(db)
        if brk is None and head is not None and head[0] > 0:
            row = db.execute("SELECT hash FROM audit WHERE seq = ?", (head[0],)).fetchone()
            if row is None:
                # The chain is whole up to its last record: the one after it is the
                # first of the newest records that were removed.
                (last,) = db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()
                brk = ChainBreak(last + 1, "is missing: the newest records were removed")
            elif row[0] != head[1]:
                brk = ChainBreak(head[0], "its contents were changed")
        return checked, brk
    finally:
        db.close()


def unclean_stops(path: Path) -> list[int]:
    """The seqs of ``daemon.unclean_stop`` records: where the last window may be missing."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT seq FROM audit WHERE action = ? ORDER BY seq", (UNCLEAN,))
        return [seq for (seq,) in rows]
    finally:
        db.close()


def source_of(owner: Owner) -> str:
    """Where a login came from, for aggregating failures.

    A socket connection is its own source. Every HTTP request is one source,
    "http": the gateway listens on loopback, or behind a TLS proxy whose address
    is all a peer address would say.
    """
    return "http" if owner.id.startswith("http-") else f"connection {owner.id}"


@dataclass(slots=True)
class _Failures:
    count: int = 0
    first: float = 0.0
    names: set[str] = field(default_factory=set)
    unknown: int = 0


@dataclass(slots=True)
class AuditStats:
    """Counters for metrics (read when scraped)."""

    failing: bool = False
    since: float = 0.0  # when the current failure began (monotonic)
    flush_failures: int = 0
    refused_failing: int = 0
    refused_full: int = 0
    failed_logins: int = 0


class Audit:
    """The audit trail: :meth:`record` queues, one writer task writes.

    ``max_pending``: records queued in memory, at most (see :data:`MAX_PENDING`).
    """

    def __init__(self, store: Store, max_pending: int = MAX_PENDING) -> None:
        self.store = store
        self.max_pending = max_pending
        self._pending: list[tuple[Any, ...]] = []
        self._seq = 0
        self._prev = GENESIS
        #: (seq, hash) of the newest record written, for :func:`verify_file`.
        self.head: tuple[int, bytes] = (0, GENESIS)
        #: The local number of the newest record written. Alone, it is head's seq;
        #: with a shared database (several nodes) the chain's seq is given at write
        #: time, and this counts this node's records.
        self._done = 0
        self.stats = AuditStats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Resolved when the next write round ends: with None, or why it failed.
        self._round: asyncio.Future[str | None] | None = None
        self._closing = False
        #: One write round at a time (the writer task; after close, a late flush).
        self._writing = asyncio.Lock()
        #: Failed logins: window number -> source -> counts.
        self._logins: dict[int, dict[str, _Failures]] = {}

    @property
    def failing(self) -> bool:
        return self.stats.failing

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return self._seq - self._done

    async def start(self) -> None:
        """Find the chain's end, note an unclean stop before it, start the writer."""
        # Python ignores SIGXFSZ already; say so here, where it matters: a write past
        # RLIMIT_FSIZE must fail with EFBIG (and be retried), not kill the daemon.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if (shared := self.store.sharing) is not None:
            await self._start_shared(shared)
            return
        rows = await self.store.query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        if rows:
            self._seq, self._prev = rows[0]["seq"], rows[0]["hash"]
            self.head = (self._seq, self._prev)
            self._done = self._seq
            marks = ", ".join("?" * len(OFFLINE))
            (last,) = await self.store.query(
                f"SELECT seq, action, time FROM audit WHERE action NOT IN ({marks}) "  # noqa: S608
                "ORDER BY seq DESC LIMIT 1",
                OFFLINE,
            ) or [{"seq": 0, "action": STOP, "time": None}]
            if last["action"] != STOP:
                log.warning(
                    "the previous run did not stop cleanly (last audit record %d, %s): "
                    "records of its last %d ms of key use may be missing",
                    last["seq"],
                    last["time"],
                    int(FLUSH_INTERVAL * 1000),
                )
                self.record(
                    UNCLEAN,
                    detail={"last_seq": last["seq"], "last_time": last["time"]},
                )
        metrics.bind_audit(self)
        self._task = asyncio.create_task(self._loop(), name="audit-writer")

    async def _start_shared(self, shared: SharedStore) -> None:
        """Several nodes, one chain: an unclean stop is this node's own last record
        not being its ``daemon.stop``."""
        last = await shared.last_audit_of_node(OFFLINE)
        if last is not None and last["action"] != STOP:
            log.warning(
                "the previous run of this node did not stop cleanly (its last audit record %d, %s)",
                last["seq"],
                last["time"],
            )
            self.record(UNCLEAN, detail={"last_seq": last["seq"], "last_time": last["time"]})
        metrics.bind_audit(self)
        self._task = asyncio.create_task(self._loop(), name="audit-writer")

    # -- taking records --------------------------------------------------------------
    def admit(self, kind: Kind) -> None:
        """Refuse (503) a request whose record could not be kept; see the module doc."""
        if kind is not Kind.READ:
            if self.stats.failing:
                self.stats.refused_failing += 1
                raise AuditFailing(
                    "the audit log cannot be written (storage failing); key use and changes "
                    "are refused until it can",
                )
            if not self.store.live:  # several nodes: this one may not know every change
                raise Unavailable(
                    "this node is not in touch with the shared database (or is catching "
                    "up); key use and changes are refused until it is",
                )
        if self.pending >= self.max_pending:
            self.stats.refused_full += 1
            raise AuditFailing(f"the audit queue is full ({self.max_pending} records)")

    def record(
        self,
        action: str,
        *,
        actor: Any = None,
        object_id: str | None = None,
        status: int = 200,
        code: str | None = None,
        invocation_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        """Queue one record (never dropped); return its seq, for :meth:`flush`."""
        if action == STOP:  # a clean stop is the last record: counts of failed logins first
            self._emit_logins(None)
        self._seq += 1
        self._pending.append(
            (
                self._seq,
                time.time(),  # formatted when flushed, off the request path
                actor.kind if actor is not None else None,
                actor.id if actor is not None else None,
                action,
                object_id,
                status,
                code,
                invocation_id,
                json.dumps(detail, separators=(",", ":"), sort_keys=True) if detail else None,
            )
        )
        if len(self._pending) >= FLUSH_AT:
            self._wake.set()
        return self._seq

    def failed_login(self, source: str, principal_id: str | None) -> None:
        """Count a failed login; written as one record per source and window.

        ``principal_id``: the id tried if it names a principal, else None (an
        attacker's made-up id is never stored, only counted as ``unknown``).
        """
        self.stats.failed_logins += 1
        now = time.time()
        window = self._logins.setdefault(int(now // LOGIN_WINDOW), {})
        if source not in window and len(window) >= LOGIN_SOURCES:
            source = "other"
        f = window.get(source)
        if f is None:
            f = window[source] = _Failures(first=now)
        f.count += 1
        if principal_id is None:
            f.unknown += 1
        elif len(f.names) < LOGIN_NAMES:
            f.names.add(principal_id)

    def _emit_logins(self, before: int | None) -> None:
        """Turn the failed-login counts of windows before ``before`` (None: all) into records."""
        for w in sorted(self._logins):
            if before is not None and w >= before:
                continue
            for source, f in self._logins.pop(w).items():
                names = sorted(f.names)
                self.record(
                    LOGIN_ACTION,
                    object_id=names[0] if len(names) == 1 and not f.unknown else None,
                    status=401,
                    code="bad_credentials",
                    detail={
                        "source": source,
                        "count": f.count,
                        "window_start": _stamp(w * LOGIN_WINDOW),
                        "window_seconds": LOGIN_WINDOW,
                        "principals": names,
                        "unknown": f.unknown,
                    },
                )

    # -- writing ------------------------------------------------------------------------
    async def flush(self, upto: int | None = None) -> None:
        """Return once every record up to ``upto`` (default: all queued now) is written.

        Raises :class:`AuditFailing` when they cannot be written now.
        """
        target = self._seq if upto is None else upto
        while self._done < target:
            if self._task is None or self._task.done():  # not started, or closed
                failure = await self._write_round()
            else:
                if self._round is None:
                    self._round = asyncio.get_running_loop().create_future()
                fut = self._round
                self._wake.set()
                failure = await asyncio.shield(fut)
            if failure is not None:
                raise AuditFailing(failure)

    async def _write_round(self) -> str | None:
        """Write what is queued, once (the writer task; after close, a late flush)."""
        async with self._writing:
            return await self._write_round_locked()

    async def _write_round_locked(self) -> str | None:
        fut, self._round = self._round, None
        batch, self._pending = self._pending, []
        failure: str | None = None
        if batch:
            try:
                await self._write(batch)
            except Exception as exc:  # any failure: keep the batch, fail closed
                self._pending[:0] = batch  # in order, ahead of what came meanwhile
                failure = self._failed(exc)
            else:
                if self.stats.failing:
                    self._recovered(len(batch))
        if fut is not None and not fut.done():
            fut.set_result(failure)
        return failure

    async def _write(self, batch: list[tuple[Any, ...]]) -> None:
        if (shared := self.store.sharing) is not None:
            self.head = await shared.append_audit(batch, _stamp)
            self._done = batch[-1][0]
            return
        rows, prev = [], self._prev
        for raw in batch:
            rec = (raw[0], _stamp(raw[1]), *raw[2:])
            h = record_hash(prev, rec)
            rows.append((*rec, prev, h))
            prev = h
        marks = ", ".join("?" * (len(COLUMNS) + 2))
        sql = f"INSERT INTO audit ({', '.join(COLUMNS)}, prev_hash, hash) VALUES ({marks})"  # noqa: S608

        def write(db: sqlite3.Connection) -> None:
            try:
                db.execute("BEGIN IMMEDIATE")
                # A COMMIT reported as failed may have reached the disk after all:
                # skip the rows already there (same hash), never write them twice.
                (last,) = db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()
                todo = rows
                if last >= rows[0][0]:
                    done = db.execute("SELECT hash FROM audit WHERE seq = ?", (last,)).fetchone()
                    i = last - rows[0][0]
                    if i >= len(rows) or done is None or done[0] != rows[i][-1]:
                        raise RuntimeError(f"audit record {last} on disk is not the one queued")
                    todo = rows[i + 1 :]
                db.executemany(sql, todo)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (full, I/O)
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

        await self.store.run_sync(write)
        self._prev = prev
        self.head = (batch[-1][0], prev)
        self._done = batch[-1][0]

    def _failed(self, exc: Exception) -> str:
        st = self.stats
        st.flush_failures += 1
        if not st.failing:
            st.failing, st.since = True, time.monotonic()
            log.error(
                "audit log cannot be written (%s: %s): %d records queued; refusing key use "
                "and changes until it can (retrying)",
                type(exc).__name__,
                exc,
                len(self._pending),
            )
        return f"the audit log cannot be written ({type(exc).__name__}); retrying"

    def _recovered(self, written: int) -> None:
        st = self.stats
        log.warning(
            "audit log writable again after %.1f s: %d queued records written, chain whole",
            time.monotonic() - st.since,
            written,
        )
        st.failing = False

    async def _loop(self) -> None:
        delay = FLUSH_INTERVAL
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            self._emit_logins(int(time.time() // LOGIN_WINDOW))
            failure = await self._write_round()
            delay = FLUSH_INTERVAL if failure is None else min(delay * 2, RETRY_MAX)

    async def close(self) -> None:
        """Stop the writer after its current round, then write what is left, once."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._emit_logins(None)
        if await self._write_round() is not None:
            log.error(
                "%d audit records could not be written at shutdown; the next start "
                "records an unclean stop",
                len(self._pending),
            )
