"""DSM's app permissions and app/plugin shapes over the HTTP gateway (the same
rules as over the socket: one permission table, one dispatcher)."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import unique
from tests.daemon.api.helpers import err, ok
from tests.daemon.gateway.conftest import Http, b64


def _group(h: Http) -> str:
    return ok(h.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]


def _aes(h: Http, g: str) -> tuple[str, bytes]:
    value = os.urandom(32)
    body = {
        "name": unique("k"),
        "obj_type": "AES",
        "value": b64(value),
        "group_id": g,
        "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"],
    }
    return ok(h.call("PUT", "/crypto/v1/keys", body))["kid"], value


def test_encrypt_only_app_over_http(admin_http: Http, http_daemon) -> None:
    g = _group(admin_http)
    kid, value = _aes(admin_http, g)
    app = ok(
        admin_http.call(
            "POST", "/sys/v1/apps", {"name": unique("app"), "add_groups": {g: ["ENCRYPT"]}}
        )
    )
    assert app["groups"] == {g: ["ENCRYPT"]}
    h = Http(admin_http.url)
    try:
        h.login(app["credential"]["api_key"])
        out = ok(h.call("POST", f"/crypto/v1/keys/{kid}/encrypt", {"plain": b64(b"over http")}))
        iv, cipher, tag = (base64.b64decode(out[k]) for k in ("iv", "cipher", "tag"))
        assert AESGCM(value).decrypt(iv, cipher + tag, None) == b"over http"
        sealed = {"iv": out["iv"], "cipher": out["cipher"], "tag": out["tag"], "mode": "GCM"}
        r = h.call("POST", f"/crypto/v1/keys/{kid}/decrypt", sealed)
        assert r["status"] == 403 and err(r, "app_permission_denied")
        assert "DECRYPT" in r["body"]["message"]
        r = h.call("GET", f"/crypto/v1/keys/{kid}/export")
        assert r["status"] == 403 and err(r, "app_permission_denied")
        # The admin gives DECRYPT: the same session may decrypt at once.
        path = f"/sys/v1/apps/{app['app_id']}"
        got = ok(admin_http.call("PATCH", path, {"mod_groups": {g: ["ENCRYPT", "DECRYPT"]}}))
        assert got["groups"] == {g: ["ENCRYPT", "DECRYPT"]}
        back = ok(h.call("POST", f"/crypto/v1/keys/{kid}/decrypt", sealed))
        assert base64.b64decode(back["plain"]) == b"over http"
    finally:
        h.close()


def test_batch_items_over_http_answer_per_group(admin_http: Http) -> None:
    g1, g2 = _group(admin_http), _group(admin_http)
    (k1, v1), (k2, _) = _aes(admin_http, g1), _aes(admin_http, g2)
    app = ok(
        admin_http.call(
            "POST",
            "/sys/v1/apps",
            {"name": unique("app"), "add_groups": {g1: ["ENCRYPT"], g2: ["SIGN"]}},
        )
    )
    h = Http(admin_http.url)
    try:
        h.login(app["credential"]["api_key"])
        items = [
            {"kid": k2, "request": {"plain": b64(b"no")}},
            {"kid": k1, "request": {"plain": b64(b"yes")}},
        ]
        out = ok(h.call("POST", "/crypto/v1/keys/batch/encrypt", items))
        assert [o["status"] for o in out] == [403, 200]
        assert out[0]["code"] == "app_permission_denied"
        b = out[1]["body"]
        sealed = base64.b64decode(b["cipher"]) + base64.b64decode(b["tag"])
        assert AESGCM(v1).decrypt(base64.b64decode(b["iv"]), sealed, None) == b"yes"
    finally:
        h.close()


def test_dsm_plugin_shape_over_http(admin_http: Http) -> None:
    g = _group(admin_http)
    body = {
        "name": unique("p"),
        "source": {"language": "LUA", "code": "function run(i) return i.n + 1 end"},
        "plugin_type": "STANDARD",
        "add_groups": [g],
        "default_group": g,
    }
    p = ok(admin_http.call("POST", "/sys/v1/plugins", body), 201)  # DSM's Created, over HTTP
    assert p["plugin_type"] == "STANDARD" and p["groups"] == [g] and p["default_group"] == g
    assert ok(admin_http.call("POST", f"/sys/v1/plugins/{p['plugin_id']}", {"n": 41})) == 42
    r = admin_http.call("POST", "/sys/v1/plugins", {**body, "plugin_type": "IMPERSONATING"})
    assert r["status"] == 400 and err(r, "invalid_value")
    bad = {**body, "name": unique("p"), "source": {"language": "WASM", "code": "x"}}
    r = admin_http.call("POST", "/sys/v1/plugins", bad)
    assert r["status"] == 400 and err(r, "invalid_value")
