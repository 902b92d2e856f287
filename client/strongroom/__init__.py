"""Strongroom client: a library (``Client``, ``AsyncClient``) and the ``strongroom`` CLI.

Usage::

    import strongroom

    with strongroom.Client() as c:
        digest = c.crypto.digest(b"hello", alg="SHA256").digest
"""

from strongroom._client import DEFAULT_SOCKET, AsyncClient, BaseClient, Client, key_descriptor
from strongroom._exceptions import (
    ApiError,
    BadRequest,
    BadTag,
    Busy,
    Conflict,
    ConnectError,
    EnvelopeError,
    Forbidden,
    InternalError,
    MemoryLimit,
    MethodNotAllowed,
    NotFound,
    PluginError,
    PluginRuntimeError,
    ProtocolError,
    StrongroomError,
    TimeLimit,
    Timeout,
    TooLarge,
    TransportError,
    Unauthenticated,
    Unsupported,
    error_for,
)
from strongroom._models import (
    App,
    AuditRecord,
    ChainCheck,
    DataKey,
    DecryptResult,
    DigestResult,
    EncryptResult,
    Group,
    Invocation,
    MacResult,
    Plugin,
    PluginTestResult,
    Record,
    Request,
    Response,
    SessionToken,
    SignResult,
    Sobject,
    StreamFinal,
    StreamStart,
    StreamStep,
    VerifyResult,
    WrapResult,
)
from strongroom._transports import (
    AsyncBaseTransport,
    AsyncUnixTransport,
    BaseTransport,
    MockTransport,
    UnixTransport,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "ApiError",
    "App",
    "AsyncBaseTransport",
    "AsyncClient",
    "AsyncUnixTransport",
    "AuditRecord",
    "BadRequest",
    "BadTag",
    "BaseClient",
    "BaseTransport",
    "Busy",
    "ChainCheck",
    "Client",
    "Conflict",
    "ConnectError",
    "DataKey",
    "DecryptResult",
    "DigestResult",
    "EncryptResult",
    "EnvelopeError",
    "Forbidden",
    "Group",
    "InternalError",
    "Invocation",
    "MacResult",
    "MemoryLimit",
    "MethodNotAllowed",
    "MockTransport",
    "NotFound",
    "Plugin",
    "PluginError",
    "PluginRuntimeError",
    "PluginTestResult",
    "ProtocolError",
    "Record",
    "Request",
    "Response",
    "SessionToken",
    "SignResult",
    "Sobject",
    "StreamFinal",
    "StreamStart",
    "StreamStep",
    "StrongroomError",
    "TimeLimit",
    "Timeout",
    "TooLarge",
    "TransportError",
    "Unauthenticated",
    "UnixTransport",
    "Unsupported",
    "VerifyResult",
    "WrapResult",
    "__version__",
    "error_for",
    "key_descriptor",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("strongroom._"):
        _obj.__module__ = "strongroom"
del _name, _obj
