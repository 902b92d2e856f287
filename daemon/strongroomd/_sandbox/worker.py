"""The sandbox worker: ``python -m strongroomd._sandbox.worker``.

Spawned (fork+exec) by :mod:`strongroomd._sandbox.pool` with a minimal
environment. Its stdin and stdout are its one channel: length-prefixed
msgpack frames, as in :mod:`strongroom.wire`. It holds no keys, opens no
database and no socket; it never imports pkcs11. Before anything else it
caps itself with rlimits, so a Lua escape is still a small, short-lived
process that can only ask the daemon for what the plugin may already do.
Before any Lua runs, a seccomp filter takes the network away for good
(:func:`no_network`): a plugin's ``request{}`` is made by the daemon.

Messages (daemon -> worker, worker -> daemon)::

    -> {"t": "syntax", "code", "name"}            <- {"t": "syntax", "message"?}
    -> {"t": "bind", "id", "version", "name", "code", "memory"}
                                                  <- {"t": "bound", "message"?}
    -> {"t": "run", "args": bin, "limits": {...}} <- {"t": "call", "method", "path", "body"}*
                                                  -> {"t": "reply", "status", "body"}
                                                  <- {"t": "http", "method", "url", "headers",
                                                      "body"}* (request{}; answered by a reply)
                                                  <- {"t": "log", "message", "severity"}*
                                                  <- {"t": "done", "kind", ...}

Every invocation gets a fresh Lua state: the trusted prelude (compiled once
to bytecode here) builds the plugin's environment in it, then the plugin's
own chunk (compiled once per binding) runs in a hooked coroutine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import struct
import sys
import time
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
ADDRESS_SPACE = 1024 * 1024 * 1024
CPU_HARD = 3600  # seconds of CPU over the worker's life; it retires at half of this
MAX_CODEC = 4 * 1024 * 1024
# An error message or traceback is a few lines; a plugin's `error(string.rep(...))`
# of megabytes made the done frame larger than the daemon accepts, and the worker
# was dropped as broken. Cut them here (characters, after decoding).
MAX_MESSAGE = 4096
MAX_TRACEBACK = 16384


def _limit(which: int, soft: int, hard: int | None = None) -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(which, (soft, soft if hard is None else hard))


NICE = 5
#: Set to "1" by the pool when the daemon's ``inspectable`` setting is on.
INSPECTABLE = "STRONGROOM_INSPECTABLE"


def _confine() -> None:
    """rlimits and no_new_privs; applied before lupa (or anything big) loads."""
    _limit(resource.RLIMIT_AS, ADDRESS_SPACE)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, 0)
    _limit(resource.RLIMIT_NOFILE, 16)
    _limit(resource.RLIMIT_FSIZE, 0)
    _limit(resource.RLIMIT_CPU, CPU_HARD, CPU_HARD)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the daemon
        if os.environ.get(INSPECTABLE) != "1":
            libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE: no /proc/PID/mem for siblings
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Plugin code never outranks the daemon for the CPU: the daemon keeps
    # serving other requests while a plugin computes, and the next Lua state
    # (built after each reply) does not compete with the reply's delivery.
    os.nice(NICE)


# -- no network (issue 11) ------------------------------------------------------------
# A plugin's request{} is made by the daemon (strongroomd/outbound.py). The worker
# itself may not create a socket of any family, nor connect, bind, listen or accept
# on one it somehow holds (it holds none: its channel is two pipes), nor use
# io_uring, which opens sockets without socket(2). Each fails with EPERM. A seccomp
# filter cannot be removed and survives execve. libseccomp builds it; the worker
# loads it with prctl(PR_SET_SECCOMP), because the systemd unit's
# SystemCallFilter=@system-service refuses seccomp(2) (libseccomp's own loader may
# pick that call and fail). Network namespaces are no option: the unit's
# RestrictNamespaces=yes and PrivateUsers=yes rule them out.
DENIED_SYSCALLS = (
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000


def no_network() -> None:
    """Install the filter (see above); OSError when it cannot be installed."""
    import errno

    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as exc:
        raise OSError(f"libseccomp.so.2 is missing (install libseccomp2): {exc}") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    # the array form: seccomp_rule_add() is variadic, which ctypes cannot call portably
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for name in DENIED_SYSCALLS:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == -1:  # __NR_SCMP_ERROR: no such call on this architecture
                continue
            rc = lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ERRNO | errno.EPERM, nr, 0, None)
            if rc < 0:
                raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")
        r, w = os.pipe()  # the program is a few hundred bytes: it fits in the pipe
        try:
            rc = lib.seccomp_export_bpf(ctx, w)
            if rc < 0:
                raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
            os.close(w)
            w = -1
            program = b""
            while chunk := os.read(r, 65536):
                program += chunk
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    finally:
        lib.seccomp_release(ctx)
    if not program or len(program) % 8:
        raise OSError("seccomp: libseccomp exported no usable program")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [
        ctypes.c_int,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


# -- channel -------------------------------------------------------------------


class _Channel:
    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd

    def _read_exact(self, n: int) -> bytes:
        chunks, need = [], n
        while need:
            chunk = os.read(self.rfd, min(need, 1 << 20))
            if not chunk:
                os._exit(0)  # the daemon is gone
            chunks.append(chunk)
            need -= len(chunk)
        return b"".join(chunks)

    def read(self) -> bytes:
        (size,) = HEADER.unpack(self._read_exact(4))
        if size > MAX_FRAME:
            os._exit(3)
        return self._read_exact(size)

    def write_payload(self, payload: bytes) -> None:
        data = memoryview(HEADER.pack(len(payload)) + payload)
        while data:
            n = os.write(self.wfd, data)
            data = data[n:]

    def send(self, obj: Any) -> None:
        self.write_payload(msgpack.packb(obj, use_bin_type=True))

    def recv(self) -> Any:
        return msgpack.unpackb(self.read(), raw=False, max_ext_len=0)


# -- what Lua may ask of Python ---------------------------------------------------
# Every operation takes and returns Lua strings (bytes) or numbers; a failure is
# returned as (None, b"message"), never raised, so no Python exception object
# can reach Lua.


def _b64decode(s: bytes) -> bytes:
    s = s.strip()
    s = s.replace(b"-", b"+").replace(b"_", b"/")
    s += b"=" * (-len(s) % 4)
    return base64.b64decode(s, validate=True)


def _bitop(op: str):
    def f(a: bytes, b: bytes, _c: Any) -> bytes:
        x, y = int.from_bytes(a, "big"), int.from_bytes(b, "big")
        r = x & y if op == "and" else x | y if op == "or" else x ^ y
        return r.to_bytes(len(a), "big")

    return f


def _iso_parse(s: bytes, _b: Any, _c: Any) -> int:
    text = s.decode("ascii").strip()
    for fmt in ("%Y%m%dT%H%M%SZ", "%Y%m%dT%H%M%S.%fZ"):
        try:
            dt = datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.UTC)
            break
        except ValueError:
            dt = None
    if dt is None:
        dt = datetime.datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.UTC)
    delta = dt - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    ns = (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    if not -(2**63) <= ns < 2**63:  # else lupa fails to convert it: "internal error"
        raise ValueError("time out of range (years 1678 to 2262)")
    return ns


def _iso_format(ns: int, _b: Any, _c: Any) -> bytes:
    secs = ns // 1_000_000_000
    dt = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=secs)
    return dt.strftime("%Y%m%dT%H%M%SZ").encode()


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, max_ext_len=0)


def _pack(value: Any) -> bytes:
    out = msgpack.packb(value, use_bin_type=True)
    if len(out) > MAX_CODEC:
        raise ValueError("value too large")
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        return base64.b64encode(o).decode()
    raise TypeError(f"cannot encode {type(o).__name__}")


def _json_encode(packed: bytes, _b: Any, _c: Any) -> bytes:
    return json.dumps(
        _unpack(packed), default=_json_default, ensure_ascii=False, separators=(",", ":")
    ).encode()


def _json_decode(s: bytes, _b: Any, _c: Any) -> bytes:
    if len(s) > MAX_CODEC:
        raise ValueError("input too large")
    return _pack(json.loads(s))


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError("integer out of range")


def _cbor_enc(v: Any, out: list[bytes], depth: int = 0) -> None:
    if depth > 100:
        raise ValueError("value nested too deeply")
    if v is None:
        out.append(b"\xf6")
    elif v is True or v is False:
        out.append(b"\xf5" if v else b"\xf4")
    elif isinstance(v, int):
        out.append(_cbor_head(0, v) if v >= 0 else _cbor_head(1, -1 - v))
    elif isinstance(v, float):
        out.append(b"\xfb" + struct.pack(">d", v))
    elif isinstance(v, bytes):
        out += (_cbor_head(2, len(v)), v)
    elif isinstance(v, str):
        b = v.encode()
        out += (_cbor_head(3, len(b)), b)
    elif isinstance(v, list):
        out.append(_cbor_head(4, len(v)))
        for x in v:
            _cbor_enc(x, out, depth + 1)
    elif isinstance(v, dict):
        out.append(_cbor_head(5, len(v)))
        for k, x in v.items():
            _cbor_enc(k, out, depth + 1)
            _cbor_enc(x, out, depth + 1)
    else:
        raise ValueError(f"cannot encode {type(v).__name__}")


def _cbor_encode(packed: bytes, _b: Any, _c: Any) -> bytes:
    out: list[bytes] = []
    _cbor_enc(_unpack(packed), out)
    return b"".join(out)


def _cbor_dec(s: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if depth > 100:
        raise ValueError("CBOR nested too deeply")
    ib = s[pos]
    pos += 1
    major, info = ib >> 5, ib & 31
    if major == 7:
        if info == 20:
            return False, pos
        if info == 21:
            return True, pos
        if info in (22, 23):
            return None, pos
        if info == 25:
            return struct.unpack_from(">e", s, pos)[0], pos + 2
        if info == 26:
            return struct.unpack_from(">f", s, pos)[0], pos + 4
        if info == 27:
            return struct.unpack_from(">d", s, pos)[0], pos + 8
        raise ValueError("unsupported CBOR simple value")
    if info < 24:
        n = info
    elif info < 28:
        size = 1 << (info - 24)
        n = int.from_bytes(s[pos : pos + size], "big")
        if pos + size > len(s):
            raise ValueError("truncated CBOR")
        pos += size
    else:
        raise ValueError("indefinite-length CBOR items are not supported")
    if major == 0:
        return n, pos
    if major == 1:
        return -1 - n, pos
    if major in (2, 3):
        if pos + n > len(s):
            raise ValueError("truncated CBOR")
        raw = s[pos : pos + n]
        return (raw if major == 2 else raw.decode()), pos + n
    if major == 4:
        if n > len(s):
            raise ValueError("truncated CBOR")
        items = []
        for _ in range(n):
            v, pos = _cbor_dec(s, pos, depth + 1)
            items.append(v)
        return items, pos
    if major == 5:
        if n > len(s):
            raise ValueError("truncated CBOR")
        m: dict[Any, Any] = {}
        for _ in range(n):
            k, pos = _cbor_dec(s, pos, depth + 1)
            v, pos = _cbor_dec(s, pos, depth + 1)
            if isinstance(k, (list, dict)):
                raise ValueError("unsupported CBOR map key")
            m[k] = v
        return m, pos
    return _cbor_dec(s, pos, depth + 1)  # major 6: a tag; keep the tagged value


def _cbor_decode(s: bytes, _b: Any, _c: Any) -> bytes:
    if len(s) > MAX_CODEC:
        raise ValueError("input too large")
    try:
        v, pos = _cbor_dec(s, 0, 0)
    except (IndexError, struct.error):
        raise ValueError("truncated CBOR") from None
    if pos != len(s):
        raise ValueError("trailing bytes after CBOR value")
    return _pack(v)


# -- BigNum, base58, RIPEMD160, EC points, RSA public numbers -----------------------
# Python integers behind a size limit: an operand or result over MAX_BN_BITS is
# refused (the Lua side refuses oversized inputs before they get here too).
MAX_BN_BITS = 16384
B58 = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _bn_int(h: bytes) -> int:
    if len(h) > MAX_BN_BITS // 4 + 1:
        raise ValueError(f"BigNum: more than {MAX_BN_BITS} bits")
    return int(h, 16)


def _bn_out(v: int) -> bytes:
    if v.bit_length() > MAX_BN_BITS:
        raise ValueError(f"BigNum: the result has more than {MAX_BN_BITS} bits")
    return (b"-%x" % -v) if v < 0 else (b"%x" % v)


def _bn(op: bytes, a: bytes, b: Any) -> Any:
    name = op.decode()
    if name == "frombytes":
        if len(a) > MAX_BN_BITS // 8:
            raise ValueError(f"BigNum: more than {MAX_BN_BITS} bits")
        return _bn_out(int.from_bytes(a, "big"))
    x = _bn_int(a)
    if name == "tobytes":
        if x < 0:
            raise ValueError("BigNum:to_bytes_be: the number is negative")
        size = (x.bit_length() + 7) // 8 or 1
        if b is not None:
            pad = int(b)
            if pad < size and not (x == 0 and pad == 0):
                raise ValueError(f"BigNum:to_bytes_be_zero_pad: the number needs {size} bytes")
            size = pad
        return x.to_bytes(size, "big")
    if name == "bits":
        return abs(x).bit_length()
    if name == "dec":
        return str(x).encode()
    if name == "toint":
        if not -(2**63) <= x < 2**63:
            raise ValueError("BigNum:to_int: the number does not fit in 64 bits")
        return x
    if name == "modexp":
        e, m = (_bn_int(v) for v in b.split(b":"))
        if m <= 0:
            raise ValueError("BigNum:mod_exp: the modulus must be positive")
        if e < 0:
            raise ValueError("BigNum:mod_exp: the exponent must not be negative")
        return _bn_out(pow(x, e, m))
    y = _bn_int(b)
    if name == "add":
        return _bn_out(x + y)
    if name == "sub":
        return _bn_out(x - y)
    if name == "mul":
        if x.bit_length() + y.bit_length() > MAX_BN_BITS + 1:
            raise ValueError(f"BigNum: the result has more than {MAX_BN_BITS} bits")
        return _bn_out(x * y)
    if name == "cmp":
        return (x > y) - (x < y)
    if y == 0:
        raise ValueError("BigNum: division by zero")
    if name == "div":  # truncated toward zero, as C's (and OpenSSL's BN_div)
        q = abs(x) // abs(y)
        return _bn_out(q if (x < 0) == (y < 0) else -q)
    if name == "mod":  # never negative, as OpenSSL's BN_nnmod
        return _bn_out(x % abs(y))
    if name == "modinv":
        return _bn_out(pow(x, -1, abs(y)))
    raise ValueError(f"BigNum: unknown operation {name}")


def _b58encode(data: bytes, _b: Any, _c: Any) -> bytes:
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, r = divmod(n, 58)
        out.append(B58[r])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return b"1" * zeros + bytes(reversed(out))


def _b58decode(text: bytes, _b: Any, _c: Any) -> bytes:
    n = 0
    for ch in text:
        i = B58.find(bytes([ch]))
        if i < 0:
            raise ValueError("Blob.from_base58: not a base58 character: " + chr(ch))
        n = n * 58 + i
    zeros = len(text) - len(text.lstrip(b"1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def _ripemd160(data: bytes, _b: Any, _c: Any) -> bytes:
    try:
        return hashlib.new("ripemd160", data).digest()
    except ValueError:
        raise ValueError("RIPEMD160 is not available in this Python's OpenSSL") from None


def _time_fmt(ns: int, fmt: bytes, _c: Any) -> bytes:
    dt = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
        microseconds=ns // 1000
    )
    out = dt.strftime(fmt.decode("utf-8"))
    return out.encode()[:4096]


_CURVES = {
    "secp256k1": "SECP256K1",
    "nistp256": "SECP256R1",
    "secp256r1": "SECP256R1",
    "nistp384": "SECP384R1",
    "secp384r1": "SECP384R1",
    "nistp521": "SECP521R1",
    "secp521r1": "SECP521R1",
}
_CANON = {
    "SECP256K1": "SecP256K1",
    "SECP256R1": "NistP256",
    "SECP384R1": "NistP384",
    "SECP521R1": "NistP521",
}
# Group orders (SEC 2), for EcGroup:order() and reducing scalars.
_ORDERS = {
    "SecP256K1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "NistP256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "NistP384": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "NistP521": int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA"
        "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}


def _curve(name: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = name.decode("ascii", "replace").lower().replace("_", "").replace("-", "")
    cls = _CURVES.get(key)
    if cls is None:
        raise ValueError(f"EcGroup: unknown curve {name.decode('ascii', 'replace')}")
    return getattr(ec, cls)()


def _ec_name(name: bytes, _b: Any, _c: Any) -> bytes:
    return _CANON[_curve(name).name.upper()].encode()


def _ec_mul(name: bytes, k: bytes, _c: Any) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    curve = _curve(name)
    scalar = _bn_int(k) % _ORDERS[name.decode()]
    if scalar == 0:
        raise ValueError("EcPoint:mul: the result is the point at infinity")
    pub = ec.derive_private_key(scalar, curve).public_key()
    return pub.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _ec_gen(name: bytes, _b: Any, _c: Any) -> bytes:
    return _ec_mul(name, b"1", None)


def _ec_order(name: bytes, _b: Any, _c: Any) -> bytes:
    return _bn_out(_ORDERS[name.decode()])


def _ec_point(name: bytes, sec1: bytes, _c: Any) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if len(sec1) > 200:
        raise ValueError("EcPoint.from_binary: not a point on the curve")
    pub = ec.EllipticCurvePublicKey.from_encoded_point(_curve(name), sec1)
    return pub.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _ec_compress(name: bytes, sec1: bytes, _c: Any) -> bytes:
    half = (len(sec1) - 1) // 2
    x, y = sec1[1 : 1 + half], sec1[1 + half :]
    return bytes([2 + (y[-1] & 1)]) + x


def _rsa_pub(der: bytes, _b: Any, _c: Any) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    if len(der) > 8192:
        raise ValueError("rsa_public_info: the public key is too large")
    try:
        key = load_der_public_key(der)
    except ValueError:
        raise ValueError("rsa_public_info: the key's public key is not readable") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("rsa_public_info: not an RSA key")
    n = key.public_numbers()
    return _bn_out(n.n) + b":" + _bn_out(n.e)


# -- X.509 pieces: OIDs, names, CSRs (DER built here; signatures come from the daemon) --
MAX_DER = 1 << 20
_OID_NAMES = {
    "CN": "2.5.4.3",
    "C": "2.5.4.6",
    "L": "2.5.4.7",
    "ST": "2.5.4.8",
    "O": "2.5.4.10",
    "OU": "2.5.4.11",
    "DC": "0.9.2342.19200300.100.1.25",
    "UID": "0.9.2342.19200300.100.1.1",
    "emailAddress": "1.2.840.113549.1.9.1",
    "commonName": "2.5.4.3",
    "countryName": "2.5.4.6",
    "localityName": "2.5.4.7",
    "stateOrProvinceName": "2.5.4.8",
    "organizationName": "2.5.4.10",
    "organizationalUnitName": "2.5.4.11",
    "serialNumber": "2.5.4.5",
    "subjectAlternativeName": "2.5.29.17",
    "keyUsage": "2.5.29.15",
    "extendedKeyUsage": "2.5.29.37",
    "basicConstraints": "2.5.29.19",
    "subjectKeyIdentifier": "2.5.29.14",
    "authorityKeyIdentifier": "2.5.29.35",
    "extensionRequest": "1.2.840.113549.1.9.14",
    "challengePassword": "1.2.840.113549.1.9.7",
}
_SIG_ALGS = {  # (key type, hash) -> AlgorithmIdentifier OID, with NULL parameters (RSA)
    ("EC", "SHA1"): ("1.2.840.10045.4.1", False),
    ("EC", "SHA224"): ("1.2.840.10045.4.3.1", False),
    ("EC", "SHA256"): ("1.2.840.10045.4.3.2", False),
    ("EC", "SHA384"): ("1.2.840.10045.4.3.3", False),
    ("EC", "SHA512"): ("1.2.840.10045.4.3.4", False),
    ("RSA", "SHA1"): ("1.2.840.113549.1.1.5", True),
    ("RSA", "SHA224"): ("1.2.840.113549.1.1.14", True),
    ("RSA", "SHA256"): ("1.2.840.113549.1.1.11", True),
    ("RSA", "SHA384"): ("1.2.840.113549.1.1.12", True),
    ("RSA", "SHA512"): ("1.2.840.113549.1.1.13", True),
}


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        head = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + head + content


def _oid_dotted(name: str) -> str:
    from asn1crypto import core, x509

    dotted = _OID_NAMES.get(name)
    if dotted is None:
        for m in (x509.NameType._map, x509.ExtensionId._map):
            dotted = next((k for k, v in m.items() if v == name), None)
            if dotted:
                break
    if dotted is None:
        dotted = name
    try:
        core.ObjectIdentifier(dotted).dump()
    except ValueError:
        raise ValueError(f"Oid.from_str: unknown OID name {name!r}") from None
    return dotted


def _oid(name: bytes, _b: Any, _c: Any) -> bytes:
    return _oid_dotted(name.decode("utf-8", "replace")).encode()


def _oid_der(dotted: bytes, _b: Any, _c: Any) -> bytes:
    from asn1crypto import core

    return core.ObjectIdentifier(dotted.decode()).dump()


_STRING_TAGS = {b"utf8": 0x0C, b"printable": 0x13, b"ia5": 0x16, b"numeric": 0x12, b"t61": 0x14}


def _set_of(items: list[bytes]) -> bytes:
    return _tlv(0x31, b"".join(sorted(items)))


def _name_der(packed: bytes) -> bytes:
    """[[oid, value, kind], ...] -> Name (each entry its own RDN, in order)."""
    entries = _unpack(packed)
    if not isinstance(entries, list) or len(entries) > 64:
        raise ValueError("X509Name: at most 64 entries")
    rdns = []
    for oid, value, kind in entries:
        tag = _STRING_TAGS.get(kind.encode() if isinstance(kind, str) else kind)
        if tag is None:
            raise ValueError(f"X509Name: unknown string kind {kind!r}")
        text = value.encode() if isinstance(value, str) else bytes(value)
        atv = _tlv(0x30, _oid_der(oid.encode(), None, None) + _tlv(tag, text))
        rdns.append(_set_of([atv]))
    return _tlv(0x30, b"".join(rdns))


def _x509_name(packed: bytes, _b: Any, _c: Any) -> bytes:
    return _name_der(packed)


def _ip_octets(text: bytes, _b: Any, _c: Any) -> bytes:
    import ipaddress

    try:
        return ipaddress.ip_address(text.decode("ascii")).packed
    except (ValueError, UnicodeDecodeError):
        raise ValueError("IpAddr.new: not an IP address") from None


def _csr_info(packed: bytes, _b: Any, _c: Any) -> bytes:
    """CertificationRequestInfo from {name=[...], spki=, exts=[[oid, crit, der]], attrs=[...]}."""
    spec = _unpack(packed)
    exts = spec.get("exts") or []
    attrs = spec.get("attrs") or []
    if len(exts) > 64 or len(attrs) > 64:
        raise ValueError("Pkcs10Csr: at most 64 extensions and 64 attributes")
    spki = bytes(spec["spki"])
    from asn1crypto import keys

    keys.PublicKeyInfo.load(spki).native  # noqa: B018 (parses: refuses junk)
    attributes = []
    if exts:
        ext_ders = []
        for oid, critical, der in exts:
            body = _oid_der(oid.encode(), None, None)
            if critical:
                body += b"\x01\x01\xff"
            ext_ders.append(_tlv(0x30, body + _tlv(0x04, bytes(der))))
        value = _tlv(0x30, b"".join(ext_ders))
        ext_req = _oid_der(_OID_NAMES["extensionRequest"].encode(), None, None)
        attributes.append(_tlv(0x30, ext_req + _set_of([value])))
    for oid, values in attrs:
        attributes.append(
            _tlv(0x30, _oid_der(oid.encode(), None, None) + _set_of([bytes(v) for v in values]))
        )
    name = _name_der(msgpack.packb(spec["name"], use_bin_type=True))
    out = _tlv(0x30, b"\x02\x01\x00" + name + spki + _tlv(0xA0, b"".join(sorted(attributes))))
    if len(out) > MAX_DER:
        raise ValueError("Pkcs10Csr: the request is too large")
    return out


def _csr_final(info: bytes, alg: bytes, sig: bytes) -> bytes:
    key_type, _, hash_alg = alg.decode().partition(":")
    entry = _SIG_ALGS.get((key_type, hash_alg.upper().replace("-", "")))
    if entry is None:
        raise ValueError(f"Pkcs10Csr: no signature algorithm for {key_type} with {hash_alg}")
    oid, null = entry
    alg_id = _tlv(0x30, _oid_der(oid.encode(), None, None) + (b"\x05\x00" if null else b""))
    return _tlv(0x30, info + alg_id + _tlv(0x03, b"\x00" + sig))


# -- certificates (issue 11): a TBSCertificate from public data; the issuer key signs it
# in the daemon, through Sobject:sign.
MAX_SERIAL_BITS = 160


def _alg_id(alg: str) -> bytes:
    key_type, _, hash_alg = alg.partition(":")
    entry = _SIG_ALGS.get((key_type, hash_alg.upper().replace("-", "")))
    if entry is None:
        raise ValueError(f"no signature algorithm for {key_type} with {hash_alg}")
    oid, null = entry
    return _tlv(0x30, _oid_der(oid.encode(), None, None) + (b"\x05\x00" if null else b""))


def _x509_time(dt: datetime.datetime) -> bytes:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
    if dt.year < 2050:
        return _tlv(0x17, dt.strftime("%y%m%d%H%M%SZ").encode())
    return _tlv(0x18, dt.strftime("%Y%m%d%H%M%SZ").encode())


def _ext_der(oid: str, critical: bool, value: bytes) -> bytes:
    body = _oid_der(oid.encode(), None, None) + (b"\x01\x01\xff" if critical else b"")
    return _tlv(0x30, body + _tlv(0x04, value))


def _csr_parts(der: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """(subject Name DER, SPKI DER, requested extensions' DER) of a CSR whose signature holds."""
    from asn1crypto import csr as acsr
    from cryptography import x509 as cx509

    try:
        if not cx509.load_der_x509_csr(der).is_signature_valid:
            raise ValueError("Pkcs10Csr:sign: the request's signature does not verify")
        req = acsr.CertificationRequest.load(der)
        info = req["certification_request_info"]
        exts: list[bytes] = []
        for attr in info["attributes"]:
            if attr["type"].dotted == _OID_NAMES["extensionRequest"]:
                for ext_set in attr["values"]:
                    exts += [e.dump() for e in ext_set]
        return info["subject"].dump(), info["subject_pk_info"].dump(), exts
    except ValueError as exc:
        if "Pkcs10Csr" in str(exc):
            raise
        raise ValueError("Pkcs10Csr: not a readable certificate request") from None


def _csr_check(der: bytes, _b: Any, _c: Any) -> bytes:
    _csr_parts(der)
    return der


def _tbs_cert(packed: bytes, _b: Any, _c: Any) -> bytes:
    """TBSCertificate (v3) from {issuer_cert, alg, lifetime, serial_bits} and either
    {csr} or {name, spki, skid?, exts}."""
    from asn1crypto import keys, x509

    spec = _unpack(packed)
    try:
        issuer = x509.Certificate.load(bytes(spec["issuer_cert"]))
        issuer_name = issuer["tbs_certificate"]["subject"].dump()
        issuer_skid = issuer.key_identifier
    except ValueError:
        raise ValueError("the issuer certificate is not a readable X.509 certificate") from None
    exts: list[bytes] = []
    if spec.get("csr") is not None:
        subject, spki, exts = _csr_parts(bytes(spec["csr"]))
    else:
        subject = _name_der(msgpack.packb(spec["name"], use_bin_type=True))
        spki = bytes(spec["spki"])
        keys.PublicKeyInfo.load(spki).native  # noqa: B018 (parses: refuses junk)
        if spec.get("skid") is not None:
            exts.append(_ext_der("2.5.29.14", False, _tlv(0x04, bytes(spec["skid"]))))
        user = spec.get("exts") or []
        if len(user) > 64:
            raise ValueError("TbsCertificate: at most 64 extensions")
        for oid, critical, der in user:
            exts.append(_ext_der(oid, bool(critical), bytes(der)))
    if issuer_skid is not None and not any(
        x509.Extension.load(e)["extn_id"].dotted == "2.5.29.35" for e in exts
    ):
        exts.append(_ext_der("2.5.29.35", False, _tlv(0x30, _tlv(0x80, issuer_skid))))
    bits = int(spec.get("serial_bits") or 128)
    if not 32 <= bits <= MAX_SERIAL_BITS:
        raise ValueError("serial number bits: 32 to 160")
    serial = int.from_bytes(os.urandom(bits // 8), "big") >> 1 | 1 << (bits - 2)  # positive
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    lifetime = int(spec["lifetime"])
    validity = _tlv(0x30, _x509_time(now) + _x509_time(now + datetime.timedelta(seconds=lifetime)))
    body = (
        _tlv(0xA0, b"\x02\x01\x02")  # version v3
        + _tlv(0x02, serial.to_bytes((serial.bit_length() + 8) // 8, "big"))
        + _alg_id(spec["alg"])
        + issuer_name
        + validity
        + subject
        + spki
    )
    if exts:
        body += _tlv(0xA3, _tlv(0x30, b"".join(exts)))
    out = _tlv(0x30, body)
    if len(out) > MAX_DER:
        raise ValueError("the certificate is too large")
    x509.TbsCertificate.load(out).native  # noqa: B018 (what we built parses back)
    return out


def _cert_final(tbs: bytes, alg: bytes, sig: bytes) -> bytes:
    return _tlv(0x30, tbs + _alg_id(alg.decode()) + _tlv(0x03, b"\x00" + sig))


class _Runner:
    def __init__(self, channel: _Channel) -> None:
        self.channel = channel
        self.bound: tuple[str, int] | None = None
        self.chunk: bytes = b""
        self.chunkname: bytes = b""
        self.ops = {
            b"hexd": lambda a, b, c: bytes.fromhex(a.decode("ascii")),
            b"hexe": lambda a, b, c: a.hex().upper().encode(),
            b"b64d": lambda a, b, c: _b64decode(a),
            b"b64e": lambda a, b, c: base64.b64encode(a),
            b"b64u": lambda a, b, c: base64.urlsafe_b64encode(a),
            b"rand": lambda a, b, c: os.urandom(a),
            b"now": lambda a, b, c: time.time_ns(),
            b"iso_p": _iso_parse,
            b"iso_f": _iso_format,
            b"and": _bitop("and"),
            b"or": _bitop("or"),
            b"xor": _bitop("xor"),
            b"json_e": _json_encode,
            b"json_d": _json_decode,
            b"cbor_e": _cbor_encode,
            b"cbor_d": _cbor_decode,
            b"bn": _bn,
            b"b58e": _b58encode,
            b"b58d": _b58decode,
            b"ripemd": _ripemd160,
            b"time_f": _time_fmt,
            b"ec_name": _ec_name,
            b"ec_gen": _ec_gen,
            b"ec_mul": _ec_mul,
            b"ec_order": _ec_order,
            b"ec_point": _ec_point,
            b"ec_compress": _ec_compress,
            b"rsa_pub": _rsa_pub,
            b"oid": _oid,
            b"oid_der": _oid_der,
            b"x509_name": _x509_name,
            b"ip": _ip_octets,
            b"csr_info": _csr_info,
            b"csr_final": _csr_final,
            b"csr_check": _csr_check,
            b"tbs": _tbs_cert,
            b"cert_final": _cert_final,
            b"call": self._call,
            b"log": self._log,
        }
        self._next: tuple[Any, Any] | None = None
        self._spent: Any = None
        # Trusted text, compiled once; stripped (its frames carry no names or lines).
        self.prelude = _compile(_runtime(None), _read_prelude(), b"=prelude", strip=True)

    # The one Python callable a Lua state ever holds.
    def py(self, op: bytes, a: Any = None, b: Any = None, c: Any = None) -> Any:
        try:
            return self.ops[op](a, b, c)
        except BaseException as exc:  # nothing may escape into Lua
            text = str(exc) if isinstance(exc, (ValueError, TypeError)) else type(exc).__name__
            return None, (text or "error").encode("utf-8", "replace")[:400]

    def _call(self, frame: bytes, _b: Any, _c: Any) -> bytes:
        self.channel.write_payload(frame)
        return self.channel.read()

    def _log(self, message: bytes, severity: bytes, _c: Any) -> bool:
        self.channel.send(
            {
                "t": "log",
                "message": message.decode("utf-8", "replace"),
                "severity": severity.decode("ascii", "replace"),
            }
        )
        return True

    def syntax(self, msg: dict[str, Any]) -> dict[str, Any]:
        err = _syntax_error(msg["code"], msg["name"], msg.get("memory", 64 << 20))
        return {"t": "syntax"} if err is None else {"t": "syntax", "message": err}

    def bind(self, msg: dict[str, Any]) -> dict[str, Any]:
        key = (msg["id"], msg["version"])
        if self.bound is not None and self.bound != key:
            return {"t": "bound", "message": "this worker serves another plugin"}
        name = ("=" + msg["name"]).encode()
        lua = _runtime(msg.get("memory", 64 << 20))
        try:
            self.chunk = _compile(lua, msg["code"].encode(), name)
        except _Syntax as exc:
            return {"t": "bound", "message": str(exc)}
        except lupa.LuaMemoryError:
            return {"t": "bound", "message": "not enough memory to compile the plugin"}
        self.bound, self.chunkname = key, name
        return {"t": "bound"}

    def prepare(self) -> None:
        """Build the next invocation's fresh Lua state now, off the request path."""
        self._spent = None
        lua = _runtime(64 << 20)
        entry = lua.globals().load(self.prelude, b"=prelude", b"b")(self.py)
        self._next = (lua, entry)

    def run(self, msg: dict[str, Any]) -> dict[str, Any]:
        lim = msg["limits"]
        used = _cpu_used()
        _limit(resource.RLIMIT_CPU, min(CPU_HARD, int(used + lim["wall_seconds"]) + 2), CPU_HARD)
        t0 = time.perf_counter_ns()
        if self._next is None:
            self.prepare()
        lua, entry = self._next
        self._next = None
        self._spent = lua  # closed after the reply is sent, by prepare()
        lua.set_max_memory(lim["memory_bytes"])
        t1 = time.perf_counter_ns()
        try:
            r = entry(
                self.chunk,
                self.chunkname,
                True,
                msg["args"],
                lim["instructions"],
                lim["max_output"],
                lim["max_result"],
            )
        except lupa.LuaMemoryError:
            r = ("memory", None, 413, b"the plugin exceeded its memory limit", None, 0, 0, b"")
        except lupa.LuaError as exc:
            text = str(exc).splitlines()[0] if str(exc) else "Lua error"
            r = ("runtime", None, 500, text.encode(), None, 0, 0, b"")
        t2 = time.perf_counter_ns()
        kind, body, status, message, tb, instructions, peak_kb, output = r
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        out = {
            "t": "done",
            "kind": kind,
            "status": status if isinstance(status, int) else None,
            "body": body,
            "message": _cut(_text(message), MAX_MESSAGE),
            "traceback": _cut(_text(tb), MAX_TRACEBACK),
            "output": _text(output) or "",
            "instructions": int(instructions or 0),
            "memory_peak": int((peak_kb or 0) * 1024),
            "setup_us": (t1 - t0) // 1000,
            "run_us": (t2 - t1) // 1000,
        }
        if _cpu_used() > CPU_HARD // 2:
            out["retire"] = True
        return out


class _Syntax(Exception):
    pass


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _cut(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + " [truncated]"


def _cpu_used() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _refuse(obj: Any, name: Any, is_setting: bool) -> Any:
    raise AttributeError("access refused")


def _runtime(max_memory: int | None) -> Any:
    return lupa.LuaRuntime(
        register_eval=False,
        register_builtins=False,
        unpack_returned_tuples=True,
        encoding=None,
        attribute_filter=_refuse,
        max_memory=max_memory,
    )


def _compile(lua: Any, code: bytes, name: bytes, *, strip: bool = False) -> bytes:
    """Compile text (never bytecode) and dump it with its line information."""
    g = lua.globals()
    r = g.load(code, name, b"t", lua.table())
    if isinstance(r, tuple):  # (nil, message)
        raise _Syntax(_text(r[1]))
    fn = r
    return g.string.dump(fn, strip)


def _syntax_error(code: str, name: str, memory: int) -> str | None:
    lua = _runtime(memory)
    try:
        _compile(lua, code.encode(), ("=" + name).encode())
    except _Syntax as exc:
        return str(exc)
    except lupa.LuaMemoryError:
        return "not enough memory to compile the plugin"
    return None


def _read_prelude() -> bytes:
    with open(os.path.join(os.path.dirname(__file__), "prelude.lua"), "rb") as f:
        return f.read()


def setup() -> None:
    """Everything the worker does to itself before it reads a frame; tests run it too."""
    _confine()
    global base64, datetime, hashlib, json, lupa, msgpack
    import base64
    import datetime
    import hashlib
    import json

    import lupa.lua53 as lupa
    import msgpack

    # A 16,384-bit BigNum has 4,933 decimal digits (Python's default cap is 4,300).
    sys.set_int_max_str_digits(5000)
    try:
        no_network()  # last, with everything imported: from here on, no socket at all
    except OSError as exc:
        sys.stderr.write(f"sandbox worker: cannot take the network away: {exc}\n")
        os._exit(4)  # fail closed: the pool reports that the worker failed to start


def main() -> None:
    setup()

    # fd 1 is the channel; anything printed by mistake goes to stderr instead.
    wfd = os.dup(1)
    os.dup2(2, 1)
    channel = _Channel(0, wfd)
    runner = _Runner(channel)
    runner.prepare()
    channel.send({"t": "ready", "pid": os.getpid()})
    handlers = {"syntax": runner.syntax, "bind": runner.bind, "run": runner.run}
    while True:
        msg = channel.recv()
        kind = msg.get("t") if isinstance(msg, dict) else None
        if kind == "exit":
            return
        handler = handlers.get(kind)
        if handler is None:
            sys.stderr.write(f"sandbox worker: unexpected message {kind!r}\n")
            os._exit(2)
        channel.send(handler(msg))
        if kind != "syntax":
            runner.prepare()


if __name__ == "__main__":
    main()
