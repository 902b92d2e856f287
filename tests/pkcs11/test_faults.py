"""Faults: the daemon killed under a threaded signing host, then restarted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from strongroom import Client

from tests.conftest import ROOT, start_daemon, unique
from tests.pkcs11.conftest import build_module


def read_until(proc: subprocess.Popen, word: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"host exited before {word}: {proc.stderr.read()}")
        if line.strip() == word:
            return
    raise TimeoutError(word)


def test_daemon_killed_and_restarted_under_signing_threads(tmp_path: Path) -> None:
    module = build_module()
    d = start_daemon(tmp_path)
    admin = Client(d.socket, d.admin_key)
    g = admin.request("POST", "/sys/v1/groups", {"name": unique("fault")})["group_id"]
    app = admin.request("POST", "/sys/v1/apps", {"name": unique("fault"), "groups": [g]})
    admin.close()
    key = app["credential"]["api_key"]
    label = unique("fault-ec")
    with Client(d.socket, key) as c:
        so = c.request(
            "POST",
            "/crypto/v1/keys",
            {"name": label, "obj_type": "EC", "elliptic_curve": "NistP256"},
        )
    env = {**os.environ, "STRONGROOM_SOCKET": str(d.socket), "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name("_fault_host.py")
    host = subprocess.Popen(
        [sys.executable, str(script), str(module), key, label, "8", so["pub_key"].hex()],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        read_until(host, "READY")
        d.kill9()
        read_until(host, "ERRORS")
        time.sleep(0.3)  # the host keeps failing, and keeps running
        assert host.poll() is None
        d.start()
        read_until(host, "RECOVERED")
        out, err = host.communicate("stop\n", timeout=60)
    finally:
        if host.poll() is None:
            host.kill()
        d.stop()
    assert host.returncode == 0, err
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["bad"] == 0
    assert set(stats["errors"]) <= {"DeviceError", "TokenNotPresent"}, stats
    assert stats["ok_after_error"] >= 20
