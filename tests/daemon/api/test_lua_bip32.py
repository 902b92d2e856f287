"""BIP32 keys in the Lua API (issue 11), in DSM's native forms as its wallet plugins
use them: ``seed:derive{key_type='BIP32', mechanism={bip32_master_key=...}}``,
``key:derive{mechanism={bip32_hardened_child={index=}}}``,
``key:transform{mechanism={bip32_weak_child={index=}}}``, ``key.pub_key`` (the
serialized xpub), ``key:sign{}``, and the xprv text import/export.

Checked against BIP32's published test vectors 1 and 2; a signature by a derived
key is verified with ``cryptography`` under the public key read from the xpub.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import lua_test_run, ok, run_lua

H = 0x80000000
# BIP32 test vectors 1 and 2: (seed, [(path, xpub, xprv), ...]).
VECTORS = {
    "vector1": (
        "000102030405060708090a0b0c0d0e0f",
        [
            (
                [],
                "xpub661MyMwAqRbcFtXgS5sYJABqqG9YLmC4Q1Rdap9gSE8NqtwybGhePY2gZ29ESFjqJoCu1Rupje8YtGqsefD265TMg7usUDFdp6W1EGMcet8",
                "xprv9s21ZrQH143K3QTDL4LXw2F7HEK3wJUD2nW2nRk4stbPy6cq3jPPqjiChkVvvNKmPGJxWUtg6LnF5kejMRNNU3TGtRBeJgk33yuGBxrMPHi",
            ),
            (
                [H],
                "xpub68Gmy5EdvgibQVfPdqkBBCHxA5htiqg55crXYuXoQRKfDBFA1WEjWgP6LHhwBZeNK1VTsfTFUHCdrfp1bgwQ9xv5ski8PX9rL2dZXvgGDnw",
                "xprv9uHRZZhk6KAJC1avXpDAp4MDc3sQKNxDiPvvkX8Br5ngLNv1TxvUxt4cV1rGL5hj6KCesnDYUhd7oWgT11eZG7XnxHrnYeSvkzY7d2bhkJ7",
            ),
            (
                [H, 1],
                "xpub6ASuArnXKPbfEwhqN6e3mwBcDTgzisQN1wXN9BJcM47sSikHjJf3UFHKkNAWbWMiGj7Wf5uMash7SyYq527Hqck2AxYysAA7xmALppuCkwQ",
                "xprv9wTYmMFdV23N2TdNG573QoEsfRrWKQgWeibmLntzniatZvR9BmLnvSxqu53Kw1UmYPxLgboyZQaXwTCg8MSY3H2EU4pWcQDnRnrVA1xe8fs",
            ),
            (
                [H, 1, H + 2, 2, 1000000000],
                "xpub6H1LXWLaKsWFhvm6RVpEL9P4KfRZSW7abD2ttkWP3SSQvnyA8FSVqNTEcYFgJS2UaFcxupHiYkro49S8yGasTvXEYBVPamhGW6cFJodrTHy",
                "xprvA41z7zogVVwxVSgdKUHDy1SKmdb533PjDz7J6N6mV6uS3ze1ai8FHa8kmHScGpWmj4WggLyQjgPie1rFSruoUihUZREPSL39UNdE3BBDu76",
            ),
        ],
    ),
    "vector2": (
        "fffcf9f6f3f0edeae7e4e1dedbd8d5d2cfccc9c6c3c0bdbab7b4b1aeaba8a5a29f9c999693908d8a8784"
        "817e7b7875726f6c696663605d5a5754514e4b484542",
        [
            (
                [0],
                "xpub69H7F5d8KSRgmmdJg2KhpAK8SR3DjMwAdkxj3ZuxV27CprR9LgpeyGmXUbC6wb7ERfvrnKZjXoUmmDznezpbZb7ap6r1D3tgFxHmwMkQTPH",
                "xprv9vHkqa6EV4sPZHYqZznhT2NPtPCjKuDKGY38FBWLvgaDx45zo9WQRUT3dKYnjwih2yJD9mkrocEZXo1ex8G81dwSM1fwqWpWkeS3v86pgKt",
            ),
            (
                [0, H + 2147483647, 1, H + 2147483646, 2],
                "xpub6FnCn6nSzZAw5Tw7cgR9bi15UV96gLZhjDstkXXxvCLsUXBGXPdSnLFbdpq8p9HmGsApME5hQTZ3emM2rnY5agb9rXpVGyy3bdW6EEgAtqt",
                "xprvA2nrNbFZABcdryreWet9Ea4LvTJcGsqrMzxHx98MMrotbir7yrKCEXw7nadnHM8Dq38EGfSh6dqA9QWTyefMLEcBYJUuekgW4BYPJcr9E7j",
            ),
        ],
    ),
}

# Vector 2's master key, as DSM's BIP32 text import takes it.
MASTER2 = "xprv9s21ZrQH143K31xYSDQpPDxsXRTUcvj2iNHm5NUtrGiGG5e2DtALGdso3pGz6ssrdK4PFmM8NSpSBHNqPqm55Qn3LqFtT2emdEXVYsCzC2U"  # noqa: E501

WALLET_LUA = r"""
local HARD = 0x80000000
local function base58check(blob)
  local once = assert(digest { alg = 'SHA256', data = blob }).digest
  local c = assert(digest { alg = 'SHA256', data = once })
  return (blob .. c.digest:slice(1, 4)):base58()
end
function run(input)
  local seed = assert(Sobject { kid = input.seed })
  local key = assert(seed:derive {
    key_type = 'BIP32', key_size = 0, mechanism = { bip32_master_key = { network = 'mainnet' } },
    transient = true })
  for _, index in ipairs(input.path) do
    if index < HARD then
      key = assert(key:transform { key_type = 'BIP32', key_size = 0,
        mechanism = { bip32_weak_child = { index = index } }, transient = true })
    else
      key = assert(key:derive { key_type = 'BIP32', key_size = 0,
        mechanism = { bip32_hardened_child = { index = index } }, transient = true })
    end
  end
  local sig = assert(key:sign { hash = Blob.from_hex(input.hash), hash_alg = 'SHA256',
    deterministic_signature = true }).signature
  return {
    obj_type = key.obj_type,
    xpub = base58check(key.pub_key),
    xprv = key:export().value:bytes(),
    signature = sig,
  }
end
"""

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58check_decode(text: str) -> bytes:
    """The 78-byte payload of a Base58Check xpub/xprv, its checksum checked."""
    n = 0
    for ch in text:
        n = n * 58 + B58.index(ch)
    raw = n.to_bytes(82, "big")
    assert hashlib.sha256(hashlib.sha256(raw[:78]).digest()).digest()[:4] == raw[78:]
    return raw[:78]


def _seed(admin: Raw, g: str, hexseed: str, ops: list[str]) -> str:
    body = {
        "name": unique("seed"),
        "group_id": g,
        "obj_type": "HMAC",
        "key_ops": ops,
        "value": base64.b64encode(bytes.fromhex(hexseed)).decode(),
    }
    return ok(admin.call("PUT", "/crypto/v1/keys", body))["kid"]


CASES = [(name, seed, *chain) for name, (seed, chains) in VECTORS.items() for chain in chains]


@pytest.mark.parametrize(
    ("vector", "seed", "path", "xpub", "xprv"),
    CASES,
    ids=[f"{c[0]}-m/{'/'.join(str(i) for i in c[2])}" for c in CASES],
)
def test_published_vectors(env, vector, seed, path, xpub, xprv) -> None:
    admin, g = env
    kid = _seed(admin, g, seed, ["MACGENERATE", "DERIVEKEY", "EXPORT"])
    msg = hashlib.sha256(vector.encode()).digest()
    out = run_lua(env, WALLET_LUA, {"seed": kid, "path": path, "hash": msg.hex()})
    assert out["obj_type"] == "BIP32"
    assert out["xpub"] == xpub
    assert out["xprv"] == xprv
    # the signature verifies under the public key the published xpub holds
    point = b58check_decode(xpub)[45:]
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), point)
    pub.verify(out["signature"], msg, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        pub.verify(out["signature"], bytes(32), ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_a_seed_without_export_is_refused_naming_export(env) -> None:
    admin, g = env
    kid = _seed(admin, g, VECTORS["vector1"][0], ["MACGENERATE", "DERIVEKEY"])
    out = lua_test_run(env, WALLET_LUA, {"seed": kid, "path": [], "hash": "00" * 32})
    assert out["status"] == 403  # the key_op error, raised by the plugin's assert()
    assert "do not include EXPORT" in out["error"]["message"]


def test_a_child_without_export_cannot_derive_further(env) -> None:
    admin, g = env
    kid = _seed(admin, g, VECTORS["vector1"][0], ["MACGENERATE", "DERIVEKEY", "EXPORT"])
    code = r"""
    function run(input)
      local m = assert(Sobject { kid = input.seed }:derive { key_type = 'BIP32',
        mechanism = { bip32_master_key = { network = 'mainnet' } }, transient = true,
        key_ops = { 'SIGN', 'VERIFY' } })
      local c, e = m:transform { key_type = 'BIP32',
        mechanism = { bip32_weak_child = { index = 0 } }, transient = true }
      local x, e2 = m:export()
      return { child = c == nil, status = e.status, message = e.message, export = e2.status }
    end
    """
    out = run_lua(env, code, {"seed": kid})
    assert out["child"] and out["status"] == 403 and "EXPORT" in out["message"]
    assert out["export"] == 403


def test_bad_mechanisms_are_refused(env) -> None:
    admin, g = env
    kid = _seed(admin, g, VECTORS["vector1"][0], ["MACGENERATE", "DERIVEKEY", "EXPORT"])
    code = r"""
    function run(input)
      local seed = Sobject { kid = input.seed }
      local m = assert(seed:derive { key_type = 'BIP32',
        mechanism = { bip32_master_key = { network = 'mainnet' } }, transient = true })
      local function st(k, e) return k == nil and (e.status .. ' ' .. e.message) or 'made' end
      return {
        weak_hardened = st(m:transform { key_type = 'BIP32',
          mechanism = { bip32_weak_child = { index = 0x80000000 } }, transient = true }),
        big_index = st(m:derive { key_type = 'BIP32',
          mechanism = { bip32_hardened_child = { index = 0x100000000 } }, transient = true }),
        network = st(seed:derive { key_type = 'BIP32',
          mechanism = { bip32_master_key = { network = 'moonnet' } }, transient = true }),
        not_bip32 = st(seed:transform { key_type = 'BIP32',
          mechanism = { bip32_weak_child = { index = 1 } }, transient = true }),
      }
    end
    """
    out = run_lua(env, code, {"seed": kid})
    assert out["weak_hardened"].startswith("400 ") and "below 2^31" in out["weak_hardened"]
    assert out["big_index"].startswith("400 ")
    assert out["network"].startswith("400 ") and "network" in out["network"]
    assert out["not_bip32"].startswith("400 ") and "not a BIP32 key" in out["not_bip32"]


def test_xprv_text_import_and_export(env) -> None:
    # DSM's "text import" of a BIP32 master key, exported as its xprv text (hd-wallet 1.3).
    admin, g = env
    _seed_hex, chain = VECTORS["vector2"]
    xprv = MASTER2
    key = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys/bip32/import",
            {
                "name": unique("xprv"),
                "group_id": g,
                "value": base64.b64encode(xprv.encode()).decode(),
            },
        )
    )
    assert key["obj_type"] == "BIP32" and len(key["pub_key"]) == 78
    code = r"""
    function run(input)
      local k = assert(Sobject { kid = input.kid })
      local text = assert(k:export()).value:bytes()
      local child = assert(k:transform { key_type = 'BIP32',
        mechanism = { bip32_weak_child = { index = 0 } }, transient = true })
      return { text = text, child = child:export().value:bytes() }
    end
    """
    out = run_lua(env, code, {"kid": key["kid"]})
    assert out["text"] == xprv
    assert out["child"] == chain[0][2]
    # an xpub is not a private key; junk is not a key
    for bad in (chain[0][1], "xprv" + "1" * 107, "not base58 0OIl"):
        r = admin.call(
            "POST",
            "/crypto/v1/keys/bip32/import",
            {"group_id": g, "value": base64.b64encode(bad.encode()).decode()},
        )
        assert r["status"] == 400, r
