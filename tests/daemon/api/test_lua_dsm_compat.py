"""Small behaviours of DSM's Lua API that its published plugins rely on (issue 11):
integral floats as indices and lengths (``#s / 2`` is a float in Lua 5.3), a
Blob's bytes through ``blob[1]`` (kvp), an empty ``key_ops`` (tr31), and
encryption with an imported certificate's public key (jws-jwe-encrypt)."""

from __future__ import annotations

import base64
import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.daemon.api.helpers import run_lua


def test_integral_floats_and_blob_index(env) -> None:
    code = r"""
    function run()
      local b = Blob.from_bytes('abcdef')
      local half = #b / 2            -- 3.0, a float
      local ok, e = pcall(function() return b:slice(1.5, 2) end)
      return {
        left = b:slice(1, half):bytes(), right = b:slice(half + 1):bytes(),
        pad = BigNum.from_int(5):to_bytes_be_zero_pad(8 / 2):hex(),
        whole = b[1], other = b[2] == nil, refused = not ok and tostring(e),
      }
    end
    """
    out = run_lua(env, code)
    assert out["left"] == "abc" and out["right"] == "def"
    assert out["pad"] == "00000005"
    assert out["whole"] == "abcdef" and out["other"] is True
    assert "indices must be integers" in out["refused"]


def test_an_empty_key_ops_is_no_operations(env) -> None:
    code = r"""
    function run()
      local k = assert(Sobject.import { obj_type = 'AES', value = Blob.random(16), key_ops = {},
        transient = true })
      local _, e = k:encrypt { plain = Blob.from_bytes('x'), mode = 'CBC' }
      return { n = #k.key_ops, status = e.status }
    end
    """
    assert run_lua(env, code) == {"n": 0, "status": 403}


def test_an_imported_certificate_encrypts_by_default(env) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "recipient")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    code = r"""
    function run(input)
      local c = assert(Sobject.import { obj_type = 'CERTIFICATE', value = input.cert,
        transient = true })
      return assert(c:encrypt { plain = Blob.from_bytes('secret'), mode = 'OAEP_MGF1_SHA256' })
        .cipher
    end
    """
    der = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    cipher = run_lua(env, code, {"cert": der})
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    assert key.decrypt(cipher, oaep) == b"secret"
