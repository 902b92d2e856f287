"""Requests, responses and the thin result types, shared by both clients."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Record", "Request", "Response", "Sobject"]


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


class Record(dict):
    """A response map whose fields also read as attributes: ``group.name``.

    It is a plain ``dict`` otherwise (compares, serialises and prints as one);
    nested maps are Records too. A missing field raises ``AttributeError``;
    fields named like dict methods (``items``, ``keys``...) need ``record["items"]``.
    """

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for k, v in self.items():
            if isinstance(v, dict | list):
                self[k] = _wrap(v)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


class Sobject(Record):
    """A security object (key) as the daemon describes it: ``kid``, ``name``, ...

    Pass it as ``key=`` to any operation; it is sent as its descriptor.
    """

    __slots__ = ()

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


def wrap(value: Any, model: type[Record] = Record) -> Any:
    """Turn a decoded body into models: maps -> ``model``, lists element-wise."""
    if isinstance(value, Mapping):
        return model(value)
    if isinstance(value, list):
        return [wrap(v, model) for v in value]
    return value
