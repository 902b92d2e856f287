"""Errors that become responses.

Handlers and the token layer raise these; only the protocol turns them into
``{"error": code, "message": ...}`` bodies, so a status is chosen in one place.
Every code is listed, with its status, in ``strongroom.wire.CODES``.

    ApiError
     +-- BadRequest        400 bad_request | invalid_field | missing_field | ...
     +-- BadTag            400 bad_tag (says nothing more, on purpose)
     +-- Unauthenticated   401
     +-- Forbidden         403
     +-- NotFound          404
     +-- Conflict          409
     +-- TooLarge          413
     +-- Unsupported       422
     +-- Busy              429
     +-- Internal          500
"""

from __future__ import annotations

from typing import Any

from strongroom.wire import CODES


class ApiError(Exception):
    code = "internal"

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        status: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if self.code not in CODES:
            raise ValueError(f"unregistered error code {self.code!r}")
        self.message = message
        self.extra = extra
        self._status = status  # only a plugin's own Error{status=...} sets this

    @property
    def status(self) -> int:
        return self._status or CODES[self.code]

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class BadRequest(ApiError):
    code = "bad_request"


class BadTag(ApiError):
    code = "bad_tag"

    def __init__(self) -> None:
        super().__init__("authentication failed")


class Unauthenticated(ApiError):
    code = "unauthenticated"


class Forbidden(ApiError):
    code = "forbidden"


class NotFound(ApiError):
    code = "not_found"


class Conflict(ApiError):
    code = "conflict"


class TooLarge(ApiError):
    code = "too_large"


class Unsupported(ApiError):
    code = "unsupported_algorithm"


class Busy(ApiError):
    code = "busy"


class Internal(ApiError):
    code = "internal"
