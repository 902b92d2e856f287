"""X.509 certificates issued by plugins (issue 11): ``Pkcs10Csr.new`` + ``csr:sign``
(as DSM's x509-ca plugin uses them) and ``TbsCertificate`` (as x509-tbs-ca does).

The CA key lives in Strongroom and signs through the daemon; every certificate
is checked with ``openssl verify`` against the CA certificate and read back
with ``cryptography``.
"""

from __future__ import annotations

import base64
import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import lua_test_run, ok, run_lua

PEM = r"""
local function pem(der)
  local b64, lines = der:base64(), {}
  for i = 1, #b64, 64 do lines[#lines + 1] = b64:sub(i, i + 63) end
  return '-----BEGIN CERTIFICATE-----\n' .. table.concat(lines, '\n')
    .. '\n-----END CERTIFICATE-----\n'
end
local function dn(t)
  local name = X509Name.new()
  for _, kv in ipairs(t) do name:set(Oid.from_str(kv[1]), kv[2], 'utf8') end
  return name
end
"""

CSR_SIGN_LUA = (
    PEM
    + r"""
function run(input)
  assert(Sobject { name = input.subject_key })
  local issuer_cert = assert(Sobject { name = input.issuer_cert })
  local csr = Pkcs10Csr.new(input.subject_key, dn(input.dn))
  local cert = csr:sign(issuer_cert, input.issuer_key, input.lifetime, input.hash)
  return { pem = pem(cert:export().value), obj_type = cert.obj_type, transient = cert.transient }
end
"""
)

TBS_LUA = (
    PEM
    + r"""
function run(input)
  local issuer_cert = assert(Sobject { name = input.issuer_cert })
  local tbs = TbsCertificate.new(input.subject_key, dn(input.dn), input.skid, input.lifetime)
  tbs:add_extension(Oid.from_str('basicConstraints'), true,
    DerEncoder.new():start_seq():end_seq():value()) -- cA FALSE is the DEFAULT: left out (DER)
  tbs:add_extension(Oid.from_str('2.5.29.32'), false, DerEncoder.new():start_seq()
    :start_seq():add_oid(Oid.from_str('1.2.3.4')):end_seq():end_seq():value())
  local cert = tbs:sign(issuer_cert, input.issuer_key, 160, 'SHA256')
  return pem(cert:export().value)
end
"""
)


def _import(admin: Raw, g: str, obj_type: str, der: bytes, **extra) -> str:
    name = unique(obj_type.lower())
    body = {
        "name": name,
        "group_id": g,
        "obj_type": obj_type,
        "value": base64.b64encode(der).decode(),
    }
    ok(admin.call("PUT", "/crypto/v1/keys", {**body, **extra}))
    return name


@pytest.fixture(scope="module", params=["EC", "RSA"])
def ca(request, env, tmp_path_factory):
    """A CA key imported into Strongroom and its self-signed certificate (imported
    with EXPORT, so plugins can read it): (key name, cert name, cert, CA pem path)."""
    admin, g = env
    if request.param == "EC":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"Strongroom test CA {request.param}")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_name = _import(admin, g, request.param, pkcs8, key_ops=["SIGN", "VERIFY"])
    der = cert.public_bytes(serialization.Encoding.DER)
    cert_name = _import(admin, g, "CERTIFICATE", der, key_ops=["VERIFY", "EXPORT"])
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_name, cert_name, cert, path


def _verify(ca_pem: Path, pem: str, tmp_path: Path) -> x509.Certificate:
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(pem)
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_pem), str(leaf)], capture_output=True, text=True
    )
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr
    return x509.load_pem_x509_certificate(pem.encode())


def _subject_key(admin: Raw, g: str) -> tuple[str, bytes]:
    name = unique("leaf")
    key = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {"name": name, "group_id": g, "obj_type": "EC", "elliptic_curve": "NistP256"},
        )
    )
    return name, key["pub_key"]


@pytest.mark.parametrize("hash_alg", [None, "SHA384"])
def test_csr_signed_into_a_certificate(env, ca, tmp_path, hash_alg) -> None:
    admin, g = env
    key_name, cert_name, ca_cert, ca_pem = ca
    leaf, spki = _subject_key(admin, g)
    out = run_lua(
        env,
        CSR_SIGN_LUA,
        {
            "subject_key": leaf,
            "issuer_key": key_name,
            "issuer_cert": cert_name,
            "dn": [["CN", "leaf.example"], ["OU", "A"], ["OU", "B"]],
            "lifetime": 86400,
            "hash": hash_alg,
        },
    )
    assert out["obj_type"] == "CERTIFICATE" and out["transient"] is True
    cert = _verify(ca_pem, out["pem"], tmp_path)
    assert cert.issuer == ca_cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "leaf.example"
    assert [
        a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ] == [
        "A",
        "B",
    ]
    assert (
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == spki
    )
    assert cert.signature_hash_algorithm.name == (hash_alg or "SHA256").lower()
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life == datetime.timedelta(seconds=86400)
    aki = cert.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.version == x509.Version.v3 and cert.serial_number > 0


def test_tbs_certificate_with_extensions(env, ca, tmp_path) -> None:
    admin, g = env
    key_name, cert_name, ca_cert, ca_pem = ca
    leaf, spki = _subject_key(admin, g)
    skid = base64.b64encode(b"twelve bytes").decode()
    pem = run_lua(
        env,
        TBS_LUA,
        {
            "subject_key": leaf,
            "issuer_key": key_name,
            "issuer_cert": cert_name,
            "dn": [["CN", "tbs.example"], ["O", "Strongroom"]],
            "skid": skid,
            "lifetime": 3600,
        },
    )
    cert = _verify(ca_pem, pem, tmp_path)
    assert cert.issuer == ca_cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == (
        b"twelve bytes"
    )
    policies = cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
    assert [p.policy_identifier.dotted_string for p in policies] == ["1.2.3.4"]
    assert cert.serial_number.bit_length() <= 159
    assert (
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == spki
    )


def test_refusals_are_clear(env, ca) -> None:
    admin, g = env
    key_name, cert_name, _ca_cert, _ = ca
    leaf, _ = _subject_key(admin, g)
    hidden = ok(
        admin.call(
            "PUT",
            "/crypto/v1/keys",
            {
                "name": unique("noexport"),
                "group_id": g,
                "obj_type": "CERTIFICATE",
                "key_ops": ["VERIFY"],
                "value": base64.b64encode(
                    _ca_cert.public_bytes(serialization.Encoding.DER)
                ).decode(),
            },
        )
    )["name"]
    code = r"""
    function run(input)
      local function try(f) local ok, e = pcall(f); return ok and 'ok' or tostring(e) end
      local name = X509Name.new():set(Oid.from_str('CN'), 'x')
      local csr = Pkcs10Csr.new(input.leaf, name)
      local cert = Sobject { name = input.cert }
      return {
        no_export = try(function()
          return csr:sign(Sobject { name = input.hidden }, input.key, 1)
        end),
        lifetime = try(function() return csr:sign(cert, input.key, 0) end),
        no_key = try(function() return csr:sign(cert, 'no such key', 60) end),
        bad_csr = try(function() return Pkcs10Csr.from_der(Blob.from_bytes('not der')) end),
        serial = try(function()
          return TbsCertificate.new(input.leaf, name, nil, 60):sign(Sobject { name = input.cert },
            input.key, 4096)
        end),
      }
    end
    """
    out = run_lua(env, code, {"leaf": leaf, "hidden": hidden, "cert": cert_name, "key": key_name})
    assert "give it EXPORT" in out["no_export"] and "EXPORT" in out["no_export"]
    assert "lifetime" in out["lifetime"]
    assert "no such key" in out["no_key"]
    assert "not a readable certificate request" in out["bad_csr"]
    assert "serial_number_bits" in out["serial"]


def test_a_tampered_request_is_not_signed(env, ca) -> None:
    key_name, cert_name, _ca_cert, _ = ca
    admin, g = env
    leaf, _ = _subject_key(admin, g)
    code = r"""
    function run(input)
      local csr = Pkcs10Csr.new(input.leaf, X509Name.new():set(Oid.from_str('CN'), 'honest'))
      local der = csr:to_der()
      local i = string.find(der, 'honest', 1, true)
      local forged = Pkcs10Csr.from_der
      local ok, e = pcall(forged, Blob.from_bytes(der:sub(1, i - 1) .. 'hacker' .. der:sub(i + 6)))
      return tostring(e)
    end
    """
    out = lua_test_run(env, code, {"leaf": leaf, "cert": cert_name, "key": key_name})
    assert out["status"] == 200, out
    assert "does not verify" in out["result"]
