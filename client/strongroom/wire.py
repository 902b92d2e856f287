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
    "app_permission_denied": 403,
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
    "unavailable": 503,
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
    """Decode one payload; string/bin/container sizes are bounded by ``max_field``.

    msgpack ext types (timestamps included) are not part of the protocol: a
    frame holding one is ``malformed_frame``, never ``too_large``.
    """
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=max_field,
            max_bin_len=max_field,
            max_array_len=max_field,
            max_map_len=max_field,
            max_ext_len=0,  # any ext with data fails the length check ...
            ext_hook=_no_ext,  # ... and an empty one reaches this
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        text = str(exc)
        if "max_ext_len" in text or isinstance(exc, _ExtRefused):
            raise FrameError("malformed_frame", "msgpack ext types are not accepted") from None
        if "exceeds max" in text:
            raise FrameError("too_large", f"a field is larger than {max_field} bytes") from None
        raise FrameError("malformed_frame", f"malformed msgpack: {exc}") from None
    except TypeError as exc:  # e.g. unhashable map key
        raise FrameError("malformed_frame", f"malformed msgpack: {exc}") from None


class _ExtRefused(ValueError):
    pass


def _no_ext(code: int, data: bytes) -> Any:
    raise _ExtRefused(f"ext type {code}")


def frame(obj: Any) -> bytes:
    payload = encode(obj)
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Incremental splitter: feed bytes, get whole payloads back.

    :meth:`feed` takes everything at once. The daemon uses :meth:`push` and
    :meth:`next` instead, so it can stop between frames (to apply
    backpressure) and change :attr:`max_frame` (after authentication) for the
    frames still buffered.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0
        #: Payloads returned so far (tells one partial frame from the next).
        self.frames = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a payload."""
        return len(self._buf) - self._pos

    def push(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next(self) -> bytes | None:
        """The next whole payload, or None; an oversized header raises (and stays)."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > self.max_frame:
                raise FrameError(
                    "too_large",
                    f"frame of {size} bytes exceeds the limit of {self.max_frame}",
                    fatal=True,
                )
            if len(buf) - pos - 4 >= size:
                self._pos = pos + 4 + size
                self.frames += 1
                return bytes(buf[pos + 4 : pos + 4 + size])
        if pos:  # keep only the partial frame
            del buf[:pos]
            self._pos = 0
        return None

    def feed(self, data: bytes) -> list[bytes]:
        self.push(data)
        out: list[bytes] = []
        while (payload := self.next()) is not None:
            out.append(payload)
        return out
