"""Audit records, hash-chained, written in batches.

Each record carries the SHA-256 of its predecessor and its own hash over a
canonical encoding, so an edited, deleted or reordered record breaks the
chain at a place :func:`verify_chain` names. Records are group-committed by
a background task every ``FLUSH_INTERVAL`` seconds (or sooner when many are
pending): a crypto request never waits for an fsync. Reading the log flushes
first, so a reader sees every record of every answered request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from strongroomd.store import Store

log = logging.getLogger("strongroomd.audit")

FLUSH_INTERVAL = 0.05
FLUSH_AT = 2000
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


class Audit:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[tuple[Any, ...]] = []
        self._seq = 0
        self._prev = GENESIS
        #: (seq, hash) of the newest record written, for :func:`verify_file`.
        self.head: tuple[int, bytes] = (0, GENESIS)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushing: asyncio.Lock = asyncio.Lock()

    async def start(self) -> None:
        rows = await self.store.query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        if rows:
            self._seq, self._prev = rows[0]["seq"], rows[0]["hash"]
            self.head = (self._seq, self._prev)
        self._task = asyncio.create_task(self._loop(), name="audit-flusher")

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
    ) -> None:
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

    async def flush(self) -> None:
        async with self._flushing:
            batch, self._pending = self._pending, []
            if not batch:
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
                with db:
                    db.execute("BEGIN")
                    db.executemany(sql, rows)

            try:
                await self.store.run_sync(write)
            except BaseException:
                self._pending[:0] = batch  # not written: keep them, in order, for the next try
                raise
            self._prev = prev
            self.head = (batch[-1][0], prev)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # keep auditing; the records stay queued for the next try
                log.exception("audit flush failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
