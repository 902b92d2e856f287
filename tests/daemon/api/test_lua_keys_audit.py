"""DSM's Lua API for key rotation, groups and the audit log (issue 11):
``key:rekey{}``, ``links`` on keys, ``Group{...}``, ``AuditLog.get_all{}``.

Each plugin here is Lua written for these tests, using the API the way DSM's
published plugins do (rotate a key by name and look at ``links``, look a group
up by id, read a key's audit events).
"""

from __future__ import annotations

from typing import Any

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import err, new_group, ok, run_lua

REKEY_LUA = r"""
function run(input)
  local key = assert(Sobject { name = input.name })
  local new, e = key:rekey { name = input.name, key_ops = { 'EXPORT', 'ENCRYPT', 'DECRYPT' } }
  if new == nil then return nil, e end
  local old = assert(Sobject { kid = key.kid })
  local all = assert(Sobject.get_all {})
  local rotated = {}
  for _, k in ipairs(all) do
    -- the published key-rotation plugin's test: links.replacement marks a rotated key
    if k.links ~= nil and k.links.replacement ~= nil then rotated[#rotated + 1] = k.kid end
  end
  return { new = new, old = old, rotated = rotated }
end
"""


def test_rekey_keeps_the_name_and_links_versions(env) -> None:
    admin, g = env
    name = unique("rot")
    first = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {"name": name, "group_id": g, "obj_type": "AES", "key_size": 128},
        )
    )
    out = run_lua(env, REKEY_LUA, {"name": name})
    new, old = out["new"], out["old"]
    assert new["name"] == name and new["kid"] != first["kid"]
    assert new["obj_type"] == "AES" and new["key_size"] == 128
    assert sorted(new["key_ops"]) == ["DECRYPT", "ENCRYPT", "EXPORT"]
    assert new["links"] == {"replaced": first["kid"]}
    assert old["kid"] == first["kid"] and old["links"] == {"replacement": new["kid"]}
    assert old["name"] != name
    assert first["kid"] in out["rotated"] and new["kid"] not in out["rotated"]
    # what the daemon holds agrees with what the plugin saw
    by_name = ok(admin.call("POST", "/crypto/v1/keys/info", {"name": name}))
    assert by_name["kid"] == new["kid"]


def test_rekey_refuses_another_type_or_name(env) -> None:
    admin, g = env
    name = unique("rot")
    ok(admin.call("POST", "/crypto/v1/keys", {"name": name, "group_id": g, "obj_type": "AES"}))
    code = r"""
    function run(input)
      local key = assert(Sobject { name = input.name })
      local a, e1 = key:rekey { obj_type = 'RSA' }
      local b, e2 = key:rekey { name = 'something else' }
      return { a = a == nil, e1 = e1.message, s1 = e1.status, b = b == nil, e2 = e2.message }
    end
    """
    out = run_lua(env, code, {"name": name})
    assert out["a"] and out["s1"] == 400 and "obj_type must stay AES" in out["e1"]
    assert out["b"] and "keeps" not in out["e2"] and "own name" in out["e2"]


def test_rekey_of_a_key_the_plugin_cannot_see_is_not_found(env, admin_raw: Raw) -> None:
    admin, g = env
    other = new_group(admin_raw)
    name = unique("rot")
    ok(admin.call("POST", "/crypto/v1/keys", {"name": name, "group_id": other, "obj_type": "AES"}))
    code = r"""
    function run(input)
      local k, e = Sobject { name = input.name }
      if k then return 'seen' end
      return { status = e.status }
    end
    """
    assert run_lua(env, code, {"name": name}) == {"status": 404}


GROUP_LUA = r"""
function run(input)
  local by_id, e1 = Group { id = input.id }
  local by_gid = Group { group_id = input.id }
  local by_name = Group { name = input.name }
  local other, e2 = Group { group_id = input.other }
  local missing, e3 = Group { name = 'no such group ' .. input.id }
  local bad, e4 = Group { id = '../logs' }
  return {
    by_id = by_id, same = by_gid.group_id == by_id.group_id and by_name.group_id == by_id.group_id,
    other = other == nil and e2.status, missing = missing == nil and e3.status,
    bad = bad == nil and e4.status,
  }
end
"""


def test_group_lookup_by_id_and_name(env, admin_raw: Raw) -> None:
    admin, g = env
    info = ok(admin.call("GET", f"/sys/v1/groups/{g}"))
    other = new_group(admin_raw)
    out = run_lua(env, GROUP_LUA, {"id": g, "name": info["name"], "other": other})
    assert out["by_id"]["group_id"] == g and out["by_id"]["name"] == info["name"]
    assert out["same"] is True
    # a group the plugin is not in answers as a missing one
    assert out["other"] == 404 and out["missing"] == 404 and out["bad"] == 404


def test_group_get_all_lists_the_plugins_groups(env) -> None:
    # A worker that escaped Lua could send any frame: only GETs of groups and logs pass.
    code = r"""
    function run()
      local r, e = Group.get_all()
      return { n = #r }
    end
    """
    assert run_lua(env, code)["n"] >= 1


def _plugin(admin: Raw, g: str, code: str, **extra: Any) -> str:
    body = {"name": unique("p"), "groups": [g], "source": {"language": "LUA", "code": code}}
    return ok(admin.call("POST", "/sys/v1/plugins", {**body, **extra}))["plugin_id"]


AUDIT_LUA = r"""
function run(input)
  if input.touch then assert(Sobject { name = input.touch }) end
  local r, e = AuditLog.get_all { object_id = input.object_id, limit = 1000 }
  if r == nil then return nil, e end
  local out = { total = r.total, invocations = {}, actors = {}, kinds = {} }
  for _, hit in ipairs(r.hits) do
    local s = hit._source
    if s.invocation_id then out.invocations[s.invocation_id] = true end
    out.actors[s.actor_id or 'none'] = true
    out.kinds[s.action_type] = true
    assert(s.time and s.message and s.actor_type and hit._id)
  end
  return out
end
"""


def test_audit_get_all_reads_only_the_plugins_own_invocations(env, admin_raw: Raw) -> None:
    admin, g = env
    key = unique("audited")
    ok(admin.call("POST", "/crypto/v1/keys", {"name": key, "group_id": g, "obj_type": "AES"}))
    reader = _plugin(admin, g, AUDIT_LUA)
    other = _plugin(admin, g, AUDIT_LUA)
    # another plugin and an admin touch the key: their records are not the reader's
    ok(admin.call("POST", f"/sys/v1/plugins/{other}", {"touch": key}))
    ok(admin.call("POST", "/crypto/v1/keys/info", {"name": key}))
    first = ok(admin.call("POST", f"/sys/v1/plugins/{reader}", {"touch": key}))
    out = ok(admin.call("POST", f"/sys/v1/plugins/{reader}", {"touch": key}))
    assert out["total"] >= 2
    own = {
        r["invocation_id"]
        for r in ok(admin.call("GET", "/sys/v1/logs", {"actor_id": reader, "limit": 1000}))
    }
    assert set(out["invocations"]) <= own and len(own) >= 2
    assert reader in out["actors"] and other not in out["actors"]
    assert first["total"] >= 1
    # filtered by object: only its own uses of the key
    keyid = ok(admin.call("POST", "/crypto/v1/keys/info", {"name": key}))["kid"]
    by_key = ok(admin.call("POST", f"/sys/v1/plugins/{reader}", {"object_id": keyid}))
    assert set(by_key["actors"]) == {reader}


def test_audit_get_all_with_the_grant_reads_everything(env, admin_raw: Raw) -> None:
    admin, g = env
    key = unique("audited")
    kid = ok(
        admin.call("POST", "/crypto/v1/keys", {"name": key, "group_id": g, "obj_type": "AES"})
    )["kid"]
    other = _plugin(admin, g, AUDIT_LUA)
    ok(admin.call("POST", f"/sys/v1/plugins/{other}", {"touch": key}))
    reader = _plugin(admin, g, AUDIT_LUA, audit_read=True)
    shown = ok(admin.call("GET", f"/sys/v1/plugins/{reader}"))
    assert shown["audit_read"] is True and "audit_read" not in shown["limits"]
    out = ok(admin.call("POST", f"/sys/v1/plugins/{reader}", {"object_id": kid}))
    assert other in out["actors"]  # another plugin's use of the key
    # taking the grant away is obeyed at the next invocation
    ok(admin.call("PATCH", f"/sys/v1/plugins/{reader}", {"audit_read": False}))
    assert ok(admin.call("GET", f"/sys/v1/plugins/{reader}"))["audit_read"] is False
    out = ok(admin.call("POST", f"/sys/v1/plugins/{reader}", {"object_id": kid}))
    assert other not in out["actors"] and out["total"] == 0
    # a PATCH of something else keeps a grant
    ok(admin.call("PATCH", f"/sys/v1/plugins/{reader}", {"audit_read": True}))
    ok(admin.call("PATCH", f"/sys/v1/plugins/{reader}", {"description": "x"}))
    assert ok(admin.call("GET", f"/sys/v1/plugins/{reader}"))["audit_read"] is True


def test_an_app_still_cannot_read_the_audit_log(world) -> None:
    _admin, _g1, _g2, app1, _app2 = world
    err(app1.call("GET", "/sys/v1/logs", {}), "forbidden")


# A key-value store the way DSM's kvp plugin keeps one: a SECRET whose value is the
# CBOR text of a JSON map, put into a "group" that may be only a label (DSM answers 400
# for a group_id that is not a group's UUID, and the plugin then uses its default group),
# read back through the exported Blob's [1].
KV_LUA = r"""
local function load(name)
  local s = Sobject { name = name }
  if s == nil then return nil, {} end
  local raw = assert(s:export().value)
  local text = raw[1]
  return s, json.decode(string.sub(text, string.find(text, '{'), #text))
end
function run(input)
  local name = input.group .. ':' .. input.path
  local old, map = load(name)
  local version = 1
  if old then
    version = tonumber(old.custom_metadata.version) + 1
    assert(old:update { name = name .. ':version_' .. (version - 1), enabled = false })
  end
  for k, v in pairs(input.put or {}) do map[k] = v end
  local value = cbor.encode(json.encode(map))
  local meta = { version = tostring(version) }
  local new, e = Sobject.import { name = name, obj_type = 'SECRET', value = value,
    group_id = input.group, custom_metadata = meta }
  local first = e and e.status
  if new == nil and e.status == 400 then
    new, e = Sobject.import { name = name, obj_type = 'SECRET', value = value,
      custom_metadata = meta }
  end
  if new == nil then return nil, e end
  return { version = version, map = map, first = first, group = new.group_id }
end
"""


def test_kv_store_in_a_label_group_survives_two_puts(env) -> None:
    _admin, g = env
    path = unique("secret/")
    one = run_lua(env, KV_LUA, {"group": "namespace", "path": path, "put": {"a": "1", "b": "2"}})
    assert one["version"] == 1 and one["first"] == 400 and one["group"] == g
    two = run_lua(env, KV_LUA, {"group": "namespace", "path": path, "put": {"b": "3"}})
    assert two == {"version": 2, "map": {"a": "1", "b": "3"}, "first": 400, "group": g}
    three = run_lua(env, KV_LUA, {"group": "namespace", "path": path, "put": {}})
    assert three["version"] == 3 and three["map"] == {"a": "1", "b": "3"}


def test_group_id_statuses(env, admin_raw: Raw) -> None:
    admin, g = env
    other = new_group(admin_raw)
    code = r"""
    function run(input)
      local _, e1 = Sobject.import { obj_type = 'SECRET', value = Blob.from_bytes('x'),
        group_id = 'namespace' }
      local _, e2 = Sobject.import { obj_type = 'SECRET', value = Blob.from_bytes('x'),
        group_id = input.other }
      return { label = e1.status, foreign = e2.status, message = e1.message }
    end
    """
    out = run_lua(env, code, {"other": other})
    # not a UUID: a bad request; a real group the plugin is not in: forbidden
    assert out == {"label": 400, "foreign": 403, "message": "group_id must be a group's UUID"}
