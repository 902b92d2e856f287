"""The token thread's rule: one caller inside the PKCS#11 module at a time."""

from __future__ import annotations

import asyncio
import threading
import time

from strongroomd._token.thread import MISSED, Worker


def test_inline_runs_only_when_the_thread_is_idle() -> None:
    async def main() -> None:
        w = Worker(asyncio.get_running_loop())
        w.start()
        assert w.inline(lambda x: x + 1, 1) == 2
        release = threading.Event()
        busy = w.call(release.wait)  # the thread is inside a job, holding the lock
        while not w.lock.locked():
            await asyncio.sleep(0.001)
        assert w.inline(lambda: "ran") is MISSED
        queued = w.call(lambda: "queued")
        release.set()
        assert await busy is True and await queued == "queued"
        await w.stop()
        assert w.inline(lambda: "ran") is MISSED  # stopped

    asyncio.run(main())


def test_calls_never_overlap() -> None:
    inside = []

    def job() -> None:
        inside.append(1)
        assert len(inside) == 1, "two callers inside at once"
        time.sleep(0.0002)
        inside.pop()

    async def main() -> None:
        w = Worker(asyncio.get_running_loop())
        w.start()
        futs = []
        for i in range(300):
            if w.inline(job) is MISSED:
                futs.append(w.call(job))
            if i % 7 == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*futs)
        await w.stop()

    asyncio.run(main())
