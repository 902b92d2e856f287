"""DSM paths, each test once over the Unix socket and once over the HTTP gateway.

``Dual`` wraps a ``Raw`` (frames, bytes as bytes) or an ``Http`` (JSON, bytes
as base64 text) behind one ``call``: bytes in a request body are encoded for
HTTP wherever they are nested, and :func:`blob` reads a binary answer field
from either. The fixtures below run on the gateway's daemon, so both
transports reach the same keys.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.conftest import Daemon, Raw
from tests.daemon.gateway.conftest import Http, http_daemon  # noqa: F401 - a fixture


def _json(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def blob(value: Any) -> bytes:
    """A binary field of an answer: bytes over the socket, base64 over HTTP."""
    return value if isinstance(value, bytes) else base64.b64decode(value)


class Dual:
    def __init__(self, conn: Raw | Http, kind: str) -> None:
        self.conn = conn
        self.kind = kind

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        if self.kind == "http":
            return self.conn.call(method, path, _json(body))
        return self.conn.call(method, path, body)

    def get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        """GET with parameters: a query string over HTTP, the body over the socket."""
        if self.kind == "http":
            return self.conn.call("GET", f"{path}?{urlencode(params)}")
        return self.conn.call("GET", path, params)

    def close(self) -> None:
        self.conn.close()


def connect(d: Daemon, kind: str, api_key: str) -> Dual:
    if kind == "http":
        h = Http(d.url)  # type: ignore[attr-defined]
        h.login(api_key)
        return Dual(h, kind)
    r = Raw(d.socket)
    r.login(api_key)
    return Dual(r, kind)


@pytest.fixture(params=["socket", "http"])
def admin(request: pytest.FixtureRequest, http_daemon: Daemon) -> Iterator[Dual]:  # noqa: F811
    """The admin over one transport (each test runs once per transport)."""
    c = connect(http_daemon, request.param, http_daemon.admin_key)
    yield c
    c.close()
