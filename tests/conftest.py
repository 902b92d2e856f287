"""A real strongroomd on a real SoftHSM token, per test worker.

``daemon`` is session-scoped: one daemon process per pytest worker, on its
own state directory (and so its own token). Tests that kill or restart a
daemon make their own with :func:`start_daemon`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from strongroom import wire

ROOT = Path(__file__).resolve().parent.parent


SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def pkcs11_tool(
    softhsm_conf: Path, pin: str, *args: str, text: bool = False, check: bool = False
) -> subprocess.CompletedProcess[Any]:
    """pkcs11-tool on a SoftHSM token labelled ``strongroom``, logged in with the user
    PIN passed through the environment (never argv): how a test looks at the token
    without the daemon."""
    return subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            SOFTHSM,
            "--token-label",
            "strongroom",
            "--login",
            "--pin",
            "env:SR_PIN",
            *args,
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(softhsm_conf), "SR_PIN": pin},
        capture_output=True,
        text=text,
        timeout=60,
        check=check,
    )


def read_secret_args(kid: str) -> list[str]:
    """pkcs11-tool's arguments that read a secret key's value by its CKA_ID (the kid)."""
    return ["--read-object", "--type", "secrkey", "--id", kid.encode().hex()]


class Daemon:
    def __init__(self, state_dir: Path, config: Path | None = None) -> None:
        self.state_dir = state_dir
        self.config = config
        self.socket = state_dir / "strongroomd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / f"{state_dir.name}.log"

    def start(self, timeout: float = 60.0) -> Daemon:
        env = {**os.environ, "STRONGROOM_STATE_DIR": str(self.state_dir)}
        env.pop("STRONGROOM_SOCKET", None)
        args = [sys.executable, "-m", "strongroomd"]
        if self.config is not None:
            args += ["--config", str(self.config)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"strongroomd exited {self.proc.returncode}:\n" + self.log.read_text()[-3000:]
                )
            if self.socket.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(self.socket))
                        return self
                    except OSError:
                        pass
            time.sleep(0.05)
        raise RuntimeError("strongroomd did not start:\n" + self.log.read_text()[-3000:])

    @property
    def admin_key(self) -> str:
        return (self.state_dir / "admin.key").read_text().strip()

    @property
    def pin(self) -> str:
        return (self.state_dir / "softhsm" / "user.pin").read_text().strip()

    @property
    def softhsm_conf(self) -> Path:
        return self.state_dir / "softhsm" / "softhsm2.conf"

    def read_secret(self, kid: str) -> subprocess.CompletedProcess[bytes]:
        """A secret key's CKA_VALUE read straight from the token with the user PIN
        (pkcs11-tool, bypassing the daemon): how a test checks what the token allows."""
        return pkcs11_tool(self.softhsm_conf, self.pin, *read_secret_args(kid))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        return rc

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


def start_daemon(tmp: Path, name: str = "state", config: str | None = None) -> Daemon:
    cfg = None
    if config is not None:
        cfg = tmp / f"{name}.toml"
        cfg.write_text(config)
    return Daemon(tmp / name, cfg).start()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    rc = d.stop()
    assert rc == 0, d.log.read_text()[-3000:]


class Raw:
    """Speaks frames directly; for protocol tests and as a minimal client."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.reader = wire.FrameReader(64 * 1024 * 1024)
        self.pending: list[Any] = []
        self.next_id = 0

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, method: str, path: str, body: Any = None, **extra: Any) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "path": path, "body": body, **extra}
        self.sock.sendall(wire.frame(msg))
        return self.next_id

    def recv(self) -> dict[str, Any]:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed")
            self.pending += [wire.decode(p) for p in self.reader.feed(data)]
        return self.pending.pop(0)

    def call(self, method: str, path: str, body: Any = None, **extra: Any) -> dict[str, Any]:
        rid = self.send(method, path, body, **extra)
        resp = self.recv()
        assert resp["id"] == rid
        return resp

    def login(self, api_key: str) -> dict[str, Any]:
        resp = self.call("POST", "/sys/v1/session/auth", {"api_key": api_key})
        assert resp["status"] == 200, resp
        return resp["body"]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[Raw]:
    r = Raw(daemon.socket)
    yield r
    r.close()


@pytest.fixture
def admin_raw(daemon: Daemon) -> Iterator[Raw]:
    r = Raw(daemon.socket)
    r.login(daemon.admin_key)
    yield r
    r.close()


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
