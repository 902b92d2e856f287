"""AES key wrap (RFC 3394, "KW") and with padding (RFC 5649, "KWP").

The block cipher is passed in as a function, so the key-encryption key never
leaves the token: each step is one AES-ECB block operation there. SoftHSM
2.6's own CKM_AES_KEY_WRAP_PAD writes the padded length into the wrapped
key's length indicator, so keys whose length is not a multiple of 8 came back
with zero bytes appended by every other implementation; this module follows
the RFCs and is checked against the ``cryptography`` package in tests.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable

from strongroomd.errors import BadRequest, BadTag

Block = Callable[[bytes], bytes]

KW_IV = b"\xa6" * 8
KWP_PREFIX = b"\xa6\x59\x59\xa6"


def _w(encrypt: Block, a: bytes, blocks: list[bytes]) -> bytes:
    n = len(blocks)
    r = list(blocks)
    (av,) = struct.unpack(">Q", a)
    for j in range(6):
        for i in range(n):
            b = encrypt(struct.pack(">Q", av) + r[i])
            (av,) = struct.unpack(">Q", b[:8])
            av ^= n * j + i + 1
            r[i] = b[8:]
    return struct.pack(">Q", av) + b"".join(r)


def _w_inverse(decrypt: Block, wrapped: bytes) -> tuple[bytes, bytes]:
    n = len(wrapped) // 8 - 1
    (av,) = struct.unpack(">Q", wrapped[:8])
    r = [wrapped[8 * (i + 1) : 8 * (i + 2)] for i in range(n)]
    for j in range(5, -1, -1):
        for i in range(n - 1, -1, -1):
            b = decrypt(struct.pack(">Q", av ^ (n * j + i + 1)) + r[i])
            (av,) = struct.unpack(">Q", b[:8])
            r[i] = b[8:]
    return struct.pack(">Q", av), b"".join(r)


def wrap(encrypt: Block, key: bytes, *, pad: bool) -> bytes:
    if not pad:
        if len(key) < 16 or len(key) % 8:
            raise BadRequest(
                "KW wraps keys of 16 bytes or more in multiples of 8; use KWP", code="invalid_value"
            )
        return _w(encrypt, KW_IV, [key[i : i + 8] for i in range(0, len(key), 8)])
    if not key or len(key) >= 2**32:
        raise BadRequest("KWP wraps 1 byte to 4 GiB", code="invalid_value")
    aiv = KWP_PREFIX + struct.pack(">I", len(key))
    padded = key + bytes(-len(key) % 8)
    if len(padded) == 8:
        return encrypt(aiv + padded)
    return _w(encrypt, aiv, [padded[i : i + 8] for i in range(0, len(padded), 8)])


def unwrap(decrypt: Block, wrapped: bytes, *, pad: bool) -> bytes:
    """The wrapped key; :class:`BadTag` (and nothing more specific) when it does not check."""
    if len(wrapped) % 8 or len(wrapped) < 16:
        raise BadTag()
    if not pad:
        if len(wrapped) < 24:
            raise BadTag()
        a, key = _w_inverse(decrypt, wrapped)
        if not hmac.compare_digest(a, KW_IV):
            raise BadTag()
        return key
    if len(wrapped) == 16:
        block = decrypt(wrapped)
        a, padded = block[:8], block[8:]
    else:
        a, padded = _w_inverse(decrypt, wrapped)
    (mli,) = struct.unpack(">I", a[4:])
    ok = hmac.compare_digest(a[:4], KWP_PREFIX)
    ok &= len(padded) - 8 < mli <= len(padded)
    ok &= not any(padded[mli:]) if mli <= len(padded) else False
    if not ok:
        raise BadTag()
    return padded[:mli]
