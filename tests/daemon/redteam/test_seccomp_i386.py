"""Red team: the worker's seccomp filter and the 32-bit system call ABI.

On x86_64 a process may still enter the kernel through ``int 0x80`` (the i386
ABI, where socket calls also go through socketcall(2)) and through x32
numbers (bit 30). The filter libseccomp builds for the native architecture
must not let either reach socket creation: both fail its architecture check
and the process is killed with SIGSYS. The x32 form is covered by
tests/daemon/sandbox/test_seccomp.py; this runs the i386 one, socketcall
SYS_SOCKET and socket(2) itself (i386 number 359), from machine code executed
after ``worker.setup()`` in a process started as the pool starts workers.
Control: the same code before the filter gets an answer from the kernel (a
descriptor or an error), not a signal.
"""

from __future__ import annotations

import platform
import signal
import subprocess
import sys

import pytest
from strongroomd._sandbox.pool import _child_env

CHILD = r"""
import ctypes, mmap, socket, struct, sys

def int80(nr, a, b, c):
    # mov eax, nr; mov ebx, a; mov ecx, b; mov edx, c; int 0x80; ret
    code = (b"\xb8" + struct.pack("<I", nr) + b"\xbb" + struct.pack("<I", a)
            + b"\xb9" + struct.pack("<I", b) + b"\xba" + struct.pack("<I", c) + b"\xcd\x80\xc3")
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
    return fn()

if sys.argv[1] == "filtered":
    from strongroomd._sandbox import worker
    worker.setup()
if sys.argv[2] == "socket":
    r = int80(359, socket.AF_INET, socket.SOCK_STREAM, 0)
else:
    # socketcall(SYS_SOCKET=1, args) with args -> {AF_INET, SOCK_STREAM, 0} below 4 GiB
    args = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40)  # MAP_32BIT
    args.write(struct.pack("<III", socket.AF_INET, socket.SOCK_STREAM, 0))
    r = int80(102, 1, ctypes.addressof(ctypes.c_char.from_buffer(args)), 0)
print("survived", r, flush=True)
"""


def _run(mode: str, call: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-s", "-c", CHILD, mode, call],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("call", ["socket", "socketcall"])
def test_int80_socket_calls_are_killed_by_the_filter(call: str) -> None:
    if platform.machine() != "x86_64":  # int 0x80 is the x86 ABI (as test_seccomp.py does)
        return
    before = _run("plain", call)
    assert before.returncode == 0 and "survived" in before.stdout, before
    after = _run("filtered", call)
    assert after.returncode == -signal.SIGSYS, after
    assert "survived" not in after.stdout, after
