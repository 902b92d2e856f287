"""Running as a systemd service: the unit, sd_notify, credentials, hardening."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, Raw, pkcs11_tool
from tests.daemon.api.helpers import ok

UNIT = ROOT / "scripts" / "systemd" / "strongroomd.service"
STRONGROOMD = Path(sys.executable).parent / "strongroomd"
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_verifies_and_is_hardened(tmp_path) -> None:
    assert shutil.which("systemd-analyze"), "scripts/_setup.sh installs systemd"
    text = UNIT.read_text()
    exec_start = _unit_settings()["ExecStart"][0].split()[0]
    copy = tmp_path / "strongroomd.service"
    copy.write_text(text.replace(exec_start, str(STRONGROOMD)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "strongroomd.service" not in proc.stderr, proc.stderr  # no warning about the unit
    s = _unit_settings()
    assert s["Type"] == ["notify"]
    assert s["LoadCredential"] == ["pin:/etc/strongroom/pin"]
    assert "STRONGROOM_STATE_DIR=/var/lib/strongroom" in s["Environment"]
    assert "STRONGROOM_SOCKET=/run/strongroom/strongroomd.sock" in s["Environment"]
    for key, value in {
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "StateDirectory": "strongroom",
        "RuntimeDirectory": "strongroom",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "MemoryDenyWriteExecute": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "User": "strongroom",
    }.items():
        assert value in s[key], key
    assert "@system-service" in s["SystemCallFilter"]


class _Notify:
    """The service manager's end of $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if key in m:
                    return m
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if proc.poll() is not None:
                    break
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        raise AssertionError(f"no {key} in {self.messages}")


def _run_like_the_unit(tmp: Path, mdwe: bool = False) -> tuple[subprocess.Popen[bytes], dict]:
    """Start strongroomd with the unit's environment: credential PIN, notify socket, umask."""
    creds = tmp / "credentials"
    creds.mkdir()
    (creds / "pin").write_text("credential-pin-4711\n")
    (creds / "pin").chmod(0o400)
    (tmp / "run").mkdir(mode=0o750)
    notify = _Notify(tmp / "notify.sock")
    env = {
        **os.environ,
        "STRONGROOM_STATE_DIR": str(tmp / "state"),
        "STRONGROOM_SOCKET": str(tmp / "run" / "strongroomd.sock"),
        "CREDENTIALS_DIRECTORY": str(creds),
        "NOTIFY_SOCKET": str(notify.path),
    }
    args = [str(STRONGROOMD), "serve", "--config", str(ROOT / "docs/strongroomd.example.toml")]
    if mdwe:
        args = [sys.executable, "-c", _MDWE_EXEC, *args]
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        args, env=env, stdout=log, stderr=log, cwd=tmp, preexec_fn=lambda: os.umask(0o077)
    )
    return proc, {"notify": notify, "env": env, "log": tmp / "daemon.log"}


_MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
    "    sys.exit(77)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _mdwe_supported() -> bool:
    if sys.platform != "linux":
        return False
    probe = subprocess.run(
        [sys.executable, "-c", _MDWE_EXEC, "/bin/true"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def test_runs_like_the_unit_ready_then_stopping(tmp_path) -> None:
    proc, ctx = _run_like_the_unit(tmp_path)
    try:
        ready = ctx["notify"].wait_for("READY", proc)
        assert ready["READY"] == "1" and "serving" in ready.get("STATUS", "")
        sock = Path(ctx["env"]["STRONGROOM_SOCKET"])
        assert sock.stat().st_mode & 0o777 == 0o660
        state = tmp_path / "state"
        # The credential is the PIN: nothing was generated in its place.
        assert not (state / "softhsm" / "user.pin").exists()
        assert (state / "strongroom.db").stat().st_mode & 0o777 == 0o600
        r = Raw(sock)
        r.login((state / "admin.key").read_text().strip())
        ok(r.call("POST", "/crypto/v1/keys", {"name": "svc", "obj_type": "AES"}))
        r.close()
        proc.send_signal(signal.SIGTERM)
        stopping = ctx["notify"].wait_for("STOPPING", proc)
        assert stopping["STOPPING"] == "1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The token answers to the credential's PIN, as pkcs11-tool sees it.
    conf = tmp_path / "state/softhsm/softhsm2.conf"
    out = pkcs11_tool(conf, "credential-pin-4711", "--list-objects", text=True)
    assert out.returncode == 0 and "label:      svc" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel without PR_SET_MDWE")
def test_memory_deny_write_execute_holds_for_plugins(tmp_path) -> None:
    """The unit's MemoryDenyWriteExecute=yes, applied with the kernel's PR_SET_MDWE."""
    proc, ctx = _run_like_the_unit(tmp_path, mdwe=True)
    try:
        ctx["notify"].wait_for("READY", proc)
        r = Raw(Path(ctx["env"]["STRONGROOM_SOCKET"]))
        r.login((tmp_path / "state" / "admin.key").read_text().strip())
        gid = ok(r.call("POST", "/sys/v1/groups", {"name": "mdwe"}))["group_id"]
        key = ok(
            r.call("POST", "/crypto/v1/keys", {"name": "m", "obj_type": "AES", "group_id": gid})
        )
        code = (
            "function run(input)\n"
            "  local k = assert(Sobject { name = 'm' })\n"
            "  local c = assert(k:encrypt { plain = Blob.from_bytes(input.p), alg = 'AES' })\n"
            "  local t = {} for i = 1, 1000 do t[i] = string.rep('x', i % 7) end\n"
            "  return { n = #t, cipher = c.cipher ~= nil }\n"
            "end"
        )
        out = ok(
            r.call(
                "POST",
                "/sys/v1/plugins/test",
                {"code": code, "input": {"p": "hi"}, "groups": [gid]},
            )
        )
        assert out["status"] == 200, out
        assert out["result"] == {"n": 1000, "cipher": True}
        assert key["kid"]
        r.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
