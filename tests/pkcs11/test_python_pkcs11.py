"""python-pkcs11 loading the module: the crypto matrix, results checked with cryptography."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams
from strongroom import Client

from tests.pkcs11.conftest import World


def pub(world: World, role: str) -> Any:
    return serialization.load_der_public_key(world.keys[world.names[role]]["pub_key"])


def key(session: Any, world: World, role: str, cls: ObjectClass) -> Any:
    return session.get_key(object_class=cls, label=world.names[role])


def raw_to_der(sig: bytes) -> bytes:
    half = len(sig) // 2
    return encode_dss_signature(
        int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
    )


def test_info_and_token(p11: Any) -> None:
    assert p11.manufacturer_id == "Strongroom"
    (slot,) = p11.get_slots()
    tok = slot.get_token()
    assert tok.label == "strongroom"
    mechs = slot.get_mechanisms()
    assert Mechanism.SHA256_RSA_PKCS in mechs
    assert Mechanism.AES_GCM in mechs


def test_wrong_pin(p11: Any) -> None:
    tok = p11.get_token(token_label="strongroom")
    with pytest.raises(pkcs11.exceptions.PinIncorrect):
        tok.open(user_pin="bm90OmFrZXk=")


def test_objects_are_the_apps_keys(session: Any, world: World) -> None:
    labels = {o[Attribute.LABEL] for o in session.get_objects()}
    mine = {world.names[r] for r in ("rsa", "ec", "aes", "hmac", "ed", "aes_x")}
    assert mine <= labels
    assert world.names["other"] not in labels


def test_attributes(session: Any, world: World) -> None:
    rsa = key(session, world, "rsa", ObjectClass.PUBLIC_KEY)
    nums = pub(world, "rsa").public_numbers()
    assert int.from_bytes(rsa[Attribute.MODULUS], "big") == nums.n
    assert int.from_bytes(rsa[Attribute.PUBLIC_EXPONENT], "big") == nums.e
    assert rsa[Attribute.MODULUS_BITS] == 2048
    assert rsa[Attribute.ID] == world.kid("rsa").encode()
    priv = key(session, world, "rsa", ObjectClass.PRIVATE_KEY)
    assert priv[Attribute.SENSITIVE] is True
    assert priv[Attribute.EXTRACTABLE] is False
    assert priv[Attribute.SIGN] is True
    assert priv[Attribute.TOKEN] is True
    ecpub = key(session, world, "ec", ObjectClass.PUBLIC_KEY)
    assert ecpub[Attribute.KEY_TYPE] == KeyType.EC
    assert ecpub[Attribute.EC_PARAMS] == bytes.fromhex("06082a8648ce3d030107")
    point = pub(world, "ec").public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert ecpub[Attribute.EC_POINT] == b"\x04" + bytes([len(point)]) + point
    aes = key(session, world, "aes", ObjectClass.SECRET_KEY)
    assert aes[Attribute.VALUE_LEN] == 32
    assert aes[Attribute.ENCRYPT] is True
    assert aes[Attribute.SIGN] is False


def test_non_exportable_value_is_sensitive(session: Any, world: World) -> None:
    aes = key(session, world, "aes", ObjectClass.SECRET_KEY)
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        aes[Attribute.VALUE]


def test_exportable_value(session: Any, world: World) -> None:
    aes = key(session, world, "aes_x", ObjectClass.SECRET_KEY)
    assert aes[Attribute.EXTRACTABLE] is True
    value = aes[Attribute.VALUE]
    assert len(value) == 16
    with world.client() as c:
        out = c.request("POST", "/crypto/v1/keys/export", {"kid": world.kid("aes_x")})
    assert out["value"] == value


@pytest.mark.parametrize(
    ("mech", "h"),
    [
        (Mechanism.SHA256_RSA_PKCS, hashes.SHA256()),
        (Mechanism.SHA384_RSA_PKCS, hashes.SHA384()),
        (Mechanism.SHA512_RSA_PKCS, hashes.SHA512()),
        (Mechanism.SHA1_RSA_PKCS, hashes.SHA1()),
    ],
)
def test_rsa_pkcs1(session: Any, world: World, mech: Mechanism, h: Any) -> None:
    k = key(session, world, "rsa", ObjectClass.PRIVATE_KEY)
    sig = k.sign(b"message", mechanism=mech)
    pub(world, "rsa").verify(sig, b"message", padding.PKCS1v15(), h)
    assert key(session, world, "rsa", ObjectClass.PUBLIC_KEY).verify(
        b"message", sig, mechanism=mech
    )
    assert not key(session, world, "rsa", ObjectClass.PUBLIC_KEY).verify(
        b"other", sig, mechanism=mech
    )


def test_rsa_raw_pkcs_with_digest_info(session: Any, world: World) -> None:
    prefix = bytes.fromhex("3031300d060960864801650304020105000420")
    di = prefix + hashlib.sha256(b"m").digest()
    sig = key(session, world, "rsa", ObjectClass.PRIVATE_KEY).sign(di, mechanism=Mechanism.RSA_PKCS)
    pub(world, "rsa").verify(sig, b"m", padding.PKCS1v15(), hashes.SHA256())


def test_rsa_pss(session: Any, world: World) -> None:
    k = key(session, world, "rsa", ObjectClass.PRIVATE_KEY)
    sig = k.sign(
        b"pss",
        mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
        mechanism_param=(Mechanism.SHA256, pkcs11.MGF.SHA256, 32),
    )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    pub(world, "rsa").verify(sig, b"pss", pss, hashes.SHA256())


@pytest.mark.parametrize(
    ("role", "mech", "h"),
    [
        ("ec", Mechanism.ECDSA_SHA256, hashes.SHA256()),
        ("ec", Mechanism.ECDSA_SHA1, hashes.SHA1()),
        ("ec384", Mechanism.ECDSA_SHA384, hashes.SHA384()),
    ],
)
def test_ecdsa(session: Any, world: World, role: str, mech: Mechanism, h: Any) -> None:
    sig = key(session, world, role, ObjectClass.PRIVATE_KEY).sign(b"ec data", mechanism=mech)
    size = 32 if role == "ec" else 48
    assert len(sig) == 2 * size  # PKCS#11 wants r||s
    pub(world, role).verify(raw_to_der(sig), b"ec data", ec.ECDSA(h))
    assert key(session, world, role, ObjectClass.PUBLIC_KEY).verify(b"ec data", sig, mechanism=mech)


def test_ecdsa_prehashed(session: Any, world: World) -> None:
    digest = hashlib.sha256(b"hashed elsewhere").digest()
    sig = key(session, world, "ec", ObjectClass.PRIVATE_KEY).sign(digest, mechanism=Mechanism.ECDSA)
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    pub(world, "ec").verify(raw_to_der(sig), digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_eddsa(session: Any, world: World) -> None:
    sig = key(session, world, "ed", ObjectClass.PRIVATE_KEY).sign(b"ed", mechanism=Mechanism.EDDSA)
    pub(world, "ed").verify(sig, b"ed")


def test_multipart_sign(session: Any, world: World) -> None:
    k = key(session, world, "rsa", ObjectClass.PRIVATE_KEY)
    sig = k.sign(iter([b"part one, ", b"part two"]), mechanism=Mechanism.SHA256_RSA_PKCS)
    pub(world, "rsa").verify(sig, b"part one, part two", padding.PKCS1v15(), hashes.SHA256())


def test_aes_gcm(session: Any, world: World) -> None:
    k = key(session, world, "aes_x", ObjectClass.SECRET_KEY)
    value = k[Attribute.VALUE]
    nonce, aad = os.urandom(12), b"header"
    ct = k.encrypt(
        b"secret data", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad)
    )
    assert AESGCM(value).decrypt(nonce, ct, aad) == b"secret data"
    ct2 = AESGCM(value).encrypt(nonce, b"from cryptography", aad)
    pt = k.decrypt(ct2, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad))
    assert pt == b"from cryptography"
    bad = ct2[:-1] + bytes([ct2[-1] ^ 1])
    with pytest.raises(pkcs11.exceptions.PKCS11Error):
        k.decrypt(bad, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad))


def test_aes_cbc_pad_and_ecb(session: Any, world: World) -> None:
    from cryptography.hazmat.primitives import padding as sympad
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    k = key(session, world, "aes_x", ObjectClass.SECRET_KEY)
    value = k[Attribute.VALUE]
    iv = os.urandom(16)
    ct = k.encrypt(b"cbc plaintext", mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv)
    d = Cipher(algorithms.AES(value), modes.CBC(iv)).decryptor()
    u = sympad.PKCS7(128).unpadder()
    assert u.update(d.update(ct) + d.finalize()) + u.finalize() == b"cbc plaintext"
    assert k.decrypt(ct, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv) == b"cbc plaintext"
    block = os.urandom(32)
    ct = k.encrypt(block, mechanism=Mechanism.AES_ECB)
    e = Cipher(algorithms.AES(value), modes.ECB()).encryptor()
    assert ct == e.update(block) + e.finalize()
    with pytest.raises(pkcs11.exceptions.DataLenRange):
        k.encrypt(b"not a block", mechanism=Mechanism.AES_ECB)


def test_aes_multipart_encrypt(session: Any, world: World) -> None:
    k = key(session, world, "aes", ObjectClass.SECRET_KEY)
    iv = os.urandom(16)
    chunks = [os.urandom(100), os.urandom(50)]
    ct = b"".join(k.encrypt(iter(chunks), mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv))
    assert k.decrypt(ct, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv) == b"".join(chunks)


def test_rsa_oaep(session: Any, world: World) -> None:
    pubk = key(session, world, "rsa", ObjectClass.PUBLIC_KEY)
    priv = key(session, world, "rsa", ObjectClass.PRIVATE_KEY)
    ct = pub(world, "rsa").encrypt(
        b"oaep",
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )
    param = (Mechanism.SHA256, pkcs11.MGF.SHA256, None)
    assert priv.decrypt(ct, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=param) == b"oaep"
    ct = pubk.encrypt(b"oaep2", mechanism=Mechanism.RSA_PKCS_OAEP)  # SHA-1 default
    assert priv.decrypt(ct, mechanism=Mechanism.RSA_PKCS_OAEP) == b"oaep2"


def test_hmac(session: Any, world: World) -> None:
    k = key(session, world, "hmac", ObjectClass.SECRET_KEY)
    mac = k.sign(b"mac me", mechanism=Mechanism.SHA256_HMAC)
    with world.client() as c:
        out = c.request(
            "POST",
            "/crypto/v1/mac",
            {"key": {"kid": world.kid("hmac")}, "alg": "SHA256", "data": b"mac me"},
        )
    assert mac == out["mac"]
    assert k.verify(b"mac me", mac, mechanism=Mechanism.SHA256_HMAC)
    assert not k.verify(b"mac you", mac, mechanism=Mechanism.SHA256_HMAC)


def test_digest(session: Any) -> None:
    assert session.digest(b"abc", mechanism=Mechanism.SHA256) == hashlib.sha256(b"abc").digest()
    parts = iter([b"a", b"bc"])
    assert session.digest(parts, mechanism=Mechanism.SHA512) == hashlib.sha512(b"abc").digest()


def test_random(session: Any) -> None:
    assert len(session.generate_random(256)) == 32


def test_missing_key_op(session: Any, world: World) -> None:
    k = key(session, world, "verify_only", ObjectClass.PRIVATE_KEY)
    assert k[Attribute.SIGN] is False  # python-pkcs11 refuses to try; pkcs11-tool tries (its test)
    rsa = key(session, world, "rsa", ObjectClass.PRIVATE_KEY)
    with pytest.raises(pkcs11.exceptions.KeyTypeInconsistent):
        rsa.sign(b"x", mechanism=Mechanism.SHA256_HMAC)


def test_key_ops_narrowed_meanwhile(session: Any, world: World) -> None:
    """The daemon decides: a key_op taken away after the object list was read is refused."""
    with world.client() as c:
        name = f"narrow-{os.urandom(4).hex()}"
        so = c.request(
            "POST",
            "/crypto/v1/keys",
            {"name": name, "obj_type": "EC", "elliptic_curve": "NistP256"},
        )
        k = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=name)
        k.sign(b"ok", mechanism=Mechanism.ECDSA_SHA256)
        c.request("PATCH", f"/crypto/v1/keys/{so['kid']}", {"key_ops": ["VERIFY"]})
        with pytest.raises(pkcs11.exceptions.PKCS11Error) as info:
            k.sign(b"no longer", mechanism=Mechanism.ECDSA_SHA256)
        assert "KeyFunctionNotPermitted" in type(info.value).__name__ or "0x68" in repr(info.value)


def test_generate_keys_and_destroy(session: Any, world: World) -> None:
    label = f"gen-{os.urandom(4).hex()}"
    aes = session.generate_key(KeyType.AES, 256, label=label, store=True)
    assert aes[Attribute.LABEL] == label
    nonce = os.urandom(12)
    ct = aes.encrypt(b"x", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce))
    assert aes.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce)) == b"x"
    with world.client() as c:
        info = c.request("POST", "/crypto/v1/keys/info", {"name": label})
    assert info["transient"] is False
    assert "EXPORT" not in info["key_ops"]
    aes.destroy()
    with world.client() as c, pytest.raises(Exception, match=r"not_found|no such key"):
        c.request("POST", "/crypto/v1/keys/info", {"name": label})


def test_generate_keypairs(session: Any, world: World) -> None:
    from pkcs11.util.ec import encode_named_curve_parameters

    label = f"genpair-{os.urandom(4).hex()}"
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
    )
    pubk, priv = params.generate_keypair(store=True, label=label)
    sig = priv.sign(b"new", mechanism=Mechanism.ECDSA_SHA256)
    assert pubk.verify(b"new", sig, mechanism=Mechanism.ECDSA_SHA256)
    pubk, priv = session.generate_keypair(KeyType.RSA, 2048, store=True, label=label + "-rsa")
    sig = priv.sign(b"new", mechanism=Mechanism.SHA256_RSA_PKCS)
    der = pubk[Attribute.MODULUS]
    assert len(der) == 256
    assert pubk.verify(b"new", sig, mechanism=Mechanism.SHA256_RSA_PKCS)
    priv.destroy()


def test_session_key_is_transient(session: Any, world: World) -> None:
    label = f"tr-{os.urandom(4).hex()}"
    k = session.generate_key(KeyType.AES, 128, label=label, store=False)
    assert k[Attribute.TOKEN] is False
    ct = k.encrypt(b"t" * 16, mechanism=Mechanism.AES_ECB)
    assert k.decrypt(ct, mechanism=Mechanism.AES_ECB) == b"t" * 16
    with world.client() as c, pytest.raises(Exception, match=r"not_found|no such key"):
        c.request("POST", "/crypto/v1/keys/info", {"name": label})


def test_create_secret_and_set_label(session: Any, world: World) -> None:
    value = os.urandom(32)
    label = f"imp-{os.urandom(4).hex()}"
    k = session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: value,
            Attribute.LABEL: label,
            Attribute.TOKEN: True,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
        }
    )
    nonce = os.urandom(12)
    ct = k.encrypt(b"imported", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce))
    assert AESGCM(value).decrypt(nonce, ct, None) == b"imported"
    k[Attribute.LABEL] = label + "-renamed"
    with world.client() as c:
        info = c.request("POST", "/crypto/v1/keys/info", {"name": label + "-renamed"})
    assert sorted(info["key_ops"]) == ["APPMANAGEABLE", "DECRYPT", "ENCRYPT"]
    k.destroy()


def test_wrap_unwrap(session: Any, world: World) -> None:
    kek = session.generate_key(
        KeyType.AES, 256, store=False, template={Attribute.WRAP: True, Attribute.UNWRAP: True}
    )
    subject = session.generate_key(
        KeyType.AES, 128, store=False, template={Attribute.EXTRACTABLE: True}
    )
    wrapped = kek.wrap_key(subject, mechanism=Mechanism.AES_KEY_WRAP)
    assert len(wrapped) == 24
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

    del aes_key_unwrap
    new = kek.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.AES,
        wrapped,
        mechanism=Mechanism.AES_KEY_WRAP,
        store=False,
        template={Attribute.EXTRACTABLE: True},
    )
    assert new[Attribute.VALUE] == subject[Attribute.VALUE]


def test_threads_sign_at_once(p11: Any, world: World, session: Any) -> None:
    # Login is the application's (PKCS#11 2.40 5.6): `session` holds it, and each
    # thread opens its own session, which shares it.
    tok = p11.get_token(token_label="strongroom")
    verifier = pub(world, "ec")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with tok.open() as s:
                k = key(s, world, "ec", ObjectClass.PRIVATE_KEY)
                for j in range(20):
                    msg = f"{i}-{j}".encode()
                    sig = k.sign(msg, mechanism=Mechanism.ECDSA_SHA256)
                    verifier.verify(raw_to_der(sig), msg, ec.ECDSA(hashes.SHA256()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_audit_shows_the_app(session: Any, world: World) -> None:
    k = key(session, world, "ec", ObjectClass.PRIVATE_KEY)
    k.sign(b"audited", mechanism=Mechanism.ECDSA_SHA256)
    app_id = base64.b64decode(world.api_key).decode().split(":", 1)[0]
    with Client(world.daemon.socket, world.daemon.admin_key) as admin:
        logs = admin.request(
            "GET", "/sys/v1/logs", {"object_id": world.kid("ec"), "actor_id": app_id, "limit": 1000}
        )
    records = logs["records"] if isinstance(logs, dict) else logs
    assert any("sign" in r["action"] and r["actor_kind"] == "app" for r in records), records[-3:]
