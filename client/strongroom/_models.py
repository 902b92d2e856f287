"""Requests, responses and the result types, shared by both clients.

Every answer map is a :class:`Record`: a ``dict`` whose fields also read as
attributes. The subclasses below declare the fields of the main answers with
their types, so ``out.cipher`` is ``bytes`` to a type checker and an editor;
a declared field the daemon left out reads as None (an undeclared one raises
AttributeError). They stay dicts, so ``out["cipher"]`` and ``json.dumps``
work as before, and a field the daemon adds later is there by item access.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "App",
    "AuditRecord",
    "ChainCheck",
    "DataKey",
    "DecryptResult",
    "DigestResult",
    "EncryptResult",
    "Group",
    "Invocation",
    "MacResult",
    "Plugin",
    "PluginTestResult",
    "Record",
    "Request",
    "Response",
    "SessionToken",
    "SignResult",
    "Sobject",
    "StreamFinal",
    "StreamStart",
    "StreamStep",
    "VerifyResult",
    "WrapResult",
]


@dataclass(slots=True)
class Request:
    """One request frame: ``{"id", "method", "path", "body", "auth"?}``.

    The repr leaves out the body and the bearer token, which may hold secrets.
    """

    id: int
    method: str
    path: str
    body: Any = None
    auth: str | None = None

    def to_wire(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "body": self.body,
        }
        if self.auth is not None:
            msg["auth"] = self.auth
        return msg

    def __repr__(self) -> str:
        return f"<Request id={self.id} {self.method} {self.path}>"


@dataclass(slots=True)
class Response:
    """One response frame. ``id`` None means a connection-level error."""

    status: int
    body: Any = None
    id: int | None = None

    @classmethod
    def from_wire(cls, msg: Any) -> Response:
        """Validate a decoded frame; raises ValueError when it is not a response."""
        if not isinstance(msg, dict):
            raise ValueError("a response frame must be a map")
        rid, status = msg.get("id"), msg.get("status")
        if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
            raise ValueError("response id must be an integer or nil")
        if not isinstance(status, int) or isinstance(status, bool):
            raise ValueError("response status must be an integer")
        return cls(status=status, body=msg.get("body"), id=rid)

    @property
    def is_error(self) -> bool:
        return self.status >= 400

    def __repr__(self) -> str:
        return f"<Response id={self.id} status={self.status}>"


def _wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, Record):
        return Record(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class Record(dict[str, Any]):
    """A response map whose fields also read as attributes: ``group.name``.

    It is a plain ``dict`` otherwise (compares, serialises and prints as one);
    nested maps are Records too. A field the class declares reads as None when
    absent; any other missing field raises ``AttributeError``. Fields named
    like dict methods (``items``, ``keys``...) need ``record["items"]``.
    """

    __slots__ = ()
    #: The fields the class and its bases declare (filled in by __init_subclass__).
    _declared: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names: set[str] = set()
        for klass in cls.__mro__:
            names.update(n for n in inspect.get_annotations(klass) if not n.startswith("_"))
        cls._declared = frozenset(names)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for k, v in self.items():
            if isinstance(v, dict | list):
                self[k] = _wrap(v)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            if name in type(self)._declared:
                return None
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


class Sobject(Record):
    """A security object (key) as the daemon describes it: ``kid``, ``name``, ...

    Pass it as ``key=`` to any operation; it is sent as its descriptor.
    ``value`` is there only in an export's answer.
    """

    __slots__ = ()
    kid: str
    name: str
    obj_type: str
    key_size: int | None
    elliptic_curve: str | None
    key_ops: list[str]
    group_id: str
    description: str
    custom_metadata: dict[str, str]
    created_at: str
    creator: dict[str, str]
    enabled: bool
    transient: bool
    public_only: bool
    transient_key: str | None
    state: str
    pub_key: bytes | None
    value: bytes | None
    activation_date: str | None
    deactivation_date: str | None
    revocation_reason: dict[str, Any] | None
    links: dict[str, Any] | None
    rotation_policy: dict[str, Any] | None

    @property
    def descriptor(self) -> dict[str, Any]:
        """``{"transient_key": ...}`` for a transient key that has one, else ``{"kid": ...}``."""
        if self.get("transient_key") is not None:
            return {"transient_key": self["transient_key"]}
        if self.get("kid") is not None:
            return {"kid": self["kid"]}
        if self.get("name") is not None:
            return {"name": self["name"]}
        raise ValueError("this sobject has neither a kid nor a name")

    def __repr__(self) -> str:
        shown = {k: self[k] for k in ("kid", "name", "obj_type") if k in self}
        return f"Sobject({shown})"


class SessionToken(Record):
    """``session.auth()``: the bearer token of this connection's session."""

    __slots__ = ()
    token_type: str
    access_token: str
    expires_in: int
    entity_id: str


class Group(Record):
    """A group: keys, apps and plugins belong to groups."""

    __slots__ = ()
    group_id: str
    name: str
    description: str
    created_at: str


class App(Record):
    """An app. ``groups`` is DSM's AppGroups map: group id -> the app's
    permissions in that group. ``credential`` (``{"api_key": ...}``) only in the
    answers of ``apps.create`` and ``apps.reset_secret``, once."""

    __slots__ = ()
    app_id: str
    name: str
    description: str
    groups: dict[str, list[str]]
    default_group: str
    enabled: bool
    created_at: str
    credential: Record | None


class Plugin(Record):
    """A plugin; ``source`` (``{"language", "code"}``) when fetched by id."""

    __slots__ = ()
    plugin_id: str
    name: str
    description: str
    groups: list[str]
    default_group: str
    enabled: bool
    plugin_type: str
    version: int
    limits: dict[str, Any]
    audit_read: Any
    request_allowlist: list[str]
    created_at: str
    updated_at: str
    lastupdated_at: str
    legacy_access: bool
    source: Record | None


class PluginTestResult(Record):
    """``plugins.test()``: ``result`` when the run succeeded, else ``error`` and
    ``traceback``; ``output`` is what it printed."""

    __slots__ = ()
    status: int
    output: str
    stats: dict[str, Any]
    invocation_id: str
    result: Any
    error: Any
    traceback: str | None


class Invocation(Record):
    """``plugins.output()``: what a recent invocation printed (admins only)."""

    __slots__ = ()
    invocation_id: str
    plugin_id: str
    at: str
    output: str
    truncated: bool


class AuditRecord(Record):
    """One audit record, as ``logs.list()`` returns them (newest first)."""

    __slots__ = ()
    seq: int
    time: str
    actor_kind: str
    actor_id: str
    action: str
    object_id: str | None
    status: int
    code: str | None
    invocation_id: str | None
    detail: Any


class ChainCheck(Record):
    """``logs.verify()``: whether the audit log's hash chain holds."""

    __slots__ = ()
    ok: bool
    records: int
    head: str
    broken_at: int | None
    reason: str | None


class EncryptResult(Record):
    """``crypto.encrypt()``: ``iv`` for modes that take one, ``tag`` for GCM."""

    __slots__ = ()
    kid: str
    cipher: bytes
    iv: bytes | None
    tag: bytes | None


class DecryptResult(Record):
    """``crypto.decrypt()``."""

    __slots__ = ()
    kid: str
    plain: bytes


class SignResult(Record):
    """``crypto.sign()``: DER for ECDSA, 64 raw bytes for Ed25519."""

    __slots__ = ()
    kid: str
    signature: bytes


class VerifyResult(Record):
    """``crypto.verify()`` and ``crypto.macverify()``: a bad signature is ``result=False``."""

    __slots__ = ()
    kid: str
    result: bool


class MacResult(Record):
    """``crypto.mac()``: ``digest`` holds the same value as ``mac`` (DSM's name)."""

    __slots__ = ()
    kid: str
    mac: bytes
    digest: bytes


class DigestResult(Record):
    """``crypto.digest()``."""

    __slots__ = ()
    digest: bytes


class WrapResult(Record):
    """``crypto.wrapkey()``."""

    __slots__ = ()
    wrapped_key: bytes
    iv: bytes | None


class StreamStart(Record):
    """``crypto.encrypt_init()`` / ``decrypt_init()``: send ``state`` with the next step."""

    __slots__ = ()
    kid: str
    iv: bytes | None
    state: bytes


class StreamStep(Record):
    """``crypto.encrypt_update()`` / ``decrypt_update()``: ``cipher`` or ``plain``."""

    __slots__ = ()
    state: bytes
    cipher: bytes | None
    plain: bytes | None


class StreamFinal(Record):
    """``crypto.encrypt_final()`` (``cipher``, ``tag``) / ``decrypt_final()`` (``plain``)."""

    __slots__ = ()
    cipher: bytes | None
    plain: bytes | None
    tag: bytes | None


class DataKey(Record):
    """A fresh AES data key from ``client.datakey()``, as KMS's GenerateDataKey gives it.

    ``wrapped_key`` is the key wrapped under the KEK ``kid`` with
    ``wrap_alg``/``wrap_mode`` (AES ``KW`` for an AES KEK, RSA
    ``OAEP_MGF1_SHA256`` for an RSA one); store it next to the data.
    ``plaintext`` is the key itself, None when asked for the wrapped form
    only: use it to encrypt locally, then drop it.
    """

    __slots__ = ()
    kid: str
    obj_type: str
    key_size: int
    wrap_alg: str
    wrap_mode: str
    wrapped_key: bytes
    plaintext: bytes | None

    def __repr__(self) -> str:  # never the key itself
        shown = {k: self[k] for k in ("kid", "key_size", "wrap_alg", "wrap_mode") if k in self}
        shown["plaintext"] = "<hidden>" if self.get("plaintext") else None
        return f"DataKey({shown})"


def wrap(value: Any, model: type[Record] = Record) -> Any:
    """Turn a decoded body into models: maps -> ``model``, lists element-wise."""
    if isinstance(value, Mapping):
        return model(value)
    if isinstance(value, list):
        return [wrap(v, model) for v in value]
    return value
