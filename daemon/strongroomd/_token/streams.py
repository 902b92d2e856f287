"""Multi-part (streaming) encryption and decryption in the token.

SoftHSM 2.6.1 allows one active operation per session, and the login
session serves every other request, so each stream runs in a PKCS#11
session of its own (two for a GCM decryption, see below), opened at init
and closed at final or when the stream is dropped; the login session is
never touched. python-pkcs11 0.10 cannot bind an operation to a session
other than the one its key object came from, so these calls go through
ctypes to the same module: ``dlopen`` of the path python-pkcs11 loaded
returns the library already initialised and logged in, and session objects
(the hot copies of keys) are visible to every session of the process. Like
every PKCS#11 call, these run on the token thread only.

Why sessions and not stateless single-part calls per chunk (CBC's last
cipher block as the next IV, CTR's counter advanced): that works for CBC and
CTR, but GCM would then need GHASH in the daemon, which means the hash
subkey H in daemon memory and a pure-Python GF(2^128) multiply per block
(tens of seconds for 50 MiB). Measured here: multi-part AES-256-GCM in one
session runs at ~800 MB/s for 1 MiB updates; the token does CBC padding,
CTR counters and GCM's tag itself.

GCM decryption: SoftHSM's multi-part GCM decryption returns nothing before
``C_DecryptFinal`` (it buffers the whole ciphertext, as PKCS#11 appends the
tag to it), so it cannot stream. A GCM decryption therefore runs two
sessions: AES-CTR from GCM's first counter block (IV || 2) gives the
plaintext chunk by chunk, and a GCM *encryption* of that plaintext with the
same key, IV and AAD in the second session yields, at final, the tag of
exactly the ciphertext received (CTR is its own inverse), which is compared
with the caller's in constant time. Both run in the token; no key-derived
value (H, E(J0)) leaves it.
"""

from __future__ import annotations

import ctypes
import hmac
import struct
from dataclasses import dataclass, field
from typing import Any

from pkcs11 import Mechanism

from strongroomd._token.core import Core
from strongroomd.errors import BadTag, Internal, NotFound, Unavailable

_UL = ctypes.c_ulong
_CKF_SERIAL_SESSION = 0x4
_CKR_SESSION_GONE = (0xB0, 0xB3)  # CKR_SESSION_CLOSED, CKR_SESSION_HANDLE_INVALID
#: Return values of a decryption's update/final that mean "the data is not valid".
_BAD_DATA = (0x05, 0x20, 0x21, 0x40, 0x41)
_CTR = struct.Struct("@L16s")

_MECHS = {
    "AES_CBC": Mechanism.AES_CBC_PAD,
    "AES_CBCNOPAD": Mechanism.AES_CBC,
    "AES_CTR": Mechanism.AES_CTR,
    "AES_GCM": Mechanism.AES_GCM,
    "DES3_CBC": Mechanism.DES3_CBC_PAD,
    "DES3_CBCNOPAD": Mechanism.DES3_CBC,
}
#: Modes a stream may use.
KINDS = frozenset(_MECHS)


class _Mech(ctypes.Structure):
    _fields_ = [("mechanism", _UL), ("pParameter", ctypes.c_void_p), ("ulParameterLen", _UL)]


class _GcmParams(ctypes.Structure):
    _fields_ = [
        ("pIv", ctypes.c_void_p),
        ("ulIvLen", _UL),
        ("ulIvBits", _UL),
        ("pAAD", ctypes.c_void_p),
        ("ulAADLen", _UL),
        ("ulTagBits", _UL),
    ]


@dataclass(eq=False)
class Op:
    """One stream's token side: its sessions and what runs in each."""

    kind: str
    decrypting: bool
    #: Sessions: [the operation] or, for GCM decryption, [CTR decryption, GCM encryption].
    sessions: list[int] = field(default_factory=list)
    #: ``Core.reopened`` when started: a re-initialisation ends every session.
    generation: int = 0
    done: bool = False


class _Module:
    """The PKCS#11 functions streams need, from the module python-pkcs11 loaded."""

    def __init__(self, path: str) -> None:
        dll = ctypes.CDLL(path)
        self.open = dll.C_OpenSession
        self.close = dll.C_CloseSession
        self.init = {False: dll.C_EncryptInit, True: dll.C_DecryptInit}
        self.update = {False: dll.C_EncryptUpdate, True: dll.C_DecryptUpdate}
        self.final = {False: dll.C_EncryptFinal, True: dll.C_DecryptFinal}


_modules: dict[str, _Module] = {}
#: Streams with open sessions (one Token per process; see ``abort_all``).
_live: set[Op] = set()


def _module(core: Core) -> _Module:
    path = core._lib.so
    m = _modules.get(path)
    if m is None:
        m = _modules[path] = _Module(path)
    return m


def _failed(rv: int, what: str) -> Exception:
    if rv in _CKR_SESSION_GONE:
        return NotFound("the stream was lost (the token was re-initialised)")
    if rv == 0x31:  # CKR_DEVICE_MEMORY
        return Unavailable("the token is out of memory for streams")
    return Internal(f"the token refused the stream's {what} (0x{rv:x})")


def _check(core: Core, op: Op) -> _Module:
    if op.done:
        raise NotFound("no such stream")
    if op.generation != core.reopened:
        op.done = True
        raise NotFound("the stream was lost (the token was re-initialised)")
    return _module(core)


def _init(
    m: _Module,
    core: Core,
    op: Op,
    kid: str,
    mechanism: int,
    param: bytes | None,
    *,
    decrypting: bool,
) -> None:
    session = _UL()
    rv = m.open(
        _UL(core._slot.slot_id), _UL(_CKF_SERIAL_SESSION), None, None, ctypes.byref(session)
    )
    if rv:
        raise _failed(rv, "session")
    op.sessions.append(session.value)
    buf = ctypes.create_string_buffer(param or b"", len(param or b""))
    mech = _Mech(mechanism, ctypes.cast(buf, ctypes.c_void_p) if param else None, len(param or b""))
    handle = core.hot(kid).wrapper.handle
    rv = m.init[decrypting](session, ctypes.byref(mech), _UL(handle))
    if rv:
        raise _failed(rv, "start")


def _gcm_param(iv: bytes, ad: bytes) -> tuple[bytes, list[Any]]:
    """CK_GCM_PARAMS as bytes, and the buffers it points into (kept alive by the caller)."""
    ivb = ctypes.create_string_buffer(iv, len(iv))
    adb = ctypes.create_string_buffer(ad, max(len(ad), 1))
    p = _GcmParams(
        ctypes.cast(ivb, ctypes.c_void_p),
        len(iv),
        len(iv) * 8,
        ctypes.cast(adb, ctypes.c_void_p) if ad else None,
        len(ad),
        128,
    )
    return bytes(p), [ivb, adb]


def start(core: Core, op: Op, kid: str, iv: bytes, ad: bytes | None) -> Op:
    """Open the stream's session(s) and start the operation (on the token thread).

    ``op`` is made by the caller, so it can end the stream even when it stopped
    waiting for this call."""
    if op.done:
        return op
    m = _module(core)
    op.generation = core.reopened
    _live.add(op)
    kind, decrypting = op.kind, op.decrypting
    try:
        if kind == "AES_GCM":
            gcm, keep = _gcm_param(iv, ad or b"")
            if decrypting:
                # Plaintext from CTR at GCM's first data counter (IV || 2; the
                # 32-bit increment equals the 128-bit one below 2^32 blocks)...
                ctr = _CTR.pack(32, iv + b"\0\0\0\2")
                _init(m, core, op, kid, Mechanism.AES_CTR, ctr, decrypting=True)
            # ...and the tag from a GCM encryption of that plaintext.
            _init(m, core, op, kid, Mechanism.AES_GCM, gcm, decrypting=False)
            del keep
        elif kind == "AES_CTR":
            _init(m, core, op, kid, Mechanism.AES_CTR, _CTR.pack(128, iv), decrypting=decrypting)
        else:
            _init(m, core, op, kid, _MECHS[kind], iv, decrypting=decrypting)
    except BaseException:
        abort(core, op)
        raise
    return op


def _update(m: _Module, session: int, decrypting: bool, data: bytes) -> bytes:
    n = _UL(len(data) + 64)
    out = ctypes.create_string_buffer(n.value)
    rv = m.update[decrypting](_UL(session), data, _UL(len(data)), out, ctypes.byref(n))
    if rv:
        if decrypting and rv in _BAD_DATA:
            raise BadTag()
        raise _failed(rv, "update")
    return ctypes.string_at(out, n.value)


def _final(m: _Module, session: int, decrypting: bool) -> bytes:
    n = _UL(64)
    out = ctypes.create_string_buffer(n.value)
    rv = m.final[decrypting](_UL(session), out, ctypes.byref(n))
    if rv:
        if decrypting and rv in _BAD_DATA:
            raise BadTag()
        raise _failed(rv, "final")
    return ctypes.string_at(out, n.value)


def update(core: Core, op: Op, data: bytes) -> bytes:
    m = _check(core, op)
    try:
        if op.kind == "AES_GCM" and op.decrypting:
            plain = _update(m, op.sessions[0], True, data)
            _update(m, op.sessions[1], False, plain)  # its output is ``data`` again
            return plain
        return _update(m, op.sessions[0], op.decrypting, data)
    except BaseException:
        abort(core, op)
        raise


def final(core: Core, op: Op, tag: bytes | None = None) -> tuple[bytes, bytes | None]:
    """The last output, and GCM's 16-byte tag when encrypting. A GCM decryption
    checks ``tag`` (12 to 16 bytes, a prefix of the full tag) here; the stream
    ends either way."""
    m = _check(core, op)
    try:
        if op.kind == "AES_GCM":
            if op.decrypting:
                rest = _final(m, op.sessions[0], True)
                if rest:
                    _update(m, op.sessions[1], False, rest)
                full = _final(m, op.sessions[1], False)[-16:]
                if tag is None or not hmac.compare_digest(full[: len(tag)], tag):
                    raise BadTag()
                return rest, None
            out = _final(m, op.sessions[0], False)
            return out[:-16], out[-16:]
        return _final(m, op.sessions[0], op.decrypting), None
    finally:
        abort(core, op)


def abort(core: Core, op: Op) -> None:
    """Close the stream's sessions (which ends any active operation in them)."""
    op.done = True
    _live.discard(op)
    sessions, op.sessions = op.sessions, []
    if not sessions or op.generation != core.reopened:
        return
    m = _module(core)
    for s in sessions:
        m.close(_UL(s))


def abort_many(core: Core, ops: list[Op]) -> None:
    for op in ops:
        abort(core, op)


def abort_all(core: Core) -> None:
    """Before the login session closes: end every stream."""
    abort_many(core, list(_live))
