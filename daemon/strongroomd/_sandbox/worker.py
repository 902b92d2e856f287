"""The sandbox worker: ``python -m strongroomd._sandbox.worker``.

Spawned (fork+exec) by :mod:`strongroomd._sandbox.pool` with a minimal
environment. Its stdin and stdout are its one channel: length-prefixed
msgpack frames, as in :mod:`strongroom.wire`. It holds no keys, opens no
database and no socket; it never imports pkcs11. Before anything else it
caps itself with rlimits, so a Lua escape is still a small, short-lived
process that can only ask the daemon for what the plugin may already do.

Messages (daemon -> worker, worker -> daemon)::

    -> {"t": "syntax", "code", "name"}            <- {"t": "syntax", "message"?}
    -> {"t": "bind", "id", "version", "name", "code", "memory"}
                                                  <- {"t": "bound", "message"?}
    -> {"t": "run", "args": bin, "limits": {...}} <- {"t": "call", "method", "path", "body"}*
                                                  -> {"t": "reply", "status", "body"}
                                                  <- {"t": "log", "message", "severity"}*
                                                  <- {"t": "done", "kind", ...}

Every invocation gets a fresh Lua state: the trusted prelude (compiled once
to bytecode here) builds the plugin's environment in it, then the plugin's
own chunk (compiled once per binding) runs in a hooked coroutine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import struct
import sys
import time
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
ADDRESS_SPACE = 1024 * 1024 * 1024
CPU_HARD = 3600  # seconds of CPU over the worker's life; it retires at half of this
MAX_CODEC = 4 * 1024 * 1024
# An error message or traceback is a few lines; a plugin's `error(string.rep(...))`
# of megabytes made the done frame larger than the daemon accepts, and the worker
# was dropped as broken. Cut them here (characters, after decoding).
MAX_MESSAGE = 4096
MAX_TRACEBACK = 16384


def _limit(which: int, soft: int, hard: int | None = None) -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(which, (soft, soft if hard is None else hard))


NICE = 5


def _confine() -> None:
    """rlimits and no_new_privs; applied before lupa (or anything big) loads."""
    _limit(resource.RLIMIT_AS, ADDRESS_SPACE)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, 0)
    _limit(resource.RLIMIT_NOFILE, 16)
    _limit(resource.RLIMIT_FSIZE, 0)
    _limit(resource.RLIMIT_CPU, CPU_HARD, CPU_HARD)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the daemon
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Plugin code never outranks the daemon for the CPU: the daemon keeps
    # serving other requests while a plugin computes, and the next Lua state
    # (built after each reply) does not compete with the reply's delivery.
    os.nice(NICE)


# -- channel -------------------------------------------------------------------


class _Channel:
    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd

    def _read_exact(self, n: int) -> bytes:
        chunks, need = [], n
        while need:
            chunk = os.read(self.rfd, min(need, 1 << 20))
            if not chunk:
                os._exit(0)  # the daemon is gone
            chunks.append(chunk)
            need -= len(chunk)
        return b"".join(chunks)

    def read(self) -> bytes:
        (size,) = HEADER.unpack(self._read_exact(4))
        if size > MAX_FRAME:
            os._exit(3)
        return self._read_exact(size)

    def write_payload(self, payload: bytes) -> None:
        data = memoryview(HEADER.pack(len(payload)) + payload)
        while data:
            n = os.write(self.wfd, data)
            data = data[n:]

    def send(self, obj: Any) -> None:
        self.write_payload(msgpack.packb(obj, use_bin_type=True))

    def recv(self) -> Any:
        return msgpack.unpackb(self.read(), raw=False, max_ext_len=0)


# -- what Lua may ask of Python ---------------------------------------------------
# Every operation takes and returns Lua strings (bytes) or numbers; a failure is
# returned as (None, b"message"), never raised, so no Python exception object
# can reach Lua.


def _b64decode(s: bytes) -> bytes:
    s = s.strip()
    s = s.replace(b"-", b"+").replace(b"_", b"/")
    s += b"=" * (-len(s) % 4)
    return base64.b64decode(s, validate=True)


def _bitop(op: str):
    def f(a: bytes, b: bytes, _c: Any) -> bytes:
        x, y = int.from_bytes(a, "big"), int.from_bytes(b, "big")
        r = x & y if op == "and" else x | y if op == "or" else x ^ y
        return r.to_bytes(len(a), "big")

    return f


def _iso_parse(s: bytes, _b: Any, _c: Any) -> int:
    text = s.decode("ascii").strip()
    for fmt in ("%Y%m%dT%H%M%SZ", "%Y%m%dT%H%M%S.%fZ"):
        try:
            dt = datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.UTC)
            break
        except ValueError:
            dt = None
    if dt is None:
        dt = datetime.datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.UTC)
    delta = dt - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    ns = (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    if not -(2**63) <= ns < 2**63:  # else lupa fails to convert it: "internal error"
        raise ValueError("time out of range (years 1678 to 2262)")
    return ns


def _iso_format(ns: int, _b: Any, _c: Any) -> bytes:
    secs = ns // 1_000_000_000
    dt = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=secs)
    return dt.strftime("%Y%m%dT%H%M%SZ").encode()


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, max_ext_len=0)


def _pack(value: Any) -> bytes:
    out = msgpack.packb(value, use_bin_type=True)
    if len(out) > MAX_CODEC:
        raise ValueError("value too large")
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return base64.b64encode(o).decode()
    raise TypeError(f"cannot encode {type(o).__name__}")


def _json_encode(packed: bytes, _b: Any, _c: Any) -> bytes:
    return json.dumps(
        _unpack(packed), default=_json_default, ensure_ascii=False, separators=(",", ":")
    ).encode()


def _json_decode(s: bytes, _b: Any, _c: Any) -> bytes:
    if len(s) > MAX_CODEC:
        raise ValueError("input too large")
    return _pack(json.loads(s))


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError("integer out of range")


def _cbor_enc(v: Any, out: list[bytes], depth: int = 0) -> None:
    if depth > 100:
        raise ValueError("value nested too deeply")
    if v is None:
        out.append(b"\xf6")
    elif v is True or v is False:
        out.append(b"\xf5" if v else b"\xf4")
    elif isinstance(v, int):
        out.append(_cbor_head(0, v) if v >= 0 else _cbor_head(1, -1 - v))
    elif isinstance(v, float):
        out.append(b"\xfb" + struct.pack(">d", v))
    elif isinstance(v, bytes):
        out += (_cbor_head(2, len(v)), v)
    elif isinstance(v, str):
        b = v.encode()
        out += (_cbor_head(3, len(b)), b)
    elif isinstance(v, list):
        out.append(_cbor_head(4, len(v)))
        for x in v:
            _cbor_enc(x, out, depth + 1)
    elif isinstance(v, dict):
        out.append(_cbor_head(5, len(v)))
        for k, x in v.items():
            _cbor_enc(k, out, depth + 1)
            _cbor_enc(x, out, depth + 1)
    else:
        raise ValueError(f"cannot encode {type(v).__name__}")


def _cbor_encode(packed: bytes, _b: Any, _c: Any) -> bytes:
    out: list[bytes] = []
    _cbor_enc(_unpack(packed), out)
    return b"".join(out)


def _cbor_dec(s: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if depth > 100:
        raise ValueError("CBOR nested too deeply")
    ib = s[pos]
    pos += 1
    major, info = ib >> 5, ib & 31
    if major == 7:
        if info == 20:
            return False, pos
        if info == 21:
            return True, pos
        if info in (22, 23):
            return None, pos
        if info == 25:
            return struct.unpack_from(">e", s, pos)[0], pos + 2
        if info == 26:
            return struct.unpack_from(">f", s, pos)[0], pos + 4
        if info == 27:
            return struct.unpack_from(">d", s, pos)[0], pos + 8
        raise ValueError("unsupported CBOR simple value")
    if info < 24:
        n = info
    elif info < 28:
        size = 1 << (info - 24)
        n = int.from_bytes(s[pos : pos + size], "big")
        if pos + size > len(s):
            raise ValueError("truncated CBOR")
        pos += size
    else:
        raise ValueError("indefinite-length CBOR items are not supported")
    if major == 0:
        return n, pos
    if major == 1:
        return -1 - n, pos
    if major in (2, 3):
        if pos + n > len(s):
            raise ValueError("truncated CBOR")
        raw = s[pos : pos + n]
        return (raw if major == 2 else raw.decode()), pos + n
    if major == 4:
        if n > len(s):
            raise ValueError("truncated CBOR")
        items = []
        for _ in range(n):
            v, pos = _cbor_dec(s, pos, depth + 1)
            items.append(v)
        return items, pos
    if major == 5:
        if n > len(s):
            raise ValueError("truncated CBOR")
        m: dict[Any, Any] = {}
        for _ in range(n):
            k, pos = _cbor_dec(s, pos, depth + 1)
            v, pos = _cbor_dec(s, pos, depth + 1)
            if isinstance(k, (list, dict)):
                raise ValueError("unsupported CBOR map key")
            m[k] = v
        return m, pos
    return _cbor_dec(s, pos, depth + 1)  # major 6: a tag; keep the tagged value


def _cbor_decode(s: bytes, _b: Any, _c: Any) -> bytes:
    if len(s) > MAX_CODEC:
        raise ValueError("input too large")
    try:
        v, pos = _cbor_dec(s, 0, 0)
    except (IndexError, struct.error):
        raise ValueError("truncated CBOR") from None
    if pos != len(s):
        raise ValueError("trailing bytes after CBOR value")
    return _pack(v)


class _Runner:
    def __init__(self, channel: _Channel) -> None:
        self.channel = channel
        self.bound: tuple[str, int] | None = None
        self.chunk: bytes = b""
        self.chunkname: bytes = b""
        self.ops = {
            b"hexd": lambda a, b, c: bytes.fromhex(a.decode("ascii")),
            b"hexe": lambda a, b, c: a.hex().upper().encode(),
            b"b64d": lambda a, b, c: _b64decode(a),
            b"b64e": lambda a, b, c: base64.b64encode(a),
            b"b64u": lambda a, b, c: base64.urlsafe_b64encode(a),
            b"rand": lambda a, b, c: os.urandom(a),
            b"now": lambda a, b, c: time.time_ns(),
            b"iso_p": _iso_parse,
            b"iso_f": _iso_format,
            b"and": _bitop("and"),
            b"or": _bitop("or"),
            b"xor": _bitop("xor"),
            b"json_e": _json_encode,
            b"json_d": _json_decode,
            b"cbor_e": _cbor_encode,
            b"cbor_d": _cbor_decode,
            b"call": self._call,
            b"log": self._log,
        }
        self._next: tuple[Any, Any] | None = None
        self._spent: Any = None
        # Trusted text, compiled once; stripped (its frames carry no names or lines).
        self.prelude = _compile(_runtime(None), _read_prelude(), b"=prelude", strip=True)

    # The one Python callable a Lua state ever holds.
    def py(self, op: bytes, a: Any = None, b: Any = None, c: Any = None) -> Any:
        try:
            return self.ops[op](a, b, c)
        except BaseException as exc:  # nothing may escape into Lua
            text = str(exc) if isinstance(exc, (ValueError, TypeError)) else type(exc).__name__
            return None, (text or "error").encode("utf-8", "replace")[:400]

    def _call(self, frame: bytes, _b: Any, _c: Any) -> bytes:
        self.channel.write_payload(frame)
        return self.channel.read()

    def _log(self, message: bytes, severity: bytes, _c: Any) -> bool:
        self.channel.send(
            {
                "t": "log",
                "message": message.decode("utf-8", "replace"),
                "severity": severity.decode("ascii", "replace"),
            }
        )
        return True

    def syntax(self, msg: dict[str, Any]) -> dict[str, Any]:
        err = _syntax_error(msg["code"], msg["name"], msg.get("memory", 64 << 20))
        return {"t": "syntax"} if err is None else {"t": "syntax", "message": err}

    def bind(self, msg: dict[str, Any]) -> dict[str, Any]:
        key = (msg["id"], msg["version"])
        if self.bound is not None and self.bound != key:
            return {"t": "bound", "message": "this worker serves another plugin"}
        name = ("=" + msg["name"]).encode()
        lua = _runtime(msg.get("memory", 64 << 20))
        try:
            self.chunk = _compile(lua, msg["code"].encode(), name)
        except _Syntax as exc:
            return {"t": "bound", "message": str(exc)}
        except lupa.LuaMemoryError:
            return {"t": "bound", "message": "not enough memory to compile the plugin"}
        self.bound, self.chunkname = key, name
        return {"t": "bound"}

    def prepare(self) -> None:
        """Build the next invocation's fresh Lua state now, off the request path."""
        self._spent = None
        lua = _runtime(64 << 20)
        entry = lua.globals().load(self.prelude, b"=prelude", b"b")(self.py)
        self._next = (lua, entry)

    def run(self, msg: dict[str, Any]) -> dict[str, Any]:
        lim = msg["limits"]
        used = _cpu_used()
        _limit(resource.RLIMIT_CPU, min(CPU_HARD, int(used + lim["wall_seconds"]) + 2), CPU_HARD)
        t0 = time.perf_counter_ns()
        if self._next is None:
            self.prepare()
        lua, entry = self._next
        self._next = None
        self._spent = lua  # closed after the reply is sent, by prepare()
        lua.set_max_memory(lim["memory_bytes"])
        t1 = time.perf_counter_ns()
        try:
            r = entry(
                self.chunk,
                self.chunkname,
                True,
                msg["args"],
                lim["instructions"],
                lim["max_output"],
                lim["max_result"],
            )
        except lupa.LuaMemoryError:
            r = ("memory", None, 413, b"the plugin exceeded its memory limit", None, 0, 0, b"")
        except lupa.LuaError as exc:
            text = str(exc).splitlines()[0] if str(exc) else "Lua error"
            r = ("runtime", None, 500, text.encode(), None, 0, 0, b"")
        t2 = time.perf_counter_ns()
        kind, body, status, message, tb, instructions, peak_kb, output = r
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        out = {
            "t": "done",
            "kind": kind,
            "status": status if isinstance(status, int) else None,
            "body": body,
            "message": _cut(_text(message), MAX_MESSAGE),
            "traceback": _cut(_text(tb), MAX_TRACEBACK),
            "output": _text(output) or "",
            "instructions": int(instructions or 0),
            "memory_peak": int((peak_kb or 0) * 1024),
            "setup_us": (t1 - t0) // 1000,
            "run_us": (t2 - t1) // 1000,
        }
        if _cpu_used() > CPU_HARD // 2:
            out["retire"] = True
        return out


class _Syntax(Exception):
    pass


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _cut(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + " [truncated]"


def _cpu_used() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _refuse(obj: Any, name: Any, is_setting: bool) -> Any:
    raise AttributeError("access refused")


def _runtime(max_memory: int | None) -> Any:
    return lupa.LuaRuntime(
        register_eval=False,
        register_builtins=False,
        unpack_returned_tuples=True,
        encoding=None,
        attribute_filter=_refuse,
        max_memory=max_memory,
    )


def _compile(lua: Any, code: bytes, name: bytes, *, strip: bool = False) -> bytes:
    """Compile text (never bytecode) and dump it with its line information."""
    g = lua.globals()
    r = g.load(code, name, b"t", lua.table())
    if isinstance(r, tuple):  # (nil, message)
        raise _Syntax(_text(r[1]))
    fn = r
    return g.string.dump(fn, strip)


def _syntax_error(code: str, name: str, memory: int) -> str | None:
    lua = _runtime(memory)
    try:
        _compile(lua, code.encode(), ("=" + name).encode())
    except _Syntax as exc:
        return str(exc)
    except lupa.LuaMemoryError:
        return "not enough memory to compile the plugin"
    return None


def _read_prelude() -> bytes:
    with open(os.path.join(os.path.dirname(__file__), "prelude.lua"), "rb") as f:
        return f.read()


def main() -> None:
    _confine()
    global base64, datetime, json, lupa, msgpack
    import base64
    import datetime
    import json

    import lupa.lua53 as lupa
    import msgpack

    # fd 1 is the channel; anything printed by mistake goes to stderr instead.
    wfd = os.dup(1)
    os.dup2(2, 1)
    channel = _Channel(0, wfd)
    runner = _Runner(channel)
    runner.prepare()
    channel.send({"t": "ready", "pid": os.getpid()})
    handlers = {"syntax": runner.syntax, "bind": runner.bind, "run": runner.run}
    while True:
        msg = channel.recv()
        kind = msg.get("t") if isinstance(msg, dict) else None
        if kind == "exit":
            return
        handler = handlers.get(kind)
        if handler is None:
            sys.stderr.write(f"sandbox worker: unexpected message {kind!r}\n")
            os._exit(2)
        channel.send(handler(msg))
        if kind != "syntax":
            runner.prepare()


if __name__ == "__main__":
    main()
