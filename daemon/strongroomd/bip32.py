"""BIP32 hierarchical deterministic keys (secp256k1), computed in the daemon.

The token has no BIP32 mechanism, so derivation happens here, from the value
of a key the caller may EXPORT (the seed, or the parent's private scalar):
HMAC-SHA512 and scalar arithmetic mod the group order in Python, the public
points with ``cryptography`` (OpenSSL's secp256k1). Only private -> private
derivation exists: DSM's plugins derive from private parents; a public-only
parent is refused.

A BIP32 key is kept in the token as an EC SecP256K1 private key (so signing
is the token's ECDSA); what BIP32 adds to it -- version, depth, parent
fingerprint, child number and chain code -- rides in the key's
``custom_metadata`` as its extended public key (``bip32_xpub``).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strongroomd.errors import BadRequest

#: The secp256k1 group order (SEC 2).
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HARDENED = 0x80000000
#: network -> (private version, public version)
VERSIONS = {
    "mainnet": (bytes.fromhex("0488ADE4"), bytes.fromhex("0488B21E")),
    "testnet": (bytes.fromhex("04358394"), bytes.fromhex("043587CF")),
}
_PUB_OF = {priv: pub for priv, pub in VERSIONS.values()}
_PRIV_OF = {pub: priv for priv, pub in VERSIONS.values()}
METADATA = "bip32_xpub"
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
MAX_DEPTH = 255


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_value")


@dataclass(frozen=True, slots=True)
class Node:
    """An extended private key."""

    version: bytes  # the private version bytes (xprv, tprv)
    depth: int
    parent_fingerprint: bytes
    child_number: int
    chain_code: bytes
    k: int

    @property
    def public(self) -> bytes:
        return point(self.k)

    def serialize(self, *, private: bool) -> bytes:
        """The 78-byte serialization (BIP32 "Serialization format")."""
        if private:
            version, key = self.version, b"\0" + self.k.to_bytes(32, "big")
        else:
            version, key = _PUB_OF[self.version], self.public
        return (
            version
            + bytes([self.depth])
            + self.parent_fingerprint
            + self.child_number.to_bytes(4, "big")
            + self.chain_code
            + key
        )


def point(k: int) -> bytes:
    """SEC1 compressed k*G."""
    pub = ec.derive_private_key(k, ec.SECP256K1()).public_key()
    return pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


def master(seed: bytes, network: str = "mainnet") -> Node:
    """The master key of a seed (16 to 64 bytes)."""
    if network not in VERSIONS:
        raise _bad(f"bip32 network is one of {', '.join(VERSIONS)}")
    if not 16 <= len(seed) <= 64:
        raise _bad("a BIP32 seed is 16 to 64 bytes (128 to 512 bits)")
    i = hmac.digest(b"Bitcoin seed", seed, "sha512")
    k = int.from_bytes(i[:32], "big")
    if not 0 < k < N:
        raise _bad("this seed gives an invalid master key (BIP32: use another seed)")
    return Node(VERSIONS[network][0], 0, b"\0\0\0\0", 0, i[32:], k)


def child(parent: Node, index: int) -> Node:
    """CKDpriv: the child ``index`` (hardened from 2^31 on)."""
    if not 0 <= index < 1 << 32:
        raise _bad("a BIP32 child index is 0 to 2^32 - 1")
    if parent.depth >= MAX_DEPTH:
        raise _bad("BIP32 keys are at most 255 levels deep")
    if index >= HARDENED:
        data = b"\0" + parent.k.to_bytes(32, "big") + index.to_bytes(4, "big")
    else:
        data = parent.public + index.to_bytes(4, "big")
    i = hmac.digest(parent.chain_code, data, "sha512")
    il = int.from_bytes(i[:32], "big")
    k = (il + parent.k) % N
    if il >= N or k == 0:
        raise _bad(f"BIP32 child {index} is invalid (BIP32: use the next index)")
    return Node(parent.version, parent.depth + 1, hash160(parent.public)[:4], index, i[32:], k)


def b58check(payload: bytes) -> str:
    data = payload + hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def b58check_decode(text: str) -> bytes:
    if len(text) > 200:
        raise _bad("not a BIP32 serialization")
    n = 0
    for ch in text:
        i = B58.find(ch)
        if i < 0:
            raise _bad("not a BIP32 serialization (base58)")
        n = n * 58 + i
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    raw = b"\0" * (len(text) - len(text.lstrip("1"))) + raw
    payload, check = raw[:-4], raw[-4:]
    if hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4] != check:
        raise _bad("BIP32 serialization: bad checksum")
    return payload


def parse_private(value: bytes) -> Node:
    """An extended private key from its text (xprv..., DSM's text import) or its bytes
    (78, or 82 with the checksum)."""
    raw: bytes
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if text and text[:4] in ("xprv", "tprv"):
        raw = b58check_decode(text)
    elif len(value) == 82:
        if value[78:] != hashlib.sha256(hashlib.sha256(value[:78]).digest()).digest()[:4]:
            raise _bad("BIP32 serialization: bad checksum")
        raw = value[:78]
    else:
        raw = value
    if len(raw) != 78:
        raise _bad("a BIP32 extended private key is 78 bytes (xprv... text or bytes)")
    version = raw[:4]
    if version in _PRIV_OF:
        raise _bad("a BIP32 public key (xpub) cannot be imported as a private key")
    if version not in _PUB_OF:
        raise _bad("unknown BIP32 version bytes " + version.hex())
    if raw[45] != 0:
        raise _bad("a BIP32 private key's key data starts with 0x00")
    k = int.from_bytes(raw[46:], "big")
    if not 0 < k < N:
        raise _bad("the BIP32 private key is out of range")
    return Node(version, raw[4], raw[5:9], int.from_bytes(raw[9:13], "big"), raw[13:45], k)


def from_parts(xpub: str, k: int) -> Node:
    """A node from the xpub kept with a key and the key's private scalar."""
    raw = b58check_decode(xpub)
    if len(raw) != 78 or raw[:4] not in _PRIV_OF:
        raise _bad("the key's bip32_xpub metadata is not an extended public key")
    node = Node(
        _PRIV_OF[raw[:4]], raw[4], raw[5:9], int.from_bytes(raw[9:13], "big"), raw[13:45], k
    )
    if node.public != raw[45:]:
        raise _bad("the key's bip32_xpub metadata does not belong to its private key")
    return node


def pkcs8(node: Node) -> bytes:
    """The EC SecP256K1 private key the token keeps for a node."""
    key = ec.derive_private_key(node.k, ec.SECP256K1())
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def scalar_of(der: bytes) -> int:
    """The private scalar of an exported EC SecP256K1 key."""
    try:
        key = serialization.load_der_private_key(der, None)
    except ValueError:
        raise _bad("the key's value is not an EC private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256k1":
        raise _bad("a BIP32 key is an EC SecP256K1 private key")
    return key.private_numbers().private_value
