"""Several strongroomd nodes on one PostgreSQL and one SoftHSM token directory.

``postgres``: one throw-away cluster for the test session (tests/multinode/pg.py).
``cluster``: three nodes (A, B, C) on a fresh database of that cluster and one
fresh token: each node has its own state directory, and all share
``SOFTHSM2_CONF`` (one token directory) and ``database_url``, as nodes on one
network HSM and one replicated database would. A starts first and makes the
admin; the others find it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, SOFTHSM, Daemon, Raw, pkcs11_tool, unique
from tests.multinode.pg import Postgres

MODULE = SOFTHSM


class Node(Daemon):
    """A daemon on the shared token (its SOFTHSM2_CONF) and the shared database."""

    def __init__(self, state_dir: Path, config: Path, env: dict[str, str]) -> None:
        super().__init__(state_dir, config)
        self.env = env

    def start(self, timeout: float = 60.0) -> Node:
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            super().start(timeout)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return self

    def connect(self, api_key: str) -> Raw:
        r = Raw(self.socket)
        r.login(api_key)
        return r


class Cluster:
    def __init__(self, tmp: Path, pg: Postgres, names: tuple[str, ...] = ("A", "B", "C")) -> None:
        self.tmp = tmp
        self.pg = pg
        self.url = pg.create_db(unique("db").replace("-", "_"))
        hsm = tmp / "hsm"
        (hsm / "tokens").mkdir(parents=True, mode=0o700)
        self.conf = hsm / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {hsm / 'tokens'}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        self.pin_file = hsm / "user.pin"
        fd = os.open(self.pin_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"test-user-pin-1234\n")
        os.close(fd)
        self.env = {"SOFTHSM2_CONF": str(self.conf)}
        subprocess.run(
            [sys.executable, "-m", "strongroomd._tokeninit", MODULE, "strongroom"],
            input=b"test-so-pin-1234\ntest-user-pin-1234\n",
            env={**os.environ, **self.env, "PYTHONPATH": str(ROOT / "daemon")},
            check=True,
            capture_output=True,
        )
        self.nodes = {name: self._node(name) for name in names}

    def _node(self, name: str, extra: str = "") -> Node:
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(
            f'pkcs11_module = "{MODULE}"\npin_file = "{self.pin_file}"\n'
            f'database_url = "{self.url}"\nnode_name = "{name}"\n'
            "node_timeout = 4.0\nconfirm_timeout = 3.0\n" + extra
        )
        return Node(self.tmp / name, cfg, self.env)

    def start(self) -> Cluster:
        for node in self.nodes.values():  # A first: it makes the admin
            node.start()
        return self

    @property
    def admin_key(self) -> str:
        return self.nodes["A"].admin_key

    def pkcs11_tool(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """pkcs11-tool on the shared token (a fresh process), with the user PIN."""
        pin = self.pin_file.read_text().strip()
        return pkcs11_tool(self.conf, pin, *args, text=True, check=check)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    pg.start()
    yield pg
    pg.destroy()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), postgres).start()
    yield c
    c.stop()


def wait_for(fn, timeout: float = 20.0, step: float = 0.05):
    """Poll until ``fn()`` is truthy (for state that settles after a restart, never
    to time an assertion): its value, or the last one after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        out = fn()
        if out or time.monotonic() > deadline:
            return out
        time.sleep(step)


def waits_on_a_lock(url: str, node: str) -> bool:
    """Whether a node's database connection is waiting for a lock now (the node
    has reached the write that a test holds back with a row lock)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        (n,) = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock'",
            (f"strongroomd:{node}",),
        ).fetchone()
    return n > 0


def token_ids(cluster: Cluster) -> str:
    """pkcs11-tool's listing of the shared token (a fresh process, the user PIN), once
    it lists keys: SoftHSM's listing can come back empty while the nodes hold the
    token's files, so an empty one is read again (bounded)."""

    def listing() -> str:
        out = cluster.pkcs11_tool("--list-objects", check=True).stdout
        return out if "Object" in out else ""

    out = wait_for(listing, timeout=30)
    assert out, "pkcs11-tool lists no object"
    return out
