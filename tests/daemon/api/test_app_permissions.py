"""DSM's app permissions, enforced per group on top of key_ops, over the socket.

Every row of ``auth.PERMISSIONS`` is exercised twice with the same request: by
an app holding just what the path needs in the key's group (allowed, and the
result checked with ``cryptography`` where there is one), and by an app
holding every other permission there (refused: 403 ``app_permission_denied``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psec.tr31
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap
from strongroomd.api import ROUTES
from strongroomd.auth import APP_PERMISSIONS, IMPLIES, PERMISSIONS

from tests.conftest import Daemon, Raw, unique
from tests.daemon.api.helpers import err, new_group, ok

AES_OPS = [
    "ENCRYPT",
    "DECRYPT",
    "WRAPKEY",
    "UNWRAPKEY",
    "DERIVEKEY",
    "MACGENERATE",
    "MACVERIFY",
    "EXPORT",
    "APPMANAGEABLE",
]
EC_OPS = ["SIGN", "VERIFY", "AGREEKEY", "APPMANAGEABLE"]


@dataclass
class PermApp:
    id: str
    conn: Raw

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return self.conn.call(method, path, body)


def make_app(daemon: Daemon, admin: Raw, groups: dict[str, list[str]] | list[str]) -> PermApp:
    """An app with DSM's AppGroups (a map of permissions, or a list: all of them)."""
    body = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("app"), "add_groups": groups}))
    conn = Raw(daemon.socket)
    conn.login(body["credential"]["api_key"])
    return PermApp(body["app_id"], conn)


def without(perm: str) -> list[str]:
    """Every DSM permission except ``perm`` and those that imply it."""
    return [p for p in APP_PERMISSIONS if p != perm and perm not in IMPLIES.get(p, ())]


def denied(resp: dict[str, Any], perm: str) -> None:
    assert resp["status"] == 403, resp
    assert resp["body"]["error"] == "app_permission_denied", resp
    assert perm in resp["body"]["message"], resp


# -- the cases ------------------------------------------------------------------


@dataclass
class Ctx:
    admin: Raw
    group: str
    aes: dict[str, Any] = field(default_factory=dict)
    aes_value: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


def aes_key(admin: Raw, g: str, **fields: Any) -> tuple[dict[str, Any], bytes]:
    value = os.urandom(32)
    body = {"name": unique("k"), "obj_type": "AES", "value": value, "group_id": g}
    return ok(admin.call("PUT", "/crypto/v1/keys", {**body, "key_ops": AES_OPS, **fields})), value


def ec_key(admin: Raw, g: str) -> dict[str, Any]:
    body = {
        "name": unique("ec"),
        "obj_type": "EC",
        "elliptic_curve": "NistP256",
        "group_id": g,
        "key_ops": EC_OPS,
    }
    return ok(admin.call("POST", "/crypto/v1/keys", body))


def ec_public(key: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    pub = serialization.load_der_public_key(key["pub_key"])
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return pub


def setup_aes(c: Ctx) -> None:
    c.aes, c.aes_value = aes_key(c.admin, c.group)


def gcm_sealed(c: Ctx, plain: bytes) -> dict[str, Any]:
    iv = os.urandom(12)
    sealed = AESGCM(c.aes_value).encrypt(iv, plain, None)
    return {"cipher": sealed[:-16], "tag": sealed[-16:], "iv": iv, "mode": "GCM"}


def check_gcm(c: Ctx, out: dict[str, Any], plain: bytes) -> None:
    assert AESGCM(c.aes_value).decrypt(out["iv"], out["cipher"] + out["tag"], None) == plain


@dataclass
class Case:
    """One operation path, the permission it needs, and the request that tests it."""

    id: str
    route: str  # "METHOD /template", as in auth.PERMISSIONS
    perm: str  # the permission under test
    also: tuple[str, ...]  # what else the allowed (and the denied) app holds
    setup: Callable[[Ctx], None]
    run: Callable[[PermApp, Ctx], dict[str, Any]]
    check: Callable[[Ctx, Any], None] = lambda c, body: None
    allowed_status: tuple[int, ...] = (200, 204)


def _enc(app: PermApp, c: Ctx) -> dict[str, Any]:
    return app.call("POST", "/crypto/v1/encrypt", {"key": {"kid": c.aes["kid"]}, "plain": b"hi"})


def _setup_sealed(c: Ctx) -> None:
    setup_aes(c)
    c.extra["sealed"] = gcm_sealed(c, b"secret words")


def _setup_signed(c: Ctx) -> None:
    c.extra["ec"] = key = ec_key(c.admin, c.group)
    sig = ok(
        c.admin.call(
            "POST",
            "/crypto/v1/sign",
            {"key": {"kid": key["kid"]}, "hash_alg": "SHA256", "data": b"signed"},
        )
    )["signature"]
    c.extra["signature"] = sig


def _check_sig(c: Ctx, body: Any) -> None:
    ec_public(c.extra["ec"]).verify(body["signature"], b"signed", ec.ECDSA(hashes.SHA256()))


def _cmac(value: bytes, data: bytes) -> bytes:
    m = CMAC(algorithms.AES(value))
    m.update(data)
    return m.finalize()


def _setup_wrap(c: Ctx) -> None:
    setup_aes(c)
    c.extra["subject"], c.extra["subject_value"] = aes_key(c.admin, c.group)


def _wrap_body(c: Ctx) -> dict[str, Any]:
    return {"subject": {"kid": c.extra["subject"]["kid"]}, "alg": "AES", "mode": "KW"}


def _check_wrap(c: Ctx, body: Any) -> None:
    assert aes_key_unwrap(c.aes_value, body["wrapped_key"]) == c.extra["subject_value"]


def _setup_unwrap(c: Ctx) -> None:
    setup_aes(c)
    c.extra["inner"] = os.urandom(32)
    c.extra["wrapped"] = aes_key_wrap(c.aes_value, c.extra["inner"])


def _unwrap_body(c: Ctx) -> dict[str, Any]:
    return {
        "alg": "AES",
        "mode": "KW",
        "obj_type": "AES",
        "wrapped_key": c.extra["wrapped"],
        "name": unique("unw"),
        "group_id": c.group,
        "key_ops": ["ENCRYPT", "EXPORT"],
    }


def _check_unwrapped(c: Ctx, body: Any) -> None:
    got = ok(c.admin.call("GET", f"/crypto/v1/keys/{body['kid']}/export"))["value"]
    assert got == c.extra["inner"]


def _setup_agree(c: Ctx) -> None:
    c.extra["ec"] = ec_key(c.admin, c.group)
    c.extra["peer"] = peer = ec.generate_private_key(ec.SECP256R1())
    der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = {"name": unique("peer"), "obj_type": "EC", "value": der, "group_id": c.group}
    c.extra["peer_pub"] = ok(c.admin.call("PUT", "/crypto/v1/keys", body))


def _agree(app: PermApp, c: Ctx) -> dict[str, Any]:
    body = {
        "private_key": {"kid": c.extra["ec"]["kid"]},
        "public_key": {"kid": c.extra["peer_pub"]["kid"]},
        "mechanism": "diffie_hellman",
        "key_type": "SECRET",
        "key_size": 256,
        "key_ops": ["EXPORT"],
        "name": unique("shared"),
        "group_id": c.group,
    }
    return app.call("POST", "/crypto/v1/agree", body)


def _check_agree(c: Ctx, body: Any) -> None:
    got = ok(c.admin.call("GET", f"/crypto/v1/keys/{body['kid']}/export"))["value"]
    assert got == c.extra["peer"].exchange(ec.ECDH(), ec_public(c.extra["ec"]))


def _derive_body(c: Ctx, data: bytes) -> dict[str, Any]:
    return {
        "name": unique("d"),
        "key_type": "AES",
        "key_size": 256,
        "group_id": c.group,
        "key_ops": ["ENCRYPT", "EXPORT"],
        "mechanism": {"encrypt_data": {"alg": "AES", "mode": "ECB", "plain": data}},
    }


def _ecb(value: bytes, data: bytes) -> bytes:
    return Cipher(algorithms.AES(value), modes.ECB()).encryptor().update(data)


def _check_derived(c: Ctx, body: Any) -> None:
    got = ok(c.admin.call("GET", f"/crypto/v1/keys/{body['kid']}/export"))["value"]
    assert got == _ecb(c.aes_value, bytes(range(32)))


def _setup_revoked(c: Ctx) -> None:
    setup_aes(c)
    ok(c.admin.call("POST", f"/crypto/v1/keys/{c.aes['kid']}/revoke", {"code": "Unspecified"}))


def _setup_scheduled(c: Ctx) -> None:
    setup_aes(c)
    path = f"/crypto/v1/keys/{c.aes['kid']}/schedule_deletion"
    ok(c.admin.call("POST", path, {"pending_days": 3}))


def _setup_ec(c: Ctx) -> None:
    c.extra["ec"] = ec_key(c.admin, c.group)


NARROW_OPS = ["ENCRYPT", "DECRYPT", "APPMANAGEABLE"]


def _setup_narrow(c: Ctx) -> None:
    """A key without EXPORT: a rekey that adds it widens key_ops."""
    body = {"name": unique("k"), "obj_type": "AES", "group_id": c.group, "key_ops": NARROW_OPS}
    c.aes = ok(c.admin.call("POST", "/crypto/v1/keys", body))


def _kid(c: Ctx) -> str:
    return c.aes["kid"]


CASES = [
    # -- one key, every form ------------------------------------------------------
    Case(
        "encrypt",
        "POST /crypto/v1/encrypt",
        "ENCRYPT",
        (),
        setup_aes,
        _enc,
        lambda c, b: check_gcm(c, b, b"hi"),
    ),
    Case(
        "encrypt-per-key",
        "POST /crypto/v1/keys/{kid}/encrypt",
        "ENCRYPT",
        (),
        setup_aes,
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/encrypt", {"plain": b"hi"}),
        lambda c, b: check_gcm(c, b, b"hi"),
    ),
    Case(
        "encrypt-init",
        "POST /crypto/v1/encrypt/init",
        "ENCRYPT",
        (),
        setup_aes,
        lambda a, c: a.call("POST", "/crypto/v1/encrypt/init", {"key": {"kid": _kid(c)}}),
        lambda c, b: None,
    ),
    Case(
        "encrypt-init-per-key",
        "POST /crypto/v1/keys/{kid}/encrypt/init",
        "ENCRYPT",
        (),
        setup_aes,
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/encrypt/init", {}),
    ),
    Case(
        "decrypt",
        "POST /crypto/v1/decrypt",
        "DECRYPT",
        (),
        _setup_sealed,
        lambda a, c: a.call(
            "POST", "/crypto/v1/decrypt", {"key": {"kid": _kid(c)}, **c.extra["sealed"]}
        ),
        lambda c, b: _eq(b["plain"], b"secret words"),
    ),
    Case(
        "decrypt-per-key",
        "POST /crypto/v1/keys/{kid}/decrypt",
        "DECRYPT",
        (),
        _setup_sealed,
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/decrypt", c.extra["sealed"]),
        lambda c, b: _eq(b["plain"], b"secret words"),
    ),
    Case(
        "decrypt-init",
        "POST /crypto/v1/decrypt/init",
        "DECRYPT",
        (),
        _setup_sealed,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/decrypt/init",
            {"key": {"kid": _kid(c)}, "mode": "GCM", "iv": c.extra["sealed"]["iv"]},
        ),
    ),
    Case(
        "decrypt-init-per-key",
        "POST /crypto/v1/keys/{kid}/decrypt/init",
        "DECRYPT",
        (),
        _setup_sealed,
        lambda a, c: a.call(
            "POST",
            f"/crypto/v1/keys/{_kid(c)}/decrypt/init",
            {"mode": "GCM", "iv": c.extra["sealed"]["iv"]},
        ),
    ),
    Case(
        "sign",
        "POST /crypto/v1/sign",
        "SIGN",
        (),
        _setup_ec,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/sign",
            {"key": {"kid": c.extra["ec"]["kid"]}, "hash_alg": "SHA256", "data": b"signed"},
        ),
        _check_sig,
    ),
    Case(
        "sign-per-key",
        "POST /crypto/v1/keys/{kid}/sign",
        "SIGN",
        (),
        _setup_ec,
        lambda a, c: a.call(
            "POST",
            f"/crypto/v1/keys/{c.extra['ec']['kid']}/sign",
            {"hash_alg": "SHA256", "data": b"signed"},
        ),
        _check_sig,
    ),
    Case(
        "verify",
        "POST /crypto/v1/verify",
        "VERIFY",
        (),
        _setup_signed,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/verify",
            {
                "key": {"kid": c.extra["ec"]["kid"]},
                "hash_alg": "SHA256",
                "data": b"signed",
                "signature": c.extra["signature"],
            },
        ),
        lambda c, b: _eq(b["result"], True),
    ),
    Case(
        "verify-per-key",
        "POST /crypto/v1/keys/{kid}/verify",
        "VERIFY",
        (),
        _setup_signed,
        lambda a, c: a.call(
            "POST",
            f"/crypto/v1/keys/{c.extra['ec']['kid']}/verify",
            {"hash_alg": "SHA256", "data": b"signed", "signature": c.extra["signature"]},
        ),
        lambda c, b: _eq(b["result"], True),
    ),
    Case(
        "mac",
        "POST /crypto/v1/mac",
        "MACGENERATE",
        (),
        setup_aes,
        lambda a, c: a.call(
            "POST", "/crypto/v1/mac", {"key": {"kid": _kid(c)}, "alg": "CMAC", "data": b"m"}
        ),
        lambda c, b: _eq(b["digest"], _cmac(c.aes_value, b"m")),
    ),
    Case(
        "mac-per-key",
        "POST /crypto/v1/keys/{kid}/mac",
        "MACGENERATE",
        (),
        setup_aes,
        lambda a, c: a.call(
            "POST", f"/crypto/v1/keys/{_kid(c)}/mac", {"alg": "CMAC", "data": b"m"}
        ),
        lambda c, b: _eq(b["mac"], _cmac(c.aes_value, b"m")),
    ),
    Case(
        "macverify",
        "POST /crypto/v1/macverify",
        "MACVERIFY",
        (),
        setup_aes,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/macverify",
            {
                "key": {"kid": _kid(c)},
                "alg": "CMAC",
                "data": b"m",
                "mac": _cmac(c.aes_value, b"m"),
            },
        ),
        lambda c, b: _eq(b["result"], True),
    ),
    Case(
        "macverify-per-key",
        "POST /crypto/v1/keys/{kid}/macverify",
        "MACVERIFY",
        (),
        setup_aes,
        lambda a, c: a.call(
            "POST",
            f"/crypto/v1/keys/{_kid(c)}/macverify",
            {"alg": "CMAC", "data": b"m", "mac": _cmac(c.aes_value, b"m")},
        ),
        lambda c, b: _eq(b["result"], True),
    ),
    # -- two keys, or a key made --------------------------------------------------
    Case(
        "wrapkey-wrapping-key",
        "POST /crypto/v1/wrapkey",
        "WRAPKEY",
        ("EXPORT",),
        _setup_wrap,
        lambda a, c: a.call(
            "POST", "/crypto/v1/wrapkey", {"key": {"kid": _kid(c)}, **_wrap_body(c)}
        ),
        _check_wrap,
    ),
    Case(
        "wrapkey-subject",
        "POST /crypto/v1/wrapkey",
        "EXPORT",
        ("WRAPKEY",),
        _setup_wrap,
        lambda a, c: a.call(
            "POST", "/crypto/v1/wrapkey", {"key": {"kid": _kid(c)}, **_wrap_body(c)}
        ),
        _check_wrap,
    ),
    Case(
        "wrapkey-per-key",
        "POST /crypto/v1/keys/{kid}/wrapkey",
        "WRAPKEY",
        ("EXPORT",),
        _setup_wrap,
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/wrapkey", _wrap_body(c)),
        _check_wrap,
    ),
    Case(
        "unwrapkey",
        "POST /crypto/v1/unwrapkey",
        "UNWRAPKEY",
        ("CREATE_SOBJECTS",),
        _setup_unwrap,
        lambda a, c: a.call(
            "POST", "/crypto/v1/unwrapkey", {"key": {"kid": _kid(c)}, **_unwrap_body(c)}
        ),
        _check_unwrapped,
    ),
    Case(
        "unwrapkey-needs-create",
        "POST /crypto/v1/unwrapkey",
        "CREATE_SOBJECTS",
        ("UNWRAPKEY",),
        _setup_unwrap,
        lambda a, c: a.call(
            "POST", "/crypto/v1/unwrapkey", {"key": {"kid": _kid(c)}, **_unwrap_body(c)}
        ),
        _check_unwrapped,
    ),
    Case(
        "unwrapkey-per-key",
        "POST /crypto/v1/keys/{kid}/unwrapkey",
        "UNWRAPKEY",
        ("CREATE_SOBJECTS",),
        _setup_unwrap,
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/unwrapkey", _unwrap_body(c)),
        _check_unwrapped,
    ),
    Case(
        "agree",
        "POST /crypto/v1/agree",
        "AGREEKEY",
        ("CREATE_SOBJECTS",),
        _setup_agree,
        _agree,
        _check_agree,
    ),
    Case(
        "agree-needs-create",
        "POST /crypto/v1/agree",
        "CREATE_SOBJECTS",
        ("AGREEKEY",),
        _setup_agree,
        _agree,
        _check_agree,
    ),
    Case(
        "derive",
        "POST /crypto/v1/derive",
        "DERIVEKEY",
        ("CREATE_SOBJECTS",),
        setup_aes,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/derive",
            {"key": {"kid": _kid(c)}, **_derive_body(c, bytes(range(32)))},
        ),
        _check_derived,
    ),
    Case(
        "derive-per-key",
        "POST /crypto/v1/keys/{kid}/derive",
        "DERIVEKEY",
        ("CREATE_SOBJECTS",),
        setup_aes,
        lambda a, c: a.call(
            "POST", f"/crypto/v1/keys/{_kid(c)}/derive", _derive_body(c, bytes(range(32)))
        ),
        _check_derived,
    ),
    Case(
        "derive-needs-create",
        "POST /crypto/v1/derive",
        "CREATE_SOBJECTS",
        ("DERIVEKEY",),
        setup_aes,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/derive",
            {"key": {"kid": _kid(c)}, **_derive_body(c, bytes(range(32)))},
        ),
        _check_derived,
    ),
    # -- a key's value ------------------------------------------------------------
    Case(
        "export",
        "POST /crypto/v1/keys/export",
        "EXPORT",
        (),
        setup_aes,
        lambda a, c: a.call("POST", "/crypto/v1/keys/export", {"kid": _kid(c)}),
        lambda c, b: _eq(b["value"], c.aes_value),
    ),
    Case(
        "export-get",
        "GET /crypto/v1/keys/{kid}/export",
        "EXPORT",
        (),
        setup_aes,
        lambda a, c: a.call("GET", f"/crypto/v1/keys/{_kid(c)}/export"),
        lambda c, b: _eq(b["value"], c.aes_value),
    ),
    Case(
        "key-digest",
        "POST /crypto/v1/keys/digest",
        "CALCULATE_DIGEST",
        (),
        setup_aes,
        lambda a, c: a.call(
            "POST", "/crypto/v1/keys/digest", {"key": {"kid": _kid(c)}, "alg": "SHA256"}
        ),
        lambda c, b: _eq(b["digest"], hashlib.sha256(c.aes_value).digest()),
    ),
    Case(
        "kcv",
        "POST /crypto/v1/keys/kcv",
        "CALCULATE_DIGEST",
        (),
        setup_aes,
        lambda a, c: a.call("POST", "/crypto/v1/keys/kcv", {"kid": _kid(c)}),
        lambda c, b: _eq(b["kcv"], _ecb(c.aes_value, bytes(16))[:3].hex().upper()),
    ),
    # -- management ---------------------------------------------------------------
    Case(
        "create",
        "POST /crypto/v1/keys",
        "CREATE_SOBJECTS",
        (),
        lambda c: None,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("new"), "obj_type": "AES", "group_id": c.group},
        ),
    ),
    Case(
        "import",
        "PUT /crypto/v1/keys",
        "CREATE_SOBJECTS",
        (),
        lambda c: c.extra.update(value=os.urandom(16)),
        lambda a, c: a.call(
            "PUT",
            "/crypto/v1/keys",
            {
                "name": unique("imp"),
                "obj_type": "AES",
                "value": c.extra["value"],
                "group_id": c.group,
                "key_ops": ["ENCRYPT", "EXPORT"],
            },
        ),
        lambda c, b: _eq(
            ok(c.admin.call("GET", f"/crypto/v1/keys/{b['kid']}/export"))["value"],
            c.extra["value"],
        ),
    ),
    Case(
        "rekey",
        "POST /crypto/v1/keys/rekey",
        "ROTATE_SOBJECTS",
        (),
        setup_aes,
        lambda a, c: a.call("POST", "/crypto/v1/keys/rekey", {"name": c.aes["name"]}),
        lambda c, b: _eq(b["name"], c.aes["name"]),
    ),
    Case(
        "rekey-widening-key_ops",
        "POST /crypto/v1/keys/rekey",
        "UPDATE_KEY_OPS",
        ("ROTATE_SOBJECTS",),
        _setup_narrow,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/keys/rekey",
            {"name": c.aes["name"], "key_ops": [*NARROW_OPS, "EXPORT"]},
        ),
        lambda c, b: _eq(sorted(b["key_ops"]), sorted([*NARROW_OPS, "EXPORT"])),
    ),
    Case(
        "update",
        "PATCH /crypto/v1/keys/{kid}",
        "MANAGE",
        (),
        setup_aes,
        lambda a, c: a.call("PATCH", f"/crypto/v1/keys/{_kid(c)}", {"description": "changed"}),
        lambda c, b: _eq(b["description"], "changed"),
    ),
    Case(
        "activate",
        "POST /crypto/v1/keys/{kid}/activate",
        "ACTIVATE_SOBJECTS",
        (),
        lambda c: _setup_preactive(c),  # defined below the table
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/activate", {}),
        lambda c, b: _eq(b["state"], "Active"),
    ),
    Case(
        "revoke",
        "POST /crypto/v1/keys/{kid}/revoke",
        "REVOKE_SOBJECTS",
        (),
        setup_aes,
        lambda a, c: a.call(
            "POST", f"/crypto/v1/keys/{_kid(c)}/revoke", {"code": "CessationOfOperation"}
        ),
        lambda c, b: _eq(b["state"], "Deactivated"),
    ),
    Case(
        "schedule-deletion",
        "POST /crypto/v1/keys/{kid}/schedule_deletion",
        "DELETE_SOBJECTS",
        (),
        setup_aes,
        lambda a, c: a.call(
            "POST", f"/crypto/v1/keys/{_kid(c)}/schedule_deletion", {"pending_days": 2}
        ),
        lambda c, b: _eq(bool(b.get("deletion_date")), True),
    ),
    Case(
        "cancel-deletion",
        "POST /crypto/v1/keys/{kid}/cancel_deletion",
        "DELETE_SOBJECTS",
        (),
        _setup_scheduled,
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/cancel_deletion", {}),
        lambda c, b: _eq(b.get("deletion_date"), None),
    ),
    Case(
        "delete",
        "DELETE /crypto/v1/keys/{kid}",
        "DELETE_SOBJECTS",
        (),
        setup_aes,
        lambda a, c: a.call("DELETE", f"/crypto/v1/keys/{_kid(c)}"),
        lambda c, b: err(c.admin.call("GET", f"/crypto/v1/keys/{_kid(c)}"), "not_found"),
    ),
    Case(
        "destroy",
        "POST /crypto/v1/keys/{kid}/destroy",
        "DESTROY_SOBJECTS",
        (),
        _setup_revoked,
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/destroy", {}),
        lambda c, b: _eq(b["state"], "Destroyed"),
    ),
    Case(
        "delete-key-material",
        "POST /crypto/v1/keys/{kid}/delete_key_material",
        "DELETE_KEY_MATERIAL",
        (),
        _setup_revoked,
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/delete_key_material", {}),
        lambda c, b: _eq(b["state"], "Destroyed"),
    ),
    Case(
        "delete-private",
        "DELETE /crypto/v1/keys/{kid}/private",
        "DELETE_KEY_MATERIAL",
        (),
        _setup_ec,
        lambda a, c: a.call("DELETE", f"/crypto/v1/keys/{c.extra['ec']['kid']}/private"),
        lambda c, b: _eq(b.get("public_only"), True),
    ),
]


CASES += [
    # DSM's revert and restore: past the permission check Strongroom answers 409
    # (it keeps no key history and has no externally backed keys).
    Case(
        "revert",
        "PUT /crypto/v1/keys/{kid}/revert",
        "REVERT_SOBJECTS",
        (),
        setup_aes,
        lambda a, c: a.call("PUT", f"/crypto/v1/keys/{_kid(c)}/revert", {"ids": ["1"]}),
        allowed_status=(409,),
    ),
    Case(
        "restore",
        "POST /crypto/v1/keys/{kid}/restore",
        "RESTORE_EXTERNAL_SOBJECTS",
        (),
        setup_aes,
        lambda a, c: a.call("POST", f"/crypto/v1/keys/{_kid(c)}/restore", {}),
        allowed_status=(409,),
    ),
]


# -- TR-31 key blocks and BIP32 keys (the paths the Lua API's Tr31Envelope and
# BIP32 keys use; apps may call them too) --------------------------------------

TR31_HEADER = {
    "version": "D",
    "key_usage": "D0",
    "algorithm": "A",
    "mode_of_use": "B",
    "key_version_number": "00",
    "exportability": "E",
    "key_context": "1",
}
# BIP32 test vector 1: m/0H and its weak child m/0H/1.
XPRV_0H = (
    "xprv9uHRZZhk6KAJC1avXpDAp4MDc3sQKNxDiPvvkX8Br5ngLNv1TxvUxt4cV1rGL5hj6KCesnDYUhd7oWgT11eZG7"
    "XnxHrnYeSvkzY7d2bhkJ7"
)
XPRV_0H_1 = (
    "xprv9wTYmMFdV23N2TdNG573QoEsfRrWKQgWeibmLntzniatZvR9BmLnvSxqu53Kw1UmYPxLgboyZQaXwTCg8MSY3H"
    "2EU4pWcQDnRnrVA1xe8fs"
)


def _setup_tr31_open(c: Ctx) -> None:
    setup_aes(c)
    c.extra["inner"] = os.urandom(16)
    header = psec.tr31.Header("D", "D0", "A", "B", "00", "E")
    c.extra["block"] = psec.tr31.wrap(c.aes_value, header, c.extra["inner"])


def _setup_bip32(c: Ctx) -> None:
    body = {
        "name": unique("bip"),
        "value": XPRV_0H,
        "group_id": c.group,
        "key_ops": ["SIGN", "VERIFY", "EXPORT", "APPMANAGEABLE"],
    }
    c.extra["bip"] = ok(c.admin.call("POST", "/crypto/v1/keys/bip32/import", body))


def _xprv_of(c: Ctx, kid: str) -> bytes:
    return ok(c.admin.call("POST", "/crypto/v1/keys/bip32/export", {"key": {"kid": kid}}))["value"]


CASES += [
    Case(
        "tr31-seal",
        "POST /crypto/v1/keys/tr31/seal",
        "EXPORT",
        (),
        _setup_wrap,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/keys/tr31/seal",
            {
                "key": {"kid": _kid(c)},
                "subject": {"kid": c.extra["subject"]["kid"]},
                "header": TR31_HEADER,
            },
        ),
        lambda c, b: _eq(
            psec.tr31.unwrap(c.aes_value, b["key_block"])[1], c.extra["subject_value"]
        ),
    ),
    Case(
        "tr31-open",
        "POST /crypto/v1/keys/tr31/open",
        "UNWRAPKEY",
        (),
        _setup_tr31_open,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/keys/tr31/open",
            {"key": {"kid": _kid(c)}, "key_block": c.extra["block"]},
        ),
        lambda c, b: _eq(b["key"], c.extra["inner"]),
    ),
    Case(
        "bip32-import",
        "POST /crypto/v1/keys/bip32/import",
        "CREATE_SOBJECTS",
        (),
        lambda c: None,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/keys/bip32/import",
            {"name": unique("bip"), "value": XPRV_0H, "group_id": c.group},
        ),
        lambda c, b: _eq(b["group_id"], c.group),
    ),
    Case(
        "bip32-export",
        "POST /crypto/v1/keys/bip32/export",
        "EXPORT",
        (),
        _setup_bip32,
        lambda a, c: a.call(
            "POST", "/crypto/v1/keys/bip32/export", {"key": {"kid": c.extra["bip"]["kid"]}}
        ),
        lambda c, b: _eq(b["value"], XPRV_0H.encode()),
    ),
    Case(
        "transform",
        "POST /crypto/v1/keys/transform",
        "TRANSFORM",
        ("CREATE_SOBJECTS",),
        _setup_bip32,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/keys/transform",
            {
                "key": {"kid": c.extra["bip"]["kid"]},
                "mechanism": {"bip32_weak_child": {"index": 1}},
                "name": unique("child"),
                "group_id": c.group,
                "key_ops": ["SIGN", "EXPORT"],
            },
        ),
        lambda c, b: _eq(_xprv_of(c, b["kid"]), XPRV_0H_1.encode()),
    ),
    Case(
        "transform-needs-create",
        "POST /crypto/v1/keys/transform",
        "CREATE_SOBJECTS",
        ("TRANSFORM",),
        _setup_bip32,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/keys/transform",
            {
                "key": {"kid": c.extra["bip"]["kid"]},
                "mechanism": {"bip32_weak_child": {"index": 1}},
                "name": unique("child"),
                "group_id": c.group,
                "key_ops": ["SIGN", "EXPORT"],
            },
        ),
        lambda c, b: _eq(_xprv_of(c, b["kid"]), XPRV_0H_1.encode()),
    ),
    Case(
        "derive-bip32",
        "POST /crypto/v1/derive",
        "DERIVEKEY",
        ("CREATE_SOBJECTS",),
        _setup_bip32,
        lambda a, c: a.call(
            "POST",
            "/crypto/v1/derive",
            {
                "key": {"kid": c.extra["bip"]["kid"]},
                "key_type": "BIP32",
                "mechanism": {"bip32_weak_child": {"index": 1}},
                "name": unique("child"),
                "group_id": c.group,
                "key_ops": ["SIGN", "EXPORT"],
            },
        ),
        lambda c, b: _eq(_xprv_of(c, b["kid"]), XPRV_0H_1.encode()),
    ),
]


def _setup_preactive(c: Ctx) -> None:
    c.aes, c.aes_value = aes_key(c.admin, c.group, activation_date="20991231T000000Z")
    assert c.aes["state"] == "PreActive", c.aes


def _eq(got: Any, want: Any) -> None:
    assert got == want, (got, want)


@pytest.fixture(scope="module")
def admin(daemon: Daemon) -> Iterator[Raw]:
    r = Raw(daemon.socket)
    r.login(daemon.admin_key)
    yield r
    r.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_permission_allowed_and_denied(daemon: Daemon, admin: Raw, case: Case) -> None:
    assert case.perm in PERMISSIONS[case.route].values(), "the case tests the table's row"
    g = new_group(admin)
    allowed = make_app(daemon, admin, {g: [case.perm, *case.also]})
    refused = make_app(daemon, admin, {g: without(case.perm)})
    try:
        c = Ctx(admin, g)
        case.setup(c)
        denied(case.run(refused, c), case.perm)
        c = Ctx(admin, g)
        case.setup(c)
        resp = case.run(allowed, c)
        assert resp["status"] in case.allowed_status, resp
        case.check(c, resp["body"])
    finally:
        allowed.conn.close()
        refused.conn.close()


def test_every_path_with_a_key_check_is_in_the_table_and_tested() -> None:
    """A /crypto/v1 route that checks a key for an app must have a row; every row
    has a case above (streaming update/final and batch items have their own tests)."""
    no_key_check = {
        "GET /crypto/v1/keys",
        "GET /crypto/v1/keys/{kid}",
        "POST /crypto/v1/keys/info",
        "POST /crypto/v1/keys/kcv/verify",  # a value given in the request, no key of ours
        "POST /crypto/v1/digest",  # hashes data, no key
    }
    routes = {f"{r.method} {r.path}" for r in ROUTES if r.path.startswith("/crypto/v1/")}
    assert routes - no_key_check <= set(PERMISSIONS), routes - no_key_check - set(PERMISSIONS)
    tested = {c.route for c in CASES}
    own_tests = {r for r in PERMISSIONS if "/batch/" in r or r.endswith(("/update", "/final"))}
    own_tests |= {
        "POST /crypto/v1/keys/persist",  # test_persist_needs_create below
    }
    assert set(PERMISSIONS) - tested - own_tests == set()
    for need in PERMISSIONS.values():
        assert set(need.values()) <= set(APP_PERMISSIONS)


def test_batch_items_answer_each_for_its_own_group(daemon: Daemon, admin: Raw) -> None:
    """One item's missing permission fails that item only, with DSM's item shape."""
    g1, g2 = new_group(admin), new_group(admin)
    (k1, v1), (k2, _v2) = aes_key(admin, g1), aes_key(admin, g2)
    app = make_app(daemon, admin, {g1: ["ENCRYPT"], g2: ["DECRYPT"]})
    try:
        items = [
            {"kid": k1["kid"], "request": {"plain": b"one"}},
            {"kid": k2["kid"], "request": {"plain": b"two"}},
            {"kid": k1["kid"], "request": {"plain": b"three"}},
        ]
        out = ok(app.call("POST", "/crypto/v1/keys/batch/encrypt", items))
        assert [o["status"] for o in out] == [200, 403, 200]
        assert out[1]["code"] == "app_permission_denied" and "ENCRYPT" in out[1]["error"]
        for o, plain in ((out[0], b"one"), (out[2], b"three")):
            b = o["body"]
            assert AESGCM(v1).decrypt(b["iv"], b["cipher"] + b["tag"], None) == plain
        sealed = [
            {"kid": k1["kid"], "request": {k: out[0]["body"][k] for k in ("cipher", "iv", "tag")}}
        ]
        back = ok(app.call("POST", "/crypto/v1/keys/batch/decrypt", sealed))
        assert back[0]["status"] == 403 and back[0]["code"] == "app_permission_denied"
        # sign/mac batches go through the same check
        macs = [{"kid": k1["kid"], "request": {"alg": "CMAC", "data": b"x"}}]
        assert ok(app.call("POST", "/crypto/v1/keys/batch/mac", macs))[0]["status"] == 403
    finally:
        app.conn.close()


def test_a_stream_is_checked_at_every_step(daemon: Daemon, admin: Raw) -> None:
    """Taking ENCRYPT away mid-stream stops the next update; giving it back lets a
    new stream run to a tag that cryptography accepts."""
    g = new_group(admin)
    key, value = aes_key(admin, g)
    app = make_app(daemon, admin, {g: ["ENCRYPT"]})
    try:
        start = ok(app.call("POST", "/crypto/v1/encrypt/init", {"key": {"kid": key["kid"]}}))
        ok(admin.call("PATCH", f"/sys/v1/apps/{app.id}", {"mod_groups": {g: ["DECRYPT"]}}))
        body = {"state": start["state"], "plain": b"abc"}
        denied(app.call("POST", "/crypto/v1/encrypt/update", body), "ENCRYPT")
        ok(admin.call("PATCH", f"/sys/v1/apps/{app.id}", {"mod_groups": {g: ["ENCRYPT"]}}))
        start = ok(app.call("POST", f"/crypto/v1/keys/{key['kid']}/encrypt/init", {}))
        mid = ok(app.call("POST", "/crypto/v1/encrypt/update", {**body, "state": start["state"]}))
        ok(admin.call("PATCH", f"/sys/v1/apps/{app.id}", {"mod_groups": {g: []}}))
        denied(app.call("POST", "/crypto/v1/encrypt/final", {"state": mid["state"]}), "ENCRYPT")
        ok(admin.call("PATCH", f"/sys/v1/apps/{app.id}", {"mod_groups": {g: ["ENCRYPT"]}}))
        start = ok(app.call("POST", "/crypto/v1/encrypt/init", {"key": {"kid": key["kid"]}}))
        mid = ok(app.call("POST", "/crypto/v1/encrypt/update", {**body, "state": start["state"]}))
        fin = ok(app.call("POST", "/crypto/v1/encrypt/final", {"state": mid["state"]}))
        sealed = mid["cipher"] + fin.get("cipher", b"") + fin["tag"]
        assert AESGCM(value).decrypt(start["iv"], sealed, None) == b"abc"
    finally:
        app.conn.close()


def test_persist_needs_create(daemon: Daemon, admin: Raw) -> None:
    g = new_group(admin)
    app = make_app(daemon, admin, {g: ["CREATE_SOBJECTS", "EXPORT"]})
    try:
        t = ok(
            app.call(
                "POST",
                "/crypto/v1/keys",
                {"name": unique("t"), "obj_type": "AES", "transient": True, "key_ops": ["EXPORT"]},
            )
        )
        kept = ok(app.call("POST", "/crypto/v1/keys/persist", {"key": {"transient_key": t["kid"]}}))
        assert kept["group_id"] == g
        # Persisting needs CREATE_SOBJECTS when the copy is made, not only for the
        # transient key: taken away in between, the persist is refused.
        t = ok(
            app.call(
                "POST",
                "/crypto/v1/keys",
                {"name": unique("t"), "obj_type": "AES", "transient": True, "key_ops": ["EXPORT"]},
            )
        )
        ok(admin.call("PATCH", f"/sys/v1/apps/{app.id}", {"mod_groups": {g: ["EXPORT"]}}))
        resp = app.call("POST", "/crypto/v1/keys/persist", {"key": {"transient_key": t["kid"]}})
        denied(resp, "CREATE_SOBJECTS")
    finally:
        app.conn.close()


def test_permissions_are_per_group_and_on_top_of_key_ops(daemon: Daemon, admin: Raw) -> None:
    """ENCRYPT in G1 does not give ENCRYPT in G2; DECRYPT in the app's group does
    not let it decrypt with a key whose key_ops lack DECRYPT."""
    g1, g2 = new_group(admin), new_group(admin)
    (k1, v1), (k2, _) = aes_key(admin, g1), aes_key(admin, g2)
    (k3, _) = aes_key(admin, g1, key_ops=["ENCRYPT"])
    app = make_app(daemon, admin, {g1: ["ENCRYPT", "DECRYPT"], g2: ["DECRYPT"]})
    try:
        out = ok(app.call("POST", "/crypto/v1/encrypt", {"key": {"kid": k1["kid"]}, "plain": b"a"}))
        assert AESGCM(v1).decrypt(out["iv"], out["cipher"] + out["tag"], None) == b"a"
        denied(
            app.call("POST", "/crypto/v1/encrypt", {"key": {"kid": k2["kid"]}, "plain": b"a"}),
            "ENCRYPT",
        )
        sealed = {k: out[k] for k in ("cipher", "iv", "tag")}
        err(
            app.call("POST", f"/crypto/v1/keys/{k3['kid']}/decrypt", {**sealed, "mode": "GCM"}),
            "key_op_not_permitted",
        )
    finally:
        app.conn.close()


def test_manage_grants_the_finer_management_permissions(daemon: Daemon, admin: Raw) -> None:
    """DSM's MANAGE covers create, rotate, revoke, destroy; it does not give crypto use."""
    g = new_group(admin)
    app = make_app(daemon, admin, {g: ["MANAGE"]})
    try:
        name = unique("m")
        key = ok(app.call("POST", "/crypto/v1/keys", {"name": name, "obj_type": "AES"}))
        assert key["group_id"] == g
        new = ok(app.call("POST", "/crypto/v1/keys/rekey", {"name": name}))
        ok(app.call("POST", f"/crypto/v1/keys/{new['kid']}/revoke", {"code": "Unspecified"}))
        assert ok(app.call("POST", f"/crypto/v1/keys/{new['kid']}/destroy", {}))["state"] == (
            "Destroyed"
        )
        denied(
            app.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, "plain": b"x"}),
            "ENCRYPT",
        )
    finally:
        app.conn.close()


def test_an_app_without_permissions_still_sees_its_groups_keys(daemon: Daemon, admin: Raw) -> None:
    """Membership alone shows keys (as DSM); it lets the app do nothing with them."""
    g = new_group(admin)
    key, _ = aes_key(admin, g)
    app = make_app(daemon, admin, {g: []})
    try:
        assert key["kid"] in {k["kid"] for k in ok(app.call("GET", "/crypto/v1/keys"))}
        assert ok(app.call("GET", f"/crypto/v1/keys/{key['kid']}"))["kid"] == key["kid"]
        denied(app.call("GET", f"/crypto/v1/keys/{key['kid']}/export"), "EXPORT")
        denied(app.call("POST", "/crypto/v1/keys", {"name": unique(), "obj_type": "AES"}), "CREATE")
    finally:
        app.conn.close()
