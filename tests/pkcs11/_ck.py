"""A thin ctypes binding of the module: the raw CK_RV codes and buffers a C caller sees.

python-pkcs11 hides the length-query convention, per-attribute results and error codes behind
exceptions; these tests need them as the spec states them. Each `Module` loads its own copy of
the library file, so its state (initialisation, login, sessions) is its own and not that of
python-pkcs11's instance in the same process.
"""

from __future__ import annotations

import ctypes
import shutil
from ctypes import byref, c_ulong, c_void_p
from pathlib import Path
from typing import Any

CK_ULONG = c_ulong
UNAVAILABLE = CK_ULONG(-1).value  # CK_UNAVAILABLE_INFORMATION

# return values (PKCS#11 2.40 pkcs11t.h)
CKR_OK = 0x0
CKR_HOST_MEMORY = 0x2
CKR_ARGUMENTS_BAD = 0x7
CKR_ATTRIBUTE_SENSITIVE = 0x11
CKR_ATTRIBUTE_TYPE_INVALID = 0x12
CKR_CANT_LOCK = 0xA
CKR_DATA_LEN_RANGE = 0x21
CKR_DEVICE_ERROR = 0x30
CKR_KEY_HANDLE_INVALID = 0x60
CKR_MECHANISM_INVALID = 0x70
CKR_OBJECT_HANDLE_INVALID = 0x82
CKR_OPERATION_ACTIVE = 0x90
CKR_OPERATION_NOT_INITIALIZED = 0x91
CKR_SESSION_HANDLE_INVALID = 0xB3
CKR_SIGNATURE_INVALID = 0xC0
CKR_USER_NOT_LOGGED_IN = 0x101
CKR_RANDOM_SEED_NOT_SUPPORTED = 0x120
CKR_BUFFER_TOO_SMALL = 0x150
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_OS_LOCKING_OK = 0x2
CKU_USER = 1

CKO_PUBLIC_KEY = 2
CKO_PRIVATE_KEY = 3
CKO_SECRET_KEY = 4

CKA_CLASS = 0x0
CKA_LABEL = 0x3
CKA_VALUE = 0x11
CKA_MODULUS = 0x120
CKA_VALUE_LEN = 0x161
CKA_EC_POINT = 0x181

CKM_RSA_PKCS = 0x1
CKM_RSA_PKCS_OAEP = 0x9
CKM_SHA256 = 0x250
CKM_ECDSA_SHA256 = 0x1044
CKM_AES_ECB = 0x1081
CKM_AES_CBC_PAD = 0x1085
CKM_AES_GCM = 0x1087

SLOT = 1


class Attribute(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", c_void_p), ("ulValueLen", CK_ULONG)]


class Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", c_void_p), ("ulParameterLen", CK_ULONG)]


class InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", c_void_p),
        ("DestroyMutex", c_void_p),
        ("LockMutex", c_void_p),
        ("UnlockMutex", c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", c_void_p),
    ]


def mech(m: int, param: bytes | None = None) -> Mechanism:
    """A CK_MECHANISM; the parameter bytes are kept alive on the structure."""
    out = Mechanism(m, None, 0)
    if param is not None:
        buf = ctypes.create_string_buffer(param, len(param))
        out._param = buf  # type: ignore[attr-defined]
        out.pParameter = ctypes.cast(buf, c_void_p)
        out.ulParameterLen = len(param)
    return out


def template(*items: tuple[int, bytes | None] | tuple[int, bytes | None, int]) -> Any:
    """A CK_ATTRIBUTE array: (type, value) or (type, None, buffer size: pValue NULL when 0)."""
    arr = (Attribute * len(items))()
    keep = []
    for i, it in enumerate(items):
        if len(it) == 3:
            size = it[2]
            buf = ctypes.create_string_buffer(size) if size else None
        else:
            value = it[1] or b""
            buf = ctypes.create_string_buffer(value, len(value))
            size = len(value)
        keep.append(buf)
        arr[i].type = it[0]
        arr[i].pValue = ctypes.cast(buf, c_void_p) if buf is not None else None
        arr[i].ulValueLen = size
    arr._keep = keep  # type: ignore[attr-defined]
    return arr


def value(attr: Attribute) -> bytes:
    return ctypes.string_at(attr.pValue, attr.ulValueLen)


class Module:
    """One private copy of the module, its C_* functions returning CK_RV as integers."""

    def __init__(self, module: Path, copy_dir: Path) -> None:
        copy_dir.mkdir(parents=True, exist_ok=True)
        path = copy_dir / module.name
        shutil.copy(module, path)  # a file of its own: the dynamic loader gives it fresh globals
        self.lib = ctypes.CDLL(str(path))

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.lib, name)
        fn.restype = CK_ULONG
        return fn

    def initialize(self, args: InitArgs | None = None) -> int:
        return self.C_Initialize(byref(args) if args is not None else None)

    def open(self, api_key: str | None = None) -> int:
        """A read-write session, logged in with api_key when given."""
        h = CK_ULONG()
        rv = self.C_OpenSession(SLOT, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None, byref(h))
        assert rv == CKR_OK, hex(rv)
        if api_key is not None:
            pin = api_key.encode()
            rv = self.C_Login(h, CKU_USER, pin, len(pin))
            assert rv in (CKR_OK, 0x100), hex(rv)  # 0x100: already logged in (login is global)
        return h.value

    def find(self, h: int, *items: tuple[int, bytes]) -> list[int]:
        t = template(*items)
        assert self.C_FindObjectsInit(h, t, len(items)) == CKR_OK
        found = (CK_ULONG * 64)()
        n = CK_ULONG()
        assert self.C_FindObjects(h, found, 64, byref(n)) == CKR_OK
        assert self.C_FindObjectsFinal(h) == CKR_OK
        return list(found[: n.value])

    def key(self, h: int, label: str, cls: int) -> int:
        (k,) = self.find(h, (CKA_LABEL, label.encode()), (CKA_CLASS, ulong(cls)))
        return k

    def crypt(
        self, fn: str, h: int, data: bytes | None, size: int | None
    ) -> tuple[int, bytes, int]:
        """C_Sign, C_Encrypt, C_DecryptFinal ...: (rv, output, *pulLen); size None: NULL buffer."""
        n = CK_ULONG(size or 0)
        out = ctypes.create_string_buffer(size) if size is not None else None
        if fn.endswith("Final"):
            rv = getattr(self, fn)(h, out, byref(n))
        else:
            rv = getattr(self, fn)(h, data, len(data or b""), out, byref(n))
        got = out.raw[: n.value] if out is not None and rv == CKR_OK else b""
        return rv, got, n.value


def ulong(v: int) -> bytes:
    return bytes(CK_ULONG(v))
