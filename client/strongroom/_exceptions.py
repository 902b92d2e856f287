"""Every error the client raises, in one tree.

    StrongroomError
     +-- TransportError              the daemon could not be reached or understood
     |    +-- ConnectError           cannot connect to the socket
     |    +-- Timeout                no answer within the client's timeout
     |    +-- ProtocolError          bad frame, unexpected id, connection lost
     +-- EnvelopeError               an envelope file is not one, fails its tag, or
     |                               ``cryptography`` (strongroom[envelope]) is missing
     +-- ApiError                    the daemon answered with an error status
          +-- BadRequest        400  bad_request | invalid_field | missing_field |
          |                          unknown_field | invalid_value | invalid_key_size |
          |                          syntax_error | malformed_frame
          +-- BadTag            400  bad_tag (decrypt/verify failed; no detail, on purpose)
          +-- Unauthenticated   401  unauthenticated | bad_credentials | token_expired
          +-- Forbidden         403  forbidden | key_op_not_permitted | app_permission_denied
          +-- NotFound          404  not_found | no_such_route
          +-- MethodNotAllowed  405  method_not_allowed
          +-- Conflict          409  conflict | name_exists | group_not_empty
          +-- TooLarge          413  too_large
          |    +-- MemoryLimit  413  memory_limit (a plugin went over its memory cap)
          +-- Unsupported       422  unsupported_algorithm
          +-- Busy              429  busy
          +-- InternalError     500  internal
          +-- PluginError       any  plugin_error (the plugin returned an Error)
          |    +-- PluginRuntimeError 500 plugin_runtime_error (has ``traceback``)
          +-- Unavailable       503  unavailable (e.g. the audit log cannot be written:
          |                          key use and changes are refused until it can; retry)
          +-- TimeLimit         504  time_limit

``error_for(status, body)`` turns an error response into the right class: by
the body's stable ``code`` first, then, for a code this client does not know,
by the status. Tests should assert ``exc.code``, which is what the daemon sent.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "BadRequest",
    "BadTag",
    "Busy",
    "Conflict",
    "ConnectError",
    "EnvelopeError",
    "Forbidden",
    "InternalError",
    "MemoryLimit",
    "MethodNotAllowed",
    "NotFound",
    "PluginError",
    "PluginRuntimeError",
    "ProtocolError",
    "StrongroomError",
    "TimeLimit",
    "Timeout",
    "TooLarge",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "Unsupported",
    "error_for",
]


class StrongroomError(Exception):
    """Base class of every error raised by this package."""


class TransportError(StrongroomError):
    """The daemon could not be reached, or its answer could not be read.

    ``socket_path`` names the socket involved, when known.
    """

    def __init__(self, message: str, *, socket_path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.socket_path = socket_path


class ConnectError(TransportError):
    """The socket does not exist, refused the connection, or is not ours to open."""


class Timeout(TransportError):
    """No response arrived within the client's timeout."""


class ProtocolError(TransportError):
    """A frame could not be read, a response did not match, or the connection dropped."""


class EnvelopeError(StrongroomError):
    """An envelope file (``strongroom.envelope``) could not be read or opened.

    ``code``: ``not_envelope`` (not one, or a version this client does not
    know), ``bad_tag`` (wrong key, or the file was changed), or
    ``missing_dependency`` (the ``cryptography`` package is not installed).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ApiError(StrongroomError):
    """An error response: ``status`` (HTTP-style), ``code`` (stable), ``message``, ``body``.

    ``body`` is the whole decoded error body; plugin errors carry extra fields
    there (``traceback``, ``invocation_id``).
    """

    #: The code this class stands for when the daemon sends no usable code.
    code: str = "unknown"
    status: int = 500

    def __init__(
        self,
        status: int | None = None,
        code: str | None = None,
        message: str = "",
        body: Any = None,
    ) -> None:
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.message = message
        self.body = body if body is not None else {"error": self.code, "message": message}
        super().__init__(f"{self.code}: {message}" if message else self.code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r})"


class BadRequest(ApiError):
    code, status = "bad_request", 400


class BadTag(ApiError):
    code, status = "bad_tag", 400


class Unauthenticated(ApiError):
    code, status = "unauthenticated", 401


class Forbidden(ApiError):
    code, status = "forbidden", 403


class NotFound(ApiError):
    code, status = "not_found", 404


class MethodNotAllowed(ApiError):
    code, status = "method_not_allowed", 405


class Conflict(ApiError):
    code, status = "conflict", 409


class TooLarge(ApiError):
    code, status = "too_large", 413


class MemoryLimit(TooLarge):
    code, status = "memory_limit", 413


class Unsupported(ApiError):
    code, status = "unsupported_algorithm", 422


class Busy(ApiError):
    code, status = "busy", 429


class InternalError(ApiError):
    code, status = "internal", 500


class PluginError(ApiError):
    code, status = "plugin_error", 400

    @property
    def invocation_id(self) -> str | None:
        """The invocation's id, to find its audit records (``logs.list(invocation_id=...)``)."""
        inv = self.body.get("invocation_id") if isinstance(self.body, dict) else None
        return inv if isinstance(inv, str) else None


class PluginRuntimeError(PluginError):
    code, status = "plugin_runtime_error", 500

    @property
    def traceback(self) -> str | None:
        """The Lua traceback, when the daemon sent one (admins and test runs)."""
        tb = self.body.get("traceback") if isinstance(self.body, dict) else None
        return tb if isinstance(tb, str) else None


class Unavailable(ApiError):
    code, status = "unavailable", 503


class TimeLimit(ApiError):
    code, status = "time_limit", 504


_BY_CODE: dict[str, type[ApiError]] = {
    "bad_request": BadRequest,
    "malformed_frame": BadRequest,
    "invalid_field": BadRequest,
    "missing_field": BadRequest,
    "unknown_field": BadRequest,
    "invalid_value": BadRequest,
    "invalid_key_size": BadRequest,
    "syntax_error": BadRequest,
    "bad_tag": BadTag,
    "plugin_error": PluginError,
    "unauthenticated": Unauthenticated,
    "bad_credentials": Unauthenticated,
    "token_expired": Unauthenticated,
    "forbidden": Forbidden,
    "key_op_not_permitted": Forbidden,
    "app_permission_denied": Forbidden,
    "not_found": NotFound,
    "no_such_route": NotFound,
    "method_not_allowed": MethodNotAllowed,
    "conflict": Conflict,
    "name_exists": Conflict,
    "group_not_empty": Conflict,
    "too_large": TooLarge,
    "memory_limit": MemoryLimit,
    "unsupported_algorithm": Unsupported,
    "busy": Busy,
    "internal": InternalError,
    "plugin_runtime_error": PluginRuntimeError,
    "unavailable": Unavailable,
    "time_limit": TimeLimit,
}

_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: TooLarge,
    422: Unsupported,
    429: Busy,
    500: InternalError,
    503: Unavailable,
    504: TimeLimit,
}


def error_for(status: int, body: Any) -> ApiError:
    """Build the exception for an error response (by code, else by status)."""
    code = message = None
    if isinstance(body, dict):
        code = body.get("error")
        message = body.get("message")
    if not isinstance(code, str):
        code = None
    if not isinstance(message, str):
        message = "" if body is None or isinstance(body, dict) else repr(body)[:200]
    cls = _BY_CODE.get(code) if code else None
    if cls is None:
        cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InternalError if status >= 500 else ApiError
    return cls(status, code or cls.code, message, body)
