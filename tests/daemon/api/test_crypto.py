"""Every row of the crypto table, through the real daemon, checked by `cryptography`.

Results made by the daemon are opened by the `cryptography` package, and
what `cryptography` makes is opened by the daemon.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)
from cryptography.hazmat.primitives.padding import PKCS7

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import err, ok

HASHES = {
    "SHA1": hashes.SHA1,
    "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512,
}
CURVES = {
    "NistP256": ec.SECP256R1,
    "NistP384": ec.SECP384R1,
    "NistP521": ec.SECP521R1,
    "SecP256K1": ec.SECP256K1,
}


def imported(admin: Raw, obj_type: str, value: bytes, **extra) -> dict:
    body = {"name": unique("imp"), "obj_type": obj_type, "value": value, **extra}
    return ok(admin.call("PUT", "/crypto/v1/keys", body))


def call(admin: Raw, op: str, key: dict, **body) -> dict:
    return ok(admin.call("POST", f"/crypto/v1/{op}", {"key": {"kid": key["kid"]}, **body}))


# -- symmetric ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [128, 192, 256])
def test_aes_gcm_both_ways(admin_raw: Raw, size: int) -> None:
    value = os.urandom(size // 8)
    key = imported(admin_raw, "AES", value)
    out = call(admin_raw, "encrypt", key, alg="AES", mode="GCM", plain=b"hello", ad=b"hdr")
    assert len(out["iv"]) == 12 and len(out["tag"]) == 16
    assert AESGCM(value).decrypt(out["iv"], out["cipher"] + out["tag"], b"hdr") == b"hello"
    iv = os.urandom(12)
    ct = AESGCM(value).encrypt(iv, b"from outside", b"aad")
    back = call(
        admin_raw,
        "decrypt",
        key,
        alg="AES",
        mode="GCM",
        cipher=ct[:-16],
        tag=ct[-16:],
        iv=iv,
        ad=b"aad",
    )
    assert back["plain"] == b"from outside"
    bad = admin_raw.call(
        "POST",
        "/crypto/v1/decrypt",
        {
            "key": {"kid": key["kid"]},
            "alg": "AES",
            "mode": "GCM",
            "cipher": ct[:-16],
            "tag": bytes(16),
            "iv": iv,
            "ad": b"aad",
        },
    )
    assert err(bad, "bad_tag")["message"] == "authentication failed"


def test_aes_gcm_short_tag(admin_raw: Raw) -> None:
    value = os.urandom(32)
    key = imported(admin_raw, "AES", value)
    out = call(admin_raw, "encrypt", key, alg="AES", mode="GCM", plain=b"x" * 40, tag_len=96)
    assert len(out["tag"]) == 12
    dec = Cipher(algorithms.AES(value), modes.GCM(out["iv"], out["tag"], min_tag_length=12))
    d = dec.decryptor()
    assert d.update(out["cipher"]) + d.finalize() == b"x" * 40


@pytest.mark.parametrize("mode", ["CBC", "CBCNOPAD", "CTR", "ECB"])
def test_aes_modes_both_ways(admin_raw: Raw, mode: str) -> None:
    value = os.urandom(32)
    key = imported(admin_raw, "AES", value)
    plain = os.urandom(48) if mode in ("CBCNOPAD", "ECB") else b"not a block multiple"
    out = call(admin_raw, "encrypt", key, alg="AES", mode=mode, plain=plain)
    cmode = {
        "CBC": lambda: modes.CBC(out["iv"]),
        "CBCNOPAD": lambda: modes.CBC(out["iv"]),
        "CTR": lambda: modes.CTR(out["iv"]),
        "ECB": lambda: modes.ECB(),
    }[mode]()
    d = Cipher(algorithms.AES(value), cmode).decryptor()
    got = d.update(out["cipher"]) + d.finalize()
    if mode == "CBC":
        u = PKCS7(128).unpadder()
        got = u.update(got) + u.finalize()
    assert got == plain
    # The other way round.
    iv = os.urandom(16)
    cmode2 = {
        "CBC": modes.CBC(iv),
        "CBCNOPAD": modes.CBC(iv),
        "CTR": modes.CTR(iv),
        "ECB": modes.ECB(),
    }[mode]
    data = plain
    if mode == "CBC":
        p = PKCS7(128).padder()
        data = p.update(plain) + p.finalize()
    e = Cipher(algorithms.AES(value), cmode2).encryptor()
    ct = e.update(data) + e.finalize()
    body = {"alg": "AES", "mode": mode, "cipher": ct}
    if mode != "ECB":
        body["iv"] = iv
    assert call(admin_raw, "decrypt", key, **body)["plain"] == plain


def test_aes_default_mode_is_gcm_and_nopad_needs_blocks(admin_raw: Raw) -> None:
    key = imported(admin_raw, "AES", os.urandom(16))
    out = call(admin_raw, "encrypt", key, alg="AES", plain=b"abc")
    assert "tag" in out and len(out["iv"]) == 12
    r = admin_raw.call(
        "POST",
        "/crypto/v1/encrypt",
        {"key": {"kid": key["kid"]}, "alg": "AES", "mode": "CBCNOPAD", "plain": b"abc"},
    )
    err(r, "invalid_value")


@pytest.mark.parametrize("mode", ["CBC", "CBCNOPAD", "ECB"])
def test_des3_both_ways(admin_raw: Raw, mode: str) -> None:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

    value = os.urandom(24)
    key = imported(admin_raw, "DES3", value)
    plain = os.urandom(16) if mode != "CBC" else b"seven bytes plus"
    out = call(admin_raw, "encrypt", key, alg="DES3", mode=mode, plain=plain)
    cm = modes.ECB() if mode == "ECB" else modes.CBC(out["iv"])
    d = Cipher(TripleDES(value), cm).decryptor()
    got = d.update(out["cipher"]) + d.finalize()
    if mode == "CBC":
        u = PKCS7(64).unpadder()
        got = u.update(got) + u.finalize()
    assert got == plain
    assert (
        call(
            admin_raw,
            "decrypt",
            key,
            **{k: v for k, v in out.items() if k != "kid"},
            alg="DES3",
            mode=mode,
        )["plain"]
        == plain
    )


def test_generated_des3_and_aes_round_trip(admin_raw: Raw) -> None:
    for body in ({"obj_type": "DES3"}, {"obj_type": "AES", "key_size": 192}):
        key = ok(admin_raw.call("POST", "/crypto/v1/keys", {"name": unique(), **body}))
        out = call(admin_raw, "encrypt", key, alg=body["obj_type"], plain=b"round trip")
        back = call(
            admin_raw,
            "decrypt",
            key,
            alg=body["obj_type"],
            cipher=out["cipher"],
            iv=out["iv"],
            **({"tag": out["tag"]} if "tag" in out else {}),
        )
        assert back["plain"] == b"round trip"


# -- HMAC, CMAC, digest ------------------------------------------------------------


@pytest.mark.parametrize("alg", list(HASHES))
@pytest.mark.parametrize("length", [14, 32, 64, 100])
def test_hmac_matches_python(admin_raw: Raw, alg: str, length: int) -> None:
    value = os.urandom(length)
    key = imported(admin_raw, "HMAC", value)
    expect = hmac.new(value, b"message", alg.lower()).digest()
    assert call(admin_raw, "mac", key, alg=alg, data=b"message")["mac"] == expect
    assert call(admin_raw, "macverify", key, alg=alg, data=b"message", mac=expect)["result"]
    wrong = bytes([expect[0] ^ 1]) + expect[1:]
    assert not call(admin_raw, "macverify", key, alg=alg, data=b"message", mac=wrong)["result"]
    # The exported value is the one imported, not a padded copy.
    exp = ok(admin_raw.call("POST", "/crypto/v1/keys/export", {"kid": key["kid"]}))
    assert exp["value"] == value


def test_aes_cmac(admin_raw: Raw) -> None:
    value = os.urandom(32)
    key = imported(admin_raw, "AES", value, key_ops=["MACGENERATE", "MACVERIFY"])
    c = CMAC(algorithms.AES(value))
    c.update(b"cmac me")
    expect = c.finalize()
    assert call(admin_raw, "mac", key, alg="CMAC", data=b"cmac me")["mac"] == expect
    assert call(admin_raw, "macverify", key, alg="CMAC", data=b"cmac me", mac=expect)["result"]


@pytest.mark.parametrize("alg", list(HASHES))
def test_digest(admin_raw: Raw, alg: str) -> None:
    out = ok(admin_raw.call("POST", "/crypto/v1/digest", {"alg": alg, "data": b"abc"}))
    assert out["digest"] == hashlib.new(alg.lower(), b"abc").digest()


# -- RSA ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key(daemon) -> dict:
    r = Raw(daemon.socket)
    r.login(daemon.admin_key)
    key = ok(
        r.call(
            "POST",
            "/crypto/v1/keys",
            {
                "name": unique("rsa"),
                "obj_type": "RSA",
                "key_size": 2048,
                "key_ops": ["SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY"],
            },
        )
    )
    r.close()
    key["public"] = serialization.load_der_public_key(key["pub_key"])
    return key


@pytest.mark.parametrize(
    ("mode", "pad"),
    [
        ("OAEP_MGF1_SHA1", lambda: padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)),
        (
            "OAEP_MGF1_SHA256",
            lambda: padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None),
        ),
        (
            {"OAEP": {"mgf": {"mgf1": {"hash": "SHA256"}}}},
            lambda: padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None),
        ),
        ("PKCS1_V15", padding.PKCS1v15),
    ],
)
def test_rsa_encryption_both_ways(admin_raw: Raw, rsa_key: dict, mode, pad) -> None:
    ct = rsa_key["public"].encrypt(b"made outside", pad())
    assert (
        call(admin_raw, "decrypt", rsa_key, alg="RSA", mode=mode, cipher=ct)["plain"]
        == b"made outside"
    )
    out = call(admin_raw, "encrypt", rsa_key, alg="RSA", mode=mode, plain=b"made inside")
    assert len(out["cipher"]) == 256
    # Round trip through the daemon (cryptography cannot decrypt without the private key).
    assert (
        call(admin_raw, "decrypt", rsa_key, alg="RSA", mode=mode, cipher=out["cipher"])["plain"]
        == b"made inside"
    )


def test_rsa_oaep_garbage_fails_cleanly(admin_raw: Raw, rsa_key: dict) -> None:
    r = admin_raw.call(
        "POST",
        "/crypto/v1/decrypt",
        {
            "key": {"kid": rsa_key["kid"]},
            "alg": "RSA",
            "mode": "OAEP_MGF1_SHA256",
            "cipher": os.urandom(255),
        },
    )
    assert r["status"] == 400, r


@pytest.mark.parametrize("hash_alg", ["SHA256", "SHA384", "SHA512"])
@pytest.mark.parametrize("mode", ["PKCS1_V15", "PSS"])
def test_rsa_signatures_verify_outside(admin_raw: Raw, rsa_key: dict, hash_alg, mode) -> None:
    h = HASHES[hash_alg]
    pad = (
        padding.PKCS1v15() if mode == "PKCS1_V15" else padding.PSS(padding.MGF1(h()), h.digest_size)
    )
    wire_mode = (
        {"PKCS1_V15": {}} if mode == "PKCS1_V15" else {"PSS": {"mgf": {"mgf1": {"hash": hash_alg}}}}
    )
    sig = call(admin_raw, "sign", rsa_key, hash_alg=hash_alg, data=b"doc", mode=wire_mode)
    rsa_key["public"].verify(sig["signature"], b"doc", pad, h())
    digest = hashlib.new(hash_alg.lower(), b"doc").digest()
    sig2 = call(admin_raw, "sign", rsa_key, hash_alg=hash_alg, hash=digest, mode=wire_mode)
    rsa_key["public"].verify(sig2["signature"], digest, pad, Prehashed(h()))
    assert (
        call(
            admin_raw,
            "verify",
            rsa_key,
            hash_alg=hash_alg,
            data=b"doc",
            mode=wire_mode,
            signature=sig["signature"],
        )["result"]
        is True
    )
    assert (
        call(
            admin_raw,
            "verify",
            rsa_key,
            hash_alg=hash_alg,
            data=b"other",
            mode=wire_mode,
            signature=sig["signature"],
        )["result"]
        is False
    )


def test_rsa_import_and_sign_verified_by_its_own_key(admin_raw: Raw) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    priv = rsa.generate_private_key(65537, 3072)
    der = priv.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = imported(admin_raw, "RSA", der)
    assert key["key_size"] == 3072
    sig = call(admin_raw, "sign", key, hash_alg="SHA256", data=b"x")["signature"]
    priv.public_key().verify(sig, b"x", padding.PKCS1v15(), hashes.SHA256())


# -- EC ----------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", list(CURVES))
def test_ecdsa_der_signatures_verify_outside(admin_raw: Raw, curve: str) -> None:
    key = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("ec"), "obj_type": "EC", "elliptic_curve": curve},
        )
    )
    pub = serialization.load_der_public_key(key["pub_key"])
    assert isinstance(pub.curve, CURVES[curve])
    sig = call(admin_raw, "sign", key, hash_alg="SHA256", data=b"msg")["signature"]
    pub.verify(sig, b"msg", ec.ECDSA(hashes.SHA256()))  # DER, as DSM returns
    digest = hashlib.sha384(b"msg").digest()
    sig2 = call(admin_raw, "sign", key, hash_alg="SHA384", hash=digest)["signature"]
    pub.verify(sig2, digest, ec.ECDSA(Prehashed(hashes.SHA384())))
    # A signature made outside verifies inside.
    priv = ec.generate_private_key(CURVES[curve]())
    der = priv.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    imp = imported(admin_raw, "EC", der)
    outside = priv.sign(b"payload", ec.ECDSA(hashes.SHA256()))
    assert (
        call(admin_raw, "verify", imp, hash_alg="SHA256", data=b"payload", signature=outside)[
            "result"
        ]
        is True
    )


def test_ed25519_both_ways(admin_raw: Raw) -> None:
    key = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("ed"), "obj_type": "EC", "elliptic_curve": "Ed25519"},
        )
    )
    pub = serialization.load_der_public_key(key["pub_key"])
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    sig = call(admin_raw, "sign", key, hash_alg="SHA512", data=b"eddsa")["signature"]
    assert len(sig) == 64
    pub.verify(sig, b"eddsa")
    priv = ed25519.Ed25519PrivateKey.generate()
    der = priv.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    imp = imported(admin_raw, "OKP", der)
    assert imp["elliptic_curve"] == "Ed25519"
    assert (
        call(admin_raw, "verify", imp, hash_alg="SHA512", data=b"out", signature=priv.sign(b"out"))[
            "result"
        ]
        is True
    )


def test_public_only_and_certificate_import(admin_raw: Raw) -> None:
    import datetime

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    priv = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "strongroom test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(priv.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(priv, hashes.SHA256())
    )
    ck = imported(admin_raw, "CERTIFICATE", cert.public_bytes(serialization.Encoding.PEM))
    assert ck["public_only"] is True and ck["obj_type"] == "CERTIFICATE"
    assert ck["pub_key"] == priv.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sig = priv.sign(b"signed", ec.ECDSA(hashes.SHA256()))
    assert (
        call(admin_raw, "verify", ck, hash_alg="SHA256", data=b"signed", signature=sig)["result"]
        is True
    )
    spki = imported(admin_raw, "EC", ck["pub_key"])
    assert spki["public_only"] is True
    err(
        admin_raw.call(
            "POST",
            "/crypto/v1/sign",
            {"key": {"kid": spki["kid"]}, "hash_alg": "SHA256", "data": b"x"},
        ),
        "key_op_not_permitted",
    )


def test_ecdh_agree_matches_outside(admin_raw: Raw) -> None:
    mine = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/keys",
            {
                "name": unique("ecdh"),
                "obj_type": "EC",
                "elliptic_curve": "NistP256",
                "key_ops": ["AGREEKEY"],
            },
        )
    )
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_pub = imported(
        admin_raw,
        "EC",
        peer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    shared = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/agree",
            {
                "private_key": {"kid": mine["kid"]},
                "public_key": {"kid": peer_pub["kid"]},
                "mechanism": "diffie_hellman",
                "key_type": "SECRET",
                "key_size": 256,
                "key_ops": ["EXPORT", "DERIVEKEY"],
                "name": unique("shared"),
            },
        )
    )
    value = ok(admin_raw.call("POST", "/crypto/v1/keys/export", {"kid": shared["kid"]}))["value"]
    expect = peer.exchange(ec.ECDH(), serialization.load_der_public_key(mine["pub_key"]))
    assert value == expect


# -- wrapping -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["KW", "KWP"])
def test_aes_key_wrap_both_ways(admin_raw: Raw, mode: str) -> None:
    kek_value = os.urandom(32)
    kek = imported(admin_raw, "AES", kek_value)
    subject_value = os.urandom(24 if mode == "KW" else 20)
    obj = "AES" if mode == "KW" else "HMAC"
    subject = (
        imported(admin_raw, obj, subject_value)
        if mode == "KW"
        else imported(admin_raw, "SECRET", subject_value)
    )
    out = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/wrapkey",
            {
                "key": {"kid": kek["kid"]},
                "subject": {"kid": subject["kid"]},
                "alg": "AES",
                "mode": mode,
            },
        )
    )
    unwrap = aes_key_unwrap if mode == "KW" else aes_key_unwrap_with_padding
    assert unwrap(kek_value, out["wrapped_key"]) == subject_value
    wrap = aes_key_wrap if mode == "KW" else aes_key_wrap_with_padding
    fresh = os.urandom(32)
    back = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/unwrapkey",
            {
                "key": {"kid": kek["kid"]},
                "alg": "AES",
                "mode": mode,
                "obj_type": "AES",
                "wrapped_key": wrap(kek_value, fresh),
                "name": unique("unwrapped"),
                "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"],
            },
        )
    )
    assert (
        ok(admin_raw.call("POST", "/crypto/v1/keys/export", {"kid": back["kid"]}))["value"] == fresh
    )


def test_wrapping_a_non_exportable_key_is_refused(admin_raw: Raw) -> None:
    kek = imported(admin_raw, "AES", os.urandom(32))
    secret = ok(admin_raw.call("POST", "/crypto/v1/keys", {"name": unique(), "obj_type": "AES"}))
    err(
        admin_raw.call(
            "POST",
            "/crypto/v1/wrapkey",
            {
                "key": {"kid": kek["kid"]},
                "subject": {"kid": secret["kid"]},
                "alg": "AES",
                "mode": "KW",
            },
        ),
        "key_op_not_permitted",
    )


def test_rsa_oaep_wrap(admin_raw: Raw, rsa_key: dict) -> None:
    subject_value = os.urandom(32)
    subject = imported(admin_raw, "AES", subject_value)
    out = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/wrapkey",
            {
                "key": {"kid": rsa_key["kid"]},
                "subject": {"kid": subject["kid"]},
                "alg": "RSA",
                "mode": "OAEP",
            },
        )
    )
    back = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/unwrapkey",
            {
                "key": {"kid": rsa_key["kid"]},
                "alg": "RSA",
                "mode": "OAEP",
                "obj_type": "AES",
                "wrapped_key": out["wrapped_key"],
                "name": unique(),
                "key_ops": ["EXPORT", "ENCRYPT"],
            },
        )
    )
    assert (
        ok(admin_raw.call("POST", "/crypto/v1/keys/export", {"kid": back["kid"]}))["value"]
        == subject_value
    )


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"obj_type": "BLOWFISH"}, "unsupported_algorithm"),
        ({"obj_type": "AES", "key_size": 100}, "invalid_key_size"),
        ({"obj_type": "RSA", "key_size": 1024}, "invalid_key_size"),
        ({"obj_type": "EC", "elliptic_curve": "NistP999"}, "unsupported_algorithm"),
        ({"obj_type": "AES", "key_size": "256"}, "invalid_field"),
        ({"obj_type": "AES", "key_ops": ["FLY"]}, "invalid_value"),
        ({"obj_type": "AES", "key_ops": ["SIGN"]}, "invalid_value"),
        ({"obj_type": "AES", "colour": "red", "key_size": 100}, "invalid_key_size"),
    ],
)
def test_bad_key_creation(admin_raw: Raw, body: dict, code: str) -> None:
    err(admin_raw.call("POST", "/crypto/v1/keys", {"name": unique(), **body}), code)


def test_name_clash_is_409(admin_raw: Raw) -> None:
    name = unique()
    ok(admin_raw.call("POST", "/crypto/v1/keys", {"name": name, "obj_type": "AES"}))
    err(admin_raw.call("POST", "/crypto/v1/keys", {"name": name, "obj_type": "AES"}), "name_exists")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"alg": "RSA", "plain": b"x"}, "unsupported_algorithm"),
        ({"alg": "AES", "mode": "XTS", "plain": b"x"}, "unsupported_algorithm"),
        ({"alg": "AES", "mode": "GCM", "plain": "text"}, "invalid_field"),
        ({"alg": "AES", "mode": "CBC", "plain": b"x", "iv": b"short"}, "invalid_value"),
        ({"alg": "AES", "plain": b"x", "tag_len": 7}, "invalid_value"),
        ({"alg": "AES"}, "missing_field"),
    ],
)
def test_bad_encrypt_requests(admin_raw: Raw, body: dict, code: str) -> None:
    key = imported(admin_raw, "AES", os.urandom(32))
    err(admin_raw.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}, **body}), code)


def test_unknown_key_and_bad_descriptor(admin_raw: Raw) -> None:
    enc = {"alg": "AES", "plain": b"x"}
    err(
        admin_raw.call("POST", "/crypto/v1/encrypt", {"key": {"name": "no-such"}, **enc}),
        "not_found",
    )
    err(
        admin_raw.call("POST", "/crypto/v1/encrypt", {"key": {"colour": "x"}, **enc}),
        "invalid_field",
    )
    err(admin_raw.call("POST", "/crypto/v1/encrypt", {"key": {"kid": 5}, **enc}), "invalid_field")
