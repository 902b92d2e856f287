"""Nodes started at the same instant on an empty database: one admin, all serve.

Each node has its own state directory; the one that makes the admin (under an
advisory lock, strongroomd.pgstore.PgStore.first_start) writes the key file in
its own, the others find the admin and say where its key is.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from strongroomd.pgstore import migrations

from tests.conftest import Daemon, Raw
from tests.daemon.api.helpers import ok
from tests.multinode.conftest import Cluster
from tests.multinode.pg import Postgres


def test_nodes_started_at_once_make_one_admin(
    tmp_path: Path, postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ("A", "B", "C")
    n = len(names)
    cluster = Cluster(tmp_path, postgres, names=names)
    for k, v in cluster.env.items():  # the shared token, for every node at once
        monkeypatch.setenv(k, v)
    try:
        with ThreadPoolExecutor(n) as pool:
            started = list(pool.map(lambda node: Daemon.start(node), cluster.nodes.values()))
        assert len(started) == n

        with psycopg.connect(cluster.url) as db:
            admins = db.execute("SELECT id FROM principals WHERE kind = 'admin'").fetchall()
            defaults = db.execute("SELECT id FROM groups WHERE name = 'default'").fetchall()
            done = [r[0] for r in db.execute("SELECT name FROM schema_migrations")]
        assert len(admins) == 1 and len(defaults) == 1
        assert sorted(done) == sorted(name for name, _ in migrations())

        # One node wrote the key file, in its own state directory; it works everywhere.
        holders = [
            node for node in cluster.nodes.values() if (node.state_dir / "admin.key").exists()
        ]
        assert len(holders) == 1, [h.state_dir for h in holders]
        key = holders[0].admin_key
        assert base64.b64decode(key).decode().split(":")[0] == admins[0][0]
        for node in cluster.nodes.values():
            r = Raw(node.socket)
            r.login(key)
            groups = ok(r.call("GET", "/sys/v1/groups"))
            assert [g["group_id"] for g in groups if g["name"] == "default"] == [defaults[0][0]]
            r.close()
            if node is not holders[0]:  # the others say where the key is
                log = node.log.read_text()
                assert "made by another node" in log, log[-2000:]
                where = f"node {holders[0].state_dir.name} wrote it to {holders[0].state_dir}"
                assert where in log, log[-2000:]
    finally:
        cluster.stop()
