"""Red-team cases through the real daemon: what a hostile plugin can make the host
do (paths, descriptors, other groups' keys, the audit log) and how odd results
travel back. FINDING marks cases that got through before their fix in the sandbox.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import new_group, new_key, ok

LIMITS = {"wall_seconds": 3, "instructions": 5_000_000}


@pytest.fixture(scope="module")
def setting(daemon):
    admin = Raw(daemon.socket)
    admin.login(daemon.admin_key)
    mine, other = new_group(admin), new_group(admin)
    yield admin, mine, other, new_key(admin, mine), new_key(admin, other)
    admin.close()


def trial(admin: Raw, group: str, code: str, input: Any = None) -> dict[str, Any]:
    body = {"code": code, "input": input, "groups": [group], "limits": LIMITS}
    return ok(admin.call("POST", "/sys/v1/plugins/test", body))


def test_finding_main_thread_escape_ends_promptly(setting) -> None:
    # FINDING: string.gmatch replaced by the plugin ran, unhooked, while the prelude
    # cleaned the traceback; here it would have spun until the 3 s wall clock (504).
    admin, g, *_ = setting
    code = """
    function run()
      string.gmatch = function() while true do end end
      error("boom")
    end"""
    r = trial(admin, g, code)
    assert r["status"] == 500 and r["error"]["error"] == "plugin_runtime_error", r
    assert r["error"]["message"] == "test:4: boom" and r["stats"]["elapsed_ms"] < 2000


def test_finding_audit_log_flood_is_capped(setting) -> None:
    # FINDING: one invocation could write tens of thousands of audit records.
    admin, g, *_ = setting
    code = """
    function run()
      local n = 0
      while pcall(AuditLog.log, {message = string.rep("a", 5000)}) do n = n + 1 end
      return n
    end"""
    name = unique("flood")
    p = ok(
        admin.call(
            "POST",
            "/sys/v1/plugins",
            {"name": name, "groups": [g], "source": {"language": "LUA", "code": code}},
        )
    )
    assert ok(admin.call("POST", f"/sys/v1/plugins/{p['plugin_id']}", {})) == 100
    logs = ok(admin.call("GET", "/sys/v1/logs", {"object_id": p["plugin_id"], "limit": 1000}))
    notes = [r for r in logs if r["action"] == "plugin.log"]
    assert len(notes) == 100


def test_finding_odd_strings_do_not_break_the_worker(setting) -> None:
    # FINDING: a surrogate (valid to Lua 5.3's utf8.len) in a result or an API call
    # made the daemon drop the worker: 500 "sandbox failure" / "internal".
    admin, g, *_ = setting
    r = trial(admin, g, r'function run() return "\237\160\128" end')
    assert r["status"] == 200 and r["result"] == b"\xed\xa0\x80", r
    r = trial(admin, g, r'function run() return select(2, Sobject{name = "\237\160\128"}) end')
    assert r["status"] == 400 and "'name' must be string" in r["error"]["message"], r


def test_finding_huge_error_message(setting) -> None:
    admin, g, *_ = setting
    r = trial(admin, g, "function run() error(string.rep('x', 9e6), 0) end")
    assert r["status"] == 500 and r["error"]["error"] == "plugin_runtime_error", r
    assert len(r["error"]["message"]) < 5000


def test_finding_uint64_input(setting) -> None:
    admin, g, *_ = setting
    r = trial(admin, g, "function run(i) return {i.n > 0, math.type(i.n)} end", {"n": 2**64 - 1})
    assert r["result"] == [True, "float"], r


@pytest.mark.parametrize(
    "kid",
    [
        "../../../sys/v1/plugins/{pid}",
        "x/../../../../sys/v1/groups/{other}",
        "",
        "info",
        "{other_kid}/../{other_kid}",
        "{other_kid}?x=1",
    ],
)
def test_kid_path_tricks_reach_nothing(setting, kid: str) -> None:
    # update/delete build "/crypto/v1/keys/" .. kid: the router never normalises ".."
    # and the daemon checks the plugin's groups on whatever key is named.
    admin, g, other, mykey, otherkey = setting
    target = ok(
        admin.call(
            "POST",
            "/sys/v1/plugins",
            {
                "name": unique("victim"),
                "groups": [other],
                "source": {"language": "LUA", "code": "function run() end"},
            },
        )
    )
    kid = kid.format(pid=target["plugin_id"], other=other, other_kid=otherkey["kid"])
    code = """
    function run(input)
      local so = assert(Sobject{kid = input.mine})
      rawset(so, "kid", input.kid)
      local _, e1 = so:delete()
      local _, e2 = so:update{name = "pwned"}
      return {e1 and e1.status, e2 and e2.status}
    end"""
    r = trial(admin, g, code, {"mine": mykey["kid"], "kid": kid})
    # Refused one way or another (400: a query string on a key path), never done.
    assert r["status"] == 200 and all(s in (400, 403, 404, 405) for s in r["result"]), r
    ok(admin.call("GET", f"/sys/v1/plugins/{target['plugin_id']}"))
    ok(admin.call("GET", f"/sys/v1/groups/{other}"))
    assert ok(admin.call("GET", f"/crypto/v1/keys/{otherkey['kid']}"))["name"] == otherkey["name"]


def test_other_groups_keys_and_crafted_descriptors(setting) -> None:
    admin, g, other, mykey, otherkey = setting
    code = """
    function run(input)
      local r = {}
      local function st(v, e) r[#r + 1] = e and e.status or "ok" end
      local mine = assert(Sobject{kid = input.mine})
      local enc = mine.encrypt
      st(Sobject{kid = input.other})
      st(Sobject{name = input.other_name})
      -- a plain table as `self` is forwarded as the key descriptor
      st(enc({kid = input.other}, {alg = "AES", plain = "aGk="}))
      st(enc({kid = input.mine, group_id = input.g2}, {alg = "AES", plain = "aGk="}))
      st(Sobject.create{name = input.new, obj_type = "AES", key_size = 128, group_id = input.g2})
      -- key= in the arguments is replaced by the sobject's own descriptor
      st(mine:encrypt{alg = "AES", plain = "aGk=", key = {kid = input.other}})
      -- alg comes from the wrapping key; the subject is another group's key: not found
      st(mine:wrap{subject = {kid = input.other}})
      return r
    end"""
    inp = {
        "other": otherkey["kid"],
        "other_name": otherkey["name"],
        "mine": mykey["kid"],
        "g2": other,
        "new": unique("k"),
    }
    r = trial(admin, g, code, inp)
    assert r["status"] == 200, r
    assert r["result"] == [404, 404, 404, 400, 403, "ok", 404], r


def test_error_status_outside_range_is_clamped(setting) -> None:
    admin, g, *_ = setting
    r = trial(
        admin, g, "function run() local e = Error.new('x') rawset(e, 'status', 200) return e end"
    )
    assert r["status"] == 400 and r["error"] == {"error": "plugin_error", "message": "x"}, r


def test_nan_inf_and_deep_input(setting) -> None:
    admin, g, *_ = setting
    r = trial(admin, g, "function run() return {1/0, -1/0} end")
    assert r["status"] == 200 and r["result"] == [float("inf"), float("-inf")]
    deep: Any = 1
    for _ in range(120):
        deep = [deep]
    r = trial(admin, g, "function run(i) return 1 end", deep)
    assert r["status"] == 500 and "nested" in r["error"]["message"], r
