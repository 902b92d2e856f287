"""/sys/v1/plugins*: management, invocation conventions, access rules, audit nesting.

Real daemon, real sandbox workers, real token.
"""

from __future__ import annotations

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import err, new_group, new_key, ok


def push(admin: Raw, code: str, groups: list[str], **extra) -> dict:
    body = {
        "name": unique("plugin"),
        "source": {"language": "LUA", "code": code},
        "groups": groups,
        **extra,
    }
    return ok(admin.call("POST", "/sys/v1/plugins", body))


def invoke(conn: Raw, plugin: dict, body=None) -> dict:
    return conn.call("POST", f"/sys/v1/plugins/{plugin['plugin_id']}", body)


# -- management ------------------------------------------------------------------------


def test_create_update_versions_and_delete(world) -> None:
    admin, g1, g2, *_ = world
    p = push(admin, "function run() return 1 end", [g1])
    assert p["version"] == 1 and p["groups"] == [g1] and p["default_group"] == g1
    up = ok(
        admin.call(
            "PATCH",
            f"/sys/v1/plugins/{p['plugin_id']}",
            {
                "source": {"language": "LUA", "code": "function run() return 2 end"},
                "add_groups": [g2],
            },
        )
    )
    assert up["version"] == 2 and set(up["groups"]) == {g1, g2}
    assert ok(invoke(admin, p)) == 2
    listed = ok(admin.call("GET", "/sys/v1/plugins"))
    assert p["plugin_id"] in {x["plugin_id"] for x in listed}
    ok(admin.call("DELETE", f"/sys/v1/plugins/{p['plugin_id']}"), 204)
    err(invoke(admin, p), "not_found")


def test_syntax_error_names_the_line(world) -> None:
    admin, g1, *_ = world
    body = {
        "name": unique(),
        "groups": [g1],
        "source": {"language": "LUA", "code": "function run()\n  local x = = 1\nend"},
    }
    e = err(admin.call("POST", "/sys/v1/plugins", body), "syntax_error")
    assert ":2:" in e["message"]
    bad_lang = {**body, "source": {"language": "PYTHON", "code": "x"}}
    err(admin.call("POST", "/sys/v1/plugins", bad_lang), "invalid_value")


def test_only_admins_manage_plugins(world) -> None:
    admin, g1, _, a1, _ = world
    code = {"language": "LUA", "code": "function run() end"}
    err(
        a1.call("POST", "/sys/v1/plugins", {"name": unique(), "source": code, "groups": [g1]}),
        "forbidden",
    )
    p = push(admin, "function run() end", [g1])
    err(a1.call("PATCH", f"/sys/v1/plugins/{p['plugin_id']}", {"enabled": False}), "forbidden")
    err(a1.call("DELETE", f"/sys/v1/plugins/{p['plugin_id']}"), "forbidden")
    err(a1.call("POST", "/sys/v1/plugins/test", {"code": "function run() end"}), "forbidden")
    seen = ok(a1.call("GET", f"/sys/v1/plugins/{p['plugin_id']}"))
    assert "source" not in seen  # apps may invoke it, not read it


# -- invocation conventions ----------------------------------------------------------------


def test_input_and_output_conversions(world) -> None:
    admin, g1, *_ = world
    p = push(
        admin,
        """
        function run(input, url, method)
          return {echo = input, blob = Blob.from_bytes("\\0\\1"), method = method,
                  path = url.path, is_null = input.n == null, first = input.list[1]}
        end""",
        [g1],
    )
    body = {"list": [10, 20], "bin": b"\x00\xff", "n": None, "s": "text", "m": {"k": True}}
    out = ok(invoke(admin, p, body))
    assert out["echo"] == body
    assert out["blob"] == b"\x00\x01"
    assert out["method"] == "POST" and out["path"][-1] == p["plugin_id"]
    assert out["is_null"] is True and out["first"] == 10


def test_return_conventions(world) -> None:
    admin, g1, *_ = world
    cases = {
        "return nil": (204, None),
        "return nil, Error.new{status = 418, message = 'teapot'}": (418, "teapot"),
        "return Error.new{status = 409, message = 'clash'}": (409, "clash"),
        "return nil, 'plain message'": (400, "plain message"),
        "error('boom')": (500, "boom"),
    }
    for body, (status, message) in cases.items():
        p = push(admin, f"function run(input)\n  {body}\nend", [g1])
        resp = invoke(admin, p, {})
        assert resp["status"] == status, (body, resp)
        if message:
            assert message in resp["body"]["message"]
            assert resp["body"]["invocation_id"]


def test_check_runs_first_and_shares_globals(world) -> None:
    admin, g1, *_ = world
    p = push(
        admin,
        """
        function check(input)
          if input.deny then return nil, Error.new{status = 403, message = 'denied'} end
          seen = 'by check'
        end
        function run(input) return seen end""",
        [g1],
    )
    assert ok(invoke(admin, p, {})) == "by check"
    assert err(invoke(admin, p, {"deny": True}), "plugin_error")["message"] == "denied"


def test_tracebacks_for_admins_not_apps(world) -> None:
    admin, g1, _, a1, _ = world
    p = push(admin, "function run(input)\n  local t = nil\n  return t.x\nend", [g1])
    as_admin = err(invoke(admin, p, {}), "plugin_runtime_error")
    assert ":3:" in as_admin["traceback"]
    as_app = err(invoke(a1.conn, p, {}), "plugin_runtime_error")
    assert "traceback" not in as_app and as_app["invocation_id"]


def test_globals_do_not_survive_an_invocation(world) -> None:
    admin, g1, *_ = world
    p = push(admin, "function run() local before = counter; counter = 1; return before end", [g1])
    assert invoke(admin, p, {})["status"] == 204
    assert invoke(admin, p, {})["status"] == 204


# -- access rules -----------------------------------------------------------------------------


def test_invoke_needs_a_shared_group(world) -> None:
    admin, g1, _, a1, a2 = world
    p = push(admin, "function run() return principal().name end", [g1])
    assert ok(invoke(a1.conn, p, {})) == ok(a1.call("GET", f"/sys/v1/apps/{a1.id}"))["name"]
    err(invoke(a2.conn, p, {}), "not_found")


def test_disabled_plugin_is_refused(world) -> None:
    admin, g1, _, a1, _ = world
    p = push(admin, "function run() return 1 end", [g1], enabled=False)
    err(invoke(a1.conn, p, {}), "forbidden")


def test_plugin_uses_only_keys_in_its_groups_and_with_their_ops(world) -> None:
    admin, g1, g2, *_ = world
    inside = new_key(admin, g1, key_ops=["ENCRYPT"])
    outside = new_key(admin, g2, key_ops=["ENCRYPT"])
    p = push(
        admin,
        """
        function run(input)
          local key, e = Sobject{kid = input.kid}
          if not key then return {found = false, status = e.status} end
          local out, e2 = key:encrypt{alg = 'AES', plain = Blob.from_bytes('x')}
          if input.decrypt then
            out, e2 = key:decrypt{alg = 'AES', cipher = out.cipher, iv = out.iv, tag = out.tag}
          end
          if not out then return {found = true, status = e2.status, message = e2.message} end
          return {found = true, ok = true}
        end""",
        [g1],
    )
    assert ok(invoke(admin, p, {"kid": inside["kid"]})) == {"found": True, "ok": True}
    denied = ok(invoke(admin, p, {"kid": outside["kid"]}))
    assert denied["status"] in (403, 404)
    no_op = ok(invoke(admin, p, {"kid": inside["kid"], "decrypt": True}))
    assert no_op["status"] == 403 and "DECRYPT" in no_op["message"]


def test_plugin_keys_go_to_its_default_group_and_transients_vanish(world) -> None:
    admin, g1, g2, *_ = world
    p = push(
        admin,
        """
        function run(input)
          local stored = assert(Sobject.create{name = input.name, obj_type = 'AES'})
          local t = assert(Sobject.create{obj_type = 'AES', transient = true})
          return {group = stored.group_id, creator = stored.creator, tk = t.transient_key}
        end""",
        [g2, g1],
        default_group=g1,
    )
    name = unique("made-by-plugin")
    out = ok(invoke(admin, p, {"name": name}))
    assert out["group"] == g1 and out["creator"] == {"plugin": p["plugin_id"]}
    err(
        admin.call(
            "POST",
            "/crypto/v1/encrypt",
            {"key": {"transient_key": out["tk"]}, "alg": "AES", "plain": b"x"},
        ),
        "not_found",
    )


def test_principal_and_this_plugin(world) -> None:
    admin, g1, _, a1, _ = world
    p = push(
        admin,
        """
        function run()
          local who, me = principal(), this_plugin()
          return {kind = who.kind, id = who:id(), groups = who.groups,
                  me = me.id, my_name = me.name}
        end""",
        [g1],
    )
    out = ok(invoke(a1.conn, p, {}))
    assert out == {
        "kind": "app",
        "id": a1.id,
        "groups": [g1],
        "me": p["plugin_id"],
        "my_name": p["name"],
    }


# -- audit ----------------------------------------------------------------------------------------


def test_nested_operations_are_audited_under_the_invocation(world) -> None:
    admin, g1, _, a1, _ = world
    key = new_key(admin, g1, key_ops=["ENCRYPT"])
    p = push(
        admin,
        """
        function run(input)
          print('working')
          AuditLog.log{message = 'about to encrypt', severity = 'INFO'}
          local k = assert(Sobject{kid = input.kid})
          assert(k:encrypt{alg = 'AES', plain = Blob.from_bytes('x')})
          return 'done'
        end""",
        [g1],
    )
    assert ok(invoke(a1.conn, p, {"kid": key["kid"]})) == "done"
    top = ok(admin.call("GET", "/sys/v1/logs", {"object_id": p["plugin_id"], "limit": 5}))
    call = next(r for r in top if r["action"] == "POST /sys/v1/plugins/{plugin_id}")
    assert call["actor_id"] == a1.id and "output" not in (call.get("detail") or {})
    nested = ok(admin.call("GET", "/sys/v1/logs", {"invocation_id": call["invocation_id"]}))
    actions = {(r["action"], r["actor_kind"]) for r in nested}
    assert ("POST /crypto/v1/encrypt", "plugin") in actions
    assert ("POST /crypto/v1/keys/info", "plugin") in actions
    assert any(
        r["action"] == "plugin.log" and r["detail"]["message"] == "about to encrypt" for r in nested
    )


# -- test runs ----------------------------------------------------------------------------


def test_test_endpoint_returns_result_output_and_traceback(world) -> None:
    admin, g1, _, a1, _ = world
    out = ok(
        admin.call(
            "POST",
            "/sys/v1/plugins/test",
            {
                "code": "function run(input)\n  print('x is', input.x)\n  return input.x * 2\nend",
                "input": {"x": 21},
                "groups": [g1],
            },
        )
    )
    assert out["status"] == 200 and out["result"] == 42 and out["output"] == "x is\t21\n"
    assert out["stats"]["elapsed_ms"] > 0
    bad = ok(
        admin.call(
            "POST",
            "/sys/v1/plugins/test",
            {"code": "function run(input)\n\n  error('nope')\nend", "input": {}, "groups": [g1]},
        )
    )
    assert bad["status"] == 500 and ":3:" in bad["traceback"]
    who = ok(
        admin.call(
            "POST",
            "/sys/v1/plugins/test",
            {
                "code": "function run() return principal():id() end",
                "invoker": a1.id,
                "groups": [g1],
            },
        )
    )
    assert who["result"] == a1.id


def test_a_plugin_host_reaches_crypto_paths_only() -> None:
    """A worker that escaped Lua still cannot manage the daemon or invoke plugins.

    Lua itself cannot choose paths (the red-team tests show that), so this checks the
    host's own rule with a recording dispatcher in place of the route table.
    """
    import asyncio

    from strongroomd.api.plugins import _Host

    class RecordingDispatcher:
        def __init__(self) -> None:
            self.seen: list[str] = []

        async def handle(self, owner, method, path, body):
            self.seen.append(path)
            return 200, {}

    host = _Host.__new__(_Host)
    host.dispatcher = RecordingDispatcher()
    host.owner = None
    host.calls, host.max_calls = 0, 10
    host.stored = False  # a test run's host: no plugin row to re-read
    for path in ("/sys/v1/plugins/x", "/sys/v1/apps", "/sys/v1/session/auth", "/../crypto/v1/x"):
        status, body = asyncio.run(host.request("POST", path, {}))
        assert status == 403 and body["error"] == "forbidden", path
    assert asyncio.run(host.request("POST", "/crypto/v1/encrypt", {})) == (200, {})
    assert host.dispatcher.seen == ["/crypto/v1/encrypt"]


def test_api_calls_per_invocation_are_capped(tmp_path) -> None:
    from tests.conftest import start_daemon

    d = start_daemon(tmp_path, config="plugin_max_api_calls = 5\n")
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        g = new_group(admin)
        out = ok(
            admin.call(
                "POST",
                "/sys/v1/plugins/test",
                {
                    "groups": [g],
                    "code": """
            function run()
              for i = 1, 10 do
                local r, err = digest{alg = 'SHA256', data = Blob.from_bytes('x')}
                if not r then return {made = i - 1, status = err.status} end
              end
            end""",
                },
            )
        )
        assert out["result"] == {"made": 5, "status": 429}
        admin.close()
    finally:
        assert d.stop() == 0
