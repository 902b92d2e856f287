"""The gateway's port: setting, STRONGROOM_HTTP_PORT, --http-port; a taken port
leaves the gateway off and the daemon serving (server.py ``_serve_http``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import strongroomd

from tests.conftest import ROOT, Raw, start_daemon
from tests.daemon.api.helpers import ok
from tests.daemon.test_operations import strongroomd as run


def _taken() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_port_from_the_environment_and_the_flag_flag_wins(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("http_port = 1111\n")
    out = run("check-config", "--config", str(cfg), env={"STRONGROOM_HTTP_PORT": "2222"})
    assert out.returncode == 0 and "http_port = 2222" in out.stdout, out
    out = run(
        "check-config", "--config", str(cfg), "--http-port", "3333",
        env={"STRONGROOM_HTTP_PORT": "2222"},
    )  # fmt: skip
    assert out.returncode == 0 and "http_port = 3333" in out.stdout, out
    bad = run("check-config", env={"STRONGROOM_HTTP_PORT": "http"})
    assert bad.returncode == 2 and "STRONGROOM_HTTP_PORT must be a port number" in bad.stderr
    bad = run("check-config", "--http-port", "70000")
    assert bad.returncode == 2 and "http_port" in bad.stderr


def test_version_flag() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"strongroomd {strongroomd.__version__}"


def test_a_taken_port_leaves_the_gateway_off_and_the_socket_serving(tmp_path, monkeypatch) -> None:
    holder = _taken()
    port = holder.getsockname()[1]
    monkeypatch.setenv("STRONGROOM_HTTP_PORT", str(port))
    try:
        d = start_daemon(tmp_path, config="http_enabled = true\n")
        try:
            conn = Raw(d.socket)
            conn.login(d.admin_key)
            assert ok(conn.call("GET", "/sys/v1/version"))["version"]
            conn.close()
            warnings = [ln for ln in d.log.read_text().splitlines() if "level=warning" in ln]
            gateway = [ln for ln in warnings if "gateway" in ln]
            assert len(gateway) == 1, warnings
            line = gateway[0]
            assert f"127.0.0.1:{port}" in line and "in use" in line
            assert "http_port" in line and "STRONGROOM_HTTP_PORT" in line
            assert "--http-port" in line
            assert not (d.state_dir / "http.url").exists()
        finally:
            assert d.stop() == 0
    finally:
        holder.close()


def test_http_port_flag_serves_the_gateway_there(tmp_path) -> None:
    with socket.socket() as probe:  # a port free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = tmp_path / "state"
    env = {**os.environ, "STRONGROOM_STATE_DIR": str(state), "STRONGROOM_HTTP": "1"}
    env.pop("STRONGROOM_HTTP_PORT", None)
    log = tmp_path / "log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strongroomd", "--http-port", str(port)],
            env=env,
            stdout=fh,
            stderr=fh,
            cwd=ROOT,
        )
    try:
        url_file = state / "http.url"
        deadline = time.monotonic() + 60
        while not url_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert url_file.exists(), log.read_text()[-3000:]
        assert url_file.read_text().strip() == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sys/v1/health", timeout=10) as r:
            assert r.status == 204
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
