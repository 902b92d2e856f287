"""The worker process and its Lua environment, driven over its real channel.

Each test binds a fresh worker (``python -m strongroomd._sandbox.worker``)
to one plugin and answers the plugin's API calls from a small table, so the
conversions, return conventions, Lua API mapping and the sandbox's first two
layers (environment, budgets) are checked without the daemon.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

CONTEXT = {
    "principal": {"kind": "app", "id": "app-1", "name": "billing", "groups": ["g1", "g2"]},
    "this_plugin": {"id": "plug-1", "name": "myplugin", "groups": ["g1"]},
}
LIMITS = {
    "memory_bytes": 16 * 1024 * 1024,
    "instructions": 2_000_000,
    "wall_seconds": 5.0,
    "max_output": 1024,
    "max_result": 1024 * 1024,
}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(  # inspectable: the tests read its /proc files
            [sys.executable, "-m", "strongroomd._sandbox.worker"],
            env={**os.environ, "STRONGROOM_INSPECTABLE": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.recv()["t"] == "ready"
        self.calls: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []

    def send(self, obj: Any) -> None:
        data = pack(obj)
        assert self.proc.stdin is not None
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        head = self.proc.stdout.read(4)
        assert len(head) == 4, "worker closed its channel"
        (n,) = struct.unpack(">I", head)
        return msgpack.unpackb(self.proc.stdout.read(n), raw=False)

    def bind(self, code: str, name: str = "myplugin") -> dict[str, Any]:
        self.send({"t": "bind", "id": "p", "version": 1, "name": name, "code": code})
        return self.recv()

    def run(
        self,
        input: Any = None,
        *,
        url: dict[str, Any] | None = None,
        method: str = "POST",
        host: Callable[[str, str, Any], tuple[int, Any]] | None = None,
        **limits: Any,
    ) -> dict[str, Any]:
        url = url if url is not None else {"path": ["sys", "v1", "plugins", "p"], "query": None}
        args = pack([input, url, method, CONTEXT])
        self.send({"t": "run", "args": args, "limits": {**LIMITS, **limits}})
        while True:
            msg = self.recv()
            if msg["t"] == "call":
                self.calls.append(msg)
                status, body = (host or no_host)(msg["method"], msg["path"], msg.get("body"))
                self.send({"t": "reply", "status": status, "body": body})
            elif msg["t"] == "log":
                self.logs.append(msg)
            else:
                assert msg["t"] == "done"
                if msg.get("body") is not None:
                    msg["body"] = msgpack.unpackb(msg["body"], raw=False)
                return msg

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def no_host(method: str, path: str, body: Any) -> tuple[int, Any]:
    return 404, {"error": "no_such_route", "message": f"no route for {path}"}


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


def run(worker: Worker, code: str, input: Any = None, **kw: Any) -> dict[str, Any]:
    bound = worker.bind(code)
    assert "message" not in bound, bound
    return worker.run(input, **kw)


def ok(worker: Worker, code: str, input: Any = None, **kw: Any) -> Any:
    r = run(worker, code, input, **kw)
    assert r["kind"] == "ok", r
    return r["body"]


# -- conversions ----------------------------------------------------------------


def test_echo_round_trip(worker: Worker) -> None:
    value = {
        "m": {"a": 1, "b": {"c": [True, False]}},
        "arr": [1, None, "x"],
        "bin": b"\x00\xff",
        "n": None,
        "f": 1.5,
        "big": 2**40,
        "neg": -70000,
        "s": "héllo",
    }
    assert ok(worker, "function run(input) return input end", value) == value


def test_input_becomes_lua_values(worker: Worker) -> None:
    code = """
    function run(input, url, method)
      return {type(input.bin), getmetatable(input.bin) == Blob, input.n == null, #input.arr,
              input.arr[2] == null, math.type(input.big), math.type(input.f),
              input.bin:hex(), url.path[4], url.query == nil, method, input.s}
    end"""
    value = {"bin": b"\x01\xab", "n": None, "arr": [1, None, 3], "big": 7, "f": 2.0, "s": "x"}
    assert ok(worker, code, value, method="GET") == [
        "table",
        True,
        True,
        3,
        True,
        "integer",
        "float",
        "01AB",
        "p",
        True,
        "GET",
        "x",
    ]


def test_nil_input_is_null(worker: Worker) -> None:
    assert ok(worker, "function run(input) return {input == null} end") == [True]


def test_lua_values_become_msgpack(worker: Worker) -> None:
    code = r"""
    function run()
      return {list = {1, 2, 3}, holes = {[1] = 1, [3] = 3}, empty = {},
              blob = Blob.from_bytes("\0\1"), raw = "\255\254", n = null, float = 0.5,
              ints = {[10] = "a"}}
    end"""
    assert ok(worker, code) == {
        "list": [1, 2, 3],
        "holes": {"1": 1, "3": 3},
        "empty": {},
        "blob": b"\x00\x01",
        "raw": b"\xff\xfe",
        "n": None,
        "float": 0.5,
        "ints": {"10": "a"},
    }


def test_unencodable_result_is_runtime_error(worker: Worker) -> None:
    r = run(worker, "function run() return {f = print} end")
    assert r["status"] == 500 and "cannot encode a function" in r["message"]


# -- check / run conventions ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("return", 204, None),
        ("return nil", 204, None),
        ('return nil, "bad input"', 400, "bad input"),
        ('return Error.new("nope")', 400, "nope"),
        ('return Error.new{status = 403, message = "forbidden here"}', 403, "forbidden here"),
        ('return nil, Error.new{status = 409, message = "clash"}', 409, "clash"),
        ('return 1, Error.new{status = 422, message = "second"}', 422, "second"),
    ],
)
def test_return_conventions(worker: Worker, body: str, status: int, message: str | None) -> None:
    r = run(worker, f"function run(input)\n  {body}\nend")
    assert r["status"] == status
    if message is None:
        assert r["kind"] == "ok" and r["body"] is None
    else:
        assert r["kind"] == "error" and r["message"] == message


def test_check_stops_run(worker: Worker) -> None:
    code = """
    function check(input)
      if input.x ~= 1 then return nil, Error.new{status = 401, message = "no"} end
    end
    function run(input) print("ran") return "ran" end"""
    r = run(worker, code, {"x": 2})
    assert (r["status"], r["message"], r["output"]) == (401, "no", "")


def test_check_error_alone_and_globals_reach_run(worker: Worker) -> None:
    code = """
    function check(input) seen = input.x; if input.x == 0 then return Error.new("zero") end end
    function run(input) return seen * 2 end"""
    bound = worker.bind(code)
    assert "message" not in bound
    assert worker.run({"x": 21})["body"] == 42
    assert worker.run({"x": 0})["message"] == "zero"


def test_uncaught_error_has_clean_traceback(worker: Worker) -> None:
    code = (
        "local function helper(x)\n  local y = x.missing.field\nend\n\n"
        "function run()\n  helper({})\nend\n"
    )
    r = run(worker, code)
    assert r["status"] == 500 and r["kind"] == "runtime"
    assert r["message"].startswith("myplugin:2: attempt to index a nil value")
    tb = r["traceback"]
    assert "myplugin:2:" in tb and "myplugin:6:" in tb
    assert "?:" not in tb and "prelude" not in tb


def test_error_raised_with_an_error_value_keeps_its_status(worker: Worker) -> None:
    r = run(worker, 'function run()\n  error(Error.new{status = 418, message = "teapot"})\nend')
    assert (r["status"], r["message"]) == (418, "teapot")
    assert "myplugin:2:" in r["traceback"]


def test_missing_run(worker: Worker) -> None:
    r = run(worker, "x = 1")
    assert r["status"] == 500 and "run" in r["message"]


def test_syntax_error_names_the_line(worker: Worker) -> None:
    worker.send({"t": "syntax", "code": "local a = 1\n\nlocal x = = 2\n", "name": "plugin.lua"})
    msg = worker.recv()["message"]
    assert msg.startswith("plugin.lua:3:") and "near" in msg
    worker.send({"t": "syntax", "code": "function run() end", "name": "plugin.lua"})
    assert "message" not in worker.recv()


def test_print_is_captured_and_capped(worker: Worker) -> None:
    r = run(
        worker,
        'function run() print("a", 1, nil, true) for i = 1, 200 do print(("x"):rep(20)) end end',
    )
    assert r["output"].startswith("a\t1\tnil\ttrue\n")
    assert len(r["output"]) < 1100 and r["output"].endswith("[output truncated]\n")


# -- the Lua API ---------------------------------------------------------------------

SOBJ = {
    "kid": "kid-1",
    "name": "k1",
    "obj_type": "EC",
    "key_ops": ["SIGN", "VERIFY"],
    "pub_key": b"\x30\x59",
    "transient": False,
}


def fake_host(method: str, path: str, body: Any) -> tuple[int, Any]:
    if path == "/crypto/v1/keys/info":
        if body.get("name") == "missing":
            return 404, {"error": "not_found", "message": "no such key"}
        return 200, SOBJ
    if path == "/crypto/v1/encrypt":
        return 200, {"kid": "kid-1", "cipher": b"C" + body["plain"], "iv": b"\x00" * 12}
    if path == "/crypto/v1/keys" and method == "POST":
        return 200, {**SOBJ, "kid": "t-1", "transient_key": "t-1", "transient": True}
    if path == "/crypto/v1/keys" and method == "GET":
        return 200, [SOBJ, {**SOBJ, "kid": "kid-2"}]
    if path == "/crypto/v1/digest":
        return 200, {"digest": b"D" * 32}
    if method == "DELETE":
        return 204, None
    return 200, {**SOBJ, "echo": {"method": method, "path": path, "body": body}}


def test_sobject_calls_map_onto_rest(worker: Worker) -> None:
    code = """
    function run()
      local k = assert(Sobject{name = "k1"})
      local enc = assert(k:encrypt{alg = "AES", plain = "aGVsbG8="})
      local enc2 = assert(k:encrypt{alg = "AES", plain = Blob.from_bytes("raw")})
      local missing, err = Sobject{name = "missing"}
      local t = assert(Sobject.create{name = "tmp", obj_type = "AES", transient = true})
      local w = assert(k:wrap{subject = t, alg = "AES"})
      local a = assert(t:agree{public_key = k, mechanism = "diffie_hellman", key_type = "AES"})
      local u = assert(k:update{description = "d"})
      local gone = assert(k:delete())
      local p = assert(t:persist{name = "kept"})
      local all = assert(Sobject.get_all{limit = 10})
      local d = assert(digest{alg = "SHA256", data = Blob.from_bytes("x")})
      local byid = assert(Sobject{id = "kid-9"})
      return {
        pub = getmetatable(k.pub_key) == Blob, kid = k.kid,
        cipher = enc.cipher, cipher_is_blob = getmetatable(enc.cipher) == Blob, c2 = enc2.cipher,
        missing = missing == nil, status = err.status, code = err.error, msg = err.message,
        transient = t.transient_key, n_all = #all, all_obj = getmetatable(all[2]),
        digest_len = #d.digest, deleted = gone, method_of = getmetatable(u),
      }
    end"""
    body = ok(worker, code, host=fake_host)
    assert body == {
        "pub": True,
        "kid": "kid-1",
        "cipher": b"Chello",
        "cipher_is_blob": True,
        "c2": b"Craw",
        "missing": True,
        "status": 404,
        "code": "not_found",
        "msg": "no such key",
        "transient": "t-1",
        "n_all": 2,
        "all_obj": "Sobject",
        "digest_len": 32,
        "deleted": True,
        "method_of": "Sobject",
    }
    calls = [(c["method"], c["path"], c.get("body")) for c in worker.calls]
    assert calls == [
        ("POST", "/crypto/v1/keys/info", {"name": "k1"}),
        ("POST", "/crypto/v1/encrypt", {"key": {"kid": "kid-1"}, "alg": "AES", "plain": b"hello"}),
        ("POST", "/crypto/v1/encrypt", {"key": {"kid": "kid-1"}, "alg": "AES", "plain": b"raw"}),
        ("POST", "/crypto/v1/keys/info", {"name": "missing"}),
        ("POST", "/crypto/v1/keys", {"name": "tmp", "obj_type": "AES", "transient": True}),
        (
            "POST",
            "/crypto/v1/wrapkey",
            {"key": {"kid": "kid-1"}, "subject": {"transient_key": "t-1"}, "alg": "AES"},
        ),
        (
            "POST",
            "/crypto/v1/agree",
            {
                "private_key": {"transient_key": "t-1"},
                "public_key": {"kid": "kid-1"},
                "mechanism": "diffie_hellman",
                "key_type": "AES",
            },
        ),
        ("PATCH", "/crypto/v1/keys/kid-1", {"description": "d"}),
        ("DELETE", "/crypto/v1/keys/kid-1", None),
        ("POST", "/crypto/v1/keys/persist", {"key": {"transient_key": "t-1"}, "name": "kept"}),
        ("GET", "/crypto/v1/keys", {"limit": 10}),
        ("POST", "/crypto/v1/digest", {"alg": "SHA256", "data": b"x"}),
        ("POST", "/crypto/v1/keys/info", {"kid": "kid-9"}),
    ]


def test_remaining_sobject_methods(worker: Worker) -> None:
    code = """
    function run()
      local k = assert(Sobject{kid = "kid-1"})
      for _, m in ipairs{"decrypt", "sign", "verify", "mac", "mac_verify", "unwrap"} do
        assert(k[m](k, {alg = "X", data = "AA=="}))
      end
      assert(k:export())
      local bad, err = k:sign{data = "not base64!"}
      return {bad == nil, err.status, err.error}
    end"""
    assert ok(worker, code, host=fake_host) == [True, 400, "invalid_field"]
    paths = [c["path"] for c in worker.calls[1:]]
    assert paths == [
        "/crypto/v1/decrypt",
        "/crypto/v1/sign",
        "/crypto/v1/verify",
        "/crypto/v1/mac",
        "/crypto/v1/macverify",
        "/crypto/v1/unwrapkey",
        "/crypto/v1/keys/export",
    ]
    assert worker.calls[2]["body"] == {"key": {"kid": "kid-1"}, "alg": "X", "data": b"\x00"}


def test_blob(worker: Worker) -> None:
    code = r"""
    function run()
      local a, b = Blob.from_hex("0f0f"), Blob.from_bytes("\240\255")
      return {
        a:hex(), (a & b):hex(), (a | b):hex(), (a ~ b):hex(), (a .. b):hex(), #(a .. b),
        a == Blob.from_hex("0F0F"), a == b, Blob.from_base64("AQID"):bytes(),
        Blob.from_bytes("\251\255"):base64(), Blob.from_bytes("\251\255"):base64_urlsafe(),
        Blob.from_hex("0102030405"):slice(2, 4):hex(), #Blob.random(16), #Blob.random{bits = 256},
        #Blob.random{bytes = 3}, (pcall(function() return a & Blob.from_hex("00") end)),
      }
    end"""
    assert ok(worker, code) == [
        "0F0F",
        "000F",
        "FFFF",
        "FFF0",
        "0F0FF0FF",
        4,
        True,
        False,
        "\x01\x02\x03",
        "+/8=",
        "-_8=",
        "020304",
        16,
        32,
        3,
        False,
    ]


def test_time_out_of_range_is_an_error_not_a_wrap(worker: Worker) -> None:
    code = r"""
    function run()
      local out = {}
      for i, f in ipairs{
        function() return Time.at(1e12) end,
        function() return Time.at(0 / 0) end,
        function() return Time.at(9.2e9):add_seconds(9.2e9) end,
        function() return Time.at(-9.2e9):add_seconds(-9.2e9) end,
        function() return Time.now_insecure():add_seconds(math.huge) end,
      } do
        local ok, err = pcall(f)
        out[i] = ok and "no error" or tostring(err):match("out of range") or tostring(err)
      end
      out[#out + 1] = Time.at(9.2e9):add_seconds(-9.2e9):unix_epoch_seconds()
      return out
    end"""
    assert ok(worker, code) == ["out of range"] * 5 + [0]


def test_json_cbor_time_bit32(worker: Worker) -> None:
    code = r"""
    function run()
      local j = json.decode('{"a": [1, 2, null], "b": {"c": "d"}, "e": {}}')
      local c = cbor.decode(cbor.encode({x = {1, 2}, y = Blob.from_bytes("\1"), z = "s"}))
      local t = Time.from_iso8601("20240102T030405Z")
      return {
        j.a[3] == null, j.b.c, json.encode({1, 2}), json.encode({}), json.encode({k = null}),
        c.x[2], c.y:hex(), c.z, getmetatable(cbor.encode(1)) == Blob and "Blob",
        Time.at(0):to_iso8601(), t:unix_epoch_seconds(), t:add_seconds(60):to_iso8601(),
        Time.at(1.5):unix_epoch_nanoseconds(), Time.now_insecure():unix_epoch_seconds() > 1.7e9,
        Time.from_iso8601("2024-01-02T03:04:05+00:00") == t,
        bit32.band(0xff, 0x0f), bit32.bxor(1, 3), bit32.lshift(1, 31), bit32.rshift(0x80000000, 31),
        bit32.bnot(0), bit32.arshift(0x80000000, 31), bit32.extract(0xf0, 4, 4),
        (pcall(json.decode, "{")), unpack({7, 8}),
      }
    end"""
    assert ok(worker, code) == [
        True,
        "d",
        "[1,2]",
        "{}",
        '{"k":null}',
        2,
        "01",
        "s",
        "Blob",
        "19700101T000000Z",
        1704164645,
        "20240102T030505Z",
        1_500_000_000,
        True,
        True,
        15,
        2,
        2**31,
        1,
        0xFFFFFFFF,
        0xFFFFFFFF,
        15,
        False,
        7,
        8,
    ]


def test_principal_this_plugin_auditlog(worker: Worker) -> None:
    code = """
    function run()
      AuditLog.log{message = "hello", severity = "WARNING"}
      local p = principal()
      return {p.kind, p.id, p:id(), p.name, p.groups[2], this_plugin().name, this_plugin().id,
              (pcall(function() return ("s")() end))}
    end"""
    assert ok(worker, code) == [
        "app",
        "app-1",
        "app-1",
        "billing",
        "g2",
        "myplugin",
        "plug-1",
        False,
    ]
    assert worker.logs == [{"t": "log", "message": "hello", "severity": "WARNING"}]


# -- the environment -------------------------------------------------------------------------


def test_environment_is_a_whitelist(worker: Worker) -> None:
    code = """
    function run()
      local names = {}
      for k in pairs(_G) do names[#names + 1] = k end
      table.sort(names)
      local os_names = {}
      for k in pairs(os) do os_names[#os_names + 1] = k end
      table.sort(os_names)
      return {names = names, os = os_names, dump = string.dump == nil, G = _G == _ENV,
              smt = getmetatable(""), gc = collectgarbage("count") > 0,
              collect = (pcall(collectgarbage, "collect"))}
    end"""
    body = ok(worker, code)
    assert body["names"] == sorted(
        [
            "assert",
            "error",
            "ipairs",
            "next",
            "pairs",
            "pcall",
            "xpcall",
            "rawequal",
            "rawget",
            "rawlen",
            "rawset",
            "select",
            "setmetatable",
            "getmetatable",
            "tonumber",
            "tostring",
            "type",
            "coroutine",
            "math",
            "string",
            "table",
            "utf8",
            "load",
            "_VERSION",
            "_G",
            "bit32",
            "unpack",
            "os",
            "print",
            "collectgarbage",
            "null",
            "Blob",
            "Error",
            "Time",
            "json",
            "cbor",
            "Sobject",
            "digest",
            "AuditLog",
            "principal",
            "this_plugin",
            "BigNum",
            "EcGroup",
            "EcPoint",
            "Oid",
            "X509Name",
            "DerEncoder",
            "IpAddr",
            "Pkcs10Csr",
            "Group",
            "TbsCertificate",
            "Tr31Envelope",
            "tr31_open",
            "request",
            "run",
        ]
    )
    assert body["os"] == ["clock", "date", "time"]
    assert body["dump"] and body["G"] and body["smt"] == "string" and body["gc"]
    assert body["collect"] is False


def test_no_python_object_is_reachable(worker: Worker) -> None:
    # Walk everything reachable from _G (tables, metatables, errors from every API
    # function called with bad arguments): no userdata anywhere.
    code = """
    local seen, found = {}, {}
    local function walk(v, path)
      local t = type(v)
      if t == "userdata" or t == "thread" then found[#found + 1] = path end
      if t == "table" and not seen[v] then
        seen[v] = true
        for k, x in next, v do walk(k, path .. ".<key>"); walk(x, path .. "." .. tostring(k)) end
        walk(getmetatable(v), path .. ".<mt>")
      end
      if t == "function" and v ~= coroutine.yield and v ~= run then
        for _, arg in ipairs{{}, "zz", 1, {bytes = -1}, {name = 1}, true} do
          local r = table.pack(pcall(v, arg, arg))
          for i = 1, r.n do
            if type(r[i]) == "userdata" then found[#found + 1] = path .. "()" end
          end
        end
      end
    end
    function run()
      local roots = {_G = _G, smt = getmetatable(""), blob = Blob.from_bytes("x"),
                     err = Error.new("x"), time = Time.at(0), p = principal()}
      for name, r in pairs(roots) do walk(r, name) end
      local tables = 0
      for _ in pairs(seen) do tables = tables + 1 end
      return {found = found, py = python, err = select(2, pcall(Blob.from_hex, "zz")),
              tables = tables}
    end"""
    body = ok(worker, code, instructions=50_000_000)
    assert body["found"] == {} and "py" not in body and body["tables"] > 20
    assert "non-hexadecimal" in body["err"]


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        ('os.execute("id")', "execute"),
        ('io.open("/etc/passwd")', "io"),
        ('require("os")', "require"),
        ('dofile("/etc/passwd")', "dofile"),
        ("debug.getregistry()", "debug"),
        ("package.loadlib('x', 'y')", "package"),
        ("string.dump(run)", "dump"),
        ("python.eval('1')", "python"),
        ('getmetatable("").__index = {}', "index"),
        ("setmetatable({}, {__gc = function() while true do end end})", "__gc"),
        ('assert(load("\\27LuaS\\0\\25\\147\\r\\n\\26\\n"))', "binary"),
        ('load("return 1", "x", "b")', "mode"),
        ("load(function() return nil end)", "text"),
    ],
)
def test_escape_attempts_fail_cleanly(worker: Worker, code: str, fragment: str) -> None:
    r = run(worker, f"function run()\n  {code}\nend")
    assert r["status"] == 500 and r["kind"] == "runtime", r
    assert fragment in r["message"]


def test_load_with_explicit_env(worker: Worker) -> None:
    code = """
    function run()
      local f = load("return x + 1", "snippet", "t", {x = 41})
      local g = load("return Blob ~= nil")
      return {f(), g()}
    end"""
    assert ok(worker, code) == [42, True]


# -- budgets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "while true do end",
        "pcall(function() while true do end end) return 'swallowed'",
        "xpcall(function() while true do end end, function() while true do end end) return 1",
        "for i = 1, 5 do pcall(function() while true do end end) end return 1",
        "coroutine.wrap(function() while true do end end)() return 1",
        "coroutine.resume(coroutine.create(function() while true do end end)) return 1",
        "local co = coroutine.wrap(function() pcall(function() while true do end end) end)"
        " pcall(co) return 1",
        "string.gsub(string.rep('a', 1000), '.', function() while true do end end)",
        "table.sort({3, 2, 1}, function() while true do end end)",
    ],
)
def test_runaway_code_hits_the_instruction_budget(worker: Worker, code: str) -> None:
    r = run(worker, f"function run()\n  {code}\nend", instructions=1_000_000)
    assert (r["kind"], r["status"]) == ("time", 504), r


@pytest.mark.parametrize(
    "code",
    [
        "local t = {} for i = 1, 1e8 do t[i] = i end",
        "local s = string.rep('x', 1 << 30)",
        "local t = {} for i = 1, 1e8 do t[#t + 1] = ('x'):rep(100) .. i end",
        "local ok = pcall(string.rep, 'x', 1 << 30) return 'swallowed'",
        "local s = 'x' while true do s = s .. s end",
    ],
)
def test_memory_bombs_hit_the_cap(worker: Worker, code: str) -> None:
    r = run(worker, f"function run()\n  {code}\nend", instructions=100_000_000)
    assert (r["kind"], r["status"]) == ("memory", 413), r
    again = worker.run(None)  # the worker survives its plugin's memory breach
    assert again["kind"] == "memory"  # (same plugin: it breaches again, cleanly)


def test_deep_recursion_is_a_clean_error(worker: Worker) -> None:
    r = run(
        worker,
        "local function f(n) return f(n + 1) + 1 end\nfunction run() return f(1) end",
        memory_bytes=256 * 1024 * 1024,
        instructions=100_000_000,
    )
    assert r["status"] == 500 and "stack overflow" in r["message"]


def test_deep_c_recursion_is_a_clean_error(worker: Worker) -> None:
    code = """
    local function f() return string.gsub("a", "a", f) end
    local function g() local co = coroutine.wrap(g) return co() end
    function run() return {select(2, pcall(f)), select(2, pcall(g))} end"""
    body = ok(worker, code)
    assert all("overflow" in m for m in body), body


def test_result_too_large(worker: Worker) -> None:
    r = run(worker, "function run() return string.rep('x', 2 * 1024 * 1024) end")
    assert (r["kind"], r["status"]) == ("too_large", 413)


def test_deeply_nested_result(worker: Worker) -> None:
    r = run(worker, "function run() local t = {} for i = 1, 1000 do t = {t} end return t end")
    assert r["status"] == 500 and "nested" in r["message"]


def test_each_invocation_gets_a_fresh_state(worker: Worker) -> None:
    code = """
    counter = (counter or 0) + 1
    function run()
      local before = {counter = counter, mark = rawget(string, "mark"), g = leaked}
      leaked = true
      string.mark = "set"
      string.rep = nil
      print("call")
      return before
    end"""
    assert ok(worker, code) == {"counter": 1}
    again = worker.run(None)
    assert again["body"] == {"counter": 1} and again["output"] == "call\n"


def test_yield_from_top_level_is_an_error(worker: Worker) -> None:
    r = run(worker, "function run() coroutine.yield(1) return 2 end")
    assert r["status"] == 500 and "yield" in r["message"]


def proc_file(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}") as f:
        return f.read()


def test_worker_is_confined(worker: Worker) -> None:
    worker.bind("function run() return 1 end")
    pid = worker.proc.pid
    limits = proc_file(pid, "limits")
    assert "Max open files            16" in limits
    assert "Max core file size        0" in limits
    assert "Max address space         1073741824" in limits
    status = proc_file(pid, "status")
    assert "NoNewPrivs:\t1" in status
    maps = proc_file(pid, "maps")
    assert "pkcs11" not in maps and "sqlite" not in maps and "softhsm" not in maps
    assert len(os.listdir(f"/proc/{pid}/fd")) <= 4


def test_worker_refuses_a_second_plugin(worker: Worker) -> None:
    worker.bind("function run() return 1 end")
    worker.send({"t": "bind", "id": "other", "version": 1, "name": "o", "code": ""})
    assert worker.recv()["message"] == "this worker serves another plugin"
