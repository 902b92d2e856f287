"""Objects beyond keys the module generates: certificates (CKO_CERTIFICATE), key import
with C_CreateObject, ECDH with C_DeriveKey; checked with cryptography and pkcs11-tool."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from pkcs11 import KDF, Attribute, CertificateType, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from tests.conftest import unique
from tests.pkcs11.conftest import World, tool_env


def make_cert(cn: str, serial: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Issuer Co")]))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256())
    )


def der_int(v: int) -> bytes:
    body = v.to_bytes((v.bit_length() + 8) // 8, "big")
    return b"\x02" + bytes([len(body)]) + body


def import_cert(world: World, cert: x509.Certificate, pem: bool = False) -> dict[str, Any]:
    enc = serialization.Encoding.PEM if pem else serialization.Encoding.DER
    with world.client() as c:
        return c.request(
            "PUT",
            "/crypto/v1/keys",
            {
                "name": unique("p11-cert"),
                "obj_type": "CERTIFICATE",
                "value": cert.public_bytes(enc),
            },
        )


def test_imported_certificate_is_a_cko_certificate(session: Any, world: World) -> None:
    cert = make_cert("strongroom cert", 0x1234567890ABCDEF)
    der = cert.public_bytes(serialization.Encoding.DER)
    so = import_cert(world, cert)
    (obj,) = session.get_objects(
        {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: so["name"]}
    )
    assert obj[Attribute.CERTIFICATE_TYPE] == CertificateType.X_509
    assert obj[Attribute.ID] == so["kid"].encode()
    assert obj[Attribute.VALUE] == der
    assert obj[Attribute.SUBJECT] == cert.subject.public_bytes()
    assert obj[Attribute.ISSUER] == cert.issuer.public_bytes()
    assert obj[Attribute.SERIAL_NUMBER] == der_int(0x1234567890ABCDEF)
    assert obj[Attribute.TOKEN] is True
    # its public key, under the same CKA_ID
    (pub,) = session.get_objects(
        {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: so["kid"].encode()}
    )
    point = cert.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert pub[Attribute.EC_POINT] == b"\x04" + bytes([len(point)]) + point
    # no private key for a certificate
    assert not list(
        session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: so["kid"].encode()}
        )
    )


def test_certificate_found_by_subject_and_serial(session: Any, world: World) -> None:
    cert = make_cert(unique("by-subject"), 77)
    so = import_cert(world, cert, pem=True)  # PEM in; CKA_VALUE is DER
    found = list(
        session.get_objects(
            {
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.SUBJECT: cert.subject.public_bytes(),
                Attribute.SERIAL_NUMBER: der_int(77),
            }
        )
    )
    assert [o[Attribute.LABEL] for o in found] == [so["name"]]
    assert found[0][Attribute.VALUE] == cert.public_bytes(serialization.Encoding.DER)


def test_pkcs11_tool_reads_certificate(world: World, tmp_path: Path) -> None:
    cert = make_cert("read by pkcs11-tool", 5)
    so = import_cert(world, cert)
    out = tmp_path / "cert.der"
    subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            str(world.module),
            "--login",
            "--pin",
            world.api_key,
            "--read-object",
            "--type",
            "cert",
            "--id",
            so["kid"].encode().hex(),
            "-o",
            str(out),
        ],
        env=tool_env(world),
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert out.read_bytes() == cert.public_bytes(serialization.Encoding.DER)


def test_create_certificate_object(session: Any, world: World) -> None:
    cert = make_cert("created through the module", 9)
    der = cert.public_bytes(serialization.Encoding.DER)
    name = unique("p11-created-cert")
    obj = session.create_object(
        {
            Attribute.CLASS: ObjectClass.CERTIFICATE,
            Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
            Attribute.LABEL: name,
            Attribute.VALUE: der,
        }
    )
    assert obj[Attribute.CLASS] == ObjectClass.CERTIFICATE
    assert obj[Attribute.VALUE] == der
    with world.client() as c:
        (so,) = [k for k in c.request("GET", "/crypto/v1/keys") if k["name"] == name]
        assert so["obj_type"] == "CERTIFICATE"
        assert c.request("POST", "/crypto/v1/keys/export", {"kid": so["kid"]})["value"] == der


# ---------------------------------------------------------------- C_CreateObject: key import


def sobject_named(world: World, name: str) -> dict[str, Any]:
    with world.client() as c:
        (so,) = [k for k in c.request("GET", "/crypto/v1/keys") if k["name"] == name]
        return so


def test_import_rsa_private_key(session: Any, world: World) -> None:
    from pkcs11.util.rsa import decode_rsa_private_key

    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = priv.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    name = unique("p11-imp-rsa")
    attrs = decode_rsa_private_key(der)
    attrs.update({Attribute.LABEL: name, Attribute.SIGN: True, Attribute.DECRYPT: True})
    k = session.create_object(attrs)
    assert k[Attribute.CLASS] == ObjectClass.PRIVATE_KEY
    assert k[Attribute.SENSITIVE] is True  # no CKA_EXTRACTABLE: no EXPORT
    sig = k.sign(b"imported rsa", mechanism=Mechanism.SHA256_RSA_PKCS)
    priv.public_key().verify(sig, b"imported rsa", padding.PKCS1v15(), hashes.SHA256())
    so = sobject_named(world, name)
    assert so["obj_type"] == "RSA" and so["key_size"] == 2048
    assert set(so["key_ops"]) >= {"SIGN", "VERIFY", "DECRYPT", "ENCRYPT"}
    assert "EXPORT" not in so["key_ops"]
    assert so["pub_key"] == priv.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # the public half verifies
    pub = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=name)
    assert pub.verify(b"imported rsa", sig, mechanism=Mechanism.SHA256_RSA_PKCS)


def test_import_rsa_public_key(session: Any, world: World) -> None:
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    nums = priv.public_key().public_numbers()
    name = unique("p11-imp-rsapub")
    k = session.create_object(
        {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.LABEL: name,
            Attribute.MODULUS: nums.n.to_bytes(256, "big"),
            Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: True,
        }
    )
    assert k[Attribute.MODULUS_BITS] == 2048
    sig = priv.sign(b"checked in strongroom", padding.PKCS1v15(), hashes.SHA256())
    assert k.verify(b"checked in strongroom", sig, mechanism=Mechanism.SHA256_RSA_PKCS)
    ct = k.encrypt(b"to the key owner", mechanism=Mechanism.RSA_PKCS)
    assert priv.decrypt(ct, padding.PKCS1v15()) == b"to the key owner"
    assert sobject_named(world, name)["public_only"] is True


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_import_ec_private_and_public(session: Any, world: World, curve: Any) -> None:
    from pkcs11.util.ec import encode_named_curve_parameters

    priv = ec.generate_private_key(curve)
    params = encode_named_curve_parameters(curve.name)
    size = (curve.key_size + 7) // 8
    name = unique("p11-imp-ec")
    k = session.create_object(
        {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.LABEL: name,
            Attribute.EC_PARAMS: params,
            Attribute.VALUE: priv.private_numbers().private_value.to_bytes(size, "big"),
            Attribute.SIGN: True,
            Attribute.EXTRACTABLE: True,
        }
    )
    sig = k.sign(b"imported ec", mechanism=Mechanism.ECDSA_SHA256)
    half = len(sig) // 2
    priv.public_key().verify(
        encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")),
        b"imported ec",
        ec.ECDSA(hashes.SHA256()),
    )
    so = sobject_named(world, name)
    assert "EXPORT" in so["key_ops"]
    assert so["pub_key"] == priv.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # the public key alone, CKA_EC_POINT as DER OCTET STRING
    point = priv.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    pub = session.create_object(
        {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.LABEL: unique("p11-imp-ecpub"),
            Attribute.EC_PARAMS: params,
            Attribute.EC_POINT: b"\x04" + bytes([len(point)]) + point,
            Attribute.VERIFY: True,
        }
    )
    assert pub.verify(b"imported ec", sig, mechanism=Mechanism.ECDSA_SHA256)


def test_import_incomplete_template(session: Any) -> None:
    with pytest.raises(pkcs11.exceptions.TemplateIncomplete):
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                Attribute.KEY_TYPE: KeyType.RSA,
                Attribute.MODULUS: b"\xc0" * 256,
                Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
            }
        )


# ---------------------------------------------------------------- C_DeriveKey: ECDH


def agree_key(
    world: World, curve: str, ops: tuple[str, ...] = ("SIGN", "VERIFY", "AGREEKEY")
) -> tuple[Any, dict[str, Any]]:
    with world.client() as c:
        so = c.request(
            "POST",
            "/crypto/v1/keys",
            {
                "name": unique("p11-ecdh"),
                "obj_type": "EC",
                "elliptic_curve": curve,
                "key_ops": [*ops, "APPMANAGEABLE"],
            },
        )
    return serialization.load_der_public_key(so["pub_key"]), so


@pytest.mark.parametrize(
    ("curve", "pycurve"), [("NistP256", ec.SECP256R1()), ("NistP384", ec.SECP384R1())]
)
def test_ecdh_derive_matches_cryptography(
    session: Any, world: World, curve: str, pycurve: Any
) -> None:
    pub, so = agree_key(world, curve)
    base = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=so["name"])
    peer = ec.generate_private_key(pycurve)
    shared = peer.exchange(ec.ECDH(), pub)
    point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    name = unique("p11-derived")
    derived = base.derive_key(
        KeyType.GENERIC_SECRET,
        len(shared) * 8,
        label=name,
        mechanism_param=(KDF.NULL, None, point),
        template={Attribute.EXTRACTABLE: True, Attribute.TOKEN: True},
    )
    assert derived[Attribute.VALUE] == shared
    assert derived[Attribute.LABEL] == name
    # an AES key of the leading 16 bytes, peer point given as a DER OCTET STRING
    aes = base.derive_key(
        KeyType.AES,
        128,
        mechanism_param=(KDF.NULL, None, b"\x04" + bytes([len(point)]) + point),
        template={Attribute.EXTRACTABLE: True, Attribute.TOKEN: False},
    )
    assert aes[Attribute.VALUE] == shared[:16]
    assert aes[Attribute.TOKEN] is False
    nonce = os.urandom(12)
    ct = aes.encrypt(b"agreed", mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce))
    assert AESGCM(shared[:16]).decrypt(nonce, ct, None) == b"agreed"
    # the peer's transient public key is gone again
    with world.client() as c:
        names = [k["name"] for k in c.request("GET", "/crypto/v1/keys")]
    assert "pkcs11-ecdh-peer" not in names


def test_ecdh_needs_agreekey(session: Any, world: World) -> None:
    _pub, so = agree_key(world, "NistP256", ("SIGN", "DERIVEKEY"))  # CKA_DERIVE, no AGREEKEY
    base = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=so["name"])
    assert base[Attribute.DERIVE] is True
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = peer.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    with pytest.raises(pkcs11.exceptions.PKCS11Error) as e:
        base.derive_key(KeyType.GENERIC_SECRET, 256, mechanism_param=(KDF.NULL, None, point))
    assert "0x68" in str(e.value)  # CKR_KEY_FUNCTION_NOT_PERMITTED (python-pkcs11 has no class)


def test_import_ed25519_private_key(session: Any, world: World) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    priv = ed25519.Ed25519PrivateKey.generate()
    seed = priv.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    name = unique("p11-imp-ed")
    k = session.create_object(
        {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
            Attribute.LABEL: name,
            Attribute.EC_PARAMS: bytes.fromhex("06032b6570"),
            Attribute.VALUE: seed,
            Attribute.SIGN: True,
        }
    )
    sig = k.sign(b"imported ed25519", mechanism=Mechanism.EDDSA)
    priv.public_key().verify(sig, b"imported ed25519")
    assert sobject_named(world, name)["elliptic_curve"] == "Ed25519"
