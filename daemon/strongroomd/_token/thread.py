"""The one thread that makes every PKCS#11 call.

SoftHSM runs with its locks off under python-pkcs11, so two threads inside
the library at once crash the process. Jobs arrive on a queue; the thread
takes everything queued, runs it, and hands the whole batch of results back
to the event loop with one ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("strongroomd.token")

_STOP = object()
#: What :meth:`Worker.inline` returns when it did not run the call.
MISSED = object()


class Worker:
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str = "pkcs11") -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = False
        #: Held by whoever is inside the PKCS#11 module: the thread, per batch, or
        #: the event loop for one short call (see :meth:`inline`).
        self.lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` on the thread; the future resolves on the loop."""
        if self._stopped:
            raise RuntimeError("the token is closed")
        fut = self._loop.create_future()
        self._jobs.put((fut, fn, args))
        return fut

    def inline(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a short call right here, on the event loop, when the thread is idle.

        Saves the two thread hand-offs a queued call costs (most of a small
        request's latency), and stays one-at-a-time inside the module: the
        lock is the thread's. Returns :data:`MISSED` when the thread is busy or
        has work queued; the caller then queues the call as usual.
        """
        if self._stopped or not self._jobs.empty() or not self.lock.acquire(blocking=False):
            return MISSED
        try:
            return fn(*args)
        finally:
            self.lock.release()

    async def stop(self, last: Callable[[], Any] | None = None) -> None:
        """Run ``last`` after every job queued before it, then end the thread."""
        if self._stopped:
            return
        fut = self.call(last) if last is not None else None
        self._stopped = True
        self._jobs.put(_STOP)
        try:
            if fut is not None:
                await fut
        finally:
            await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        jobs = self._jobs
        get, get_nowait = jobs.get, jobs.get_nowait
        post = self._loop.call_soon_threadsafe
        deliver = _deliver
        empty = queue.Empty
        running = True
        while running:
            batch = [get()]
            try:
                while True:
                    batch.append(get_nowait())
            except empty:
                pass
            done = []
            with self.lock:
                for job in batch:
                    if job is _STOP:
                        running = False
                        continue
                    fut, fn, args = job
                    try:
                        done.append((fut, True, fn(*args)))
                    except BaseException as exc:  # handed to the awaiting task
                        done.append((fut, False, exc))
            if done:
                try:
                    post(deliver, done)
                except RuntimeError:  # the loop is closed: nobody is waiting
                    log.warning("event loop closed with %d token jobs pending", len(done))


def _deliver(done: list) -> None:
    for fut, ok, value in done:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
