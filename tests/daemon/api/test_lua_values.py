"""DSM's value APIs added for published plugins (issue 11): base58, RIPEMD160, Time
arithmetic and strftime, json.decode of a Blob, BigNum, EcGroup/EcPoint and
Sobject:rsa_public_info. Every result is checked independently: published test
vectors, Python integers, `cryptography`, `ssh-keygen`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import random
import struct
import subprocess

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import unique
from tests.daemon.api.helpers import ok, run_lua

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    s = ""
    while n:
        n, r = divmod(n, 58)
        s = B58[r] + s
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + s


def test_base58_known_vectors_and_round_trip(env) -> None:
    # Vectors from the Base58 draft (draft-msporny-base58) and Bitcoin Core's base58 tests.
    vectors = [
        ("", ""),
        ("61", "2g"),
        ("626262", "a3gV"),
        ("636363", "aPEr"),
        ("73696d706c792061206c6f6e6720737472696e67", "2cFupjhnEsSn59qHXstmK2ffpLv2"),
        (
            "00eb15231dfceb60925886b67d065299925915aeb172c06647",
            "1NS17iag9jJgTHD1VXjvLCEnZuQ3rJDE9L",
        ),
        ("516b6fcd0f", "ABnLTmg"),
        ("00000000000000000000", "1111111111"),
        ("48656c6c6f20576f726c6421", "2NEpo7TZRRrLZSi2U"),
    ]
    rnd = [random.randbytes(n) for n in (1, 5, 32, 78)] + [b"\0\0" + random.randbytes(20)]
    out = run_lua(
        env,
        """
        function run(input)
          local enc, dec = {}, {}
          for i, v in ipairs(input.hex) do
            enc[i] = Blob.from_hex(v):base58()
            dec[i] = Blob.from_base58(enc[i]):hex()
          end
          for i, v in ipairs(input.b58) do input.b58[i] = Blob.from_base58(v):hex() end
          local bad, err = pcall(Blob.from_base58, "0OIl")
          return {enc = enc, dec = dec, b58 = input.b58, bad = bad, err = err}
        end""",
        {"hex": [h for h, _ in vectors] + [r.hex() for r in rnd], "b58": [b for _, b in vectors]},
    )
    want = [b for _, b in vectors] + [b58(r) for r in rnd]
    assert out["enc"] == want
    assert [d.lower() for d in out["dec"]] == [h for h, _ in vectors] + [r.hex() for r in rnd]
    assert [d.lower() for d in out["b58"]] == [h for h, _ in vectors]
    assert out["bad"] is False and "base58" in out["err"]


def test_ripemd160_known_vectors(env) -> None:
    # The RIPEMD-160 authors' published test vectors.
    vectors = {
        "": "9c1185a5c5e9fc54612808977ee8f548b2258d31",
        "a": "0bdc9d2d256b3ee9daae347be6f4dc835a467ffe",
        "abc": "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc",
        "message digest": "5d0689ef49d2fae572b881b123a85ffa21595f36",
        "12345678901234567890123456789012345678901234567890123456789012345678901234567890": (
            "9b752e45573d4b39f4dbd3323cab82bf63326bfb"
        ),
    }
    out = run_lua(
        env,
        """
        function run(input)
          local r = {}
          for i, s in ipairs(input) do
            r[i] = assert(digest{alg = 'RIPEMD160', data = Blob.from_bytes(s)}).digest:hex()
          end
          -- HASH160, as the wallet plugins use it
          local sha = assert(digest{alg = 'SHA256', data = Blob.from_bytes('abc')}).digest
          r[#r + 1] = assert(digest{alg = 'RIPEMD160', data = sha}).digest:hex()
          return r
        end""",
        list(vectors),
    )
    assert [h.lower() for h in out[:-1]] == list(vectors.values())
    assert out[-1].lower() == hashlib.new("ripemd160", hashlib.sha256(b"abc").digest()).hexdigest()


def test_time_arithmetic_fmt_and_json_decode_of_a_blob(env) -> None:
    out = run_lua(
        env,
        """
        function run()
          local t = Time.at(1700000000)
          local later = t + 90
          local earlier = 60 + t - 120
          return {fmt = later:fmt('%Y-%m-%dT%H:%M:%SZ'), iso = earlier:to_iso8601(),
                  diff = later - t, day = t:fmt('%A %d %B %Y'),
                  json = json.decode(Blob.from_bytes('{"a": [1, 2], "b": "x"}')),
                  cmp = earlier < later}
        end""",
    )
    base = datetime.datetime.fromtimestamp(1700000000, datetime.UTC)
    assert out["fmt"] == (base + datetime.timedelta(seconds=90)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert out["iso"] == (base - datetime.timedelta(seconds=60)).strftime("%Y%m%dT%H%M%SZ")
    assert out["diff"] == 90 and out["cmp"] is True
    assert out["day"] == base.strftime("%A %d %B %Y")
    assert out["json"] == {"a": [1, 2], "b": "x"}


BIGNUM_LUA = """
function run(input)
  local r = {}
  for i, c in ipairs(input) do
    local a = BigNum.from_bytes_be(Blob.from_hex(c.a))
    local b = BigNum.from_bytes_be(Blob.from_hex(c.b))
    local m = BigNum.from_bytes_be(Blob.from_hex(c.m))
    local inplace = a:copy()
    inplace:add(b)
    inplace:mod(m)
    r[i] = {
      add = (a + b):to_bytes_be():hex(), sub = tostring(a - b), mul = (a * b):to_bytes_be():hex(),
      div = tostring(a / b), mod = (a % b):to_bytes_be():hex(), lt = a < b, le = a <= b,
      eq = a == a:copy(), inplace = inplace:to_bytes_be_zero_pad(512):hex(),
      modexp = a:mod_exp(b, m):to_bytes_be():hex(), bits = a:bits(),
      int = (BigNum.from_int(c.i) + 1):to_int(), neg = tostring(-a),
    }
  end
  return r
end"""


def test_bignum_against_python_integers(env) -> None:
    rng = random.Random(11)
    cases = []
    for bits in (8, 64, 255, 256, 521, 2048, 4096):
        a, b, m = (rng.getrandbits(bits) | 1 for _ in range(3))
        cases.append({"a": a, "b": b, "m": m, "i": rng.randrange(-(2**40), 2**40)})

    def even_hex(v: int) -> str:
        return f"{v:x}".zfill(2 * ((v.bit_length() + 7) // 8))

    body = [
        {**c, "a": even_hex(c["a"]), "b": even_hex(c["b"]), "m": even_hex(c["m"])} for c in cases
    ]
    out = run_lua(env, BIGNUM_LUA, body)
    for c, r in zip(cases, out, strict=True):
        a, b, m = c["a"], c["b"], c["m"]

        def h(v: int) -> str:
            return f"{v:x}".zfill(2 * max(1, (v.bit_length() + 7) // 8)).upper()

        assert r["add"] == h(a + b)
        assert int(r["sub"]) == a - b
        assert r["mul"] == h(a * b)
        assert int(r["div"]) == a // b
        assert r["mod"] == h(a % b)
        assert (r["lt"], r["le"], r["eq"]) == (a < b, a <= b, True)
        assert r["inplace"] == f"{(a + b) % m:01024x}".upper()
        assert r["modexp"] == h(pow(a, b, m))
        assert r["bits"] == a.bit_length()
        assert r["int"] == c["i"] + 1
        assert int(r["neg"]) == -a


def test_bignum_refuses_huge_numbers_and_the_worker_goes_on(env) -> None:
    out = run_lua(
        env,
        """
        function run()
          local r = {}
          local big = Blob.from_bytes(string.rep('\\255', 2049))
          r.from = select(2, pcall(BigNum.from_bytes_be, big))
          local max = BigNum.from_bytes_be(Blob.from_bytes(string.rep('\\255', 2048)))
          r.mul = select(2, pcall(function() return max * max end))
          r.pad = select(2, pcall(function() return max:to_bytes_be_zero_pad(4) end))
          r.zero = select(2, pcall(function() return max / BigNum.from_int(0) end))
          -- repeated squaring stops at the limit instead of growing without bound
          local x = BigNum.from_int(3)
          r.grow = select(2, pcall(function() for _ = 1, 30 do x = x * x end end))
          r.ok = (max:bits() == 16384)
          return r
        end""",
    )
    assert "at most 2048 bytes (16384 bits)" in out["from"]
    assert "more than 16384 bits" in out["mul"]
    assert "more than 16384 bits" in out["grow"]
    assert "needs 2048 bytes" in out["pad"]
    assert "division by zero" in out["zero"]
    assert out["ok"] is True


def test_ec_generator_multiplication_against_cryptography(env) -> None:
    scalars = [1, 2, random.getrandbits(256) % (2**255)]
    out = run_lua(
        env,
        """
        function run(input)
          local r = {points = {}}
          for _, curve in ipairs({'SecP256K1', 'NistP256'}) do
            local g = EcGroup.from_name(curve)
            for i, k in ipairs(input) do
              local p = g:generator():mul(BigNum.from_bytes_be(Blob.from_hex(k)))
              r.points[#r.points + 1] = {c = p:to_binary(), u = p:to_binary(false)}
            end
          end
          local g = EcGroup.from_name('SecP256K1')
          local q = g:generator():mul(BigNum.from_int(5))
          r.refused = select(2, pcall(function() return q:mul(BigNum.from_int(2)) end))
          r.unknown = select(2, pcall(EcGroup.from_name, 'brainpool'))
          return r
        end""",
        [f"{k:064x}" for k in scalars],
    )
    i = 0
    for curve in (ec.SECP256K1(), ec.SECP256R1()):
        for k in scalars:
            pub = ec.derive_private_key(k, curve).public_key()
            r = out["points"][i]
            assert r["u"] == pub.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
            assert r["c"] == pub.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
            i += 1
    assert "only the group's generator" in out["refused"]
    assert "unknown curve" in out["unknown"]


SSH_CA_LUA = r"""
-- An SSH user certificate (PROTOCOL.certkeys) signed by an RSA key in Strongroom,
-- as DSM's ssh-ca plugin makes one: the CA's public numbers from rsa_public_info.
local function mpint(n)
  local b = n:to_bytes_be()
  if string.byte(b:slice(1, 1):bytes()) & 0x80 ~= 0 then b = Blob.from_hex('00') .. b end
  return string.pack('>s4', b:bytes())
end
function run(input)
  local ca = assert(Sobject{name = input.ca})
  local info = assert(ca:rsa_public_info())
  local ca_pub = string.pack('>s4', 'ssh-rsa') .. mpint(info.public_exponent)
    .. mpint(info.public_modulus)
  local user = Blob.from_base64(input.pubkey):bytes()
  local _, pos = string.unpack('>s4', user)
  local e, n
  e, pos = string.unpack('>s4', user, pos)
  n, pos = string.unpack('>s4', user, pos)
  local now = Time.now_insecure()
  local ext = string.pack('>s4s4', 'permit-pty', '')
  local body = string.pack('>s4s4s4s4I8I4s4s4I8I8s4s4s4s4',
    'ssh-rsa-cert-v01@openssh.com', Blob.random(16):bytes(), e, n, 7, 1, 'key-1',
    string.pack('>s4', 'alice'), now:unix_epoch_seconds() - 60, (now + 3600):unix_epoch_seconds(),
    '', ext, '', ca_pub)
  local sig = assert(ca:sign{data = Blob.from_bytes(body), hash_alg = 'SHA256'}).signature
  local cert = body .. string.pack('>s4', string.pack('>s4s4', 'rsa-sha2-256', sig:bytes()))
  return {line = 'ssh-rsa-cert-v01@openssh.com ' .. Blob.from_bytes(cert):base64(),
          e = tostring(info.public_exponent), n = info.public_modulus:to_bytes_be()}
end
"""


def test_rsa_public_info_and_an_ssh_certificate_checked_by_ssh_keygen(env, tmp_path) -> None:
    admin, g = env
    name = unique("ssh-ca")
    key = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {"name": name, "obj_type": "RSA", "key_size": 2048, "group_id": g},
        )
    )
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(tmp_path / "id")],
        check=True,
    )
    pub_line = (tmp_path / "id.pub").read_text().split()
    out = run_lua(env, SSH_CA_LUA, {"ca": name, "pubkey": pub_line[1]})
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    ca_pub = load_der_public_key(key["pub_key"])
    assert isinstance(ca_pub, rsa.RSAPublicKey)
    nums = ca_pub.public_numbers()
    assert int(out["e"]) == nums.e and int.from_bytes(out["n"], "big") == nums.n
    (tmp_path / "id-cert.pub").write_text(out["line"] + "\n")
    shown = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(tmp_path / "id-cert.pub")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "Type: ssh-rsa-cert-v01@openssh.com user certificate" in shown
    assert "alice" in shown and "permit-pty" in shown and "rsa-sha2-256" in shown
    # The signature verifies with the CA's public key (ssh-keygen -L does not check it).
    cert = base64.b64decode(out["line"].split()[1])
    pos, fields = 0, []
    fmt = ["s", "s", "s", "s", "Q", "I", "s", "s", "Q", "Q", "s", "s", "s", "s"]
    for f in fmt:
        if f == "s":
            (ln,) = struct.unpack_from(">I", cert, pos)
            fields.append(cert[pos + 4 : pos + 4 + ln])
            pos += 4 + ln
        else:
            size = 8 if f == "Q" else 4
            fields.append(int.from_bytes(cert[pos : pos + size], "big"))
            pos += size
    signed, sig_blob = cert[:pos], cert[pos + 4 :]
    (ln,) = struct.unpack_from(">I", sig_blob, 0)
    assert sig_blob[4 : 4 + ln] == b"rsa-sha2-256"
    sig = sig_blob[8 + ln :]
    ca_pub.verify(sig, signed, padding.PKCS1v15(), hashes.SHA256())


BIP32_LUA = r"""
-- BIP32 private derivation written the way DSM's wallet plugins do it: HMAC-SHA512
-- by a transient HMAC key, BigNum for the scalar, EcGroup for public points,
-- RIPEMD160 for fingerprints, base58 for serialization.
local N = BigNum.from_bytes_be(Blob.from_hex(
  'FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141'))
local function point(k)
  return EcGroup.from_name('SecP256K1'):generator():mul(BigNum.from_bytes_be(k)):to_binary()
end
local function hash160(b)
  local sha = assert(digest{alg = 'SHA256', data = b}).digest
  return assert(digest{alg = 'RIPEMD160', data = sha}).digest
end
local function checked(b)
  local c = assert(digest{alg = 'SHA256', data = assert(digest{alg = 'SHA256', data = b}).digest})
  return (b .. c.digest:slice(1, 4)):base58()
end
local function hmac512(key, data)
  local k = assert(Sobject.import{obj_type = 'HMAC', value = key, transient = true})
  return assert(k:mac{alg = 'SHA512', data = data}).digest
end
function run(input)
  local raw = Blob.from_base58(input.xprv)
  local chain, key = raw:slice(14, 45), raw:slice(47, 78)
  local depth, fpr, index = 0, Blob.from_hex('00000000'), Blob.from_hex('00000000')
  for step in string.gmatch(input.path, '[^/]+') do
    if step ~= 'm' then
      local hard = step:sub(-1) == 'H'
      local i = tonumber(hard and step:sub(1, -2) or step) + (hard and 0x80000000 or 0)
      index = Blob.from_bytes(string.pack('>I4', i))
      local data = hard and (Blob.from_hex('00') .. key .. index) or (point(key) .. index)
      local I = hmac512(chain, data)
      fpr = hash160(point(key)):slice(1, 4)
      local child = BigNum.from_bytes_be(I:slice(1, 32))
      child:add(BigNum.from_bytes_be(key))
      child:mod(N)
      key, chain = child:to_bytes_be_zero_pad(32), I:slice(33, 64)
      depth = depth + 1
    end
  end
  local head = Blob.from_bytes(string.pack('B', depth)) .. fpr .. index .. chain
  return {xprv = checked(Blob.from_hex('0488ADE4') .. head .. Blob.from_hex('00') .. key),
          xpub = checked(Blob.from_hex('0488B21E') .. head .. point(key))}
end
"""


@pytest.mark.parametrize(
    ("path", "xpub", "xprv"),
    [
        # BIP32 test vector 1 (published in BIP-0032).
        (
            "m/0H",
            "xpub68Gmy5EdvgibQVfPdqkBBCHxA5htiqg55crXYuXoQRKfDBFA1WEjWgP6LHhwBZeNK1VTsfTFUHCdrfp1bgwQ9"
            "xv5ski8PX9rL2dZXvgGDnw",
            "xprv9uHRZZhk6KAJC1avXpDAp4MDc3sQKNxDiPvvkX8Br5ngLNv1TxvUxt4cV1rGL5hj6KCesnDYUhd7oWgT11"
            "eZG7XnxHrnYeSvkzY7d2bhkJ7",
        ),
        (
            "m/0H/1/2H/2/1000000000",
            "xpub6H1LXWLaKsWFhvm6RVpEL9P4KfRZSW7abD2ttkWP3SSQvnyA8FSVqNTEcYFgJS2UaFcxupHiYkro49S8y"
            "GasTvXEYBVPamhGW6cFJodrTHy",
            "xprvA41z7zogVVwxVSgdKUHDy1SKmdb533PjDz7J6N6mV6uS3ze1ai8FHa8kmHScGpWmj4WggLyQjgPie1rFS"
            "ruoUihUZREPSL39UNdE3BBDu76",
        ),
    ],
)
def test_bip32_derivation_against_published_vectors(env, path, xpub, xprv) -> None:
    master = (
        "xprv9s21ZrQH143K3QTDL4LXw2F7HEK3wJUD2nW2nRk4stbPy6cq3jPPqjiChkVvvNKmPGJxWUtg6LnF5kejMRNN"
        "U3TGtRBeJgk33yuGBxrMPHi"
    )
    out = run_lua(env, BIP32_LUA, {"xprv": master, "path": path})
    assert out == {"xpub": xpub, "xprv": xprv}
