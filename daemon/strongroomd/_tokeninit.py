"""Initialise a SoftHSM token in a child process, PINs read from stdin.

python-pkcs11 has no C_InitToken and ``softhsm2-util`` takes PINs only from
a terminal or argv (where every local user can read them), so this module
calls the four PKCS#11 functions it needs through ctypes. It runs as
``python -m strongroomd._tokeninit MODULE LABEL`` with ``SOFTHSM2_CONF`` set
and "SO_PIN\\nUSER_PIN\\n" on stdin, in its own process, because a process may
load the module only once and the daemon loads it next through python-pkcs11.
Exit 0 when a token with LABEL exists afterwards (made now or before).
"""

from __future__ import annotations

import ctypes
import sys

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
_INFO_FLAGS_OFFSET = 96  # label[32] manufacturerID[32] model[16] serialNumber[16]

ulong = ctypes.c_ulong


class PKCS11Failure(Exception):
    pass


def _call(lib: ctypes.CDLL, name: str, *args: object) -> None:
    rv = getattr(lib, name)(*args)
    if rv != 0:
        raise PKCS11Failure(f"{name} failed: CKR 0x{rv:x}")


def _slots(lib: ctypes.CDLL) -> list[tuple[int, str, bool]]:
    count = ulong(0)
    _call(lib, "C_GetSlotList", ctypes.c_ubyte(1), None, ctypes.byref(count))
    ids = (ulong * count.value)()
    _call(lib, "C_GetSlotList", ctypes.c_ubyte(1), ids, ctypes.byref(count))
    out = []
    for slot in ids[: count.value]:
        info = ctypes.create_string_buffer(512)
        _call(lib, "C_GetTokenInfo", ulong(slot), info)
        label = info.raw[:32].decode("utf-8", "replace").rstrip()
        flags = ulong.from_buffer_copy(info.raw, _INFO_FLAGS_OFFSET).value
        out.append((slot, label, bool(flags & CKF_TOKEN_INITIALIZED)))
    return out


def ensure_token(module: str, label: str, so_pin: bytes, user_pin: bytes) -> bool:
    """Make the token unless it exists; True when it was made now."""
    lib = ctypes.CDLL(module)
    for fn in (
        "C_Initialize",
        "C_Finalize",
        "C_GetSlotList",
        "C_GetTokenInfo",
        "C_InitToken",
        "C_OpenSession",
        "C_Login",
        "C_InitPIN",
        "C_Logout",
        "C_CloseSession",
    ):
        getattr(lib, fn).restype = ulong
    _call(lib, "C_Initialize", None)
    try:
        slots = _slots(lib)
        if any(init and name == label for _, name, init in slots):
            return False
        free = [slot for slot, _, init in slots if not init]
        if not free:
            raise PKCS11Failure("no free slot to initialise a token in")
        padded = label.encode().ljust(32)[:32]
        _call(lib, "C_InitToken", ulong(free[0]), so_pin, ulong(len(so_pin)), padded)
        # Slot ids change after initialisation in SoftHSM: look the token up again.
        slot = next(s for s, name, init in _slots(lib) if init and name == label)
        session = ulong(0)
        _call(
            lib,
            "C_OpenSession",
            ulong(slot),
            ulong(CKF_SERIAL_SESSION | CKF_RW_SESSION),
            None,
            None,
            ctypes.byref(session),
        )
        _call(lib, "C_Login", session, ulong(CKU_SO), so_pin, ulong(len(so_pin)))
        _call(lib, "C_InitPIN", session, user_pin, ulong(len(user_pin)))
        _call(lib, "C_Logout", session)
        _call(lib, "C_CloseSession", session)
        return True
    finally:
        lib.C_Finalize(None)


def main() -> int:
    module, label = sys.argv[1], sys.argv[2]
    lines = sys.stdin.buffer.read().split(b"\n")
    if len(lines) < 2 or not lines[0] or not lines[1]:
        print("expected SO PIN and user PIN on stdin", file=sys.stderr)
        return 2
    try:
        made = ensure_token(module, label, lines[0], lines[1])
    except PKCS11Failure as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print("created" if made else "exists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
