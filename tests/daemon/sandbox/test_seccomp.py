"""The sandbox worker has no network: a worker that escaped Lua cannot make a socket.

A plugin's request{} is made by the daemon; the worker process itself runs
under a seccomp filter (``worker.no_network``, installed by ``worker.setup``)
that refuses socket(2) and socketpair(2) of every family, connect, bind,
listen and accept, and io_uring, with EPERM.

Escaping Lua is simulated by running Python in a process started exactly as
the pool starts a worker (same interpreter flags, environment, working
directory, closed descriptors) that calls the worker's own setup function and
then tries everything. One run adds the restriction of the systemd unit that
matters here and can be reproduced without systemd: its SystemCallFilter
refuses seccomp(2) itself with EPERM, so the filter must still load (libseccomp
falls back to prctl). Real workers of a running pool are checked too.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from strongroomd._sandbox import Pool
from strongroomd._sandbox.pool import _child_env
from strongroomd._sandbox.worker import DENIED_SYSCALLS

# Runs in the child. argv[1]: a TCP port listening in the test; argv[2]: "unit" to
# first refuse seccomp(2) with EPERM as the unit's SystemCallFilter does, then
# start again under that filter.
ESCAPED = r"""
import ctypes, errno, json, os, socket, sys

port, mode = int(sys.argv[1]), sys.argv[2]
if mode == "unit":
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(0x7FFF0000)
    nr = lib.seccomp_syscall_resolve_name(b"seccomp")
    assert lib.seccomp_rule_add_array(ctx, 0x00050000 | errno.EPERM, nr, 0, None) == 0
    assert lib.seccomp_load(ctx) == 0  # seccomp(2) is refused from here on
    assert ctypes.CDLL(None, use_errno=True).syscall(nr, 0, 0, None) == -1
    # and a new program starts under it, as the daemon and its workers do under the unit
    os.execv(sys.executable, [sys.executable, "-s", sys.argv[0], str(port), "after-unit"])

# A socket made before the filter, as if one had leaked into the worker.
leaked = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

from strongroomd._sandbox import worker
worker.setup()

out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))

families = {
    "AF_INET": (socket.AF_INET, socket.SOCK_STREAM),
    "AF_INET/udp": (socket.AF_INET, socket.SOCK_DGRAM),
    "AF_INET6": (socket.AF_INET6, socket.SOCK_STREAM),
    "AF_UNIX": (socket.AF_UNIX, socket.SOCK_STREAM),
    "AF_UNIX/dgram": (socket.AF_UNIX, socket.SOCK_DGRAM),
    "AF_NETLINK": (socket.AF_NETLINK, socket.SOCK_RAW),
    "AF_PACKET": (socket.AF_PACKET, socket.SOCK_RAW),
    "AF_VSOCK": (socket.AF_VSOCK, socket.SOCK_STREAM),
}
for name, (fam, kind) in families.items():
    attempt(name, lambda: socket.socket(fam, kind))
attempt("socketpair", socket.socketpair)
attempt("connect", lambda: leaked.connect(("127.0.0.1", port)))
attempt("bind", lambda: leaked.bind(("127.0.0.1", 0)))
attempt("listen", lambda: leaked.listen(1))
libc = ctypes.CDLL(None, use_errno=True)
def raw(nr, *args):
    if libc.syscall(nr, *args) == -1:
        raise OSError(ctypes.get_errno(), "")
if os.uname().machine == "x86_64":
    attempt("io_uring_setup", lambda: raw(425, 8, ctypes.create_string_buffer(120)))
    attempt("raw socket(2)", lambda: raw(41, socket.AF_INET, socket.SOCK_STREAM, 0))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
out["Seccomp"] = status["Seccomp"].strip()
out["NoNewPrivs"] = status["NoNewPrivs"].strip()
sys.stdout.write(json.dumps(out))
sys.stdout.flush()
if len(sys.argv) > 3 and os.uname().machine == "x86_64":
    # an x32 system call (bit 30): not this filter's ABI, so the process is killed
    libc.syscall(0x40000000 | 41, socket.AF_INET, socket.SOCK_STREAM, 0)
    sys.stdout.write("survived")
"""


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "escaped.py"
    path.write_text(ESCAPED)
    return str(path)


def escaped(script: str, port: int, mode: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Python in a process made as the pool makes a worker, after the worker's setup."""
    return subprocess.run(
        [sys.executable, "-s", script, str(port), mode, *extra],
        env=_child_env(),
        cwd="/",
        close_fds=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def check(result: subprocess.CompletedProcess[str], listener: socket.socket) -> None:
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out.pop("Seccomp") == "2" and out.pop("NoNewPrivs") == "1"
    assert out and set(out.values()) == {"EPERM"}, out
    with pytest.raises(BlockingIOError):  # nothing ever connected to it
        listener.accept()


def test_an_escaped_worker_cannot_make_a_socket(listener: socket.socket, script: str) -> None:
    check(escaped(script, listener.getsockname()[1], "plain"), listener)


def test_the_same_under_the_units_syscall_filter(listener: socket.socket, script: str) -> None:
    check(escaped(script, listener.getsockname()[1], "unit"), listener)


def test_other_syscall_abis_are_not_a_way_round(listener: socket.socket, script: str) -> None:
    result = escaped(script, listener.getsockname()[1], "plain", "x32")
    assert json.loads(result.stdout.removesuffix("survived")), result.stderr
    if platform.machine() == "x86_64":
        assert result.returncode == -signal.SIGSYS and "survived" not in result.stdout
    else:
        assert result.returncode == 0


def test_the_filter_names_every_way_to_a_socket() -> None:
    assert set(DENIED_SYSCALLS) >= {
        "socket",
        "socketpair",
        "connect",
        "bind",
        "listen",
        "accept",
        "accept4",
        "io_uring_setup",
    }


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def test_real_workers_run_filtered_and_hold_no_socket() -> None:
    async def go() -> list[int]:
        pool = Pool(warm=2, max_workers=2, inspectable=True)  # its /proc/PID/fd is read
        await pool.start()
        try:
            pids = [w.pid for w in pool._workers]
            for pid in pids:
                st = _status(pid)
                assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
                fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                assert fds and not [f for f in fds if f.startswith("socket:")], fds
            return pids
        finally:
            await pool.close()

    assert len(asyncio.run(go())) == 2
