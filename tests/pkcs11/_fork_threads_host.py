"""A host that forks while its other threads are in calls: argv module path, API key, EC key
label, a folder for the module's copy.

Threads sign in a loop; the main thread forks FORKS times meanwhile. Each child finds the module
uninitialised (PKCS#11 2.40 6.7.7), calls C_Initialize, logs in and signs, and exits 0; a child
that hangs is killed after a minute. Prints one JSON line: the children's exit codes, the
children's signatures, the codes other than CKR_OK the parent's threads saw."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from ctypes import byref
from pathlib import Path

from tests.pkcs11 import _ck as ck

THREADS = 4
FORKS = 5


def sign(m: ck.Module, h: int, label: str, msg: bytes) -> tuple[int, bytes]:
    k = m.key(h, label, ck.CKO_PRIVATE_KEY)
    rv = m.C_SignInit(h, byref(ck.mech(ck.CKM_ECDSA_SHA256)), k)
    if rv != ck.CKR_OK:
        return rv, b""
    rv, sig, _ = m.crypt("C_Sign", h, msg, 64)
    return rv, sig


def child(m: ck.Module, api_key: str, label: str, i: int) -> None:
    code = 1
    try:
        n = ck.CK_ULONG()
        before = m.C_GetSlotList(0, None, byref(n))
        if before == ck.CKR_CRYPTOKI_NOT_INITIALIZED and m.initialize() == ck.CKR_OK:
            rv, sig = sign(m, m.open(api_key), label, f"child {i}".encode())
            if rv == ck.CKR_OK:
                os.write(1, f"sig {i} {sig.hex()}\n".encode())
                code = 0
    finally:
        os._exit(code)


def wait(pid: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -999  # hung


def main() -> None:
    module, api_key, label, copy_dir = sys.argv[1:5]
    m = ck.Module(Path(module), Path(copy_dir))
    locking = ck.InitArgs(None, None, None, None, ck.CKF_OS_LOCKING_OK, None)
    assert m.initialize(locking) == ck.CKR_OK
    m.open(api_key)
    stop = threading.Event()
    seen: list[int] = []
    running = threading.Barrier(THREADS + 1)

    def work() -> None:
        h = m.open()
        running.wait(60)
        while not stop.is_set():
            rv, _ = sign(m, h, label, b"parent")
            if rv != ck.CKR_OK:
                seen.append(rv)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    running.wait(60)
    codes = []
    for i in range(FORKS):
        time.sleep(0.05)
        pid = os.fork()
        if pid == 0:
            child(m, api_key, label, i)
        codes.append(wait(pid))
    stop.set()
    for t in threads:
        t.join(60)
    assert m.C_Finalize(None) == ck.CKR_OK
    print(json.dumps({"children": codes, "parent_errors": seen}), flush=True)


if __name__ == "__main__":
    main()
