"""TR-31 / ANSI X9.143 key blocks, opened and sealed in the daemon with ``psec``.

The token has no TR-31 mechanism, so the key block protection key's value
(and, to seal, the target key's value) is read from the token -- only for
keys whose key_ops include EXPORT -- and handed to psec, which implements the
key derivation, encryption and MAC of versions A, B, C and D.
"""

from __future__ import annotations

from typing import Any

from strongroomd.errors import BadRequest

MAX_BLOCK = 16384
#: The header fields of DSM's Tr31Envelope, in order; key_context is X9.143's
#: byte 15 (psec calls bytes 15-16 "reserved").
FIELDS = (
    "version",
    "key_usage",
    "algorithm",
    "mode_of_use",
    "key_version_number",
    "exportability",
    "key_context",
)
_WIDTH = {
    "version": 1,
    "key_usage": 2,
    "algorithm": 1,
    "mode_of_use": 1,
    "key_version_number": 2,
    "exportability": 1,
}


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_value")


def header_text(h: dict[str, Any]) -> str:
    """A 16-character TR-31 header (no optional blocks) from DSM's envelope fields."""
    out = []
    for name, width in _WIDTH.items():
        v = h.get(name)
        if name == "key_version_number" and v is None:
            v = "00"
        if not isinstance(v, str) or len(v) != width or not v.isascii() or not v.isprintable():
            raise _bad(f"TR-31 header: {name} is {width} printable ASCII character(s)")
        out.append(v)
    ctx = h.get("key_context") or "0"
    if not isinstance(ctx, str) or len(ctx) != 1 or not ctx.isdigit():
        raise _bad("TR-31 header: key_context is one digit (0 to 9)")
    v, usage, alg, mode, kvn, exp = out
    return f"{v}0016{usage}{alg}{mode}{kvn}{exp}00{ctx}0"


def seal(kbpk: bytes, header: dict[str, Any], key: bytes) -> str:
    import psec.tr31

    try:
        return str(psec.tr31.wrap(kbpk, header_text(header), key))
    except (psec.tr31.HeaderError, psec.tr31.KeyBlockError) as exc:
        raise _bad(f"TR-31: {exc}") from None


def open_(kbpk: bytes, block: str) -> tuple[dict[str, str], bytes]:
    """(header fields, key bytes) of a key block; refuses one whose MAC does not verify."""
    import psec.tr31

    if not isinstance(block, str) or not 16 <= len(block) <= MAX_BLOCK or not block.isascii():
        raise _bad(f"a TR-31 key block is 16 to {MAX_BLOCK} ASCII characters")
    try:
        h, key = psec.tr31.unwrap(kbpk, block)
    except (psec.tr31.HeaderError, psec.tr31.KeyBlockError) as exc:
        raise _bad(f"TR-31: {exc}") from None
    fields = {
        "version": h.version_id,
        "key_usage": h.key_usage,
        "algorithm": h.algorithm,
        "mode_of_use": h.mode_of_use,
        "key_version_number": h.version_num,
        "exportability": h.exportability,
        "key_context": h.reserved[:1],
    }
    return fields, key
