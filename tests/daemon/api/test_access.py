"""API.md section 2, every rule in both directions: allowed and denied."""

from __future__ import annotations

import base64
import time

import pytest

from tests.conftest import Raw, start_daemon, unique
from tests.daemon.api.helpers import err, new_app, new_group, new_key, ok

ENC = {"alg": "AES", "mode": "GCM", "plain": b"secret data"}


# -- credentials -------------------------------------------------------------------


def test_wrong_secret_and_unknown_app_give_the_same_answer(daemon, raw: Raw, world) -> None:
    _, _, _, a1, _ = world
    app_id = base64.b64decode(a1.api_key).decode().split(":")[0]
    wrong = base64.b64encode(f"{app_id}:nope".encode()).decode()
    unknown = base64.b64encode(b"00000000-0000-0000-0000-000000000000:nope").decode()
    for key in (wrong, unknown, "%%%notbase64", base64.b64encode(b"nocolon").decode()):
        body = err(raw.call("POST", "/sys/v1/session/auth", {"api_key": key}), "bad_credentials")
        assert "nope" not in body["message"]
    ok(raw.call("POST", "/sys/v1/session/auth", {"api_key": a1.api_key}))


def test_app_id_and_secret_form(raw: Raw, world) -> None:
    _, _, _, a1, _ = world
    app_id, secret = base64.b64decode(a1.api_key).decode().split(":", 1)
    body = ok(raw.call("POST", "/sys/v1/session/auth", {"app_id": app_id, "secret": secret}))
    assert body["entity_id"] == app_id and body["token_type"] == "Bearer"


def test_reset_secret_revokes_old_key_and_sessions(daemon, raw: Raw, world) -> None:
    admin, _, _, a1, _ = world
    ok(a1.call("GET", "/sys/v1/groups"))
    new = ok(admin.call("POST", f"/sys/v1/apps/{a1.id}/reset_secret"))["credential"]["api_key"]
    err(a1.call("GET", "/sys/v1/groups"), "bad_credentials")
    err(raw.call("POST", "/sys/v1/session/auth", {"api_key": a1.api_key}), "bad_credentials")
    ok(raw.call("POST", "/sys/v1/session/auth", {"api_key": new}))


def test_deleted_app_cannot_log_in(daemon, raw: Raw, world) -> None:
    admin, _, _, a1, _ = world
    ok(admin.call("DELETE", f"/sys/v1/apps/{a1.id}"), 204)
    err(a1.call("GET", "/sys/v1/groups"), "bad_credentials")
    err(raw.call("POST", "/sys/v1/session/auth", {"api_key": a1.api_key}), "bad_credentials")


def test_expired_session(tmp_path) -> None:
    # 2 s: the first request must come inside it, seconds on a loaded machine.
    d = start_daemon(tmp_path, config="session_ttl = 2\n")
    try:
        r = Raw(d.socket)
        r.login(d.admin_key)
        ok(r.call("GET", "/sys/v1/groups"))
        time.sleep(2.2)
        err(r.call("GET", "/sys/v1/groups"), "token_expired")
        r.login(d.admin_key)
        ok(r.call("GET", "/sys/v1/groups"))
        r.close()
    finally:
        assert d.stop() == 0


# -- administration is for admins --------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/sys/v1/groups", {"name": "x"}),
        ("GET", "/sys/v1/apps", None),
        ("POST", "/sys/v1/apps", {"name": "x", "groups": []}),
        ("GET", "/sys/v1/logs", None),
    ],
)
def test_apps_cannot_administer(world, method, path, body) -> None:
    admin, *_, a1, _ = world
    err(a1.call(method, path, body), "forbidden")
    assert admin.call(method, path, body)["status"] != 403


def test_app_sees_only_its_groups_and_itself(world) -> None:
    admin, g1, g2, a1, a2 = world
    assert {g["group_id"] for g in ok(a1.call("GET", "/sys/v1/groups"))} == {g1}
    err(a1.call("GET", f"/sys/v1/groups/{g2}"), "not_found")  # as if it did not exist
    assert ok(a1.call("GET", f"/sys/v1/apps/{a1.id}"))["app_id"] == a1.id
    err(a1.call("GET", f"/sys/v1/apps/{a2.id}"), "forbidden")
    assert {g1, g2} <= {g["group_id"] for g in ok(admin.call("GET", "/sys/v1/groups"))}


# -- keys: groups -----------------------------------------------------------------------


def test_key_use_needs_the_keys_group(world) -> None:
    admin, g1, g2, a1, a2 = world
    key = new_key(admin, g1)
    ok(a1.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))
    # Refused as if it did not exist, so names in other groups cannot be probed.
    err(a2.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}), "not_found")
    err(a2.call("POST", "/crypto/v1/encrypt", {"key": {"name": key["name"]}, **ENC}), "not_found")
    # Listing and showing hide what is not yours.
    assert key["kid"] in {k["kid"] for k in ok(a1.call("GET", "/crypto/v1/keys"))}
    assert key["kid"] not in {k["kid"] for k in ok(a2.call("GET", "/crypto/v1/keys"))}
    err(a2.call("GET", f"/crypto/v1/keys/{key['kid']}"), "not_found")
    ok(a1.call("GET", f"/crypto/v1/keys/{key['kid']}"))


def test_app_creates_keys_only_in_its_groups(world) -> None:
    _, g1, g2, a1, _ = world
    key = new_key(a1.conn, g1)
    assert key["group_id"] == g1 and key["creator"] == {"app": a1.id}
    dflt = ok(a1.call("POST", "/crypto/v1/keys", {"name": unique(), "obj_type": "AES"}))
    assert dflt["group_id"] == g1  # the app's default group
    err(
        a1.call("POST", "/crypto/v1/keys", {"name": unique(), "obj_type": "AES", "group_id": g2}),
        "forbidden",
    )


# -- keys: key_ops ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "path", "body", "kind"),
    [
        ("ENCRYPT", "/crypto/v1/encrypt", ENC, "AES"),
        ("MACGENERATE", "/crypto/v1/mac", {"alg": "SHA256", "data": b"m"}, "HMAC"),
        ("SIGN", "/crypto/v1/sign", {"hash_alg": "SHA256", "data": b"d"}, "EC"),
        ("EXPORT", "/crypto/v1/keys/export", None, "AES"),
    ],
)
def test_each_key_op_is_enforced(world, op, path, body, kind) -> None:
    admin, g1, _, a1, _ = world
    extra = {"elliptic_curve": "NistP256"} if kind == "EC" else {}
    extra["obj_type"] = kind
    if kind != "EC":
        extra["key_size"] = 256
    every = {
        "AES": ["ENCRYPT", "DECRYPT", "EXPORT"],
        "HMAC": ["MACGENERATE", "MACVERIFY"],
        "EC": ["SIGN", "VERIFY"],
    }[kind]
    with_op = new_key(admin, g1, key_ops=every, **extra)
    without = new_key(admin, g1, key_ops=[o for o in every if o != op], **extra)

    def req(k):
        if body is None:
            return a1.call("POST", path, {"kid": k["kid"]})
        return a1.call("POST", path, {"key": {"kid": k["kid"]}, **body})

    ok(req(with_op))
    err(req(without), "key_op_not_permitted")


def test_disabled_key_is_refused(world) -> None:
    admin, g1, _, a1, _ = world
    key = new_key(admin, g1)
    ok(admin.call("PATCH", f"/crypto/v1/keys/{key['kid']}", {"enabled": False}))
    err(a1.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}), "forbidden")
    ok(admin.call("PATCH", f"/crypto/v1/keys/{key['kid']}", {"enabled": True}))
    ok(a1.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **ENC}))


# -- keys: management ----------------------------------------------------------------------


def test_manage_own_keys_and_appmanageable_ones_only(daemon, world) -> None:
    admin, g1, _, a1, _ = world
    other = new_app(daemon, admin, [g1])
    mine = new_key(a1.conn, g1, key_ops=["ENCRYPT"])  # no APPMANAGEABLE, but a1 made it
    managed = new_key(admin, g1, key_ops=["ENCRYPT", "APPMANAGEABLE"])
    locked = new_key(admin, g1, key_ops=["ENCRYPT"])
    ok(a1.call("PATCH", f"/crypto/v1/keys/{mine['kid']}", {"description": "x"}))
    err(other.call("PATCH", f"/crypto/v1/keys/{mine['kid']}", {"description": "x"}), "forbidden")
    ok(other.call("PATCH", f"/crypto/v1/keys/{managed['kid']}", {"description": "y"}))
    err(a1.call("DELETE", f"/crypto/v1/keys/{locked['kid']}"), "forbidden")
    ok(admin.call("DELETE", f"/crypto/v1/keys/{locked['kid']}"), 204)
    ok(a1.call("DELETE", f"/crypto/v1/keys/{mine['kid']}"), 204)
    other.conn.close()


def test_key_ops_can_only_narrow(world) -> None:
    admin, g1, *_ = world
    key = new_key(admin, g1, key_ops=["ENCRYPT", "DECRYPT"])
    body = ok(admin.call("PATCH", f"/crypto/v1/keys/{key['kid']}", {"key_ops": ["ENCRYPT"]}))
    assert body["key_ops"] == ["ENCRYPT"]
    err(
        admin.call("PATCH", f"/crypto/v1/keys/{key['kid']}", {"key_ops": ["ENCRYPT", "DECRYPT"]}),
        "invalid_value",
    )


def test_group_with_keys_cannot_be_deleted(world) -> None:
    admin, *_ = world
    g = new_group(admin)
    key = new_key(admin, g)
    err(admin.call("DELETE", f"/sys/v1/groups/{g}"), "group_not_empty")
    ok(admin.call("DELETE", f"/crypto/v1/keys/{key['kid']}"), 204)
    ok(admin.call("DELETE", f"/sys/v1/groups/{g}"), 204)


def test_transient_keys_belong_to_their_connection(daemon, world) -> None:
    admin, g1, _, a1, _ = world
    tk = ok(a1.call("POST", "/crypto/v1/keys", {"obj_type": "AES", "transient": True}))
    assert tk["transient"] is True
    desc = {"transient_key": tk["transient_key"]}
    ok(a1.call("POST", "/crypto/v1/encrypt", {"key": desc, **ENC}))
    # Another connection of the same app cannot use it.
    same_app = Raw(daemon.socket)
    same_app.login(a1.api_key)
    err(same_app.call("POST", "/crypto/v1/encrypt", {"key": desc, **ENC}), "not_found")
    # It is not stored.
    assert tk["kid"] not in {k["kid"] for k in ok(same_app.call("GET", "/crypto/v1/keys"))}
    same_app.close()
