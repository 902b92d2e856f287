"""A key's public half in PEM, DER, JWK or OpenSSH form, from its ``pub_key``.

The daemon describes an asymmetric key with ``pub_key``: a DER
SubjectPublicKeyInfo. Every other form is a re-encoding of it, done here
without a crypto library: a small DER reader takes the SPKI apart (RSA
modulus and exponent, EC point and curve, Ed25519 point) and the encoders
build JWK (RFC 7517/7518/8037/8812) and OpenSSH (RFC 4253/5656/8709) text.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

__all__ = ["FORMATS", "public_key"]

FORMATS = ("PEM", "DER", "JWK", "OPENSSH")

_RSA = bytes.fromhex("2a864886f70d010101")
_EC = bytes.fromhex("2a8648ce3d0201")
_ED25519 = bytes.fromhex("2b6570")
#: curve OID -> (JWK crv, OpenSSH curve name or None, coordinate bytes)
_CURVES = {
    bytes.fromhex("2a8648ce3d030107"): ("P-256", "nistp256", 32),
    bytes.fromhex("2b81040022"): ("P-384", "nistp384", 48),
    bytes.fromhex("2b81040023"): ("P-521", "nistp521", 66),
    bytes.fromhex("2b8104000a"): ("secp256k1", None, 32),
}


def _tlv(data: bytes, at: int) -> tuple[int, bytes, int]:
    """One DER element at ``at`` -> (tag, content, offset after it)."""
    if at + 2 > len(data):
        raise ValueError("truncated DER")
    tag, n = data[at], data[at + 1]
    at += 2
    if n & 0x80:
        width = n & 0x7F
        if not 0 < width <= 4 or at + width > len(data):
            raise ValueError("bad DER length")
        n = int.from_bytes(data[at : at + width], "big")
        at += width
    if at + n > len(data):
        raise ValueError("truncated DER")
    return tag, data[at : at + n], at + n


def _children(content: bytes) -> list[tuple[int, bytes]]:
    out, at = [], 0
    while at < len(content):
        tag, value, at = _tlv(content, at)
        out.append((tag, value))
    return out


def _parse(spki: bytes) -> tuple[str, dict[str, Any]]:
    """-> ("RSA", {n, e}) | ("EC", {crv, ssh, size, point}) | ("Ed25519", {x})."""
    tag, seq, _ = _tlv(spki, 0)
    parts = _children(seq) if tag == 0x30 else []
    if len(parts) != 2 or parts[0][0] != 0x30 or parts[1][0] != 0x03 or not parts[1][1]:
        raise ValueError("pub_key is not a SubjectPublicKeyInfo")
    alg = _children(parts[0][1])
    oid = alg[0][1]
    bits = parts[1][1][1:]  # skip the unused-bits byte
    if oid == _RSA:
        _, rsa, _ = _tlv(bits, 0)
        (_, n), (_, e) = _children(rsa)[:2]
        return "RSA", {"n": n.lstrip(b"\0"), "e": e.lstrip(b"\0")}
    if oid == _EC and len(alg) > 1 and alg[1][1] in _CURVES:
        crv, ssh, size = _CURVES[alg[1][1]]
        if len(bits) != 1 + 2 * size or bits[0] != 4:
            raise ValueError("only uncompressed EC points are supported")
        return "EC", {"crv": crv, "ssh": ssh, "size": size, "point": bits}
    if oid == _ED25519:
        return "Ed25519", {"x": bits}
    raise ValueError("unsupported public key algorithm in pub_key")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _mpint(value: bytes) -> bytes:
    value = value.lstrip(b"\0")
    if value and value[0] & 0x80:
        value = b"\0" + value
    return _ssh_string(value)


def to_jwk(spki: bytes) -> dict[str, str]:
    kind, f = _parse(spki)
    if kind == "RSA":
        return {"kty": "RSA", "n": _b64url(f["n"]), "e": _b64url(f["e"])}
    if kind == "EC":
        p, size = f["point"], f["size"]
        x, y = p[1 : 1 + size], p[1 + size :]
        return {"kty": "EC", "crv": f["crv"], "x": _b64url(x), "y": _b64url(y)}
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(f["x"])}


def to_openssh(spki: bytes, comment: str | None = None) -> str:
    kind, f = _parse(spki)
    if kind == "RSA":
        name = "ssh-rsa"
        blob = _ssh_string(b"ssh-rsa") + _mpint(f["e"]) + _mpint(f["n"])
    elif kind == "EC":
        if f["ssh"] is None:
            raise ValueError(f"OpenSSH has no key type for the curve {f['crv']}")
        name = f"ecdsa-sha2-{f['ssh']}"
        blob = _ssh_string(name.encode()) + _ssh_string(f["ssh"].encode())
        blob += _ssh_string(f["point"])
    else:
        name = "ssh-ed25519"
        blob = _ssh_string(b"ssh-ed25519") + _ssh_string(f["x"])
    line = f"{name} {base64.b64encode(blob).decode('ascii')}"
    return f"{line} {comment}" if comment else line


def to_pem(spki: bytes) -> str:
    b64 = base64.b64encode(spki).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"


def public_key(sobject: Any, format: str = "PEM") -> str | bytes | dict[str, str]:
    """The public key of ``sobject`` (a key's info) in ``format``.

    PEM and OpenSSH give ``str``, DER ``bytes``, JWK a ``dict``. Raises
    ValueError for a key with no public half (AES, HMAC...) or a form the
    key type has none of (OpenSSH for secp256k1).
    """
    fmt = format.upper()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {format!r}: one of PEM, DER, JWK, OpenSSH")
    spki = sobject.get("pub_key")
    if not spki:
        what = f"key {sobject['name']!r}" if sobject.get("name") else "this key"
        raise ValueError(f"{what} ({sobject.get('obj_type', '?')}) has no public key")
    if isinstance(spki, str):
        spki = base64.b64decode(spki)
    if fmt == "DER":
        return bytes(spki)
    if fmt == "PEM":
        return to_pem(spki)
    if fmt == "JWK":
        jwk = to_jwk(spki)
        if sobject.get("kid"):
            jwk["kid"] = sobject["kid"]
        return jwk
    return to_openssh(spki, sobject.get("name"))
