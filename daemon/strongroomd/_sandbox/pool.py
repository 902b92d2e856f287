"""Daemon side of the sandbox: spawn workers, talk to them, kill and replace.

A worker serves one plugin (id + version). The pool keeps ``warm`` blank,
pre-spawned workers so that an invocation never waits for a process to start:
it reuses an idle worker already bound to its plugin, else binds a blank one,
and a background task spawns the next blank. ``max_workers`` caps the number
of processes; when every slot is taken, the least recently used idle worker
is retired to make room, and when all are busy the invocation waits.

Each invocation has a hard wall-clock deadline: when it passes, the worker is
SIGKILLed and replaced (504). A worker that dies (crash, rlimit) is replaced
too (500), as is one that hit its memory cap (413). Calls a plugin makes to
the API arrive on the same channel and go to :meth:`Host.request`; they are
never cancelled half-way by the deadline, which is checked again after each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import strongroom
from strongroom.wire import HEADER, FrameError, decode, encode, frame

import strongroomd
from strongroomd.errors import BadRequest, Internal, status_of

log = logging.getLogger("strongroomd.sandbox")

START_TIMEOUT = 20.0
SYNTAX_TIMEOUT = 5.0
MAX_CALL_FRAME = 8 * 1024 * 1024
# AuditLog.log entries kept per invocation (the prelude refuses more); each one is an
# audit record, and a worker must not be able to flood the audit log.
MAX_LOGS = 100
MAX_LOG_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int = 64 * 1024 * 1024  # Lua allocator cap -> 413 memory_limit
    instructions: int = 100_000_000  # VM instruction budget -> 504 time_limit
    wall_seconds: float = 5.0  # hard deadline; the worker is killed -> 504 time_limit
    max_output: int = 64 * 1024  # captured print() bytes (truncated beyond)
    max_result: int = 4 * 1024 * 1024  # encoded result size -> 413 too_large


@dataclass(frozen=True, slots=True)
class PluginCode:
    id: str
    name: str  # chunk name in tracebacks
    version: int
    code: str


@dataclass(slots=True)
class Outcome:
    """How an invocation ended. ``failure`` is the error code when the sandbox
    ended it (limits, crashes, syntax); its status comes from the code's error
    class. A plugin's own ``Error{status=...}`` is not a failure: its status stands."""

    status: int
    body: Any
    output: str
    traceback: str | None
    stats: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


def _failed(
    code: str,
    message: str,
    output: str = "",
    tb: str | None = None,
    stats: dict[str, Any] | None = None,
) -> Outcome:
    return Outcome(status_of(code), _error(code, message, tb), output, tb, stats or {}, code)


class Host(Protocol):
    async def request(self, method: str, path: str, body: Any) -> tuple[int, Any]: ...

    def log(self, message: str, severity: str) -> None: ...

    # request{}: a plugin's outbound HTTP call, made by the daemon (see
    # strongroomd.outbound); ``timeout`` is what is left of the invocation's wall clock.
    async def http(self, msg: dict[str, Any], timeout: float) -> tuple[int, Any]: ...


def _error(code: str, message: str, tb: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": code, "message": message}
    if tb:
        body["traceback"] = tb
    return body


class _WorkerGone(Exception):
    pass


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.key: tuple[str, int] | None = None
        self.invocations = 0
        assert proc.stdin is not None and proc.stdout is not None
        self._w = proc.stdin
        self._r = proc.stdout
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def send(self, obj: Any) -> None:
        try:
            self._w.write(frame(obj))
            await self._w.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise _WorkerGone(str(exc)) from None

    async def recv(self, max_frame: int = MAX_CALL_FRAME) -> dict[str, Any]:
        try:
            (size,) = HEADER.unpack(await self._r.readexactly(4))
            if size > max_frame:
                raise FrameError("too_large", f"worker frame of {size} bytes")
            msg = decode(await self._r.readexactly(size), max_field=max_frame)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _WorkerGone(str(exc)) from None
        if not isinstance(msg, dict):
            raise FrameError("malformed_frame", "worker sent a non-map frame")
        return msg

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def died(self) -> str:
        """Wait briefly for the exit status; describe how the worker ended."""
        try:
            async with asyncio.timeout(2.0):
                rc = await self.proc.wait()
        except TimeoutError:
            self.kill()
            return "the worker stopped answering"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            return f"the worker process was killed by {name}"
        return f"the worker process exited with status {rc}"


def _child_env(inspectable: bool = False) -> dict[str, str]:
    paths = {
        os.path.dirname(os.path.dirname(os.path.abspath(strongroomd.__file__))),
        os.path.dirname(os.path.dirname(os.path.abspath(strongroom.__file__))),
    }
    return {
        "PATH": os.defpath,
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join(sorted(paths)),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        **({"STRONGROOM_INSPECTABLE": "1"} if inspectable else {}),
    }


class Pool:
    """Warm, supervised Lua workers; see the module docstring."""

    def __init__(
        self,
        *,
        warm: int = 2,
        max_workers: int = 8,
        python: str = sys.executable,
        inspectable: bool = False,
    ) -> None:
        if max_workers < 1 or warm < 0:
            raise ValueError("need max_workers >= 1 and warm >= 0")
        self.warm = min(warm, max_workers)
        self.max_workers = max_workers
        self.python = python
        self._env = _child_env(inspectable)
        self._blank: list[_Worker] = []
        self._idle: OrderedDict[_Worker, None] = OrderedDict()  # bound and idle, LRU first
        self._workers: set[_Worker] = set()
        self._starting = 0
        self._changed: asyncio.Condition | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._stats: dict[str, int] = {
            "spawned": 0,
            "restarts": 0,
            "invocations": 0,
            "time_limit": 0,
            "memory_limit": 0,
            "crashes": 0,
            "evicted": 0,
        }

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self._changed = asyncio.Condition()
        self._closed = False
        blanks = await asyncio.gather(*(self._spawn() for _ in range(self.warm)))
        self._blank.extend(blanks)

    async def close(self) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        workers = list(self._workers)
        for w in workers:
            w.kill()
        for w in workers:
            try:
                async with asyncio.timeout(5.0):
                    await w.proc.wait()
            except TimeoutError:
                log.warning("sandbox worker %d did not exit", w.pid)
            if w._stderr_task is not None:
                w._stderr_task.cancel()
        self._workers.clear()
        self._blank.clear()
        self._idle.clear()

    @property
    def stats(self) -> dict[str, Any]:
        return {
            **self._stats,
            "workers": len(self._workers),
            "blank": len(self._blank),
            "idle": len(self._idle),
        }

    # -- processes ---------------------------------------------------------------
    async def _spawn(self) -> _Worker:
        self._starting += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-s",
                "-m",
                "strongroomd._sandbox.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                cwd="/",
                close_fds=True,
            )
            w = _Worker(proc)
            w._stderr_task = self._task(self._drain_stderr(w))
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    hello = await w.recv()
            except (TimeoutError, _WorkerGone, FrameError):
                w.kill()
                raise Internal("a sandbox worker failed to start") from None
            if hello.get("t") != "ready":
                w.kill()
                raise Internal("a sandbox worker failed to start")
            self._workers.add(w)
            self._stats["spawned"] += 1
            return w
        finally:
            self._starting -= 1

    async def _drain_stderr(self, w: _Worker) -> None:
        stream = w.proc.stderr
        assert stream is not None
        while True:
            line = await stream.readline()
            if not line:
                return
            log.warning("sandbox worker %d: %s", w.pid, line.decode("utf-8", "replace").rstrip())

    def _task(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _discard(self, w: _Worker) -> None:
        w.kill()
        self._workers.discard(w)
        self._idle.pop(w, None)
        if w in self._blank:
            self._blank.remove(w)
        self._task(self._reap(w))
        self._replenish_soon()

    async def _reap(self, w: _Worker) -> None:
        await w.proc.wait()
        if w._stderr_task is not None:
            await asyncio.wait([w._stderr_task], timeout=1.0)

    def _room(self) -> bool:
        return len(self._workers) + self._starting < self.max_workers

    def _evict_lru(self, spare: tuple[str, int] | None = None) -> bool:
        """Retire the least recently used idle worker, but none bound to ``spare``."""
        for w in self._idle:
            if spare is None or w.key != spare:
                del self._idle[w]
                self._stats["evicted"] += 1
                self._discard(w)
                return True
        return False

    def _replenish_soon(self) -> None:
        if not self._closed and self._changed is not None:
            self._task(self._replenish())

    async def _replenish(self) -> None:
        # Blanks are made only where there is room: retiring a bound idle worker
        # to make one would throw away the worker the next invocation wants.
        while not self._closed and len(self._blank) + self._starting < self.warm:
            if not self._room():
                return
            try:
                w = await self._spawn()
            except Internal:
                log.exception("could not spawn a sandbox worker")
                return
            if self._closed:
                w.kill()
                return
            self._blank.append(w)
            await self._notify()

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _blank_worker(self, spare: tuple[str, int] | None = None) -> _Worker | None:
        """A blank worker now (a warm one, or a new one where there is room), or None."""
        if self._changed is None:
            raise RuntimeError("Pool.start() was not called")
        if self._closed:
            raise Internal("the sandbox pool is closed")
        while self._blank:
            w = self._blank.pop()
            if w.alive:
                self._replenish_soon()
                return w
            self._discard(w)
        if self._room() or self._evict_lru(spare):
            w = await self._spawn()
            self._replenish_soon()
            return w
        return None

    async def _wait_for_change(self) -> None:
        assert self._changed is not None
        async with self._changed:
            # A notify may come between the caller's look and this wait: look again soon.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.05)

    def _release(self, w: _Worker, *, healthy: bool, keep: bool = True) -> None:
        if not healthy or not w.alive or not keep or self._closed:
            if not healthy or not w.alive:
                self._stats["restarts"] += 1
            self._discard(w)
        elif w.key is None:
            self._blank.append(w)
        else:
            self._idle[w] = None
        self._task(self._notify())

    # -- the interface -------------------------------------------------------------
    async def check_syntax(self, code: str, name: str) -> None:
        while (w := await self._blank_worker()) is None:
            await self._wait_for_change()
        healthy = False
        try:
            async with asyncio.timeout(SYNTAX_TIMEOUT):
                await w.send({"t": "syntax", "code": code, "name": name})
                msg = await w.recv()
            healthy = msg.get("t") == "syntax"
        except (TimeoutError, _WorkerGone, FrameError):
            raise Internal("the syntax check failed") from None
        finally:
            self._release(w, healthy=healthy)
        if msg.get("message"):
            raise BadRequest(str(msg["message"]), code="syntax_error")

    async def _acquire(
        self, plugin: PluginCode, limits: Limits, discard: bool
    ) -> tuple[_Worker | None, str | None]:
        key = (plugin.id, plugin.version)
        while True:
            if not discard:
                for w in reversed(self._idle):
                    if w.key == key:
                        del self._idle[w]
                        return w, None
                for w in [w for w in self._idle if w.key and w.key[0] == plugin.id]:
                    self._idle.pop(w, None)
                    self._discard(w)  # an older version of this plugin
            blank = await self._blank_worker(spare=None if discard else key)
            if blank is not None:
                w = blank
                break
            # Every worker is busy: the next one released may be bound to this plugin.
            await self._wait_for_change()
        try:
            await w.send(
                {
                    "t": "bind",
                    "id": plugin.id,
                    "version": plugin.version,
                    "name": plugin.name,
                    "code": plugin.code,
                    "memory": limits.memory_bytes,
                }
            )
            async with asyncio.timeout(max(limits.wall_seconds, SYNTAX_TIMEOUT)):
                msg = await w.recv()
        except (TimeoutError, _WorkerGone, FrameError):
            self._release(w, healthy=False)
            raise Internal("a sandbox worker failed to load the plugin") from None
        if msg.get("message"):
            self._release(w, healthy=True)  # still blank
            return None, str(msg["message"])
        w.key = key
        return w, None

    async def forget(self, plugin_id: str) -> None:
        """Retire the idle workers bound to a plugin (after an update or delete)."""
        for w in [w for w in self._idle if w.key and w.key[0] == plugin_id]:
            self._idle.pop(w, None)
            self._discard(w)

    async def invoke(
        self,
        plugin: PluginCode,
        input: Any,
        *,
        url: dict[str, Any],
        method: str,
        context: dict[str, Any],
        host: Host,
        limits: Limits,
        discard: bool = False,
    ) -> Outcome:
        """Run ``plugin`` once. ``discard``: use a fresh worker and drop it afterwards."""
        t0 = time.perf_counter()
        self._stats["invocations"] += 1
        w, syntax = await self._acquire(plugin, limits, discard)
        if w is None:
            return _failed("syntax_error", syntax or "syntax error", stats={"elapsed_ms": _ms(t0)})
        healthy = True
        calls = 0
        try:
            outcome, healthy, calls = await self._run(w, input, url, method, context, host, limits)
        except BaseException:
            healthy = False
            raise
        finally:
            w.invocations += 1
            self._release(w, healthy=healthy, keep=not discard)
        outcome.stats.update({"elapsed_ms": _ms(t0), "worker_pid": w.pid, "api_calls": calls})
        return outcome

    async def _run(
        self,
        w: _Worker,
        input: Any,
        url: dict[str, Any],
        method: str,
        context: dict[str, Any],
        host: Host,
        limits: Limits,
    ) -> tuple[Outcome, bool, int]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.wall_seconds
        max_frame = max(limits.max_result, MAX_CALL_FRAME) + 65536
        calls = logs = 0
        try:
            await w.send(
                {
                    "t": "run",
                    "args": encode([input, url, method, context]),
                    "limits": {
                        "memory_bytes": limits.memory_bytes,
                        "instructions": limits.instructions,
                        "wall_seconds": limits.wall_seconds,
                        "max_output": limits.max_output,
                        "max_result": limits.max_result,
                    },
                }
            )
            while True:
                if loop.time() >= deadline:
                    raise TimeoutError
                async with asyncio.timeout_at(deadline):
                    msg = await w.recv(max_frame)
                t = msg.get("t")
                if t == "done":
                    break
                if t == "call":
                    calls += 1
                    status, body = await self._host_call(host, msg)
                    await w.send({"t": "reply", "status": status, "body": body})
                elif t == "http":  # request{}: the daemon makes the call, bounded by the deadline
                    status, body = await self._host_http(host, msg, deadline - loop.time())
                    await w.send({"t": "reply", "status": status, "body": body})
                elif t == "log":
                    logs += 1
                    if logs <= MAX_LOGS:
                        message = str(msg.get("message", ""))[:MAX_LOG_CHARS]
                        host.log(message, str(msg.get("severity", "INFO"))[:16])
                else:
                    raise FrameError("malformed_frame", f"unexpected worker message {t!r}")
        except TimeoutError:
            self._stats["time_limit"] += 1
            w.kill()
            msg_ = f"the plugin ran longer than {limits.wall_seconds:g} s"
            return _failed("time_limit", msg_), False, calls
        except _WorkerGone:
            why = await w.died()
            if w.proc.returncode == -signal.SIGXCPU:
                self._stats["time_limit"] += 1
                return _failed("time_limit", "the plugin used up its CPU time"), False, calls
            self._stats["crashes"] += 1
            log.warning("sandbox worker %d died: %s", w.pid, why)
            failed = _failed("plugin_runtime_error", f"the plugin's sandbox failed: {why}")
            return failed, False, calls
        except FrameError as exc:
            self._stats["crashes"] += 1
            log.warning("sandbox worker %d broke the protocol: %s", w.pid, exc.message)
            return _failed("internal", "sandbox failure"), False, calls
        return (
            self._outcome(msg, limits),
            msg.get("kind") != "memory" and not msg.get("retire"),
            calls,
        )

    async def _host_call(self, host: Host, msg: dict[str, Any]) -> tuple[int, Any]:
        method, path = msg.get("method"), msg.get("path")
        if not isinstance(method, str) or not isinstance(path, str):
            return status_of("bad_request"), _error(
                "bad_request", "a plugin call needs a method and a path"
            )
        try:
            return await host.request(method, path, msg.get("body"))
        except Exception:
            log.exception("plugin API call %s %s failed", method, path)
            return status_of("internal"), _error("internal", "internal error")

    async def _host_http(self, host: Host, msg: dict[str, Any], timeout: float) -> tuple[int, Any]:
        http = getattr(host, "http", None)
        if http is None:
            return status_of("forbidden"), _error("forbidden", "request{} is not available here")
        try:
            return await http(msg, timeout)
        except Exception:
            log.exception("plugin request{} failed")
            return status_of("internal"), _error("internal", "internal error")

    def _outcome(self, msg: dict[str, Any], limits: Limits) -> Outcome:
        kind = msg.get("kind")
        output = msg.get("output") or ""
        tb = msg.get("traceback")
        message = msg.get("message") or ""
        stats = {
            "instructions": msg.get("instructions", 0),
            "memory_peak": msg.get("memory_peak", 0),
            "setup_us": msg.get("setup_us", 0),
            "run_us": msg.get("run_us", 0),
        }
        if kind == "ok":
            raw = msg.get("body")
            if raw is None:
                return Outcome(204, None, output, None, stats)
            try:
                body = decode(raw, max_field=limits.max_result + 16)
            except FrameError as exc:
                return _failed("internal", exc.message, output, None, stats)
            return Outcome(200, body, output, None, stats)
        if kind == "error":
            status = msg.get("status")
            if not isinstance(status, int) or not 400 <= status <= 599:
                status = 400
            return Outcome(status, _error("plugin_error", message, tb), output, tb, stats)
        if kind == "time":
            self._stats["time_limit"] += 1
            return _failed("time_limit", message, output, None, stats)
        if kind == "memory":
            self._stats["memory_limit"] += 1
            return _failed("memory_limit", message, output, None, stats)
        if kind == "too_large":
            return _failed("too_large", message, output, None, stats)
        if kind == "syntax":
            return _failed("syntax_error", message, output, None, stats)
        return _failed("plugin_runtime_error", message, output, tb, stats)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
