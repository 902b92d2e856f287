"""A daemon with the HTTP gateway on a free loopback port, per test worker.

The gateway binds port 0 and the daemon writes the URL it got to
``<state_dir>/http.url``; :class:`Http` is a minimal JSON client over it.
"""

from __future__ import annotations

import base64
import http.client as httpclient
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import Daemon, Raw, start_daemon

#: Small bounds, so the size tests stay small.
MAX_FRAME = 256 * 1024
MAX_FIELD = 128 * 1024
CONFIG = f"""
http_enabled = true
http_port = 0
max_frame = {MAX_FRAME}
max_field = {MAX_FIELD}
"""


def gateway_url(d: Daemon, timeout: float = 10.0) -> str:
    path = d.state_dir / "http.url"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no http.url:\n" + d.log.read_text()[-3000:])
        time.sleep(0.02)
    return path.read_text().strip()


class Http:
    """One keep-alive HTTP connection; ``call`` answers like ``Raw.call``."""

    def __init__(self, url: str, token: str | None = None) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host, self.port = parts.hostname, parts.port
        self.conn = httpclient.HTTPConnection(self.host, self.port, timeout=30)
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        h = {"Content-Type": "application/json"} if data is not None else {}
        if self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        h.update(headers or {})
        try:
            self.conn.request(method, path, body=data, headers=h)
            resp = self.conn.getresponse()
        except (httpclient.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.conn.close()
            raise
        body = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        status, hdrs, raw = self.request(method, path, data, headers)
        parsed = (
            json.loads(raw)
            if raw and hdrs.get("content-type", "").startswith("application/json")
            else (raw or None)
        )
        return {"status": status, "body": parsed, "headers": hdrs}

    def login(self, api_key: str) -> dict[str, Any]:
        resp = self.call(
            "POST", "/sys/v1/session/auth", headers={"Authorization": f"Basic {api_key}"}
        )
        assert resp["status"] == 200, resp
        self.token = resp["body"]["access_token"]
        return resp["body"]

    def close(self) -> None:
        self.conn.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def http_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("gateway"), config=CONFIG)
    d.url = gateway_url(d)  # type: ignore[attr-defined]
    yield d
    rc = d.stop()
    assert rc == 0, d.log.read_text()[-3000:]
    assert not (d.state_dir / "http.url").exists()


@pytest.fixture
def http(http_daemon: Daemon) -> Iterator[Http]:
    h = Http(http_daemon.url)  # type: ignore[attr-defined]
    yield h
    h.close()


@pytest.fixture
def admin_http(http_daemon: Daemon) -> Iterator[Http]:
    h = Http(http_daemon.url)  # type: ignore[attr-defined]
    h.login(http_daemon.admin_key)
    yield h
    h.close()


@pytest.fixture
def admin_sock(http_daemon: Daemon) -> Iterator[Raw]:
    r = Raw(http_daemon.socket)
    r.login(http_daemon.admin_key)
    yield r
    r.close()


ROOT = Path(__file__).resolve().parents[3]
