"""DSM's PluginRequest and Plugin shapes: source {language, code}, plugin_type,
add_groups / del_groups / mod_groups, default_group; and a plugin is not an app
(DSM's app permissions of whoever invokes it do not narrow what it does)."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import Daemon, Raw, unique
from tests.daemon.api.helpers import err, new_group, ok

CODE = "function run(input) return {hello = input.who} end"


def _create(admin: Raw, **body) -> dict:
    full = {"name": unique("plugin"), "source": {"language": "LUA", "code": CODE}, **body}
    return ok(admin.call("POST", "/sys/v1/plugins", full))


def test_dsm_plugin_request_and_view(admin_raw: Raw) -> None:
    g1, g2 = new_group(admin_raw), new_group(admin_raw)
    p = _create(
        admin_raw,
        plugin_type="STANDARD",
        add_groups=[g1, g2],
        default_group=g2,
        enabled=True,
        description="says hello",
    )
    assert p["plugin_type"] == "STANDARD"
    assert p["source"] == {"language": "LUA", "code": CODE}
    assert p["groups"] == [g1, g2] and p["default_group"] == g2
    assert p["lastupdated_at"] == p["updated_at"] and p["legacy_access"] is False
    assert p["enabled"] is True and p["description"] == "says hello"
    got = ok(admin_raw.call("GET", f"/sys/v1/plugins/{p['plugin_id']}"))
    assert {k: got[k] for k in ("plugin_type", "groups", "default_group", "source")} == {
        k: p[k] for k in ("plugin_type", "groups", "default_group", "source")
    }
    out = ok(admin_raw.call("POST", f"/sys/v1/plugins/{p['plugin_id']}", {"who": "dsm"}))
    assert out == {"hello": "dsm"}
    # language is case-insensitive, as Strongroom accepted before; plugin_type may be left out
    assert _create(admin_raw, groups=[g1], source={"language": "lua", "code": CODE})["plugin_type"]


def test_unknown_language_or_plugin_type_is_a_400(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    body = {"name": unique(), "groups": [g], "source": {"language": "LUA", "code": CODE}}
    e = err(
        admin_raw.call(
            "POST", "/sys/v1/plugins", {**body, "source": {"language": "JS", "code": CODE}}
        ),
        "invalid_value",
    )
    assert "LUA" in e["message"]
    # Any case of a known value, as DSM's Python SDK sends PluginType.STANDARD as "Standard".
    for kind in ("Standard", "standard"):
        made = admin_raw.call(
            "POST", "/sys/v1/plugins", {**body, "name": unique(), "plugin_type": kind}
        )
        assert made["status"] == 200 and made["body"]["plugin_type"] == "STANDARD", made
    for kind in ("FANCY",):
        e = err(
            admin_raw.call("POST", "/sys/v1/plugins", {**body, "plugin_type": kind}),
            "invalid_value",
        )
        assert "STANDARD, IMPERSONATING, CUSTOMALGORITHM" in e["message"]
    for kind in ("IMPERSONATING", "CUSTOMALGORITHM"):
        e = err(
            admin_raw.call("POST", "/sys/v1/plugins", {**body, "plugin_type": kind}),
            "invalid_value",
        )
        assert "STANDARD plugins only" in e["message"]
    repo = {"repo_url": "https://x", "name": "p", "version": "1", "language": "LUA", "code": CODE}
    err(admin_raw.call("POST", "/sys/v1/plugins", {**body, "source": repo}), "invalid_value")
    err(admin_raw.call("POST", "/sys/v1/plugins", {**body, "del_groups": [g]}), "invalid_field")
    resp = admin_raw.call("POST", "/sys/v1/plugins", {**body, "plugin_type": "X"})
    assert resp["status"] == 400  # a client error, not 422: DSM's enum names no such type
    # nothing was stored
    names = {p["name"] for p in ok(admin_raw.call("GET", "/sys/v1/plugins"))}
    assert body["name"] not in names


def test_patch_add_del_mod_groups_and_default(admin_raw: Raw) -> None:
    g1, g2, g3 = new_group(admin_raw), new_group(admin_raw), new_group(admin_raw)
    p = _create(admin_raw, add_groups=[g1])
    path = f"/sys/v1/plugins/{p['plugin_id']}"
    out = ok(admin_raw.call("PATCH", path, {"add_groups": [g2, g3], "default_group": g3}))
    assert out["groups"] == [g1, g2, g3] and out["default_group"] == g3
    assert out["version"] == p["version"] + 1 and out["plugin_type"] == "STANDARD"
    out = ok(admin_raw.call("PATCH", path, {"del_groups": [g3]}))  # the default goes too
    assert out["groups"] == [g1, g2] and out["default_group"] == g1
    ok(admin_raw.call("PATCH", path, {"mod_groups": [g2], "plugin_type": "STANDARD"}))
    err(admin_raw.call("PATCH", path, {"mod_groups": [g3]}), "invalid_value")
    err(admin_raw.call("PATCH", path, {"add_groups": [g3], "del_groups": [g3]}), "invalid_value")
    err(admin_raw.call("PATCH", path, {"plugin_type": "IMPERSONATING"}), "invalid_value")
    err(admin_raw.call("PATCH", path, {"del_groups": [g1, g2]}), "invalid_value")  # none left
    new_code = "function run() return 7 end"
    out = ok(admin_raw.call("PATCH", path, {"source": {"language": "LUA", "code": new_code}}))
    assert out["source"]["code"] == new_code and out["groups"] == [g1, g2]
    assert ok(admin_raw.call("POST", path, {})) == 7


def test_a_plugin_is_not_bound_by_its_invokers_app_permissions(
    daemon: Daemon, admin_raw: Raw
) -> None:
    """An app with only ENCRYPT in G cannot decrypt with a key in G itself, yet a
    plugin in G that it invokes decrypts with that key: the plugin keeps its own
    rules (its groups, the key's key_ops), as in DSM where a plugin is not an app."""
    g = new_group(admin_raw)
    value = os.urandom(32)
    key = ok(
        admin_raw.call(
            "PUT",
            "/crypto/v1/keys",
            {
                "name": unique("k"),
                "obj_type": "AES",
                "value": value,
                "group_id": g,
                "key_ops": ["ENCRYPT", "DECRYPT"],
            },
        )
    )
    code = """
    function run(input)
      local key = assert(Sobject{kid = input.kid})
      local out = assert(key:decrypt{cipher = Blob.from_base64(input.cipher),
        iv = Blob.from_base64(input.iv), tag = Blob.from_base64(input.tag), mode = 'GCM'})
      return {plain = out.plain:base64()}
    end"""
    p = ok(
        admin_raw.call(
            "POST",
            "/sys/v1/plugins",
            {
                "name": unique("dec"),
                "source": {"language": "LUA", "code": code},
                "plugin_type": "STANDARD",
                "add_groups": [g],
            },
        )
    )
    app = ok(
        admin_raw.call("POST", "/sys/v1/apps", {"name": unique(), "add_groups": {g: ["ENCRYPT"]}})
    )
    conn = Raw(daemon.socket)
    try:
        conn.login(app["credential"]["api_key"])
        iv = os.urandom(12)
        sealed = AESGCM(value).encrypt(iv, b"for the plugin", None)
        fields = {"cipher": sealed[:-16], "iv": iv, "tag": sealed[-16:]}
        resp = conn.call("POST", f"/crypto/v1/keys/{key['kid']}/decrypt", {**fields, "mode": "GCM"})
        assert resp["status"] == 403 and resp["body"]["error"] == "app_permission_denied"
        b64 = {k: base64.b64encode(v).decode() for k, v in fields.items()}
        out = ok(conn.call("POST", f"/sys/v1/plugins/{p['plugin_id']}", {"kid": key["kid"], **b64}))
        assert base64.b64decode(out["plain"]) == b"for the plugin"
    finally:
        conn.close()
