"""Small builders shared by the API tests: groups, apps, logged-in connections."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.conftest import Daemon, Raw, unique


def ok(resp: dict[str, Any], status: int = 200) -> Any:
    assert resp["status"] == status, resp
    return resp["body"]


def err(resp: dict[str, Any], code: str) -> dict[str, Any]:
    assert resp["status"] != 200 and resp["body"]["error"] == code, resp
    return resp["body"]


def new_group(admin: Raw) -> str:
    return ok(admin.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]


@dataclass
class App:
    id: str
    api_key: str
    groups: list[str]
    conn: Raw

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return self.conn.call(method, path, body)


def new_app(daemon: Daemon, admin: Raw, groups: list[str]) -> App:
    body = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("app"), "groups": groups}))
    conn = Raw(daemon.socket)
    conn.login(body["credential"]["api_key"])
    return App(body["app_id"], body["credential"]["api_key"], groups, conn)


def new_key(conn: Raw, group: str, **fields: Any) -> dict[str, Any]:
    body = {"name": unique("k"), "obj_type": "AES", "key_size": 256, "group_id": group, **fields}
    return ok(conn.call("POST", "/crypto/v1/keys", body))


def lua_test_run(env: tuple[Raw, str], code: str, input_: Any = None) -> dict[str, Any]:
    """A test run of unsaved Lua as the admin, in the ``env`` group: the whole answer."""
    admin, g = env
    body = {"code": code, "input": input_ or {}, "groups": [g]}
    return ok(admin.call("POST", "/sys/v1/plugins/test", body))


def run_lua(env: tuple[Raw, str], code: str, input_: Any = None) -> Any:
    """A test run that must succeed: its result."""
    out = lua_test_run(env, code, input_)
    assert out["status"] in (200, 204), (out.get("error"), out.get("traceback"))
    return out.get("result")


@contextmanager
def bystander_encrypting(daemon: Daemon, kid: str) -> Iterator[list[int]]:
    """Another admin connection encrypts with ``kid`` in a loop while the block runs;
    yields the statuses it got (all 200 when the daemon kept serving everyone)."""
    bystander = Raw(daemon.socket)
    bystander.login(daemon.admin_key)
    results: list[int] = []
    stop = threading.Event()

    def keep_working() -> None:
        while not stop.is_set():
            r = bystander.call(
                "POST", "/crypto/v1/encrypt", {"key": {"kid": kid}, "alg": "AES", "plain": b"still"}
            )
            results.append(r["status"])

    t = threading.Thread(target=keep_working)
    t.start()
    try:
        yield results
    finally:
        stop.set()
        t.join(30)
        bystander.close()
