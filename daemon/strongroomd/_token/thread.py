"""The one thread that makes every PKCS#11 call, and the order it makes them in.

SoftHSM runs with its locks off under python-pkcs11, so two threads inside
the library at once crash the process: every call goes through this thread
(or, for one short call on an idle thread, through :meth:`Worker.inline`).

One thread is one queue, so the order of that queue is the only fairness
there is. A single FIFO let one app pipelining ten RSA-4096 creations make
another app's AES encrypt wait 23.5 s. So jobs are sorted into two lanes:

- **short** (every crypto operation, symmetric key creation, token-object
  writes): one queue per principal, served round-robin, one job per turn. A
  principal pipelining 1,000 encrypts delays another's single encrypt by at
  most one job per other busy principal, never by its whole backlog.
- **slow** (key-pair generation: RSA takes seconds, and its time is not
  bounded by the input): its own round-robin, and bounded. A principal may
  have ``slow_per_principal`` of them queued or running, the daemon
  ``slow_total``; beyond that the caller gets 429 ``busy`` at once.

The lanes interleave: after a slow job, short jobs that are waiting run for
up to as long as that slow job took (or until none is left) before the next
slow job starts. So a short job waits for at most the one slow job already
running, never a queue of them, and when both lanes are saturated each gets
about half the thread: neither starves.

Results are handed back to the event loop in batches (one
``call_soon_threadsafe`` per batch), always before a slow job starts.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from strongroomd import metrics
from strongroomd._token.fair import caller
from strongroomd.errors import Busy

log = logging.getLogger("strongroomd.token")

SHORT, SLOW = 0, 1
_STOP = object()
#: What :meth:`Worker.inline` returns when it did not run the call.
MISSED = object()
#: Most results held back before they are handed to the event loop.
_BATCH = 64


class Worker:
    """The PKCS#11 thread, with per-principal round-robin and a bounded slow lane."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        name: str = "pkcs11",
        *,
        slow_per_principal: int = 2,
        slow_total: int = 8,
    ) -> None:
        self._loop = loop
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = False
        self.slow_per_principal = slow_per_principal
        self.slow_total = slow_total
        #: Jobs handed to the thread and not yet answered, per lane (event loop only).
        self.pending = [0, 0]
        #: Slow jobs queued or running, per principal (event loop only).
        self._slow_by: dict[str, int] = {}
        #: Slow jobs refused with 429.
        self.refused = 0
        #: Held by whoever is inside the PKCS#11 module: the thread, while it has
        #: work, or the event loop for one short call (see :meth:`inline`).
        self.lock = threading.Lock()
        _workers.add(self)

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` on the thread in the short lane; the future resolves on the loop."""
        if self._stopped:
            raise RuntimeError("the token is closed")
        fut = self._loop.create_future()
        self.pending[0] += 1
        self._inbox.put((SHORT, caller.get(), fut, fn, args))
        return fut

    def slow(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Like :meth:`call`, in the slow lane; raises :class:`Busy` when it is full."""
        if self._stopped:
            raise RuntimeError("the token is closed")
        who = caller.get()
        mine = self._slow_by.get(who, 0)
        if mine >= self.slow_per_principal or self.pending[1] >= self.slow_total:
            self.refused += 1
            raise Busy("too many key-pair generations queued; retry when one has finished")
        self._slow_by[who] = mine + 1
        self.pending[1] += 1
        fut = self._loop.create_future()
        self._inbox.put((SLOW, who, fut, fn, args))
        return fut

    def inline(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a short call right here, on the event loop, when the thread is idle.

        Saves the two thread hand-offs a queued call costs (most of a small
        request's latency), and stays one-at-a-time inside the module: the
        lock is the thread's. Returns :data:`MISSED` when the thread is busy or
        has work queued; the caller then queues the call as usual.
        """
        if self._stopped or not self._inbox.empty() or not self.lock.acquire(blocking=False):
            return MISSED
        try:
            return fn(*args)
        finally:
            self.lock.release()

    async def stop(self, last: Callable[[], Any] | None = None) -> None:
        """Run ``last`` after every job queued before it, then end the thread."""
        if self._stopped:
            return
        fut = self._loop.create_future()
        self._stopped = True
        self._inbox.put((_STOP, None, fut, last, ()))
        try:
            await fut
        finally:
            await asyncio.to_thread(self._thread.join)

    # -- event loop side of the hand-back -------------------------------------------------

    def _deliver(self, done: list) -> None:
        pending, slow_by = self.pending, self._slow_by
        for lane, who, fut, ok, value in done:
            if lane == SLOW:
                left = slow_by[who] - 1
                if left:
                    slow_by[who] = left
                else:
                    del slow_by[who]
            if lane is not _STOP:
                pending[lane] -= 1
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        inbox = self._inbox
        lanes: tuple[dict[str, deque], dict[str, deque]] = ({}, {})
        rings: tuple[deque[str], deque[str]] = (deque(), deque())
        short_ring, slow_ring = rings
        lock = self.lock
        done: list = []
        stop: tuple | None = None
        credit = 0.0  # short-lane time owed since the last slow job ended

        queued = 0  # short jobs waiting in the rings
        round_left = 0  # short jobs of the current round not run yet

        def sort(job: tuple) -> None:
            nonlocal stop, queued
            lane, who = job[0], job[1]
            if lane is _STOP:
                stop = job
                return
            if lane == SHORT:
                queued += 1
            queues = lanes[lane]
            q = queues.get(who)
            if q is None:
                q = queues[who] = deque()
                rings[lane].append(who)
            q.append(job)

        def take(lane: int) -> tuple:
            ring, queues = rings[lane], lanes[lane]
            who = ring[0]
            q = queues[who]
            job = q.popleft()
            if q:
                ring.rotate(-1)
            else:
                ring.popleft()
                del queues[who]
            return job

        held = False
        while True:
            if not short_ring and not slow_ring:
                if done:
                    self._post(done)
                    done = []
                if stop is not None:
                    break
                if held:  # idle: an inline call may use the module meanwhile
                    lock.release()
                sort(inbox.get())
                lock.acquire()
                held = True
            while not inbox.empty():
                sort(inbox.get_nowait())
            if not short_ring and not slow_ring:
                continue
            if slow_ring and (credit <= 0.0 or not short_ring):
                if done:
                    self._post(done)
                    done = []
                job = take(SLOW)
                t0 = perf_counter()
                done.append(_execute(job))
                credit = perf_counter() - t0
                self._post(done)
                done = []
                continue
            if round_left <= 0:  # a round: the short jobs queued now, in turn order
                round_left = min(queued, _BATCH)
            job = take(SHORT)
            queued -= 1
            round_left -= 1
            if slow_ring:
                t0 = perf_counter()
                done.append(_execute(job))
                credit -= perf_counter() - t0
            else:
                credit = 0.0
                done.append(_execute(job))
            # Results go back once per round, as the loop's requests came in: the
            # event loop turns them into replies while the thread runs the next
            # round (holding them for a full batch left the two taking turns).
            if round_left <= 0 or len(done) >= _BATCH:
                self._post(done)
                done = []

        _, _, fut, last, _ = stop
        if not held:
            lock.acquire()
        try:
            if last is not None:
                self._post([_execute((_STOP, None, fut, last, ()))])
            else:
                self._post([(_STOP, None, fut, True, None)])
        finally:
            lock.release()

    def _post(self, done: list) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, done)
        except RuntimeError:  # the loop is closed: nobody is waiting
            log.warning("event loop closed with %d token jobs pending", len(done))


def _execute(job: tuple) -> tuple:
    lane, who, fut, fn, args = job
    if fut.cancelled():  # its caller is gone: no need to do the work
        return lane, who, fut, False, None
    try:
        return lane, who, fut, True, fn(*args)
    except BaseException as exc:  # handed to the awaiting task
        return lane, who, fut, False, exc


# -- metrics: read when scraped -------------------------------------------------------------

_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


class _Collector:
    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily(
            "strongroom_token_jobs",
            "Token jobs handed to the PKCS#11 thread and not yet answered, by lane.",
            labels=["lane"],
        )
        refused = CounterMetricFamily(
            "strongroom_token_slow_refused",
            "Key-pair generations refused with 429 because the slow lane was full.",
        )
        short = slow = n = 0
        for w in list(_workers):
            short += w.pending[0]
            slow += w.pending[1]
            n += w.refused
        jobs.add_metric(["short"], short)
        jobs.add_metric(["slow"], slow)
        refused.add_metric([], n)
        yield jobs
        yield refused


metrics.REGISTRY.register(_Collector())
