"""X.509 pieces of DSM's Lua API (issue 11): Oid, X509Name, DerEncoder, IpAddr and
Pkcs10Csr. A CSR built by a plugin and signed by a key in Strongroom is checked
with `openssl req -verify` and parsed by `cryptography`.
"""

from __future__ import annotations

import ipaddress
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from tests.conftest import unique
from tests.daemon.api.helpers import ok, run_lua

CSR_LUA = r"""
local function pem(der, kind)
  local b64, lines = Blob.from_bytes(der):base64(), {}
  for i = 1, #b64, 64 do lines[#lines + 1] = b64:sub(i, i + 63) end
  return '-----BEGIN ' .. kind .. '-----\n' .. table.concat(lines, '\n') .. '\n-----END '
    .. kind .. '-----\n'
end
function run(input)
  local name = X509Name.new()
  name:set(Oid.from_str('CN'), input.cn, 'utf8')
  name:set(Oid.from_str('organizationName'), 'Strongroom', 'utf8')
  name:set(Oid.from_str('2.5.4.6'), 'NL', 'printable')
  local san = DerEncoder.new():start_seq()
  for _, d in ipairs(input.dns) do san = san:implicit_context(2):add_string(d, 'ia5') end
  for _, ip in ipairs(input.ips) do
    san = san:implicit_context(7):add_octets(Blob.from_bytes(IpAddr.new(ip):octets()))
  end
  local b = Pkcs10Csr.builder()
  b:with_hash_alg(input.hash)
  b:with_subject(name)
  b:with_signer_sobject(input.key)
  b:add_extension(Oid.from_str('subjectAlternativeName'), false, san:end_seq():value())
  return pem(b:build():to_der(), 'CERTIFICATE REQUEST')
end
"""


@pytest.mark.parametrize(
    ("spec", "hash_alg"),
    [
        ({"obj_type": "EC", "elliptic_curve": "NistP256"}, "SHA256"),
        ({"obj_type": "RSA", "key_size": 2048}, "SHA384"),
    ],
)
def test_csr_verified_by_openssl(env, tmp_path, spec, hash_alg) -> None:
    admin, g = env
    name = unique("csr")
    key = ok(admin.call("POST", "/crypto/v1/keys", {"name": name, "group_id": g, **spec}))
    pem = run_lua(
        env,
        CSR_LUA,
        {
            "cn": "leaf.example",
            "dns": ["a.example", "b.example"],
            "ips": ["10.0.0.1", "2001:db8::1"],
            "key": name,
            "hash": hash_alg,
        },
    )
    path = tmp_path / "req.pem"
    path.write_text(pem)
    r = subprocess.run(
        ["openssl", "req", "-in", str(path), "-verify", "-noout"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "verify OK" in (r.stdout + r.stderr)
    csr = x509.load_pem_x509_csr(pem.encode())
    assert csr.is_signature_valid
    assert csr.signature_hash_algorithm.name == hash_alg.lower()
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "leaf.example"
    assert csr.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "NL"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example", "b.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.1"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    spki = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert spki == key["pub_key"]


def test_der_encoder_bounds_and_oids(env) -> None:
    out = run_lua(
        env,
        r"""
        function run()
          local r = {}
          local d = DerEncoder.new()
          r.deep = select(2, pcall(function() for _ = 1, 1000 do d:start_seq() end end))
          local open = DerEncoder.new():start_seq()
          r.unbalanced = select(2, pcall(function() return open:value() end))
          r.oid = tostring(Oid.from_str('commonName'))
          r.bad_oid = select(2, pcall(Oid.from_str, 'no such name'))
          r.bad_ip = select(2, pcall(IpAddr.new, '300.1.1.1'))
          r.der = Blob.from_bytes(DerEncoder.new():start_seq():add_oid(Oid.from_str('2.5.4.3'))
            :add_bool(true):add_null():add_integer(BigNum.from_int(128)):end_seq():value()):hex()
          return r
        end""",
    )
    assert "nested more than 64 deep" in out["deep"]
    assert "still open" in out["unbalanced"]
    assert out["oid"] == "2.5.4.3"
    assert "unknown OID" in out["bad_oid"]
    assert "not an IP address" in out["bad_ip"]
    assert out["der"] == "300E06035504030101FF050002020080"
