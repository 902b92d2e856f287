"""The meaning of crypto request fields, with no PKCS#11 in sight.

The router has checked types; this module checks meaning (is this mode valid
for this algorithm, is the iv the right length, is the key size allowed) and
holds the pieces of cryptography that happen outside the token: OAEP with
SHA-256 around raw RSA, DigestInfo for pre-hashed PKCS#1 v1.5 signatures,
ECDSA signature encodings, the HMAC key padding rule, and digests.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from strongroomd.errors import BadRequest, BadTag, Unsupported

__all__ = [
    "CURVES",
    "HASHES",
    "CipherSpec",
    "Curve",
    "RsaMode",
    "SignSpec",
    "check_key_size",
    "cipher_spec",
    "digest",
    "digest_info",
    "ecdsa_der_to_raw",
    "ecdsa_raw_to_der",
    "hmac_token_value",
    "mac_alg",
    "oaep_decode",
    "oaep_encode",
    "rsa_encrypt_mode",
    "sign_spec",
    "wrap_mode",
]

# -- hashes -----------------------------------------------------------------

#: hash name -> (hashlib name, digest size in bytes)
HASHES: dict[str, tuple[str, int]] = {
    "SHA1": ("sha1", 20),
    "SHA256": ("sha256", 32),
    "SHA384": ("sha384", 48),
    "SHA512": ("sha512", 64),
}

# DER prefixes of DigestInfo (RFC 8017 section 9.2, note 1).
_DIGEST_INFO = {
    "SHA1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "SHA256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "SHA384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "SHA512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def hash_name(value: Any, field: str = "hash_alg") -> str:
    if not isinstance(value, str) or value.upper() not in HASHES:
        raise Unsupported(f"unsupported {field}; use one of SHA1, SHA256, SHA384, SHA512")
    return value.upper()


def hash_data(name: str, data: bytes) -> bytes:
    return hashlib.new(HASHES[name][0], data).digest()


def digest(req: dict) -> dict:
    """``POST /crypto/v1/digest``: ``{alg, data}`` -> ``{digest}``."""
    name = hash_name(req.get("alg"), "alg")
    return {"digest": hash_data(name, req["data"])}


def digest_info(name: str, hashed: bytes) -> bytes:
    """The DER DigestInfo that PKCS#1 v1.5 signs for an already computed hash."""
    return _DIGEST_INFO[name] + hashed


# -- curves -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Curve:
    name: str
    bits: int
    oid_der: bytes  # DER of the named-curve OID: CKA_EC_PARAMS
    edwards: bool = False

    @property
    def size(self) -> int:
        """Bytes of one coordinate / scalar."""
        return (self.bits + 7) // 8


CURVES: dict[str, Curve] = {
    "NistP256": Curve("NistP256", 256, bytes.fromhex("06082a8648ce3d030107")),
    "NistP384": Curve("NistP384", 384, bytes.fromhex("06052b81040022")),
    "NistP521": Curve("NistP521", 521, bytes.fromhex("06052b81040023")),
    "SecP256K1": Curve("SecP256K1", 256, bytes.fromhex("06052b8104000a")),
    "Ed25519": Curve("Ed25519", 256, bytes.fromhex("06032b6570"), edwards=True),
}
CURVE_BY_OID = {c.oid_der: c for c in CURVES.values()}


class _RandomPool:
    """os.urandom, drawn 4 KiB at a time.

    One getrandom() per IV made the event loop give up the GIL per request,
    and getting it back behind the token thread cost up to a switch interval.
    Every byte handed out is used once; a lock keeps that true across threads.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._buf):
                self._buf, self._pos = os.urandom(max(self._size, n)), 0
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out


random_bytes = _RandomPool().take


def curve(name: Any) -> Curve:
    if name not in CURVES:
        raise Unsupported("elliptic_curve must be one of " + ", ".join(CURVES))
    return CURVES[name]


# -- key sizes --------------------------------------------------------------

HMAC_MIN_BYTES = 14
HMAC_MAX_BYTES = 512
#: SoftHSM wants an HMAC key at least as long as the hash output (64 bytes
#: for SHA-512). A key of at most one hash block padded with zero bytes gives
#: the same HMAC (RFC 2104: keys shorter than the block are zero-padded), and
#: 64 bytes is no more than the smallest block (SHA-1/SHA-256: 64 bytes).
HMAC_TOKEN_BYTES = 64


def check_key_size(obj_type: str, key_size: int | None) -> int:
    """Validate the size of a key to generate; returns it in bits."""
    if obj_type == "AES":
        if key_size not in (128, 192, 256):
            raise BadRequest("AES key_size must be 128, 192 or 256", code="invalid_key_size")
    elif obj_type == "DES":
        if key_size not in (None, 56, 64):
            raise BadRequest("DES key_size is 56", code="invalid_key_size")
        return 56
    elif obj_type == "OPAQUE":
        raise BadRequest("an OPAQUE object is imported, not generated", code="invalid_value")
    elif obj_type == "DES3":
        if key_size is None:
            return 168
        if key_size not in (168, 192):
            raise BadRequest("DES3 key_size must be 168 or 192", code="invalid_key_size")
        return 168
    elif obj_type == "RSA":
        if key_size not in (2048, 3072, 4096):
            raise BadRequest("RSA key_size must be 2048, 3072 or 4096", code="invalid_key_size")
    elif obj_type == "HMAC":
        if (
            key_size is None
            or key_size % 8
            or not HMAC_MIN_BYTES * 8 <= key_size <= HMAC_MAX_BYTES * 8
        ):
            raise BadRequest(
                "HMAC key_size must be a multiple of 8 from 112 to 4096", code="invalid_key_size"
            )
    elif obj_type == "SECRET":
        if key_size is None or key_size % 8 or not 8 <= key_size <= 8192:
            raise BadRequest(
                "SECRET key_size must be a multiple of 8 from 8 to 8192", code="invalid_key_size"
            )
    else:
        raise BadRequest(f"cannot size a key of type {obj_type}", code="invalid_value")
    return key_size


def check_value_size(obj_type: str, value: bytes) -> int:
    """Validate a raw symmetric key value to import; returns its size in bits."""
    n = len(value)
    if obj_type == "AES" and n not in (16, 24, 32):
        raise BadRequest("an AES key is 16, 24 or 32 bytes", code="invalid_key_size")
    if obj_type == "DES3":
        if n != 24:
            raise BadRequest("a DES3 key is 24 bytes", code="invalid_key_size")
        return 168
    if obj_type == "DES":
        if n != 8:
            raise BadRequest("a DES key is 8 bytes", code="invalid_key_size")
        return 56
    if obj_type == "OPAQUE" and not 1 <= n <= 64 * 1024:
        raise BadRequest("an OPAQUE object is 1 byte to 64 KiB", code="invalid_key_size")
    if obj_type == "HMAC" and not HMAC_MIN_BYTES <= n <= HMAC_MAX_BYTES:
        raise BadRequest("an HMAC key is 14 to 512 bytes", code="invalid_key_size")
    if obj_type == "SECRET" and not 1 <= n <= 1024:
        raise BadRequest("a SECRET is 1 to 1024 bytes", code="invalid_key_size")
    return n * 8


def kcv_of_value(obj_type: str, value: bytes, method: str) -> str:
    """The key check value of a key given by value (``kcv/verify``), with
    ``cryptography``: the same definition as the token's."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.cmac import CMAC

    if obj_type == "AES":
        if len(value) not in (16, 24, 32):
            raise BadRequest("an AES key is 16, 24 or 32 bytes", code="invalid_key_size")
        if method == "Cmac":
            c = CMAC(algorithms.AES(value))
            c.update(bytes(16))
            return c.finalize()[:5].hex().upper()
        e = Cipher(algorithms.AES(value), modes.ECB()).encryptor()  # noqa: S305 - one zero block
        return (e.update(bytes(16)) + e.finalize())[:3].hex().upper()
    if obj_type in ("DES", "DES3"):
        if len(value) != (8 if obj_type == "DES" else 24) or method == "Cmac":
            raise BadRequest(f"not a {obj_type} key for this method", code="invalid_value")
        key = value * 3 if obj_type == "DES" else value
        e = Cipher(TripleDES(key), modes.ECB()).encryptor()  # noqa: S305 - one zero block
        return (e.update(bytes(8)) + e.finalize())[:3].hex().upper()
    raise Unsupported("a key check value is for AES, DES and DES3 keys")


def des_odd_parity(value: bytes) -> bytes:
    """Each byte's low bit set so that the byte has odd parity, as DES keys do."""
    return bytes((b & 0xFE) | (bin(b >> 1).count("1") + 1) % 2 for b in value)


def token_value(obj_type: str, value: bytes) -> bytes:
    """What the token holds for a symmetric key's value."""
    if obj_type == "HMAC":
        return hmac_token_value(value)
    if obj_type == "DES":
        return des_token_value(value)
    return value


def des_token_value(value: bytes) -> bytes:
    """A single-DES key as the token holds it: DES3 with K1 = K2 = K3, which
    computes exactly single DES (SoftHSM 2.6.1 lists DES mechanisms but refuses
    them)."""
    return value * 3


def hmac_token_value(value: bytes) -> bytes:
    """The value to store in the token for an HMAC key (zero-padded if short)."""
    if len(value) < HMAC_TOKEN_BYTES:
        return value + bytes(HMAC_TOKEN_BYTES - len(value))
    return value


# -- symmetric ciphers ------------------------------------------------------

_BLOCK = {"AES": 16, "DES3": 8}
_AES_MODES = ("GCM", "CBC", "CBCNOPAD", "CTR", "ECB")
_DES3_MODES = ("CBC", "CBCNOPAD", "ECB")
GCM_TAG_BITS = (96, 104, 112, 120, 128)


@dataclass(frozen=True, slots=True)
class CipherSpec:
    """A checked symmetric encrypt/decrypt request."""

    kind: str  # "AES_GCM", "AES_CBC", ..., "DES3_ECB"
    iv: bytes | None
    ad: bytes | None
    tag_bits: int
    return_iv: bool


def _symmetric_mode(obj_type: str, mode: Any) -> str:
    if mode is None:
        return "GCM" if obj_type == "AES" else "CBC"
    modes = _AES_MODES if obj_type == "AES" else _DES3_MODES
    if not isinstance(mode, str) or mode.upper() not in modes:
        raise Unsupported(f"mode must be one of {', '.join(modes)} for {obj_type}")
    return mode.upper()


def cipher_spec(obj_type: str, req: dict, *, decrypt: bool) -> CipherSpec:
    """Check ``alg``/``mode``/``iv``/``ad``/``tag_len`` of a symmetric request."""
    alg = req.get("alg")
    if alg != obj_type:
        raise Unsupported(f"alg {alg} cannot be used with a {obj_type} key")
    if req.get("label") is not None:
        raise BadRequest("label is only for RSA OAEP", code="invalid_field")
    if req.get("aad") is not None:
        raise BadRequest("associated data goes in the field 'ad' (not aad)", code="invalid_field")
    mode = _symmetric_mode(obj_type, req.get("mode"))
    block = _BLOCK[obj_type]
    iv = req.get("iv")
    ad = req.get("ad")
    if ad is not None and mode != "GCM":
        raise BadRequest("ad is only used with GCM", code="invalid_field")
    tag_bits = 128
    data_len = len(req["cipher"] if decrypt else req["plain"])
    if mode == "GCM":
        if decrypt:
            tag = req.get("tag")
            if tag is None:
                raise BadRequest("GCM decryption needs the tag", code="invalid_value")
            tag_bits = len(tag) * 8
            if tag_bits not in GCM_TAG_BITS:
                raise BadRequest("tag must be 12 to 16 bytes", code="invalid_value")
        else:
            tag_len = req.get("tag_len", 128)
            if tag_len not in GCM_TAG_BITS:
                raise BadRequest(
                    "tag_len is in bits: 96, 104, 112, 120 or 128", code="invalid_value"
                )
            tag_bits = tag_len
        want_iv = 12
    elif mode == "ECB":
        if iv is not None:
            raise BadRequest("ECB takes no iv", code="invalid_field")
        want_iv = 0
    else:
        want_iv = block
    if mode != "GCM" and (req.get("tag") is not None or req.get("tag_len") is not None):
        raise BadRequest("tag and tag_len are only used with GCM", code="invalid_field")
    if mode in ("ECB", "CBCNOPAD") and data_len % block:
        raise BadRequest(
            f"{mode} needs a multiple of {block} bytes; use CBC for padding",
            code="invalid_value",
        )
    if decrypt and mode == "CBC" and (data_len == 0 or data_len % block):
        raise BadTag()
    return_iv = False
    if want_iv:
        if iv is None:
            if decrypt:
                raise BadRequest(f"{mode} decryption needs the iv", code="invalid_value")
            iv = random_bytes(want_iv)
            return_iv = True
        elif len(iv) != want_iv:
            raise BadRequest(f"the iv for {mode} is {want_iv} bytes", code="invalid_value")
        else:
            return_iv = not decrypt
    return CipherSpec(f"{obj_type}_{mode}", iv, ad, tag_bits, return_iv)


# -- RSA --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RsaMode:
    kind: str  # "OAEP" or "PKCS1_V15"
    hash: str | None  # OAEP hash (also MGF1 hash)


def _mgf1_hash(params: Any, default: str | None) -> str | None:
    """Pull ``hash`` out of ``{"mgf": {"mgf1": {"hash": ...}}}``."""
    if params is None or params == {}:
        return default
    if not isinstance(params, dict) or set(params) != {"mgf"}:
        raise BadRequest("mode parameters must be {mgf: {mgf1: {hash}}}", code="invalid_value")
    mgf = params["mgf"]
    if not isinstance(mgf, dict) or set(mgf) != {"mgf1"} or not isinstance(mgf["mgf1"], dict):
        raise BadRequest("only mgf1 is supported", code="invalid_value")
    return hash_name(mgf["mgf1"].get("hash"), "mgf1 hash")


def _mode_name(mode: Any) -> tuple[str, Any]:
    if isinstance(mode, str):
        return mode.upper(), None
    if isinstance(mode, dict) and len(mode) == 1:
        ((name, params),) = mode.items()
        if isinstance(name, str):
            return name.upper(), params
    raise BadRequest("mode must be a name or a one-entry map", code="invalid_value")


def rsa_encrypt_mode(mode: Any) -> RsaMode:
    """RSA encryption/wrap padding; OAEP with SHA-1 when ``mode`` is absent."""
    if mode is None:
        return RsaMode("OAEP", "SHA1")
    name, params = _mode_name(mode)
    # DSM's CryptMode names all four (its SDK sends OAEP_MGF1_SHA384 and _SHA512 too);
    # beyond SHA-1 the padding is applied outside the token (docs/protocol.md).
    if name.startswith("OAEP_MGF1_") and name[len("OAEP_MGF1_") :] in HASHES and params is None:
        return RsaMode("OAEP", name[len("OAEP_MGF1_") :])
    if name == "OAEP":
        h = _mgf1_hash(params, "SHA1")
        if h not in HASHES:
            raise Unsupported("RSA OAEP supports SHA1, SHA256, SHA384 and SHA512")
        return RsaMode("OAEP", h)
    if name == "PKCS1_V15":
        if params not in (None, {}):
            raise BadRequest("PKCS1_V15 takes no parameters", code="invalid_value")
        return RsaMode("PKCS1_V15", None)
    raise Unsupported("RSA modes are OAEP and PKCS1_V15")


def _mgf1(seed: bytes, length: int, name: str) -> bytes:
    hname, hlen = HASHES[name]
    out = bytearray()
    for counter in range((length + hlen - 1) // hlen):
        out += hashlib.new(hname, seed + counter.to_bytes(4, "big")).digest()
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def oaep_encode(message: bytes, k: int, name: str, label: bytes = b"") -> bytes:
    """EME-OAEP encoding (RFC 8017 7.1.1) to a ``k``-byte block."""
    hname, hlen = HASHES[name]
    if len(message) > k - 2 * hlen - 2:
        raise BadRequest("plain is too long for this key and padding", code="invalid_value")
    lhash = hashlib.new(hname, label).digest()
    db = lhash + bytes(k - len(message) - 2 * hlen - 2) + b"\x01" + message
    seed = random_bytes(hlen)
    masked_db = _xor(db, _mgf1(seed, k - hlen - 1, name))
    masked_seed = _xor(seed, _mgf1(masked_db, hlen, name))
    return b"\x00" + masked_seed + masked_db


def oaep_decode(em: bytes, k: int, name: str, label: bytes = b"") -> bytes:
    """EME-OAEP decoding (RFC 8017 7.1.2), one failure for every error.

    ``em`` is the raw RSA output; it is left-padded to ``k`` bytes. The
    separator search touches every byte and branches on nothing secret, so
    the time taken does not depend on where the decoding goes wrong.
    """
    hname, hlen = HASHES[name]
    if k < 2 * hlen + 2 or len(em) > k:
        raise BadTag()
    em = em.rjust(k, b"\x00")
    masked_seed, masked_db = em[1 : 1 + hlen], em[1 + hlen :]
    seed = _xor(masked_seed, _mgf1(masked_db, hlen, name))
    db = _xor(masked_db, _mgf1(seed, k - hlen - 1, name))
    lhash = hashlib.new(hname, label).digest()
    good = hmac.compare_digest(db[:hlen], lhash) & (em[0] == 0)
    # Find the first 0x01 after the zero padding without early exit.
    looking = 1  # still inside the zero run
    index = 0
    bad_pad = 0
    for i in range(hlen, len(db)):
        b = db[i]
        is_zero = int(b == 0)
        is_one = int(b == 1)
        found = looking & is_one
        index |= -found & i  # i when found, else unchanged
        bad_pad |= looking & (1 - is_zero) & (1 - is_one)
        looking &= is_zero
    good &= (1 - looking) & (1 - bad_pad)
    if not good:
        raise BadTag()
    return db[index + 1 :]


@dataclass(frozen=True, slots=True)
class SignSpec:
    kind: str  # "PKCS1_V15", "PSS", "ECDSA", "EDDSA"
    hash: str
    mgf_hash: str | None
    message: bytes  # the hash (or, for EdDSA, the data)


def sign_spec(obj_type: str, curve_name: str | None, req: dict) -> SignSpec:
    """Check a sign/verify request and compute the hash it signs."""
    data = req.get("data")
    hashed = req.get("hash")
    if (data is None) == (hashed is None):
        raise BadRequest("give exactly one of data and hash", code="invalid_field")
    mode = req.get("mode")
    ed = obj_type == "EC" and curve_name == "Ed25519"
    raw_hash = req.get("hash_alg")
    if ed:
        # PureEdDSA signs the message itself; DSM callers pass SHA512 anyway.
        if raw_hash is not None:
            hash_name(raw_hash)
        if hashed is not None:
            raise BadRequest("Ed25519 signs data, not a hash", code="invalid_field")
        if mode is not None:
            raise Unsupported("Ed25519 takes no mode")
        return SignSpec("EDDSA", "SHA512", None, data)
    name = hash_name(raw_hash)
    if hashed is not None:
        if len(hashed) != HASHES[name][1]:
            raise BadRequest(f"a {name} hash is {HASHES[name][1]} bytes", code="invalid_value")
        message = hashed
    else:
        message = hash_data(name, data)
    if obj_type == "EC":
        if mode is not None:
            raise Unsupported("ECDSA takes no mode")
        return SignSpec("ECDSA", name, None, message)
    if obj_type != "RSA":
        raise Unsupported(f"a {obj_type} key cannot sign")
    if mode is None:
        return SignSpec("PKCS1_V15", name, None, message)
    mname, params = _mode_name(mode)
    if mname == "PKCS1_V15":
        if params not in (None, {}):
            raise BadRequest("PKCS1_V15 takes no parameters", code="invalid_value")
        return SignSpec("PKCS1_V15", name, None, message)
    if mname == "PSS":
        return SignSpec("PSS", name, _mgf1_hash(params, name), message)
    raise Unsupported("RSA signature modes are PKCS1_V15 and PSS")


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    half = len(raw) // 2
    return encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )


def ecdsa_der_to_raw(der: bytes, size: int) -> bytes | None:
    """r||s of ``size`` bytes each, or None when ``der`` is no valid signature."""
    try:
        r, s = decode_dss_signature(der)
    except ValueError:
        return None
    if not (0 < r < 1 << (8 * size) and 0 < s < 1 << (8 * size)):
        return None
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# -- MAC and wrap -----------------------------------------------------------


def mac_alg(obj_type: str, alg: Any) -> str:
    """``alg`` of a mac request: a hash for HMAC keys, CMAC for AES keys."""
    if obj_type == "HMAC":
        if isinstance(alg, str) and alg.upper() in HASHES:
            return alg.upper()
        raise Unsupported("HMAC keys take alg SHA1, SHA256, SHA384 or SHA512")
    if obj_type == "AES":
        if isinstance(alg, str) and alg.upper() in ("CMAC", "AES"):
            return "CMAC"
        raise Unsupported("AES keys take alg CMAC")
    raise Unsupported(f"a {obj_type} key cannot compute a MAC")


def check_key_format(subject_type: str, public_only: bool, key_format: Any) -> None:
    """DSM's ``key_format`` on wrap: ``Default`` or ``Pkcs8``. A private key is
    wrapped as its PKCS#8 PrivateKeyInfo in both cases (the form export gives);
    ``Pkcs8`` names that form and is refused for anything else."""
    if key_format is None or key_format == "Default":
        return
    if key_format != "Pkcs8":
        raise BadRequest("key_format is Default or Pkcs8", code="invalid_value")
    if subject_type not in ("RSA", "EC") or public_only:
        raise BadRequest("key_format Pkcs8 is for RSA and EC private keys", code="invalid_value")


def wrap_mode(obj_type: str, req: dict) -> str | RsaMode:
    """The wrap mode of a wrapping key: "KW", "KWP", or an RSA OAEP mode."""
    alg = req.get("alg")
    if alg != obj_type:
        raise Unsupported(f"alg {alg} cannot be used with a {obj_type} key")
    mode = req.get("mode")
    if obj_type == "AES":
        if mode is None:
            return "KW"
        if isinstance(mode, str) and mode.upper() in ("KW", "KWP"):
            return mode.upper()
        raise Unsupported("AES wrap modes are KW and KWP")
    if obj_type == "RSA":
        if isinstance(mode, str) and mode.upper() == "OAEP":
            mode = None
        rsa_mode = rsa_encrypt_mode(mode)
        if rsa_mode.kind != "OAEP":
            raise Unsupported("RSA wraps keys with OAEP only")
        return rsa_mode
    raise Unsupported(f"a {obj_type} key cannot wrap keys")


# -- key derivation ---------------------------------------------------------

#: Derived key types and their value lengths in bytes for a key_size in bits.
DERIVE_TARGETS = ("AES", "DES3", "DES", "HMAC", "SECRET")


@dataclass(frozen=True, slots=True)
class DeriveSpec:
    """A checked ``mechanism`` of DSM's DeriveKeyRequest.

    ``kind`` is "ENCRYPT_DATA" (run in the token: the new key's value is the
    first ``length`` bytes of the base key's encryption of ``data``) or "HKDF"
    (RFC 5869, computed in the daemon from an exportable base key's value).
    """

    kind: str
    length: int  # bytes of the new key's value
    mode: str = ""  # ENCRYPT_DATA: "ECB" or "CBC"
    data: bytes = b""
    iv: bytes | None = None
    hash: str = ""  # HKDF
    salt: bytes | None = None
    info: bytes | None = None


def _blob(value: Any, name: str) -> bytes:
    """A binary field nested in a mechanism: bytes (frames) or base64 text (JSON)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        import base64
        import binascii

        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise BadRequest(f"{name} must be binary (base64 in JSON)", code="invalid_field")


def derived_length(key_type: str, key_size: int | None) -> int:
    """Bytes of value a derived key of this type and size takes."""
    if key_type not in DERIVE_TARGETS:
        raise Unsupported(
            f"cannot derive a key of type {key_type}; use one of AES, DES3, DES, HMAC, SECRET"
        )
    bits = check_key_size(
        key_type,
        key_size
        if key_size is not None or key_type in ("DES", "DES3")
        else {"AES": 256, "HMAC": 256, "SECRET": 256}[key_type],
    )
    return {"DES3": 24, "DES": 8}.get(key_type, bits // 8)


def derive_spec(base_type: str, key_type: str, key_size: int | None, mechanism: Any) -> DeriveSpec:
    """Check DSM's ``mechanism`` (``{encrypt_data: {...}}`` or ``{hkdf: {...}}``)
    for a base key of ``base_type``; BIP32/SLIP-10 are not offered."""
    if not isinstance(mechanism, dict) or len(mechanism) != 1:
        raise BadRequest("mechanism is a map with one of encrypt_data, hkdf", code="invalid_field")
    ((kind, params),) = mechanism.items()
    if kind in (
        "bip32_master_key",
        "bip32_hardened_child",
        "slip10_master_key",
        "slip10_hardened_child",
    ):
        raise Unsupported(f"{kind} derivation is not offered (no BIP32/SLIP-10 keys here)")
    if not isinstance(params, dict):
        raise BadRequest(f"mechanism.{kind} must be a map", code="invalid_field")
    length = derived_length(key_type, key_size)
    if kind == "encrypt_data":
        return _encrypt_data_spec(base_type, key_type, length, params)
    if kind == "hkdf":
        h = hash_name(params.get("hash_alg"), "mechanism.hkdf.hash_alg")
        salt = params.get("salt")
        info = params.get("info")
        if length > 255 * HASHES[h][1]:
            raise BadRequest("HKDF gives at most 255 hash lengths", code="invalid_key_size")
        return DeriveSpec(
            "HKDF",
            length,
            hash=h,
            salt=None if salt is None else _blob(salt, "mechanism.hkdf.salt"),
            info=None if info is None else _blob(info, "mechanism.hkdf.info"),
        )
    raise Unsupported(f"unknown derive mechanism {kind!r}; use encrypt_data or hkdf")


def _encrypt_data_spec(base_type: str, key_type: str, length: int, p: dict) -> DeriveSpec:
    cipher = "DES3" if base_type == "DES" else base_type
    if cipher not in _BLOCK:
        raise Unsupported(
            f"encrypt_data derivation needs an AES, DES or DES3 base key, not {base_type}"
        )
    alg = p.get("alg", base_type)
    if not isinstance(alg, str) or alg.upper() != base_type:
        raise Unsupported(f"alg {alg} cannot be used with a {base_type} key")
    mode = p.get("mode", "ECB")
    if not isinstance(mode, str) or mode.upper() not in ("ECB", "CBC", "CBCNOPAD"):
        raise Unsupported(
            "encrypt_data derivation takes mode ECB, CBC or CBCNOPAD (the token's "
            "*_ECB_ENCRYPT_DATA and *_CBC_ENCRYPT_DATA)"
        )
    mode = "ECB" if mode.upper() == "ECB" else "CBC"
    if "plain" not in p:
        raise BadRequest("mechanism.encrypt_data.plain is required", code="missing_field")
    data = _blob(p["plain"], "mechanism.encrypt_data.plain")
    block = _BLOCK[cipher]
    if not data or len(data) % block:
        raise BadRequest(
            f"mechanism.encrypt_data.plain must be a non-empty multiple of {block} bytes "
            "(the token encrypts it without padding)",
            code="invalid_value",
        )
    if len(data) < length:
        raise BadRequest(
            f"a {key_type} key of {length} bytes needs at least {length} bytes of plain",
            code="invalid_value",
        )
    iv = None
    if mode == "CBC":
        iv = _blob(p["iv"], "mechanism.encrypt_data.iv") if "iv" in p else random_bytes(block)
        if len(iv) != block:
            raise BadRequest(f"the iv for CBC is {block} bytes", code="invalid_value")
    elif p.get("iv") is not None:
        raise BadRequest("ECB takes no iv", code="invalid_field")
    if key_type == "DES":
        raise Unsupported(
            "encrypt_data cannot make a DES key in the token (a DES key is held as DES3 "
            "K||K||K); derive DES3, or use hkdf from an exportable key"
        )
    return DeriveSpec("ENCRYPT_DATA", length, mode=mode, data=data, iv=iv)


def hkdf(value: bytes, spec: DeriveSpec) -> bytes:
    """RFC 5869 HKDF with ``cryptography`` (the token offers no HKDF)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    algo = {
        "SHA1": hashes.SHA1,
        "SHA256": hashes.SHA256,
        "SHA384": hashes.SHA384,
        "SHA512": hashes.SHA512,
    }[spec.hash]()
    return HKDF(algo, spec.length, spec.salt, spec.info).derive(value)
