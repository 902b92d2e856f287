"""The wire format shared by the daemon and its clients; no I/O here.

A frame is a 4-byte big-endian length followed by that many bytes of one
msgpack map. Requests are ``{"id", "method", "path", "body", "auth"?}``;
responses are ``{"id", "status", "body"}``. The length prefix lets a reader
refuse an oversized frame before buffering it and resynchronise after a
malformed one, so one bad frame never costs a connection its other requests.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

__all__ = [
    "CODES",
    "HEADER",
    "MAX_FRAME",
    "FrameError",
    "FrameReader",
    "decode",
    "encode",
    "frame",
]

#: Default upper bound of one frame's payload (the daemon's is configurable).
MAX_FRAME = 4 * 1024 * 1024

HEADER = struct.Struct(">I")

#: Stable error codes and the HTTP status each one travels with.
CODES: dict[str, int] = {
    "bad_request": 400,
    "malformed_frame": 400,
    "invalid_field": 400,
    "missing_field": 400,
    "unknown_field": 400,
    "invalid_value": 400,
    "invalid_key_size": 400,
    "bad_tag": 400,
    "syntax_error": 400,
    "plugin_error": 400,
    "unauthenticated": 401,
    "bad_credentials": 401,
    "token_expired": 401,
    "forbidden": 403,
    "key_op_not_permitted": 403,
    "not_found": 404,
    "no_such_route": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "name_exists": 409,
    "group_not_empty": 409,
    "too_large": 413,
    "memory_limit": 413,
    "unsupported_algorithm": 422,
    "busy": 429,
    "internal": 500,
    "plugin_runtime_error": 500,
    "time_limit": 504,
}


class FrameError(Exception):
    """A frame that cannot be read; ``fatal`` means the stream is lost."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


def encode(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def decode(payload: bytes, *, max_field: int = MAX_FRAME) -> Any:
    """Decode one payload; string/bin/container sizes are bounded by ``max_field``."""
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=max_field,
            max_bin_len=max_field,
            max_array_len=max_field,
            max_map_len=max_field,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        if "exceeds max" in str(exc):
            raise FrameError("too_large", f"a field is larger than {max_field} bytes") from None
        raise FrameError("malformed_frame", f"malformed msgpack: {exc}") from None
    except TypeError as exc:  # e.g. unhashable map key
        raise FrameError("malformed_frame", f"malformed msgpack: {exc}") from None


def frame(obj: Any) -> bytes:
    payload = encode(obj)
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Incremental splitter: feed bytes, get whole payloads back."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > self.max_frame:
                raise FrameError(
                    "too_large",
                    f"frame of {size} bytes exceeds the limit of {self.max_frame}",
                    fatal=True,
                )
            if n - pos - 4 < size:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out
