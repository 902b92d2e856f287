"""DSM's session refresh and app credential read."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import Daemon, Raw, start_daemon
from tests.daemon.api.helpers import err, new_app, new_group, ok


def test_app_credential_cannot_be_read_back(daemon: Daemon, admin_raw: Raw) -> None:
    app = new_app(daemon, admin_raw, [new_group(admin_raw)])
    try:
        body = err(admin_raw.call("GET", f"/sys/v1/apps/{app.id}/credential"), "conflict")
        assert "reset_secret" in body["message"] and app.api_key not in str(body)
        err(app.call("GET", f"/sys/v1/apps/{app.id}/credential"), "forbidden")
        err(admin_raw.call("GET", "/sys/v1/apps/nope/credential"), "not_found")
    finally:
        app.conn.close()


#: Seconds. Each request below must come within 0.4 TTL of its due time: 1.2 s, not the
#: 0.4 s of a 1 s TTL, which a loaded machine can take for a request.
TTL = 3


@pytest.fixture(scope="module")
def short_sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("ttl"), config=f"session_ttl = {TTL}\n")
    yield d
    assert d.stop() == 0


def test_session_refresh_keeps_a_session_alive(short_sessions: Daemon) -> None:
    r = Raw(short_sessions.socket)
    try:
        r.login(short_sessions.admin_key)
        time.sleep(0.6 * TTL)
        assert r.call("POST", "/sys/v1/session/refresh")["status"] == 204
        time.sleep(0.6 * TTL)  # 1.2 TTL after login: alive only thanks to the refresh
        ok(r.call("GET", "/sys/v1/groups"))
        time.sleep(TTL + 0.1)
        err(r.call("GET", "/sys/v1/groups"), "token_expired")
        err(r.call("POST", "/sys/v1/session/refresh"), "bad_credentials")
    finally:
        r.close()
