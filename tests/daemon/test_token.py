"""strongroomd._token against a real SoftHSM token, checked with cryptography."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)
from strongroomd._token import Token
from strongroomd.errors import BadRequest, BadTag, NotFound, Unsupported
from strongroomd.keyref import KeyRef, NewKey

from tests.daemon.token_fixture import softhsm_token

HASHES = {
    "SHA1": hashes.SHA1(),
    "SHA256": hashes.SHA256(),
    "SHA384": hashes.SHA384(),
    "SHA512": hashes.SHA512(),
}


class Harness:
    """One event loop and one open Token for the whole module."""

    def __init__(self) -> None:
        self.conf = softhsm_token()
        self.loop = asyncio.new_event_loop()
        self.token = self.run(Token.open(self.conf.module, self.conf.label, self.conf.pin))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def call(self, name: str, *args):
        return self.run(getattr(self.token, name)(*args))

    def new(self, obj_type, key_size=None, curve=None, *, exportable=True, transient=False):
        return NewKey(
            str(uuid.uuid4()),
            f"k{uuid.uuid4().hex[:8]}",
            obj_type,
            key_size,
            curve,
            exportable,
            transient,
        )


@pytest.fixture(scope="module")
def h():
    harness = Harness()
    yield harness
    harness.run(harness.token.close())
    harness.loop.close()


# KeyRef has slots; keep materials beside it instead of on it.
_MATERIAL: dict[str, object] = {}


def make(h, obj_type, key_size=None, curve=None, *, value=None, **kw):
    new = h.new(obj_type, key_size, curve, **kw)
    m = h.call("generate", new) if value is None else h.call("import_key", new, value)
    _MATERIAL[new.kid] = m
    return KeyRef(new.kid, new.obj_type, m.key_size, m.curve, new.transient, m.public_only)


def pub(ref):
    return serialization.load_der_public_key(_MATERIAL[ref.kid].pub_key)


def der(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def traditional(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


# -- symmetric ------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 24, 32])
def test_aes_gcm_both_ways(h, size):
    value = os.urandom(size)
    key = make(h, "AES", value=value)
    out = h.call("encrypt", key, {"alg": "AES", "plain": b"hello gcm", "ad": b"hdr"})
    assert len(out["iv"]) == 12 and len(out["tag"]) == 16
    gcm = AESGCM(value)
    assert gcm.decrypt(out["iv"], out["cipher"] + out["tag"], b"hdr") == b"hello gcm"
    iv = os.urandom(12)
    ct = gcm.encrypt(iv, b"from cryptography", None)
    req = {"alg": "AES", "mode": "GCM", "cipher": ct[:-16], "tag": ct[-16:], "iv": iv}
    assert h.call("decrypt", key, req) == {"plain": b"from cryptography"}
    bad = dict(req, tag=bytes(16))
    with pytest.raises(BadTag):
        h.call("decrypt", key, bad)


def test_aes_gcm_short_tag(h):
    value = os.urandom(32)
    key = make(h, "AES", value=value)
    out = h.call("encrypt", key, {"alg": "AES", "plain": b"x" * 40, "tag_len": 96})
    assert len(out["tag"]) == 12
    dec = Cipher(algorithms.AES(value), modes.GCM(out["iv"], out["tag"], 12)).decryptor()
    assert dec.update(out["cipher"]) + dec.finalize() == b"x" * 40
    req = {"alg": "AES", "cipher": out["cipher"], "iv": out["iv"], "tag": out["tag"]}
    assert h.call("decrypt", key, req)["plain"] == b"x" * 40


def _pkcs7(data: bytes, block: int) -> bytes:
    n = block - len(data) % block
    return data + bytes([n]) * n


@pytest.mark.parametrize(
    ("obj", "mode", "plain"),
    [
        ("AES", "CBC", b"seventeen bytes!!"),
        ("AES", "CBCNOPAD", b"x" * 32),
        ("AES", "CTR", b"any length at all"),
        ("AES", "ECB", b"y" * 48),
        ("DES3", "CBC", b"ten bytes!"),
        ("DES3", "CBCNOPAD", b"z" * 16),
        ("DES3", "ECB", b"w" * 8),
    ],
)
def test_block_modes_both_ways(h, obj, mode, plain):
    value = os.urandom(32 if obj == "AES" else 24)
    key = make(h, obj, value=value)
    algo = algorithms.AES(value) if obj == "AES" else TripleDES(value)
    block = 16 if obj == "AES" else 8
    out = h.call("encrypt", key, {"alg": obj, "mode": mode, "plain": plain})
    iv = out.get("iv")
    assert (iv is None) == (mode == "ECB")
    cmode = {"CBC": modes.CBC, "CBCNOPAD": modes.CBC, "CTR": modes.CTR}.get(mode)
    cipher = Cipher(algo, cmode(iv) if cmode else modes.ECB())
    expected = _pkcs7(plain, block) if mode == "CBC" else plain
    dec = cipher.decryptor()
    assert dec.update(out["cipher"]) + dec.finalize() == expected
    enc = cipher.encryptor()
    theirs = enc.update(expected) + enc.finalize()
    req = {"alg": obj, "mode": mode, "cipher": theirs}
    if iv is not None:
        req["iv"] = iv
    assert h.call("decrypt", key, req) == {"plain": plain}


def test_default_des3_mode_is_cbc(h):
    key = make(h, "DES3")
    out = h.call("encrypt", key, {"alg": "DES3", "plain": b"abc"})
    assert len(out["iv"]) == 8 and len(out["cipher"]) == 8
    req = {"alg": "DES3", "cipher": out["cipher"], "iv": out["iv"]}
    assert h.call("decrypt", key, req)["plain"] == b"abc"


def test_cbc_bad_padding_is_bad_tag(h):
    value = os.urandom(16)
    key = make(h, "AES", value=value)
    enc = Cipher(algorithms.AES(value), modes.CBC(bytes(16))).encryptor()
    ct = enc.update(b"\x00" * 16) + enc.finalize()
    with pytest.raises(BadTag):
        h.call("decrypt", key, {"alg": "AES", "mode": "CBC", "cipher": ct, "iv": bytes(16)})


def test_symmetric_errors(h):
    key = make(h, "AES", 256)
    with pytest.raises(Unsupported):
        h.call("encrypt", key, {"alg": "RSA", "plain": b"x"})
    with pytest.raises(Unsupported):
        h.call("sign", key, {"hash_alg": "SHA256", "data": b"x"})
    with pytest.raises(Unsupported):
        h.call("mac", key, {"alg": "SHA256", "data": b"x"})
    with pytest.raises(BadRequest) as info:
        h.call("encrypt", key, {"alg": "AES", "plain": b"x", "iv": b"short"})
    assert info.value.code == "invalid_value"
    with pytest.raises(BadRequest) as info:
        h.call("encrypt", key, {"alg": "AES", "mode": "ECB", "plain": b"x" * 17})
    assert info.value.code == "invalid_value"
    for obj, size in [("AES", 100), ("RSA", 1024), ("HMAC", 64), ("DES3", 64)]:
        with pytest.raises(BadRequest) as info:
            h.call("generate", h.new(obj, size))
        assert info.value.code == "invalid_key_size"
    with pytest.raises(BadRequest) as info:
        h.call("import_key", h.new("AES"), b"x" * 17)
    assert info.value.code == "invalid_key_size"
    with pytest.raises(Unsupported) as info:
        h.call("generate", h.new("EC", curve="NistP192"))
    assert info.value.code == "unsupported_algorithm"
    missing = KeyRef(str(uuid.uuid4()), "AES", 256, None, False)
    with pytest.raises(NotFound):
        h.call("encrypt", missing, {"alg": "AES", "plain": b"x"})


# -- RSA ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_pair(h):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private, make(h, "RSA", value=der(private))


OAEP_MODES = {
    "OAEP_MGF1_SHA1": padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None),
    "OAEP_MGF1_SHA256": padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None),
    "PKCS1_V15": padding.PKCS1v15(),
}


@pytest.mark.parametrize(
    "mode",
    [
        "OAEP_MGF1_SHA1",
        "OAEP_MGF1_SHA256",
        {"OAEP": {"mgf": {"mgf1": {"hash": "SHA256"}}}},
        {"OAEP": {"mgf": {"mgf1": {"hash": "SHA1"}}}},
        "PKCS1_V15",
        {"PKCS1_V15": {}},
        None,
    ],
)
def test_rsa_encrypt_both_ways(h, rsa_pair, mode):
    private, key = rsa_pair
    if isinstance(mode, dict):
        name = next(iter(mode))
        if name == "OAEP":
            name = "OAEP_MGF1_" + mode["OAEP"]["mgf"]["mgf1"]["hash"]
    else:
        name = mode or "OAEP_MGF1_SHA1"
    pad = OAEP_MODES[name]
    req = {"alg": "RSA", "plain": b"rsa secret"}
    if mode is not None:
        req["mode"] = mode
    out = h.call("encrypt", key, req)
    assert private.decrypt(out["cipher"], pad) == b"rsa secret"
    theirs = private.public_key().encrypt(b"from cryptography", pad)
    dreq = {"alg": "RSA", "cipher": theirs}
    if mode is not None:
        dreq["mode"] = mode
    assert h.call("decrypt", key, dreq) == {"plain": b"from cryptography"}
    tampered = bytes([theirs[0] ^ 0x40]) + theirs[1:]
    with pytest.raises(BadTag):
        h.call("decrypt", key, dict(dreq, cipher=tampered))


def _pss(name: str):
    return padding.PSS(padding.MGF1(HASHES[name]), HASHES[name].digest_size)


@pytest.mark.parametrize("hash_alg", ["SHA1", "SHA256", "SHA384", "SHA512"])
@pytest.mark.parametrize("mode", [None, {"PKCS1_V15": {}}, {"PSS": {}}, "PSS"])
@pytest.mark.parametrize("prehashed", [False, True])
def test_rsa_sign_verify(h, rsa_pair, hash_alg, mode, prehashed):
    private, key = rsa_pair
    if mode == {"PSS": {}}:
        mode = {"PSS": {"mgf": {"mgf1": {"hash": hash_alg}}}}
    pss = mode is not None and "PSS" in mode
    data = b"sign me"
    req = {"hash_alg": hash_alg}
    if prehashed:
        req["hash"] = hashlib.new(hash_alg.lower(), data).digest()
    else:
        req["data"] = data
    if mode is not None:
        req["mode"] = mode
    sig = h.call("sign", key, req)["signature"]
    pad = _pss(hash_alg) if pss else padding.PKCS1v15()
    pub(key).verify(sig, data, pad, HASHES[hash_alg])
    theirs = private.sign(data, pad, HASHES[hash_alg])
    assert h.call("verify", key, dict(req, signature=theirs)) == {"result": True}
    bad = theirs[:-1] + bytes([theirs[-1] ^ 1])
    assert h.call("verify", key, dict(req, signature=bad)) == {"result": False}
    assert h.call("verify", key, dict(req, signature=b"short")) == {"result": False}


def test_rsa_generated_sizes(h):
    for size in (2048, 4096):  # 4096 once: SoftHSM takes a few seconds
        key = make(h, "RSA", size, exportable=False)
        assert pub(key).key_size == size
        sig = h.call("sign", key, {"hash_alg": "SHA256", "data": b"x"})["signature"]
        pub(key).verify(sig, b"x", padding.PKCS1v15(), hashes.SHA256())
        out = h.call("encrypt", key, {"alg": "RSA", "plain": b"p", "mode": "OAEP_MGF1_SHA256"})
        req = {"alg": "RSA", "cipher": out["cipher"], "mode": "OAEP_MGF1_SHA256"}
        assert h.call("decrypt", key, req)["plain"] == b"p"
        with pytest.raises(BadRequest):
            h.call("export", key)


# -- EC -------------------------------------------------------------------------

CURVES = {
    "NistP256": ec.SECP256R1(),
    "NistP384": ec.SECP384R1(),
    "NistP521": ec.SECP521R1(),
    "SecP256K1": ec.SECP256K1(),
}


@pytest.mark.parametrize("curve", list(CURVES))
def test_ecdsa(h, curve):
    key = make(h, "EC", curve=curve)
    assert key.curve == curve
    for hash_alg in ("SHA256", "SHA512"):
        req = {"hash_alg": hash_alg, "data": b"ec data", "deterministic_signature": True}
        sig = h.call("sign", key, req)["signature"]
        pub(key).verify(sig, b"ec data", ec.ECDSA(HASHES[hash_alg]))
        digest = hashlib.new(hash_alg.lower(), b"ec data").digest()
        sig2 = h.call("sign", key, {"hash_alg": hash_alg, "hash": digest})["signature"]
        pub(key).verify(sig2, digest, ec.ECDSA(Prehashed(HASHES[hash_alg])))
        assert h.call("verify", key, dict(req, signature=sig))["result"] is True
        assert h.call("verify", key, dict(req, data=b"other", signature=sig))["result"] is False
        assert h.call("verify", key, dict(req, signature=b"\x30\x01"))["result"] is False
    theirs = ec.generate_private_key(CURVES[curve])
    imported = make(h, "EC", value=der(theirs))
    sig = theirs.sign(b"m", ec.ECDSA(hashes.SHA256()))
    req = {"hash_alg": "SHA256", "data": b"m", "signature": sig}
    assert h.call("verify", imported, req)["result"] is True


def test_ed25519(h):
    key = make(h, "EC", curve="Ed25519")
    sig = h.call("sign", key, {"hash_alg": "SHA512", "data": b"ed"})["signature"]
    assert len(sig) == 64
    pub(key).verify(sig, b"ed")
    theirs = ed25519.Ed25519PrivateKey.generate()
    imported = make(h, "EC", value=der(theirs))
    assert imported.curve == "Ed25519"
    req = {"data": b"msg", "signature": theirs.sign(b"msg")}
    assert h.call("verify", imported, req)["result"] is True
    assert h.call("verify", imported, dict(req, data=b"other"))["result"] is False
    assert h.call("export", imported) == der(theirs)
    with pytest.raises(BadRequest):
        h.call("sign", key, {"hash_alg": "SHA512", "hash": bytes(64)})


@pytest.mark.parametrize(
    ("curve", "obj", "size"),
    [
        ("NistP256", "AES", 256),
        ("NistP384", "AES", 128),
        ("NistP521", "HMAC", 256),
        ("SecP256K1", "SECRET", 256),
    ],
)
def test_ecdh_agrees_with_cryptography(h, curve, obj, size):
    mine = make(h, "EC", curve=curve)
    theirs = ec.generate_private_key(CURVES[curve])
    spki = theirs.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    peer = make(h, "EC", value=spki)
    assert peer.public_only
    new = h.new(obj, size)
    m = h.call("agree", mine, peer, new)
    assert m.key_size == size
    ref = KeyRef(new.kid, obj, size, None, False)
    shared = theirs.exchange(ec.ECDH(), pub(mine))
    value = h.call("export", ref)
    assert value == shared[: size // 8]
    if obj == "HMAC":
        mac = h.call("mac", ref, {"alg": "SHA256", "data": b"d"})["mac"]
        assert mac == hmac.new(value, b"d", "sha256").digest()


# -- MAC ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [14, 32, 100])
def test_hmac_every_hash(h, size):
    value = os.urandom(size)
    key = make(h, "HMAC", value=value)
    assert key.key_size == size * 8
    for alg in ("SHA1", "SHA256", "SHA384", "SHA512"):
        mac = h.call("mac", key, {"alg": alg, "data": b"data"})["mac"]
        assert mac == hmac.new(value, b"data", alg.lower()).digest()
        req = {"alg": alg, "data": b"data", "mac": mac}
        assert h.call("macverify", key, req) == {"result": True}
        assert h.call("macverify", key, dict(req, mac=mac[:-1])) == {"result": False}
    assert h.call("export", key) == value


def test_generated_short_hmac_exports_what_it_macs_with(h):
    key = make(h, "HMAC", 128)
    value = h.call("export", key)
    assert len(value) == 16
    mac = h.call("mac", key, {"alg": "SHA512", "data": b"x"})["mac"]
    assert mac == hmac.new(value, b"x", "sha512").digest()


def test_aes_cmac(h):
    value = os.urandom(32)
    key = make(h, "AES", value=value)
    mac = h.call("mac", key, {"alg": "CMAC", "data": b"cmac data"})["mac"]
    c = cmac.CMAC(algorithms.AES(value))
    c.update(b"cmac data")
    assert mac == c.finalize()
    req = {"alg": "CMAC", "data": b"cmac data", "mac": mac}
    assert h.call("macverify", key, req)["result"] is True


def test_digest():
    from strongroomd._token import digest

    assert digest({"alg": "SHA256", "data": b"a"}) == {"digest": hashlib.sha256(b"a").digest()}


# -- wrap -----------------------------------------------------------------------


def test_aes_wrap_unwrap(h):
    kek_value = os.urandom(32)
    kek = make(h, "AES", value=kek_value)
    subject_value = os.urandom(32)
    subject = make(h, "AES", value=subject_value)
    out = h.call("wrap", kek, subject, {"alg": "AES", "mode": "KW"})
    assert aes_key_unwrap(kek_value, out["wrapped_key"]) == subject_value
    out = h.call("wrap", kek, subject, {"alg": "AES", "mode": "KWP"})
    assert aes_key_unwrap_with_padding(kek_value, out["wrapped_key"]) == subject_value
    secret = os.urandom(20)
    new = h.new("HMAC", exportable=False)
    wrapped = aes_key_wrap_with_padding(kek_value, secret)
    m = h.call("unwrap", kek, new, {"alg": "AES", "mode": "KWP", "wrapped_key": wrapped})
    assert m.key_size == 160
    ref = KeyRef(new.kid, "HMAC", 160, None, False)
    mac = h.call("mac", ref, {"alg": "SHA256", "data": b"u"})["mac"]
    assert mac == hmac.new(secret, b"u", "sha256").digest()
    with pytest.raises(BadRequest):
        h.call("export", ref)
    aes_value = os.urandom(16)
    new = h.new("AES")
    wrapped = aes_key_wrap(kek_value, aes_value)
    h.call("unwrap", kek, new, {"alg": "AES", "wrapped_key": wrapped})
    assert h.call("export", KeyRef(new.kid, "AES", 128, None, False)) == aes_value
    with pytest.raises(BadTag):
        h.call("unwrap", kek, h.new("AES"), {"alg": "AES", "wrapped_key": bytes(24)})
    locked = make(h, "AES", 256, exportable=False)
    with pytest.raises(BadRequest):
        h.call("wrap", kek, locked, {"alg": "AES"})


def test_rsa_oaep_wrap(h, rsa_pair):
    private, key = rsa_pair
    value = os.urandom(32)
    subject = make(h, "AES", value=value)
    out = h.call("wrap", key, subject, {"alg": "RSA", "mode": "OAEP"})
    assert private.decrypt(out["wrapped_key"], OAEP_MODES["OAEP_MGF1_SHA1"]) == value
    new = h.new("AES")
    wrapped = private.public_key().encrypt(value, OAEP_MODES["OAEP_MGF1_SHA1"])
    h.call("unwrap", key, new, {"alg": "RSA", "wrapped_key": wrapped})
    assert h.call("export", KeyRef(new.kid, "AES", 256, None, False)) == value


# -- import, export, lifecycle ------------------------------------------------------


def test_import_export_formats(h):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key = make(h, "RSA", value=pem)
    # DSM's export form: PKCS#1 RSAPrivateKey, SEC1 ECPrivateKey (its CLI labels
    # them "RSA/EC PRIVATE KEY"; its Azure plugin reads n at byte 7 of PKCS#1).
    assert h.call("export", key) == traditional(private)
    ec_private = ec.generate_private_key(ec.SECP384R1())
    key = make(h, "EC", value=der(ec_private))
    assert (key.curve, key.key_size) == ("NistP384", 384)
    assert h.call("export", key) == traditional(ec_private)
    # Imported in either form; the traditional one comes back the same.
    again = make(h, "EC", value=traditional(ec_private))
    assert h.call("export", again) == traditional(ec_private)
    spki = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = make(h, "RSA", value=spki)
    assert public.public_only
    assert h.call("export", public) == private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(Unsupported):
        h.call("sign", public, {"hash_alg": "SHA256", "data": b"x"})
    with pytest.raises(BadRequest) as info:
        h.call("import_key", h.new("RSA"), b"not a key")
    assert info.value.code == "invalid_value"
    with pytest.raises(BadRequest):
        h.call("import_key", h.new("EC"), pem)


def test_certificate_import(h):
    import datetime

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "strongroom test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    new = h.new("CERTIFICATE")
    m = h.call("import_key", new, cert.public_bytes(serialization.Encoding.PEM))
    assert (m.obj_type, m.curve, m.key_size, m.public_only) == (
        "CERTIFICATE",
        "NistP256",
        256,
        True,
    )
    ref = KeyRef(new.kid, "CERTIFICATE", 256, "NistP256", False, True)
    assert h.call("export", ref) == cert_der
    sig = private.sign(b"c", ec.ECDSA(hashes.SHA256()))
    req = {"hash_alg": "SHA256", "data": b"c", "signature": sig}
    assert h.call("verify", ref, req)["result"] is True


def test_non_exportable_is_sensitive_in_the_token(h):
    from pkcs11 import Attribute
    from pkcs11.exceptions import AttributeSensitive

    key = make(h, "AES", 256, exportable=False)
    with pytest.raises(BadRequest):
        h.call("export", key)
    core = h.token._core
    entry = core.index[key.kid]

    def read():
        attrs = entry.secret.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE])
        try:
            entry.secret[Attribute.VALUE]
        except AttributeSensitive:
            return attrs, "sensitive"
        return attrs, "readable"

    attrs, verdict = h.run(h.token._worker.call(read))
    assert verdict == "sensitive"
    assert attrs[Attribute.SENSITIVE] is True and attrs[Attribute.EXTRACTABLE] is False


def test_transient_persist_rename_remove(h):
    value = os.urandom(16)
    key = make(h, "AES", value=value, transient=True)
    assert key.kid not in h.token.kids()
    new = h.new("AES", 128)
    m = h.call("persist", key, new)
    assert m.key_size == 128
    stored = KeyRef(new.kid, "AES", 128, None, False)
    assert new.kid in h.token.kids()
    out = h.call("encrypt", stored, {"alg": "AES", "plain": b"p"})
    h.call("rename", stored, "renamed")
    req = {"alg": "AES", "cipher": out["cipher"], "iv": out["iv"], "tag": out["tag"]}
    assert h.call("decrypt", stored, req)["plain"] == b"p"
    assert h.call("export", stored) == value
    h.call("remove", new.kid)
    h.call("remove", new.kid)  # idempotent
    assert new.kid not in h.token.kids()
    with pytest.raises(NotFound):
        h.call("encrypt", stored, {"alg": "AES", "plain": b"p"})


def test_concurrent_requests_share_the_thread(h):
    key = make(h, "AES", 256, exportable=False)

    async def many():
        reqs = [{"alg": "AES", "plain": os.urandom(32)} for _ in range(500)]
        outs = await asyncio.gather(*(h.token.encrypt(key, r) for r in reqs))
        back = await asyncio.gather(
            *(
                h.token.decrypt(
                    key, {"alg": "AES", "cipher": o["cipher"], "iv": o["iv"], "tag": o["tag"]}
                )
                for o in outs
            )
        )
        return [r["plain"] for r in reqs] == [b["plain"] for b in back]

    assert h.run(many())


def test_reopen_sees_stored_keys(h):
    """Last: closes the module's Token and opens a new one on the same token."""
    stored = make(h, "EC", curve="NistP256", exportable=False)
    transient = make(h, "AES", 128, transient=True)
    before = h.token.kids()
    assert stored.kid in before and transient.kid not in before
    h.run(h.token.close())
    with pytest.raises(RuntimeError):
        h.token.kids()
    h.token = h.run(Token.open(h.conf.module, h.conf.label, h.conf.pin))
    assert h.token.kids() == before
    sig = h.call("sign", stored, {"hash_alg": "SHA256", "data": b"again"})["signature"]
    pub(stored).verify(sig, b"again", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(NotFound):
        h.call("encrypt", transient, {"alg": "AES", "plain": b"x"})
