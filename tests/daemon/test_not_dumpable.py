"""A plugin worker that escaped Lua runs as the daemon's user: it must not be
able to read the daemon's memory (the PIN, hot keys) nor a sibling worker's.

Daemon, worker and probe run as one unprivileged user, as under the shipped
unit (a root test run drops to ``nobody`` with setpriv: root's CAP_SYS_PTRACE
would pass every check and prove nothing). The probe is what an escaped worker
could do: open ``/proc/PID/mem`` of a process of its own user.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

NOBODY = 65534
PROBE = r"""
import sys
try:
    with open(f"/proc/{sys.argv[1]}/mem", "rb"):
        print("open")
except PermissionError:
    print("denied")
"""


def as_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args]


def probe(pid: int) -> str:
    out = subprocess.run(
        as_user([sys.executable, "-c", PROBE, str(pid)]), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def yama_allows_same_user() -> bool:
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    return not scope.exists() or scope.read_text().strip() == "0"


HOLD = r"""
import sys, time
if sys.argv[1] == "1":
    from strongroomd.main import _not_dumpable
    _not_dumpable()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("hardened", [True, False])
def test_the_daemon_makes_itself_unreadable_by_its_own_user(hardened: bool) -> None:
    # What strongroomd's serve does first unless ``inspectable = true`` (main._serve).
    proc = subprocess.Popen(
        as_user([sys.executable, "-c", HOLD, "1" if hardened else "0"]),
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        if hardened:
            assert probe(proc.pid) == "denied"
        elif yama_allows_same_user():  # the probe works: an ordinary process is readable
            assert probe(proc.pid) == "open"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("inspectable", [False, True])
def test_a_plugin_worker_is_not_readable_by_its_siblings(inspectable: bool) -> None:
    env = {**os.environ, "STRONGROOM_INSPECTABLE": "1" if inspectable else "0"}
    worker = subprocess.Popen(
        as_user([sys.executable, "-m", "strongroomd._sandbox.worker"]),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert worker.stdout is not None and worker.stdout.read(4)  # "ready": set up
        if not inspectable:
            assert probe(worker.pid) == "denied"
        elif yama_allows_same_user():
            assert probe(worker.pid) == "open"
    finally:
        worker.kill()
        worker.wait()
