"""The HTTP/JSON gateway over real HTTP: auth, every path family, errors, limits, headers.

The same daemon also serves its Unix socket, so values cross between the two
front ends (encrypt over HTTP, decrypt over the socket) and the permission
rules are checked to answer alike on both.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import time

import pytest

from tests.conftest import Raw, start_daemon, unique
from tests.daemon.api.helpers import err, ok
from tests.daemon.gateway.conftest import MAX_FIELD, MAX_FRAME, Http, b64, gateway_url


def new_group(h: Http) -> str:
    return ok(h.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]


def new_app(admin: Http, url: str, groups: list[str]) -> tuple[Http, dict]:
    app = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("app"), "groups": groups}))
    h = Http(url)
    h.login(app["credential"]["api_key"])
    return h, app


# -- authentication ----------------------------------------------------------------------


def test_basic_api_key_on_auth_gives_a_bearer_token(http: Http, http_daemon) -> None:
    body = http.login(http_daemon.admin_key)
    assert body["token_type"] == "Bearer" and body["kind"] == "admin"
    assert ok(http.call("GET", "/sys/v1/groups"))
    # The API key in the body works as on the socket.
    plain = Http(http.url)
    got = ok(plain.call("POST", "/sys/v1/session/auth", {"api_key": http_daemon.admin_key}))
    plain.token = got["access_token"]
    assert ok(plain.call("GET", "/sys/v1/groups"))
    plain.close()


def test_refused_credentials(http: Http, http_daemon) -> None:
    bad = base64.b64encode(b"nobody:nothing").decode()
    r = http.call("POST", "/sys/v1/session/auth", headers={"Authorization": f"Basic {bad}"})
    assert r["status"] == 401 and err(r, "bad_credentials")
    assert r["headers"]["www-authenticate"].startswith("Bearer")
    err(http.call("GET", "/sys/v1/groups"), "unauthenticated")
    err(
        http.call("GET", "/sys/v1/groups", headers={"Authorization": "Bearer nope"}),
        "bad_credentials",
    )
    # The API key is for session/auth only: never a slow scrypt check per request.
    r = http.call(
        "GET", "/sys/v1/groups", headers={"Authorization": f"Basic {http_daemon.admin_key}"}
    )
    assert "session/auth" in err(r, "unauthenticated")["message"]
    err(
        http.call("GET", "/sys/v1/groups", headers={"Authorization": "Digest x"}), "unauthenticated"
    )
    r = http.call(
        "POST",
        "/sys/v1/session/auth",
        {"api_key": http_daemon.admin_key},
        headers={"Authorization": f"Basic {http_daemon.admin_key}"},
    )
    err(r, "invalid_field")


def test_terminate_ends_the_bearer_token(admin_http: Http) -> None:
    ok(admin_http.call("POST", "/sys/v1/session/terminate"), 204)
    err(admin_http.call("GET", "/sys/v1/groups"), "bad_credentials")


def test_expired_token(tmp_path) -> None:
    # 2 s: the first request must come inside it, seconds on a loaded machine.
    d = start_daemon(tmp_path, config="http_enabled = true\nhttp_port = 0\nsession_ttl = 2\n")
    try:
        h = Http(gateway_url(d))
        h.login(d.admin_key)
        ok(h.call("GET", "/sys/v1/groups"))
        time.sleep(2.1)
        err(h.call("GET", "/sys/v1/groups"), "token_expired")
        h.close()
    finally:
        assert d.stop() == 0


# -- path families -------------------------------------------------------------------------


def test_groups_and_apps(admin_http: Http, http_daemon) -> None:
    gid = new_group(admin_http)
    assert ok(admin_http.call("GET", f"/sys/v1/groups/{gid}"))["group_id"] == gid
    ok(admin_http.call("PATCH", f"/sys/v1/groups/{gid}", {"description": "d"}))
    assert gid in {g["group_id"] for g in ok(admin_http.call("GET", "/sys/v1/groups"))}
    app_http, app = new_app(admin_http, http_daemon.url, [gid])
    assert app["credential"]["api_key"]
    assert [g["group_id"] for g in ok(app_http.call("GET", "/sys/v1/groups"))] == [gid]
    app_http.close()
    ok(admin_http.call("DELETE", f"/sys/v1/apps/{app['app_id']}"), 204)
    r = admin_http.call("DELETE", f"/sys/v1/groups/{gid}")
    assert r["status"] == 204 and r["body"] is None


def test_keys_lifecycle_and_query_params(admin_http: Http) -> None:
    gid = new_group(admin_http)
    names = [unique("k") for _ in range(3)]
    for n in names:
        ok(
            admin_http.call(
                "POST", "/crypto/v1/keys", {"name": n, "obj_type": "AES", "group_id": gid}
            )
        )
    listed = ok(admin_http.call("GET", f"/crypto/v1/keys?group_id={gid}&limit=2"))
    assert len(listed) == 2 and all(k["group_id"] == gid for k in listed)
    one = ok(admin_http.call("GET", f"/crypto/v1/keys?name={names[0]}"))
    assert [k["name"] for k in one] == [names[0]]
    kid = one[0]["kid"]
    assert ok(admin_http.call("GET", f"/crypto/v1/keys/{kid}"))["name"] == names[0]
    assert ok(admin_http.call("POST", "/crypto/v1/keys/info", {"name": names[0]}))["kid"] == kid
    up = ok(admin_http.call("PATCH", f"/crypto/v1/keys/{kid}", {"description": "over http"}))
    assert up["description"] == "over http"
    err(admin_http.call("GET", "/crypto/v1/keys?limit=many"), "invalid_field")
    assert isinstance(ok(admin_http.call("GET", "/crypto/v1/keys?colour=red")), list)  # ignored
    err(admin_http.call("POST", "/crypto/v1/keys/info?name=x", {"name": names[0]}), "invalid_field")
    ok(admin_http.call("DELETE", f"/crypto/v1/keys/{kid}"), 204)
    err(admin_http.call("GET", f"/crypto/v1/keys/{kid}"), "not_found")


def test_import_export_and_public_key_base64(admin_http: Http, admin_sock: Raw) -> None:
    value = bytes(range(32))
    name = unique("imp")
    k = ok(
        admin_http.call(
            "PUT", "/crypto/v1/keys", {"name": name, "obj_type": "AES", "value": b64(value)}
        )
    )
    exported = ok(admin_http.call("POST", "/crypto/v1/keys/export", {"kid": k["kid"]}))
    assert base64.b64decode(exported["value"]) == value
    ec = ok(
        admin_http.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("ec"), "obj_type": "EC", "elliptic_curve": "NistP256"},
        )
    )
    same = ok(admin_sock.call("GET", f"/crypto/v1/keys/{ec['kid']}"))
    assert base64.b64decode(ec["pub_key"]) == same["pub_key"]


def test_transient_keys_are_refused_over_http(admin_http: Http) -> None:
    r = admin_http.call(
        "POST", "/crypto/v1/keys", {"name": unique("t"), "obj_type": "AES", "transient": True}
    )
    assert "Unix socket" in err(r, "invalid_value")["message"]


def test_crypto_round_trips_between_http_and_socket(admin_http: Http, admin_sock: Raw) -> None:
    k = ok(admin_http.call("POST", "/crypto/v1/keys", {"name": unique("aes"), "obj_type": "AES"}))
    key = {"kid": k["kid"]}
    plain = bytes(range(256)) * 3
    # HTTP -> socket
    out = ok(
        admin_http.call(
            "POST", "/crypto/v1/encrypt", {"key": key, "alg": "AES", "plain": b64(plain)}
        )
    )
    body = {
        "key": key,
        "alg": "AES",
        "cipher": base64.b64decode(out["cipher"]),
        "iv": base64.b64decode(out["iv"]),
        "tag": base64.b64decode(out["tag"]),
    }
    assert ok(admin_sock.call("POST", "/crypto/v1/decrypt", body))["plain"] == plain
    # socket -> HTTP, with additional data
    out = ok(
        admin_sock.call(
            "POST", "/crypto/v1/encrypt", {"key": key, "alg": "AES", "plain": plain, "ad": b"hdr"}
        )
    )
    body = {"key": key, "alg": "AES", "ad": b64(b"hdr")}
    body.update({f: b64(out[f]) for f in ("cipher", "iv", "tag")})
    assert (
        base64.b64decode(ok(admin_http.call("POST", "/crypto/v1/decrypt", body))["plain"]) == plain
    )
    body["tag"] = b64(bytes(16))
    err(admin_http.call("POST", "/crypto/v1/decrypt", body), "bad_tag")
    err(
        admin_http.call(
            "POST", "/crypto/v1/encrypt", {"key": key, "alg": "AES", "plain": "not base64!"}
        ),
        "invalid_field",
    )


def test_sign_verify_mac_digest(admin_http: Http, admin_sock: Raw) -> None:
    ec = ok(
        admin_http.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("ec"), "obj_type": "EC", "elliptic_curve": "NistP256"},
        )
    )
    data = b64(b"message")
    sig = ok(
        admin_http.call(
            "POST",
            "/crypto/v1/sign",
            {"key": {"kid": ec["kid"]}, "hash_alg": "SHA256", "data": data},
        )
    )
    v = {"key": {"kid": ec["kid"]}, "hash_alg": "SHA256", "data": b"message"}
    assert (
        ok(
            admin_sock.call(
                "POST", "/crypto/v1/verify", {**v, "signature": base64.b64decode(sig["signature"])}
            )
        )["result"]
        is True
    )
    hm = ok(
        admin_http.call(
            "POST", "/crypto/v1/keys", {"name": unique("h"), "obj_type": "HMAC", "key_size": 256}
        )
    )
    mac = ok(
        admin_http.call(
            "POST", "/crypto/v1/mac", {"key": {"kid": hm["kid"]}, "alg": "SHA256", "data": data}
        )
    )
    check = {"key": {"kid": hm["kid"]}, "alg": "SHA256", "data": data, "mac": mac["mac"]}
    assert ok(admin_http.call("POST", "/crypto/v1/macverify", check))["result"] is True
    dg = ok(admin_http.call("POST", "/crypto/v1/digest", {"alg": "SHA256", "data": data}))
    import hashlib

    assert base64.b64decode(dg["digest"]) == hashlib.sha256(b"message").digest()


def test_plugins_and_logs(admin_http: Http) -> None:
    gid = new_group(admin_http)
    code = (
        "function run(input)\n"
        '  print("hi")\n'
        '  return {n = input.n + 1, blob = Blob.from_bytes("ab")}\n'
        "end\n"
    )
    p = ok(
        admin_http.call(
            "POST",
            "/sys/v1/plugins",
            {"name": unique("p"), "source": {"language": "LUA", "code": code}, "groups": [gid]},
        ),
        201,  # Created, as DSM answers a new plugin over HTTP (the socket: 200)
    )
    out = ok(admin_http.call("POST", f"/sys/v1/plugins/{p['plugin_id']}", {"n": 41}))
    assert out["n"] == 42 and base64.b64decode(out["blob"]) == b"ab"
    t = ok(
        admin_http.call(
            "POST",
            "/sys/v1/plugins/test",
            {"code": "function run(i)\n  error('boom')\nend", "input": {}, "groups": [gid]},
        )
    )
    assert t["status"] == 500 and "test:2:" in t["traceback"]
    logs = ok(admin_http.call("GET", f"/sys/v1/logs?object_id={p['plugin_id']}&limit=5"))
    assert logs[0]["action"] == "POST /sys/v1/plugins/{plugin_id}" and logs[0]["invocation_id"]
    ok(admin_http.call("PATCH", f"/sys/v1/plugins/{p['plugin_id']}", {"description": "v2"}))
    assert ok(admin_http.call("GET", f"/sys/v1/plugins/{p['plugin_id']}"))["version"] == 2


# -- permission rules hold over HTTP --------------------------------------------------------


def test_access_rules_match_the_socket(admin_http: Http, http_daemon) -> None:
    g1, g2 = new_group(admin_http), new_group(admin_http)
    key = ok(
        admin_http.call(
            "POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES", "group_id": g2}
        )
    )
    app_http, app = new_app(admin_http, http_daemon.url, [g1])
    app_sock = Raw(http_daemon.socket)
    app_sock.login(app["credential"]["api_key"])
    try:
        enc = {"key": {"kid": key["kid"]}, "alg": "AES", "plain": b64(b"x")}
        over_http = app_http.call("POST", "/crypto/v1/encrypt", enc)
        over_sock = app_sock.call("POST", "/crypto/v1/encrypt", {**enc, "plain": b"x"})
        assert over_http["status"] == over_sock["status"] >= 403
        assert over_http["body"]["error"] == over_sock["body"]["error"]
        err(app_http.call("POST", "/sys/v1/groups", {"name": unique("g")}), "forbidden")
        err(app_http.call("GET", "/sys/v1/logs"), "forbidden")
        err(
            app_http.call("POST", "/sys/v1/plugins/test", {"code": "function run() end"}),
            "forbidden",
        )
    finally:
        app_http.close()
        app_sock.close()


# -- errors, limits, headers ------------------------------------------------------------------


def test_error_bodies(admin_http: Http) -> None:
    r = admin_http.call("GET", "/sys/v1/nothing")
    assert r["status"] == 404 and set(r["body"]) >= {"error", "message"}
    assert r["body"]["error"] == "no_such_route"
    err(admin_http.call("PUT", "/sys/v1/groups"), "method_not_allowed")
    status, hdrs, raw = admin_http.request("POST", "/sys/v1/groups", b"{not json")
    assert status == 400 and json.loads(raw)["error"] == "malformed_frame"
    assert hdrs["content-type"].startswith("application/json")
    # Unknown fields are ignored, as DSM's server ignores them.
    made = ok(admin_http.call("POST", "/sys/v1/groups", {"name": unique("g"), "colour": 1}))
    assert "colour" not in made
    err(admin_http.call("POST", "/sys/v1/groups", [1, 2]), "invalid_field")
    err(admin_http.call("GET", "/nowhere"), "no_such_route")


def test_size_limits(admin_http: Http) -> None:
    big = json.dumps({"alg": "SHA256", "data": "A" * MAX_FRAME}).encode()
    status, _, raw = admin_http.request("POST", "/crypto/v1/digest", big)
    assert status == 413 and json.loads(raw)["error"] == "too_large"
    field = b64(b"x" * (MAX_FIELD // 4 * 3 + 3))  # the base64 text is over max_field
    r = admin_http.call("POST", "/crypto/v1/digest", {"alg": "SHA256", "data": field})
    err(r, "too_large")
    ok(admin_http.call("POST", "/crypto/v1/digest", {"alg": "SHA256", "data": b64(b"x" * 1000)}))


def test_security_headers_and_no_cors(http: Http, admin_http: Http) -> None:
    origin = {"Origin": "https://evil.example"}
    for h, method, path in (
        (admin_http, "GET", "/sys/v1/groups"),
        (http, "GET", "/sys/v1/groups"),
        (http, "GET", "/openapi.json"),
        (http, "GET", "/console/"),
        (http, "GET", "/console/app.js"),
        (http, "GET", "/nowhere"),
        (http, "OPTIONS", "/sys/v1/groups"),
    ):
        status, hdrs, _ = h.request(method, path, headers=origin)
        assert "default-src 'self'" in hdrs["content-security-policy"], path
        assert "frame-ancestors 'none'" in hdrs["content-security-policy"]
        assert hdrs["x-content-type-options"] == "nosniff"
        assert hdrs["x-frame-options"] == "DENY"
        assert hdrs["referrer-policy"] == "no-referrer"
        assert not any(k.startswith("access-control-") for k in hdrs), (path, hdrs)
        if path.startswith("/sys/"):
            assert hdrs["cache-control"] == "no-store"
    status, _, _ = http.request("OPTIONS", "/sys/v1/groups", headers=origin)
    assert status == 405


def test_foreign_host_header_is_refused(http: Http) -> None:
    """A page on another origin that rebinds its name to 127.0.0.1 still sends its own Host."""
    status, _, raw = http.request("GET", "/openapi.json", headers={"Host": "evil.example:80"})
    assert status == 403 and json.loads(raw)["error"] == "forbidden"


def test_console_files(http: Http) -> None:
    status, hdrs, _ = http.request("GET", "/")
    assert status == 302 and hdrs["location"] == "/console/"
    status, hdrs, body = http.request("GET", "/console/")
    assert status == 200 and hdrs["content-type"].startswith("text/html") and b"app.js" in body
    for name in (
        "app.js",
        "style.css",
        "vendor/codemirror.js",
        "vendor/lua.js",
        "vendor/codemirror.css",
    ):
        status, hdrs, body = http.request("GET", f"/console/{name}")
        assert status == 200 and body, name
    assert http.request("GET", "/console/vendor/lua.js")[1]["content-type"].startswith(
        "text/javascript"
    )
    for bad in (
        "/console/package.json",
        "/console/vendor/../package.json",
        "/console/node_modules/codemirror/package.json",
    ):
        assert http.request("GET", bad)[0] == 404, bad


def test_metrics_mounted(http: Http) -> None:
    status, hdrs, body = http.request("GET", "/metrics")
    if importlib.util.find_spec("strongroomd.metrics") is None:
        assert status == 404 and json.loads(body)["error"] == "not_found"
    else:
        assert status == 200 and hdrs["content-type"].startswith("text/plain"), body[:200]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_non_loopback_host_needs_explicit_setting(host: str) -> None:
    from strongroomd import config
    from strongroomd.config import ConfigError

    with pytest.raises(ConfigError, match="loopback"):
        config.load(http_enabled=True, http_host=host)
    assert config.load(http_enabled=True, http_host=host, http_allow_remote=True).http_host == host
    assert config.load(http_enabled=True, http_host="::1").http_host == "::1"
