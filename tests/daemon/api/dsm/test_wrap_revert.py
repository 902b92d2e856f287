"""key_format on wrapkey; revert and restore (served, and refused with 409 and why)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from tests.conftest import unique
from tests.daemon.api.dsm.conftest import Dual, blob, connect
from tests.daemon.api.helpers import err, ok


def _group(c: Dual) -> str:
    return ok(c.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]


def _key(c: Dual, g: str, **body) -> dict:
    return ok(c.call("POST", "/crypto/v1/keys", {"name": unique("k"), "group_id": g, **body}))


@pytest.mark.parametrize(
    "subject",
    [
        {"obj_type": "RSA", "key_size": 2048, "key_ops": ["SIGN", "VERIFY", "EXPORT"]},
        {"obj_type": "EC", "elliptic_curve": "NistP256", "key_ops": ["SIGN", "VERIFY", "EXPORT"]},
    ],
)
def test_pkcs8_private_key_wrapped_with_kwp(admin: Dual, subject: dict) -> None:
    g = _group(admin)
    kek = _key(admin, g, obj_type="AES", key_ops=["WRAPKEY", "UNWRAPKEY", "EXPORT"])
    kek_value = blob(ok(admin.call("GET", f"/crypto/v1/keys/{kek['kid']}/export"))["value"])
    priv = _key(admin, g, **subject)
    for fmt in ("Pkcs8", "Default", None):
        body = {"subject": {"kid": priv["kid"]}, "alg": "AES", "mode": "KWP"}
        if fmt:
            body["key_format"] = fmt
        out = ok(admin.call("POST", f"/crypto/v1/keys/{kek['kid']}/wrapkey", body))
        der = aes_key_unwrap_with_padding(kek_value, blob(out["wrapped_key"]))
        key = serialization.load_der_private_key(der, password=None)
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert spki == blob(priv["pub_key"])
        # PKCS#8 PrivateKeyInfo: SEQUENCE { INTEGER 0, AlgorithmIdentifier, OCTET STRING }
        assert der == key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@pytest.mark.parametrize("mode", ["OAEP_MGF1_SHA256", "OAEP_MGF1_SHA512"])
def test_pkcs8_private_key_wrapped_with_rsa_oaep(admin: Dual, mode: str) -> None:
    """The OAEP hashes SoftHSM lacks are padded here around the exported value:
    that must still be PKCS#8 (export itself gives SEC1), as key_format Pkcs8 says."""
    g = _group(admin)
    kek = _key(admin, g, obj_type="RSA", key_size=4096, key_ops=["WRAPKEY", "UNWRAPKEY", "EXPORT"])
    kek_der = blob(ok(admin.call("GET", f"/crypto/v1/keys/{kek['kid']}/export"))["value"])
    kek_private = serialization.load_der_private_key(kek_der, password=None)
    assert isinstance(kek_private, rsa.RSAPrivateKey)
    priv = _key(
        admin, g, obj_type="EC", elliptic_curve="NistP256", key_ops=["SIGN", "VERIFY", "EXPORT"]
    )
    body = {"subject": {"kid": priv["kid"]}, "alg": "RSA", "mode": mode, "key_format": "Pkcs8"}
    out = ok(admin.call("POST", f"/crypto/v1/keys/{kek['kid']}/wrapkey", body))
    h = hashes.SHA256() if mode.endswith("256") else hashes.SHA512()
    der = kek_private.decrypt(blob(out["wrapped_key"]), padding.OAEP(padding.MGF1(h), h, None))
    key = serialization.load_der_private_key(der, password=None)
    assert der == key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_bad_key_format(admin: Dual) -> None:
    g = _group(admin)
    kek = _key(admin, g, obj_type="AES", key_ops=["WRAPKEY", "EXPORT"])
    aes = _key(admin, g, obj_type="AES", key_ops=["ENCRYPT", "EXPORT"])
    body = {"subject": {"kid": aes["kid"]}, "alg": "AES", "mode": "KWP"}
    err(
        admin.call(
            "POST", f"/crypto/v1/keys/{kek['kid']}/wrapkey", {**body, "key_format": "Pkcs8"}
        ),
        "invalid_value",
    )
    err(
        admin.call("POST", f"/crypto/v1/keys/{kek['kid']}/wrapkey", {**body, "key_format": "Jwk"}),
        "invalid_value",
    )
    ok(
        admin.call(
            "POST", f"/crypto/v1/keys/{kek['kid']}/wrapkey", {**body, "key_format": "Default"}
        )
    )


def test_revert_and_restore_say_why_they_cannot(admin: Dual, http_daemon) -> None:
    g, other = _group(admin), _group(admin)
    k = _key(admin, g, obj_type="AES")
    r = err(
        admin.call("PUT", f"/crypto/v1/keys/{k['kid']}/revert", {"ids": [k["kid"]]}), "conflict"
    )
    assert r["message"] and "history" in r["message"]
    assert admin.call("PUT", f"/crypto/v1/keys/{k['kid']}/revert", {})["status"] == 400
    r = err(admin.call("POST", f"/crypto/v1/keys/{k['kid']}/restore", {}), "conflict")
    assert "external" in r["message"]
    err(
        admin.call("POST", "/crypto/v1/keys/00000000-0000-0000-0000-000000000000/restore"),
        "not_found",
    )
    # Another group's app cannot see the key: 404, as for every key it cannot see.
    app_ = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("a"), "groups": [other]}))
    a = connect(http_daemon, admin.kind, app_["credential"]["api_key"])
    try:
        err(a.call("POST", f"/crypto/v1/keys/{k['kid']}/restore", {}), "not_found")
        err(a.call("PUT", f"/crypto/v1/keys/{k['kid']}/revert", {"ids": []}), "not_found")
    finally:
        a.close()
