"""POST /crypto/v1/derive and /crypto/v1/keys/{kid}/derive (DSM's DeriveKeyRequest).

Every derived value is checked with ``cryptography``: the base key is made
with EXPORT so its value is known, and the derived key (made with EXPORT too,
or used to encrypt when it is not exportable) is compared with AES/3DES of the
data under that value, or with cryptography's HKDF.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.conftest import unique
from tests.daemon.api.dsm.conftest import Dual, blob, connect
from tests.daemon.api.helpers import err, ok


def _group(c: Dual) -> str:
    return ok(c.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]


def _base(c: Dual, g: str, obj_type: str = "AES", ops: list[str] | None = None, **kw) -> tuple:
    body = {
        "name": unique("base"),
        "obj_type": obj_type,
        "group_id": g,
        "key_ops": ops or ["ENCRYPT", "DECRYPT", "DERIVEKEY", "EXPORT"],
        **kw,
    }
    key = ok(c.call("POST", "/crypto/v1/keys", body))
    value = b""
    if "EXPORT" in key["key_ops"]:
        value = blob(ok(c.call("GET", f"/crypto/v1/keys/{key['kid']}/export"))["value"])
    return key["kid"], value


def _export(c: Dual, kid: str) -> bytes:
    return blob(ok(c.call("GET", f"/crypto/v1/keys/{kid}/export"))["value"])


def _ecb(value: bytes, data: bytes) -> bytes:
    e = Cipher(algorithms.AES(value), modes.ECB()).encryptor()
    return e.update(data) + e.finalize()


def test_aes_ecb_encrypt_data_in_the_token(admin: Dual) -> None:
    g = _group(admin)
    kid, value = _base(admin, g)
    data = os.urandom(32)
    new = ok(
        admin.call(
            "POST",
            "/crypto/v1/derive",
            {
                "key": {"kid": kid},
                "name": unique("d"),
                "key_type": "AES",
                "key_size": 256,
                "group_id": g,
                "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"],
                "mechanism": {"encrypt_data": {"alg": "AES", "mode": "ECB", "plain": data}},
            },
        )
    )
    assert new["obj_type"] == "AES" and new["key_size"] == 256 and new["group_id"] == g
    assert new["kid"] != kid and new["key_ops"] == ["ENCRYPT", "DECRYPT", "EXPORT"]
    assert _export(admin, new["kid"]) == _ecb(value, data)


def test_aes_cbc_per_key_path_and_an_unexportable_result(admin: Dual) -> None:
    """The derived key never leaves the token: checked by what it encrypts."""
    g = _group(admin)
    kid, value = _base(admin, g)
    data, iv = os.urandom(32), os.urandom(16)
    new = ok(
        admin.call(
            "POST",
            f"/crypto/v1/keys/{kid}/derive",
            {
                "name": unique("d"),
                "key_type": "AES",
                "key_size": 128,
                "group_id": g,
                "mechanism": {"encrypt_data": {"mode": "CBC", "plain": data, "iv": iv}},
            },
        )
    )
    assert "EXPORT" not in new["key_ops"] and new["key_size"] == 128
    err(admin.call("GET", f"/crypto/v1/keys/{new['kid']}/export"), "key_op_not_permitted")
    e = Cipher(algorithms.AES(value), modes.CBC(iv)).encryptor()
    want = (e.update(data) + e.finalize())[:16]
    out = ok(admin.call("POST", f"/crypto/v1/keys/{new['kid']}/encrypt", {"plain": b"hello"}))
    assert AESGCM(want).decrypt(blob(out["iv"]), blob(out["cipher"]) + blob(out["tag"]), None) == (
        b"hello"
    )


def test_des3_base_and_target(admin: Dual) -> None:
    g = _group(admin)
    kid, value = _base(admin, g, "DES3")
    data = os.urandom(24)
    new = ok(
        admin.call(
            "POST",
            "/crypto/v1/derive",
            {
                "key": {"kid": kid},
                "name": unique("d"),
                "key_type": "DES3",
                "group_id": g,
                "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"],
                "mechanism": {"encrypt_data": {"alg": "DES3", "mode": "ECB", "plain": data}},
            },
        )
    )
    e = Cipher(TripleDES(value), modes.ECB()).encryptor()
    want = e.update(data) + e.finalize()
    got = _export(admin, new["kid"])
    # DES keys carry parity in each byte's low bit; the token sets it.
    assert bytes(b & 0xFE for b in got) == bytes(b & 0xFE for b in want)
    assert all(bin(b).count("1") % 2 == 1 for b in got)


def test_hkdf_needs_export_and_matches_cryptography(admin: Dual) -> None:
    g = _group(admin)
    kid, value = _base(admin, g, "SECRET", ["DERIVEKEY", "EXPORT"], key_size=256)
    salt, info = os.urandom(16), b"context"
    new = ok(
        admin.call(
            "POST",
            "/crypto/v1/derive",
            {
                "key": {"kid": kid},
                "name": unique("d"),
                "key_type": "HMAC",
                "key_size": 384,
                "group_id": g,
                "key_ops": ["MACGENERATE", "EXPORT"],
                "mechanism": {"hkdf": {"hash_alg": "SHA256", "salt": salt, "info": info}},
            },
        )
    )
    want = HKDF(hashes.SHA256(), 48, salt, info).derive(value)
    assert _export(admin, new["kid"]) == want
    # Without EXPORT on the base key, HKDF (done outside the token) is refused.
    sealed, _ = _base(admin, g, "SECRET", ["DERIVEKEY"], key_size=256)
    err(
        admin.call(
            "POST",
            f"/crypto/v1/keys/{sealed}/derive",
            {"key_type": "AES", "mechanism": {"hkdf": {"hash_alg": "SHA256"}}, "group_id": g},
        ),
        "key_op_not_permitted",
    )


def test_derivekey_is_required_and_apps_see_only_their_groups(admin: Dual, http_daemon) -> None:
    g, other = _group(admin), _group(admin)
    kid, _ = _base(admin, g, ops=["ENCRYPT", "EXPORT"])
    body = {
        "key_type": "AES",
        "group_id": g,
        "mechanism": {"encrypt_data": {"mode": "ECB", "plain": bytes(32)}},
    }
    err(admin.call("POST", f"/crypto/v1/keys/{kid}/derive", body), "key_op_not_permitted")
    good, value = _base(admin, g)
    app_ = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("a"), "groups": [g]}))
    stranger = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("a"), "groups": [other]}))
    a = connect(http_daemon, admin.kind, app_["credential"]["api_key"])
    s = connect(http_daemon, admin.kind, stranger["credential"]["api_key"])
    try:
        new = ok(
            a.call(
                "POST",
                f"/crypto/v1/keys/{good}/derive",
                {**body, "key_ops": ["ENCRYPT", "EXPORT"], "name": unique("d")},
            )
        )
        assert _export(a, new["kid"]) == _ecb(value, bytes(32))
        # Another group's app cannot see the base key, nor put a key in g.
        err(s.call("POST", f"/crypto/v1/keys/{good}/derive", body), "not_found")
    finally:
        a.close()
        s.close()


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"mechanism": {"encrypt_data": {"mode": "ECB", "plain": bytes(20)}}}, "invalid_value"),
        ({"mechanism": {"encrypt_data": {"mode": "ECB", "plain": bytes(16)}}}, "invalid_value"),
        (
            {"mechanism": {"encrypt_data": {"mode": "GCM", "plain": bytes(32)}}},
            "unsupported_algorithm",
        ),
        ({"mechanism": {"encrypt_data": {"mode": "ECB"}}}, "missing_field"),
        ({"mechanism": {"slip10_master_key": {}}}, "unsupported_algorithm"),
        ({"mechanism": {"pbkdf2": {}}}, "unsupported_algorithm"),
        ({"mechanism": {}}, "invalid_field"),
        ({"key_type": "RSA"}, "unsupported_algorithm"),
        ({"key_size": 100}, "invalid_key_size"),
    ],
)
def test_bad_derive_requests(admin: Dual, change: dict, code: str) -> None:
    g = _group(admin)
    kid, _ = _base(admin, g)
    body = {
        "key": {"kid": kid},
        "key_type": "AES",
        "key_size": 256,
        "group_id": g,
        "mechanism": {"encrypt_data": {"mode": "ECB", "plain": bytes(32)}},
        **change,
    }
    err(admin.call("POST", "/crypto/v1/derive", body), code)


def test_a_revoked_base_key_derives_nothing(admin: Dual) -> None:
    """Deriving protects new data: refused once the base key is deactivated."""
    g = _group(admin)
    kid, _ = _base(admin, g)
    body = {
        "key_type": "AES",
        "group_id": g,
        "mechanism": {"encrypt_data": {"mode": "ECB", "plain": bytes(32)}},
    }
    ok(admin.call("POST", f"/crypto/v1/keys/{kid}/derive", {**body, "name": unique("d")}))
    ok(admin.call("POST", f"/crypto/v1/keys/{kid}/revoke", {"code": "Superseded"}))
    r = admin.call("POST", f"/crypto/v1/keys/{kid}/derive", {**body, "name": unique("d")})
    assert r["status"] == 403, r


def test_hmac_key_derived_in_the_token(admin: Dual) -> None:
    g = _group(admin)
    kid, value = _base(admin, g)
    data = os.urandom(32)
    new = ok(
        admin.call(
            "POST",
            f"/crypto/v1/keys/{kid}/derive",
            {
                "name": unique("h"),
                "key_type": "HMAC",
                "key_size": 256,
                "group_id": g,
                "key_ops": ["MACGENERATE", "EXPORT"],
                "mechanism": {"encrypt_data": {"mode": "ECB", "plain": data}},
            },
        )
    )
    secret = _ecb(value, data)
    assert _export(admin, new["kid"]) == secret
    out = ok(
        admin.call("POST", f"/crypto/v1/keys/{new['kid']}/mac", {"alg": "SHA256", "data": b"m"})
    )
    assert blob(out["mac"]) == hmac.new(secret, b"m", hashlib.sha256).digest()
    # Not padded as an imported HMAC key is (the value never leaves the token):
    # SoftHSM wants an HMAC-SHA512 key of at least 64 bytes (docs/protocol.md).
    err(
        admin.call("POST", f"/crypto/v1/keys/{new['kid']}/mac", {"alg": "SHA512", "data": b"m"}),
        "invalid_value",
    )


def test_transient_result_and_the_audit_record(admin: Dual) -> None:
    """The audit record names both keys; a transient derived key lives on its
    connection (the socket; the gateway refuses transient keys)."""
    g = _group(admin)
    kid, value = _base(admin, g)
    data = os.urandom(16)
    body = {
        "key_type": "AES",
        "key_size": 128,
        "group_id": g,
        "key_ops": ["ENCRYPT", "DECRYPT"],
        "mechanism": {"encrypt_data": {"mode": "ECB", "plain": data}},
    }
    new = ok(admin.call("POST", f"/crypto/v1/keys/{kid}/derive", {**body, "name": unique("d")}))
    (rec,) = ok(admin.call("GET", "/sys/v1/logs", {"object_id": new["kid"]}))
    assert rec["action"] == "POST /crypto/v1/keys/{kid}/derive"
    assert rec["detail"] == {"base_kid": kid, "mechanism": "encrypt_data"}
    r = admin.call("POST", f"/crypto/v1/keys/{kid}/derive", {**body, "transient": True})
    if admin.kind == "http":
        err(r, "invalid_value")
        return
    t = ok(r)
    assert t["transient"] is True
    out = ok(admin.call("POST", "/crypto/v1/encrypt", {"key": {"kid": t["kid"]}, "plain": b"t"}))
    key = _ecb(value, data)[:16]
    assert AESGCM(key).decrypt(out["iv"], out["cipher"] + out["tag"], None) == b"t"
