"""Objects beyond keys the module generates: certificates (CKO_CERTIFICATE), key import
with C_CreateObject, ECDH with C_DeriveKey; checked with cryptography and pkcs11-tool."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, CertificateType, ObjectClass

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
