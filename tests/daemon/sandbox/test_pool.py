"""The pool: warm workers, binding, deadlines, kill and replace, concurrency.

Real worker processes behind :class:`strongroomd._sandbox.Pool`; the host is a
small in-test object that answers a few API paths.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from strongroomd._sandbox import Limits, Outcome, PluginCode, Pool
from strongroomd.errors import BadRequest

CONTEXT = {
    "principal": {"kind": "app", "id": "app-1", "name": "billing", "groups": ["g1"]},
    "this_plugin": {"id": "p", "name": "p", "groups": ["g1"]},
}
URL = {"path": ["sys", "v1", "plugins", "p"], "query": None}
FAST = Limits(instructions=2_000_000, wall_seconds=2.0, memory_bytes=16 * 1024 * 1024)


class Host:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.logs: list[tuple[str, str]] = []
        self.on_call: Any = None

    async def request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.calls.append((method, path, body))
        if self.on_call is not None:
            await self.on_call()
        if path == "/crypto/v1/keys/info":
            return 200, {"kid": "k1", "name": body.get("name"), "obj_type": "AES"}
        if path == "/crypto/v1/encrypt":
            return 200, {"kid": "k1", "cipher": bytes(reversed(body["plain"]))}
        return 404, {"error": "no_such_route", "message": "no route"}

    def log(self, message: str, severity: str) -> None:
        self.logs.append((message, severity))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def pool(loop: asyncio.AbstractEventLoop) -> Iterator[Pool]:
    p = Pool(warm=2, max_workers=8)
    loop.run_until_complete(p.start())
    yield p
    loop.run_until_complete(p.close())


def plugin(code: str, name: str = "myplugin", version: int = 1, pid: str | None = None):
    return PluginCode(id=pid or str(uuid.uuid4()), name=name, version=version, code=code)


async def invoke(
    pool: Pool, p: PluginCode, input: Any = None, host: Host | None = None, **kw: Any
) -> Outcome:
    limits = kw.pop("limits", FAST)
    return await pool.invoke(
        p, input, url=URL, method="POST", context=CONTEXT, host=host or Host(), limits=limits, **kw
    )


def test_echo(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    """Many echoes through one pool; latency is printed (scripts/bench measures it)."""
    echo = plugin("function run(input) return input end", pid="echo")

    async def go() -> list[float]:
        times = []
        for i in range(600):
            t = time.perf_counter()
            out = await invoke(pool, echo, {"i": i, "b": b"\x00"}, limits=Limits())
            times.append(time.perf_counter() - t)
            assert (out.status, out.body) == (200, {"i": i, "b": b"\x00"})
        return times[100:]

    times = loop.run_until_complete(go())
    p50 = statistics.median(times) * 1e3
    p99 = sorted(times)[int(len(times) * 0.99)] * 1e3
    print(f"\necho through Pool.invoke: p50 {p50:.3f} ms, p99 {p99:.3f} ms")


def test_warm_blanks_are_kept(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        out = await invoke(pool, plugin("function run() return 1 end"))
        assert out.status == 200
        # Spawning a worker (a Python start-up) takes seconds on a loaded machine.
        deadline = time.monotonic() + 60
        while pool.stats["blank"] < 2:
            assert time.monotonic() < deadline, f"blanks not replenished: {pool.stats}"
            await asyncio.sleep(0.05)

    loop.run_until_complete(go())


def test_binding_reuse_versions_and_discard(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    code = "function run() return 1 end"

    async def go() -> None:
        a1 = await invoke(pool, plugin(code, pid="a"))
        a2 = await invoke(pool, plugin(code, pid="a"))
        b = await invoke(pool, plugin(code, pid="b"))
        a3 = await invoke(pool, plugin(code, pid="a", version=2))
        t1 = await invoke(pool, plugin(code, pid="a", version=2), discard=True)
        a4 = await invoke(pool, plugin(code, pid="a", version=2))
        pid = lambda o: o.stats["worker_pid"]  # noqa: E731
        assert pid(a1) == pid(a2) != pid(b)
        assert pid(a3) != pid(a1) and pid(t1) not in (pid(a3), pid(a1))
        assert pid(a4) == pid(a3)
        with pytest.raises(ProcessLookupError):  # killed and reaped, however loaded
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                os.kill(pid(t1), 0)
                await asyncio.sleep(0.02)

    loop.run_until_complete(go())


def test_check_syntax(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(pool.check_syntax("function run() return 1 end", "x"))
    with pytest.raises(BadRequest) as err:
        loop.run_until_complete(pool.check_syntax("local a\nlocal = 2\n", "plugin.lua"))
    assert err.value.code == "syntax_error" and err.value.message.startswith("plugin.lua:2:")
    out = loop.run_until_complete(invoke(pool, plugin("function run(")))
    assert out.status == 400 and out.body["error"] == "syntax_error"


def test_api_calls_round_trip(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    code = """
    function run(input)
      local k = assert(Sobject{name = input.key})
      local r = assert(k:encrypt{alg = "AES", plain = Blob.from_bytes("abc")})
      local nope, err = digest{alg = "SHA256", data = "AA=="}
      AuditLog.log{message = "done", severity = "INFO"}
      print("cipher", r.cipher:bytes())
      return {cipher = r.cipher, err = err.error, status = err.status}
    end"""
    host = Host()
    out = loop.run_until_complete(invoke(pool, plugin(code), {"key": "k"}, host=host))
    assert (out.status, out.body) == (
        200,
        {"cipher": b"cba", "err": "no_such_route", "status": 404},
    )
    assert out.output == "cipher\tcba\n" and out.stats["api_calls"] == 3
    assert host.logs == [("done", "INFO")]
    assert host.calls[1] == (
        "POST",
        "/crypto/v1/encrypt",
        {"key": {"kid": "k1"}, "alg": "AES", "plain": b"abc"},
    )


def test_runtime_error_outcome(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    code = "function run()\n  local t = nil\n  return t.x\nend"
    out = loop.run_until_complete(invoke(pool, plugin(code, name="tb")))
    assert out.status == 500 and out.body["error"] == "plugin_runtime_error"
    assert out.body["message"].startswith("tb:3: attempt to index")
    assert out.traceback and "tb:3:" in out.traceback and out.body["traceback"] == out.traceback
    err = loop.run_until_complete(invoke(pool, plugin("function run() return nil, 'no' end")))
    assert (err.status, err.body) == (400, {"error": "plugin_error", "message": "no"})


def test_wall_clock_kills_a_slow_c_call(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    slow = plugin(
        "function run() return string.rep('a', 300000):find('.-.-.-.-.-b') end", pid="slow"
    )
    before = pool.stats["restarts"]
    limits = Limits(wall_seconds=0.5)
    t = time.perf_counter()
    out = loop.run_until_complete(invoke(pool, slow, limits=limits))
    assert (out.status, out.body["error"]) == (504, "time_limit")
    # Answered at the deadline, not when the call ends (it would run for hours); the
    # bound leaves room for a worker's start-up on a loaded machine.
    assert time.perf_counter() - t < 30
    assert pool.stats["restarts"] == before + 1
    ok = loop.run_until_complete(invoke(pool, plugin("function run() return 1 end")))
    assert ok.status == 200


def test_crashed_worker_is_replaced(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    host = Host()
    target = plugin("function run() Sobject{name = 'x'} return 1 end", pid="crash")

    async def go() -> Outcome:
        async def crash() -> None:
            busy = [w for w in pool._workers if w not in pool._idle and w not in pool._blank]
            for w in busy:
                if w.key == ("crash", 1):
                    os.kill(w.pid, signal.SIGSEGV)
                    await w.proc.wait()

        host.on_call = crash
        return await invoke(pool, target, host=host)

    out = loop.run_until_complete(go())
    assert out.status == 500 and out.body["error"] == "plugin_runtime_error"
    assert "SIGSEGV" in out.body["message"]
    host.on_call = None
    again = loop.run_until_complete(invoke(pool, target, host=host))
    assert again.status == 200 and again.stats["worker_pid"] != out.stats["worker_pid"]


HOSTILE = [
    ("os.execute('id')", 500, "plugin_runtime_error"),
    ("io.open('/etc/passwd')", 500, "plugin_runtime_error"),
    ("require('os')", 500, "plugin_runtime_error"),
    ("load('\\27LuaS\\0')()", 500, "plugin_runtime_error"),
    ("return python", 204, None),
    ("getmetatable('').__index.dump = 1", 500, "plugin_runtime_error"),
    ("while true do end", 504, "time_limit"),
    ("pcall(function() while true do end end) return 1", 504, "time_limit"),
    (
        "xpcall(function() while true do end end, function() while true do end end)",
        504,
        "time_limit",
    ),
    ("coroutine.wrap(function() while true do end end)()", 504, "time_limit"),
    ("setmetatable({}, {__gc = function() while true do end end})", 500, "plugin_runtime_error"),
    ("return string.rep('a', 300000):find('.-.-.-.-.-b')", 504, "time_limit"),
    ("local t = {} for i = 1, 1e9 do t[i] = i end", 413, "memory_limit"),
    ("return string.rep('x', 1 << 28)", 413, "memory_limit"),
    ("return string.rep('x', 1 << 40)", 500, "plugin_runtime_error"),
    # Deep recursion: "stack overflow" (500) or, under a small cap, the memory limit first.
    ("local function f() return f() + 1 end return f()", (500, 413), None),
    ("return string.rep('x', 8 * 1024 * 1024)", 413, "too_large"),
]


def test_hostile_plugins_are_contained_while_others_run(
    pool: Pool, loop: asyncio.AbstractEventLoop
) -> None:
    limits = Limits(
        instructions=5_000_000,
        wall_seconds=1.0,
        memory_bytes=32 * 1024 * 1024,
        max_result=1024 * 1024,
    )
    benign = plugin("function run(input) return input * 2 end", pid="benign")

    # Only the cases that must end at the wall clock get the short one: 17 workers on a
    # loaded machine can take seconds over a memory or size limit, and must end by it.
    roomy = dataclasses.replace(limits, wall_seconds=60.0)

    async def hostile(code: str, error: str | None) -> Outcome:
        mine = limits if error == "time_limit" else roomy
        return await invoke(pool, plugin(f"function run()\n  {code}\nend"), limits=mine)

    async def go() -> tuple[list[Outcome], int]:
        # Served while the hostile plugins still run: an order, not a rate.
        attack = asyncio.gather(*(hostile(c, e) for c, _, e in HOSTILE))
        n = 0
        while not attack.done():
            out = await invoke(pool, benign, n)
            assert (out.status, out.body) == (200, n * 2)
            n += 1 if not attack.done() else 0
        return await attack, n

    outs, served = loop.run_until_complete(go())
    for (code, status, error), out in zip(HOSTILE, outs, strict=True):
        assert out.status in (status if isinstance(status, tuple) else (status,)), (code, out)
        if error:
            assert out.body["error"] == error, (code, out)
    assert served >= 5
    after = loop.run_until_complete(invoke(pool, benign, 21))
    assert after.body == 42


def test_isolation_between_invocations(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    code = """
    function run(input)
      local seen = {leak = leak, mark = rawget(string, "mark")}
      leak, string.mark = input, input
      return seen
    end"""
    p = plugin(code, pid="iso")
    first = loop.run_until_complete(invoke(pool, p, "one"))
    second = loop.run_until_complete(invoke(pool, p, "two"))
    assert first.body == second.body == {}
    assert first.stats["worker_pid"] == second.stats["worker_pid"]


def test_cap_on_workers_queues_invocations(loop: asyncio.AbstractEventLoop) -> None:
    small = Pool(warm=1, max_workers=2)

    async def go() -> list[Outcome]:
        await small.start()
        host = Host()
        host.on_call = lambda: asyncio.sleep(0.1)
        try:
            code = "function run(i) Sobject{name = 'x'} return i end"
            return await asyncio.gather(
                *(invoke(small, plugin(code, pid=f"p{i % 3}"), i, host=host) for i in range(6))
            )
        finally:
            assert small.stats["workers"] <= 2
            await small.close()

    outs = loop.run_until_complete(go())
    assert [o.body for o in outs] == list(range(6))
