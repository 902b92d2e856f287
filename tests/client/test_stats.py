"""Logs.stats in the client library: DSM's transaction statistics (admin)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from strongroom import AsyncClient, Client, Forbidden


def test_stats_of_one_key_count_its_uses_and_apps_are_refused(daemon) -> None:
    now = int(time.time())
    window = {"range_from": now - 600, "range_to": now + 600, "num_points": 1}
    with Client(daemon.socket, api_key=daemon.admin_key, timeout=30) as c:
        group = c.groups.create(f"stats-{uuid.uuid4().hex[:8]}")
        key = c.keys.create(f"k-{uuid.uuid4().hex[:8]}", "AES", group_id=group["group_id"])
        for _ in range(3):
            c.crypto.encrypt(key=key, plain=b"x")
        (bucket,) = c.logs.stats("key", key, **window)["time"]["buckets"]
        assert bucket["doc_count"] == 3
        (bucket,) = c.logs.stats("group", group["group_id"], **window)["time"]["buckets"]
        assert bucket["doc_count"] == 3
        (bucket,) = c.logs.stats("apps", **window)["time"]["buckets"]
        assert "total_txn" in bucket  # the busiest apps (the admin is not one)
        with pytest.raises(ValueError):
            c.logs.stats("key")  # one key's stats need its id
        with pytest.raises(ValueError):
            c.logs.stats("planets")
        app = c.apps.create(f"a-{uuid.uuid4().hex[:8]}", groups=[group["group_id"]])
    app_key = app["credential"]["api_key"]
    with Client(daemon.socket, api_key=app_key, timeout=30) as a, pytest.raises(Forbidden):
        a.logs.stats("key", key)


def test_async_stats(daemon) -> None:
    async def go() -> dict:
        async with AsyncClient(daemon.socket, api_key=daemon.admin_key, timeout=30) as c:
            return await c.logs.stats("groups")

    assert all("total_txn" in b for b in asyncio.run(go())["time"]["buckets"])
