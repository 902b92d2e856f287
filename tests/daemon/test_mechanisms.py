"""strongroomd.mechanisms: request meaning, OAEP, encodings; no token."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from strongroomd import mechanisms as mech
from strongroomd.errors import BadRequest, BadTag, Unsupported


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _raw_private(key, data: bytes) -> bytes:
    n = key.private_numbers()
    k = key.key_size // 8
    return pow(int.from_bytes(data, "big"), n.d, n.public_numbers.n).to_bytes(k, "big")


def _raw_public(key, data: bytes) -> bytes:
    n = key.public_key().public_numbers()
    k = key.key_size // 8
    return pow(int.from_bytes(data, "big"), n.e, n.n).to_bytes(k, "big")


def _oaep(name: str):
    h = {"SHA1": hashes.SHA1(), "SHA256": hashes.SHA256()}[name]
    return padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)


@pytest.mark.parametrize("name", ["SHA1", "SHA256"])
@pytest.mark.parametrize("size", [0, 1, 31, 190])
def test_oaep_decode_of_cryptography_ciphertexts(rsa_key, name, size):
    if name == "SHA1":
        size = min(size, 214)
    message = bytes(range(size % 256))[:size] if size < 256 else b"a" * size
    cipher = rsa_key.public_key().encrypt(message, _oaep(name))
    assert mech.oaep_decode(_raw_private(rsa_key, cipher), 256, name) == message


@pytest.mark.parametrize("name", ["SHA1", "SHA256"])
def test_oaep_encode_decrypts_with_cryptography(rsa_key, name):
    em = mech.oaep_encode(b"secret message", 256, name)
    assert len(em) == 256 and em[0] == 0
    cipher = _raw_public(rsa_key, em)
    assert rsa_key.decrypt(cipher, _oaep(name)) == b"secret message"


def test_oaep_rejects_tampering_and_wrong_hash(rsa_key):
    cipher = rsa_key.public_key().encrypt(b"hello", _oaep("SHA256"))
    em = bytearray(_raw_private(rsa_key, cipher))
    with pytest.raises(BadTag):
        mech.oaep_decode(bytes(em), 256, "SHA1")
    for pos in (0, 5, 40, 255):
        bad = bytearray(em)
        bad[pos] ^= 1
        with pytest.raises(BadTag):
            mech.oaep_decode(bytes(bad), 256, "SHA256")
    with pytest.raises(BadTag):
        mech.oaep_decode(bytes(256), 256, "SHA256")
    with pytest.raises(BadRequest):
        mech.oaep_encode(b"x" * 191, 256, "SHA256")


def test_cipher_spec_defaults_and_errors():
    s = mech.cipher_spec("AES", {"alg": "AES", "plain": b"x"}, decrypt=False)
    assert (s.kind, len(s.iv), s.tag_bits, s.return_iv) == ("AES_GCM", 12, 128, True)
    s = mech.cipher_spec("DES3", {"alg": "DES3", "plain": b"x"}, decrypt=False)
    assert (s.kind, len(s.iv)) == ("DES3_CBC", 8)
    s = mech.cipher_spec("AES", {"alg": "AES", "plain": b"x" * 16, "mode": "ECB"}, decrypt=False)
    assert (s.kind, s.iv, s.return_iv) == ("AES_ECB", None, False)
    s = mech.cipher_spec("AES", {"alg": "AES", "plain": b"", "tag_len": 96}, decrypt=False)
    assert s.tag_bits == 96

    def code(exc, req, obj="AES", decrypt=False):
        with pytest.raises(exc) as info:
            mech.cipher_spec(obj, req, decrypt=decrypt)
        return info.value.code

    assert code(Unsupported, {"alg": "DES3", "plain": b""}) == "unsupported_algorithm"
    assert code(Unsupported, {"alg": "AES", "plain": b"", "mode": "OFB"}) == "unsupported_algorithm"
    assert code(Unsupported, {"alg": "DES3", "plain": b"", "mode": "GCM"}, "DES3")
    assert code(BadRequest, {"alg": "AES", "plain": b"", "iv": b"1" * 16}) == "invalid_value"
    assert code(BadRequest, {"alg": "AES", "plain": b"", "tag_len": 64}) == "invalid_value"
    assert code(BadRequest, {"alg": "AES", "plain": b"", "tag_len": 16}) == "invalid_value"
    assert code(BadRequest, {"alg": "AES", "plain": b"x", "mode": "ECB"}) == "invalid_value"
    req = {"alg": "AES", "plain": b"x" * 15, "mode": "CBCNOPAD"}
    assert code(BadRequest, req) == "invalid_value"
    req = {"alg": "AES", "cipher": b"x", "mode": "CBC", "iv": b"1" * 16}
    assert code(BadTag, req, decrypt=True) == "bad_tag"
    assert code(BadRequest, {"alg": "AES", "cipher": b"x"}, decrypt=True) == "invalid_value"
    req = {"alg": "AES", "plain": b"", "mode": "CTR", "ad": b"x"}
    assert code(BadRequest, req) == "invalid_field"


def test_key_sizes():
    assert mech.check_key_size("AES", 192) == 192
    assert mech.check_key_size("DES3", 192) == 168
    assert mech.check_key_size("HMAC", 112) == 112
    for obj, size in [("AES", 512), ("RSA", 1024), ("HMAC", 104), ("HMAC", 121), ("AES", None)]:
        with pytest.raises(BadRequest) as info:
            mech.check_key_size(obj, size)
        assert info.value.code == "invalid_key_size"
    with pytest.raises(BadRequest):
        mech.check_value_size("AES", b"x" * 15)
    with pytest.raises(BadRequest):
        mech.check_value_size("HMAC", b"x" * 13)


@pytest.mark.parametrize("size", [14, 20, 32, 63, 64, 100])
def test_hmac_padding_gives_the_same_mac(size):
    key = bytes(range(1, size + 1))
    padded = mech.hmac_token_value(key)
    assert len(padded) >= 64
    for name in ("sha1", "sha256", "sha384", "sha512"):
        assert hmac.new(key, b"msg", name).digest() == hmac.new(padded, b"msg", name).digest()


def test_rsa_modes():
    assert mech.rsa_encrypt_mode(None) == mech.RsaMode("OAEP", "SHA1")
    assert mech.rsa_encrypt_mode("OAEP_MGF1_SHA256") == mech.RsaMode("OAEP", "SHA256")
    mode = {"OAEP": {"mgf": {"mgf1": {"hash": "SHA256"}}}}
    assert mech.rsa_encrypt_mode(mode) == mech.RsaMode("OAEP", "SHA256")
    assert mech.rsa_encrypt_mode({"PKCS1_V15": {}}).kind == "PKCS1_V15"
    assert mech.rsa_encrypt_mode("PKCS1_V15").kind == "PKCS1_V15"
    with pytest.raises(Unsupported):
        mech.rsa_encrypt_mode("RAW")
    # Every DSM CryptMode OAEP hash (SHA-384/512 since DSM's SDK sends them).
    mode = {"OAEP": {"mgf": {"mgf1": {"hash": "SHA512"}}}}
    assert mech.rsa_encrypt_mode(mode) == mech.RsaMode("OAEP", "SHA512")
    assert mech.rsa_encrypt_mode("OAEP_MGF1_SHA384") == mech.RsaMode("OAEP", "SHA384")
    with pytest.raises(Unsupported):
        mech.rsa_encrypt_mode("OAEP_MGF1_MD5")
    with pytest.raises(Unsupported):
        mech.rsa_encrypt_mode({"OAEP": {"mgf": {"mgf1": {"hash": "MD5"}}}})
    with pytest.raises(BadRequest):
        mech.rsa_encrypt_mode({"OAEP": {"mgf": {"other": {}}}})


def test_sign_spec():
    s = mech.sign_spec("RSA", None, {"hash_alg": "SHA256", "data": b"abc"})
    assert (s.kind, s.message) == ("PKCS1_V15", hashlib.sha256(b"abc").digest())
    pss = {"PSS": {"mgf": {"mgf1": {"hash": "SHA1"}}}}
    s = mech.sign_spec("RSA", None, {"hash_alg": "SHA384", "hash": b"h" * 48, "mode": pss})
    assert (s.kind, s.hash, s.mgf_hash, s.message) == ("PSS", "SHA384", "SHA1", b"h" * 48)
    s = mech.sign_spec("EC", "Ed25519", {"hash_alg": "SHA512", "data": b"abc"})
    assert (s.kind, s.message) == ("EDDSA", b"abc")
    with pytest.raises(BadRequest):
        mech.sign_spec("RSA", None, {"hash_alg": "SHA256", "hash": b"short"})
    with pytest.raises(BadRequest):
        mech.sign_spec("RSA", None, {"hash_alg": "SHA256", "hash": b"h" * 32, "data": b""})
    with pytest.raises(Unsupported):
        mech.sign_spec("RSA", None, {"hash_alg": "MD5", "data": b""})
    with pytest.raises(Unsupported):
        mech.sign_spec("EC", "NistP256", {"hash_alg": "SHA256", "data": b"", "mode": "PSS"})


def test_ecdsa_encodings():
    raw = (300).to_bytes(32, "big") + (7).to_bytes(32, "big")
    der = mech.ecdsa_raw_to_der(raw)
    assert mech.ecdsa_der_to_raw(der, 32) == raw
    assert mech.ecdsa_der_to_raw(b"\x30\x00junk", 32) is None
    assert mech.ecdsa_der_to_raw(mech.ecdsa_raw_to_der(raw), 1) is None


def test_digest_and_mac_alg():
    assert mech.digest({"alg": "SHA384", "data": b"x"}) == {"digest": hashlib.sha384(b"x").digest()}
    with pytest.raises(Unsupported):
        mech.digest({"alg": "MD5", "data": b"x"})
    assert mech.mac_alg("HMAC", "sha256") == "SHA256"
    assert mech.mac_alg("AES", "CMAC") == "CMAC"
    with pytest.raises(Unsupported):
        mech.mac_alg("AES", "SHA256")
    with pytest.raises(Unsupported):
        mech.mac_alg("RSA", "SHA256")
    assert mech.wrap_mode("AES", {"alg": "AES"}) == "KW"
    assert mech.wrap_mode("AES", {"alg": "AES", "mode": "KWP"}) == "KWP"
    with pytest.raises(Unsupported):
        mech.wrap_mode("AES", {"alg": "RSA"})
