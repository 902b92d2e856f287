"""The token thread's rules: one caller inside the PKCS#11 module at a time,
principals served round-robin, key generation in a bounded lane of its own."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from strongroomd._token.fair import caller
from strongroomd._token.thread import MISSED, Worker
from strongroomd.errors import Busy


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


# -- scheduling: the order jobs run in, never how long they took ----------------------------


def _as(who: str, submit, *args):
    """Submit a job as principal ``who`` (what the dispatcher sets per request)."""
    token = caller.set(who)
    try:
        return submit(*args)
    finally:
        caller.reset(token)


async def _hold(w: Worker, who: str = "holder", slow: bool = False):
    """Park the thread inside a job until the returned event is set."""
    release = threading.Event()
    fut = _as(who, w.slow if slow else w.call, release.wait)
    while not w.lock.locked():
        await asyncio.sleep(0.001)
    return release, fut


def test_short_jobs_are_served_round_robin_across_principals() -> None:
    ran: list[str] = []

    async def main() -> None:
        w = Worker(asyncio.get_running_loop())
        w.start()
        release, held = await _hold(w)
        a = [_as("A", w.call, ran.append, f"A{i}") for i in range(50)]
        b = _as("B", w.call, ran.append, "B0")
        c = [_as("C", w.call, ran.append, f"C{i}") for i in range(2)]
        release.set()
        await asyncio.gather(held, *a, b, *c)
        await w.stop()

    asyncio.run(main())
    # B's one job waits for one job of each other busy principal, not A's backlog.
    assert ran[:6] == ["A0", "B0", "C0", "A1", "C1", "A2"]
    assert ran[6:] == [f"A{i}" for i in range(3, 50)]


def test_a_short_job_waits_for_the_running_key_generation_not_a_queue() -> None:
    ran: list[str] = []

    async def main() -> None:
        w = Worker(asyncio.get_running_loop(), slow_per_principal=3)
        w.start()
        release, held = await _hold(w, "A", slow=True)  # A's first generation runs
        gens = [_as("A", w.slow, ran.append, f"gen{i}") for i in (1, 2)]
        short = _as("B", w.call, ran.append, "encrypt")
        release.set()
        await asyncio.gather(held, *gens, short)
        await w.stop()

    asyncio.run(main())
    assert ran == ["encrypt", "gen1", "gen2"]


def test_a_backlog_of_short_jobs_does_not_starve_key_generation() -> None:
    ran: list[str] = []

    async def main() -> None:
        w = Worker(asyncio.get_running_loop())
        w.start()
        release, held = await _hold(w, "A")
        shorts = [_as("A", w.call, ran.append, f"A{i}") for i in range(200)]
        gen = _as("B", w.slow, ran.append, "gen")
        release.set()
        await asyncio.gather(held, *shorts, gen)
        await w.stop()

    asyncio.run(main())
    assert ran.index("gen") < 5


def test_slow_lane_is_bounded_per_principal_and_in_total() -> None:
    async def main() -> None:
        w = Worker(asyncio.get_running_loop(), slow_per_principal=2, slow_total=3)
        w.start()
        release, held = await _hold(w, "A", slow=True)
        second = _as("A", w.slow, lambda: "a2")
        with pytest.raises(Busy):
            _as("A", w.slow, lambda: "a3")  # A has two
        third = _as("B", w.slow, lambda: "b1")
        with pytest.raises(Busy):
            _as("C", w.slow, lambda: "c1")  # three in all
        assert w.pending == [0, 3] and w.refused == 2
        release.set()
        assert await asyncio.gather(held, second, third) == [True, "a2", "b1"]
        assert w.pending == [0, 0]
        assert await _as("A", w.slow, lambda: "again") == "again"
        await w.stop()

    asyncio.run(main())


def test_a_cancelled_job_is_not_run() -> None:
    ran: list[str] = []

    async def main() -> None:
        w = Worker(asyncio.get_running_loop())
        w.start()
        release, held = await _hold(w)
        gone = w.call(ran.append, "gone")
        kept = w.call(ran.append, "kept")
        gone.cancel()
        release.set()
        await asyncio.gather(held, kept)
        await w.stop()
        assert w.pending == [0, 0]

    asyncio.run(main())
    assert ran == ["kept"]


def test_stop_runs_last_after_everything_queued() -> None:
    ran: list[str] = []

    async def main() -> None:
        w = Worker(asyncio.get_running_loop())
        w.start()
        release, held = await _hold(w)
        futs = [_as(p, w.call, ran.append, p) for p in ("A", "B", "A")]
        gen = _as("C", w.slow, ran.append, "gen")
        stopping = asyncio.ensure_future(w.stop(lambda: ran.append("last")))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(held, *futs, gen, stopping)

    asyncio.run(main())
    assert ran[-1] == "last" and sorted(ran[:-1]) == ["A", "A", "B", "gen"]
