"""Errors that become responses.

Handlers, the keyring and the token layer raise these; only the front ends
turn them into ``{"error": code, "message": ...}`` bodies. The class decides
the status: each class has one, and lists the stable codes it may carry (the
first is its default). A code outside its class is a programming error,
refused when the exception is made, so a status can never drift from its
code. Every code also travels in ``strongroom.wire.CODES``, which clients
read; a test checks that the two agree.

    ApiError
     +-- BadRequest          400 bad_request | malformed_frame | invalid_field | missing_field
     |                           | unknown_field | invalid_value | invalid_key_size | syntax_error
     |    +-- BadTag         400 bad_tag (says nothing more, on purpose)
     +-- Unauthenticated     401 unauthenticated | bad_credentials | token_expired
     +-- Forbidden           403 forbidden
     |    +-- KeyOpNotPermitted  403 key_op_not_permitted
     +-- NotFound            404 not_found | no_such_route
     +-- MethodNotAllowed    405 method_not_allowed
     +-- Conflict            409 conflict | name_exists | group_not_empty
     +-- TooLarge            413 too_large | memory_limit
     +-- Unsupported         422 unsupported_algorithm
     +-- Busy                429 busy
     +-- Internal            500 internal | plugin_runtime_error
     +-- Unavailable         503 unavailable (e.g. the audit log cannot be written; retry later)
     +-- TimeLimit           504 time_limit
     +-- PluginError         the status a plugin chose with Error{status=...} (plugin_error)
"""

from __future__ import annotations

from typing import Any, ClassVar


class ApiError(Exception):
    status: ClassVar[int] = 500
    codes: ClassVar[tuple[str, ...]] = ("internal",)

    def __init__(self, message: str = "", *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        if code is None:
            code = self.codes[0]
        elif code not in self.codes:
            raise ValueError(f"{type(self).__name__} cannot carry code {code!r}")
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class BadRequest(ApiError):
    status = 400
    codes = (
        "bad_request",
        "malformed_frame",
        "invalid_field",
        "missing_field",
        "unknown_field",
        "invalid_value",
        "invalid_key_size",
        "syntax_error",
    )


class BadTag(BadRequest):
    codes = ("bad_tag",)

    def __init__(self, message: str = "", **extra: Any) -> None:
        super().__init__("authentication failed", **extra)  # never more than that


class Unauthenticated(ApiError):
    status = 401
    codes = ("unauthenticated", "bad_credentials", "token_expired")


class Forbidden(ApiError):
    status = 403
    codes = ("forbidden",)


class KeyOpNotPermitted(Forbidden):
    codes = ("key_op_not_permitted",)


class AppPermissionDenied(Forbidden):
    """The app lacks the DSM app permission the operation needs in the key's group."""

    codes = ("app_permission_denied",)


class NotFound(ApiError):
    status = 404
    codes = ("not_found", "no_such_route")


class MethodNotAllowed(ApiError):
    status = 405
    codes = ("method_not_allowed",)


class Conflict(ApiError):
    status = 409
    codes = ("conflict", "name_exists", "group_not_empty")


class TooLarge(ApiError):
    status = 413
    codes = ("too_large", "memory_limit")


class Unsupported(ApiError):
    status = 422
    codes = ("unsupported_algorithm",)


class Busy(ApiError):
    status = 429
    codes = ("busy",)


class Internal(ApiError):
    status = 500
    codes = ("internal", "plugin_runtime_error")


class Unavailable(ApiError):
    """Refused for now, nothing done (unless the message says otherwise): retry later."""

    status = 503
    codes = ("unavailable",)


class TimeLimit(ApiError):
    status = 504
    codes = ("time_limit",)


class PluginError(ApiError):
    """A plugin's own ``Error{status=..., message=...}``: the plugin picks the status
    (4xx/5xx); the code is whatever it named, ``plugin_error`` by default."""

    codes = ("plugin_error",)

    def __init__(self, message: str, status: int, code: str = "plugin_error", **extra: Any) -> None:
        super().__init__(message, **extra)
        self.code = code
        self.status = status  # type: ignore[misc] - per instance, the plugin's choice


#: Every class that may be raised, by code (PluginError is built explicitly).
BY_CODE: dict[str, type[ApiError]] = {
    code: cls
    for cls in (
        BadRequest,
        BadTag,
        Unauthenticated,
        Forbidden,
        KeyOpNotPermitted,
        AppPermissionDenied,
        NotFound,
        MethodNotAllowed,
        Conflict,
        TooLarge,
        Unsupported,
        Busy,
        Internal,
        Unavailable,
        TimeLimit,
    )
    for code in cls.codes
}


def from_code(code: str, message: str, **extra: Any) -> ApiError:
    """The error for a code reported by another process (the sandbox worker)."""
    cls = BY_CODE.get(code)
    if cls is None:
        return Internal(message, **extra)
    return cls(message, code=code, **extra)


def status_of(code: str) -> int:
    return BY_CODE.get(code, Internal).status
