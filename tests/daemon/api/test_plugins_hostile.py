"""Hostile plugins against the real daemon: each is contained with the right status
while a second client's requests keep succeeding."""

from __future__ import annotations

import pytest

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import bystander_encrypting, new_group, new_key, ok

LIMITS = {"wall_seconds": 2, "instructions": 20_000_000, "memory_bytes": 32 * 1024 * 1024}
#: For plugins that must end by another limit (memory, size, an error): on a loaded
#: machine they can take seconds of wall time, and must not meet the wall clock first.
ROOMY = {**LIMITS, "wall_seconds": 60}

# (name, code, expected status, expected code, text the message must contain)
HOSTILE = [
    (
        "os.execute",
        "function run() return os.execute('id') end",
        500,
        "plugin_runtime_error",
        "execute",
    ),
    (
        "io.open",
        "function run() return io.open('/etc/passwd') end",
        500,
        "plugin_runtime_error",
        "io",
    ),
    ("require", "function run() return require('os') end", 500, "plugin_runtime_error", "require"),
    (
        "bytecode",
        "function run() return load('\\27Lua\\83\\0')() end",
        500,
        "plugin_runtime_error",
        "",
    ),
    (
        "string.dump",
        "function run() return string.dump(run) end",
        500,
        "plugin_runtime_error",
        "dump",
    ),
    ("python", "function run() return python.eval('1') end", 500, "plugin_runtime_error", ""),
    (
        "debug",
        "function run() return debug.getregistry() end",
        500,
        "plugin_runtime_error",
        "debug",
    ),
    (
        "string metatable",
        "function run() getmetatable('').__index = {} end",
        500,
        "plugin_runtime_error",
        "",
    ),
    ("loop", "function run() while true do end end", 504, "time_limit", ""),
    (
        "loop in pcall",
        "function run() pcall(function() while true do end end) return 1 end",
        504,
        "time_limit",
        "",
    ),
    (
        "loop in xpcall",
        "function run() xpcall(function() while true do end end, "
        "function() return 'caught' end) return 1 end",
        504,
        "time_limit",
        "",
    ),
    (
        "loop in coroutine",
        "function run() local co = coroutine.create(function() "
        "while true do end end) coroutine.resume(co) return 1 end",
        504,
        "time_limit",
        "",
    ),
    (
        "loop in __gc",
        "function run() setmetatable({}, {__gc = function() while true do end "
        "end}) collectgarbage() return 1 end",
        500,
        "plugin_runtime_error",
        "__gc",
    ),
    (
        "slow pattern",
        "function run() return string.rep('a', 300000):find('.-.-.-.-.-.-b') end",
        504,
        "time_limit",
        "",
    ),
    (
        "table growth",
        "function run() local t = {} for i = 1, 1e9 do t[i] = i end end",
        413,
        "memory_limit",
        "",
    ),
    ("string.rep bomb", "function run() return string.rep('x', 2^30) end", 413, "memory_limit", ""),
    # Lua's stack lives in the capped heap: the cap stops the recursion first.
    (
        "deep recursion",
        "local function f(n) return f(n + 1) + 1 end function run() return f(1) end",
        413,
        "memory_limit",
        "",
    ),
    (
        "huge result",
        "function run() return {data = string.rep('x', 5 * 2^20)} end",
        413,
        "too_large",
        "",
    ),
]


@pytest.fixture(scope="module")
def setting(daemon):
    admin = Raw(daemon.socket)
    admin.login(daemon.admin_key)
    g = new_group(admin)
    key = new_key(admin, g)
    yield admin, g, key
    admin.close()


def invoke_hostile(admin: Raw, g: str, code: str, limits: dict = ROOMY) -> dict:
    p = ok(
        admin.call(
            "POST",
            "/sys/v1/plugins",
            {
                "name": unique("hostile"),
                "groups": [g],
                "limits": limits,
                "source": {"language": "LUA", "code": code},
            },
        )
    )
    return admin.call("POST", f"/sys/v1/plugins/{p['plugin_id']}", {})


@pytest.mark.parametrize(
    ("name", "code", "status", "error", "text"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_plugin_is_contained(daemon, setting, name, code, status, error, text) -> None:
    admin, g, key = setting
    with bystander_encrypting(daemon, key["kid"]) as results:
        resp = invoke_hostile(admin, g, code, LIMITS if error == "time_limit" else ROOMY)
    assert resp["status"] == status, resp
    assert resp["body"]["error"] == error, resp
    assert text in resp["body"]["message"], resp
    assert resp["body"]["invocation_id"]
    assert results and set(results) == {200}
    # The daemon and the sandbox still serve: a well-behaved plugin runs right after.
    assert ok(invoke_hostile(admin, g, "function run() return 'fine' end")) == "fine"


def test_many_transient_keys_are_bounded_and_freed(daemon, setting) -> None:
    admin, g, _ = setting
    code = """
        function run()
          local n = 0
          for i = 1, 5000 do
            local k, err = Sobject.create{obj_type = 'AES', transient = true}
            if not k then return {made = n, status = err.status} end
            n = n + 1
          end
          return {made = n}
        end"""
    out = ok(invoke_hostile(admin, g, code))
    assert out["made"] <= 1000 and out.get("status") == 413
    again = ok(invoke_hostile(admin, g, code))
    assert again["made"] == out["made"]  # the first invocation's keys are gone
