"""Envelope encryption of files with a data key: the data is encrypted here, not in the daemon.

A fresh AES-256 data key per file (:meth:`Client.datakey`) encrypts the file
locally with AES-GCM; the file carries the data key wrapped under a KEK held
by the daemon, so only a caller allowed to unwrap with that KEK can open it.
The bulk data never crosses the socket, so a file of any size costs two or
three requests. This is the point of a data key (AWS Encryption SDK, Vault's
``transit/datakey``), and why the module needs the ``cryptography`` package:
``pip install 'strongroom[envelope]'``. The rest of the client needs only msgpack.

File format, version 1 (all of it in ``docs/api.md``, "Data keys and envelope files")::

    offset  size  field
    0       5     magic b"SRENV"
    5       1     version, 1
    6       4     N, header length, big-endian (at most 65,536)
    10      N     header: UTF-8 JSON, binary fields base64:
                  {"alg": "AES-256-GCM", "iv": 12 bytes, "tag_len": 128,
                   "kek": KEK kid, "wrap_alg": "AES" | "RSA",
                   "wrap_mode": "KW" | "OAEP_MGF1_SHA256", "wrapped_key": ...}
    10+N    L     ciphertext: AES-GCM of the L plaintext bytes under the data key
                  and iv, with bytes 0 .. 10+N (magic to header) as the AAD
    end-16  16    GCM tag

Any change to the header (another KEK named, another iv) or to the data
fails the tag. One GCM message per file: up to 64 GiB, with a fresh key
for each file, so an iv never repeats under a key.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from strongroom._exceptions import EnvelopeError

if TYPE_CHECKING:
    from strongroom._client import Client

__all__ = [
    "MAGIC",
    "VERSION",
    "Header",
    "Readable",
    "Writable",
    "decrypt",
    "decrypt_file",
    "encrypt",
    "encrypt_file",
    "read_header",
]

MAGIC = b"SRENV"
VERSION = 1
TAG_BYTES = 16
MAX_HEADER = 65536
CHUNK = 1 << 20
#: GCM's own limit for one message: 2**39 - 256 bits.
MAX_PLAIN = (1 << 36) - 32


class Readable(Protocol):
    """A binary input: a file opened "rb", ``sys.stdin.buffer``, ``io.BytesIO``..."""

    def read(self, n: int = -1, /) -> bytes: ...


class Writable(Protocol):
    """A binary output: a file opened "wb", ``sys.stdout.buffer``, ``io.BytesIO``..."""

    def write(self, data: bytes, /) -> int: ...


def _aead() -> Any:
    """cryptography's Cipher pieces, or a clear error naming the extra that brings them."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise EnvelopeError(
            "missing_dependency",
            "envelope encryption needs the cryptography package: "
            "pip install 'strongroom[envelope]'",
        ) from None
    return Cipher, algorithms, modes


@dataclass(frozen=True)
class Header:
    """An envelope file's header; ``raw`` is its bytes (magic to header), the AAD."""

    kek: str
    wrap_alg: str
    wrap_mode: str
    wrapped_key: bytes
    alg: str
    iv: bytes
    tag_len: int
    raw: bytes

    @property
    def key_size(self) -> int:
        return int(self.alg.split("-")[1])

    @classmethod
    def build(cls, datakey: Mapping[str, Any], iv: bytes) -> Header:
        alg = f"AES-{datakey['key_size']}-GCM"
        doc = {
            "alg": alg,
            "iv": base64.b64encode(iv).decode(),
            "tag_len": TAG_BYTES * 8,
            "kek": datakey["kid"],
            "wrap_alg": datakey["wrap_alg"],
            "wrap_mode": datakey["wrap_mode"],
            "wrapped_key": base64.b64encode(datakey["wrapped_key"]).decode(),
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        raw = MAGIC + bytes([VERSION]) + struct.pack(">I", len(text)) + text
        return cls(
            doc["kek"],
            doc["wrap_alg"],
            doc["wrap_mode"],
            datakey["wrapped_key"],
            alg,
            iv,
            TAG_BYTES * 8,
            raw,
        )


def read_header(src: Readable) -> Header:
    """Read and check the header; ``src`` is left at the first ciphertext byte."""
    head = src.read(10)
    if len(head) < 10 or head[:5] != MAGIC:
        raise EnvelopeError("not_envelope", "not a Strongroom envelope file (no SRENV header)")
    if head[5] != VERSION:
        raise EnvelopeError(
            "not_envelope", f"envelope version {head[5]}: this client reads version {VERSION}"
        )
    (n,) = struct.unpack(">I", head[6:10])
    text = src.read(n) if n <= MAX_HEADER else b""
    try:
        doc = json.loads(text)
        header = Header(
            str(doc["kek"]),
            str(doc["wrap_alg"]),
            str(doc["wrap_mode"]),
            base64.b64decode(doc["wrapped_key"], validate=True),
            str(doc["alg"]),
            base64.b64decode(doc["iv"], validate=True),
            int(doc["tag_len"]),
            head + text,
        )
    except (ValueError, KeyError, TypeError):
        raise EnvelopeError("not_envelope", "the envelope header is damaged") from None
    if header.alg not in ("AES-128-GCM", "AES-192-GCM", "AES-256-GCM") or header.tag_len != 128:
        raise EnvelopeError("not_envelope", f"unknown envelope algorithm {header.alg!r}")
    if len(header.iv) != 12:  # what encrypt writes; anything else is a damaged header
        raise EnvelopeError("not_envelope", "the envelope header is damaged (iv)")
    return header


def encrypt(datakey: Mapping[str, Any], src: Readable, dst: Writable) -> Header:
    """Write ``src`` to ``dst`` as an envelope file under ``datakey`` (a :class:`DataKey`
    with its plaintext) -> the header written."""
    Cipher, algorithms, modes = _aead()
    key = datakey.get("plaintext")
    if not key:
        raise ValueError("encrypting needs the data key's plaintext (datakey(plaintext=True))")
    iv = os.urandom(12)
    header = Header.build(datakey, iv)
    enc = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    enc.authenticate_additional_data(header.raw)
    dst.write(header.raw)
    total = 0
    while chunk := src.read(CHUNK):
        total += len(chunk)
        if total > MAX_PLAIN:
            raise EnvelopeError("too_large", "an envelope holds at most 64 GiB")
        dst.write(enc.update(chunk))
    dst.write(enc.finalize())
    dst.write(enc.tag)
    return header


def decrypt(header: Header, key: bytes, src: Readable, dst: Writable) -> int:
    """Decrypt the rest of ``src`` (after :func:`read_header`) into ``dst`` -> bytes written.

    What reaches ``dst`` is unauthenticated until this returns: on
    :class:`EnvelopeError` ``bad_tag`` throw it away (:func:`decrypt_file` does).
    """
    Cipher, algorithms, modes = _aead()
    if len(key) * 8 != header.key_size:
        raise EnvelopeError("bad_tag", "the data key does not fit this envelope")
    dec = Cipher(algorithms.AES(key), modes.GCM(header.iv)).decryptor()
    dec.authenticate_additional_data(header.raw)
    held, total = b"", 0
    while chunk := src.read(CHUNK):
        held += chunk
        if len(held) > TAG_BYTES:
            out = dec.update(held[:-TAG_BYTES])
            held = held[-TAG_BYTES:]
            total += len(out)
            dst.write(out)
    if len(held) != TAG_BYTES:
        raise EnvelopeError("not_envelope", "the envelope is cut short")
    from cryptography.exceptions import InvalidTag

    try:
        dst.write(dec.finalize_with_tag(held))
    except InvalidTag:
        raise EnvelopeError(
            "bad_tag", "the envelope does not check: wrong data key, or the file was changed"
        ) from None
    return total


def encrypt_file(
    client: Client,
    src: str | os.PathLike[str] | Readable,
    dst: str | os.PathLike[str] | Writable,
    *,
    kek: Any = None,
    kid: str | None = None,
    name: str | None = None,
    bits: int = 256,
) -> Header:
    """Encrypt a file (path or binary stream) under a fresh data key -> its header.

    A path ``dst`` is written under a temporary name and renamed when whole.
    """
    _aead()  # fail before asking the daemon for a key
    with _reader(src) as fin:  # and before it, when the input cannot be read
        datakey = client.datakey(kek, kid=kid, name=name, bits=bits)
        with _writer(dst) as fout:
            return encrypt(datakey, fin, fout)


def decrypt_file(
    client: Client,
    src: str | os.PathLike[str] | Readable,
    dst: str | os.PathLike[str] | Writable,
    *,
    kek: Any = None,
    kid: str | None = None,
    name: str | None = None,
) -> Header:
    """Decrypt an envelope file -> its header. The KEK is the one the file names
    unless given. A path ``dst`` appears only once the tag checked (written
    under a temporary name beside it, 0600); a stream ``dst`` gets nothing
    before then either."""
    _aead()
    with _reader(src) as fin:
        header = read_header(fin)
        if kek is None and kid is None and name is None:
            kid = header.kek
        key = client.unwrap_datakey(
            kek=kek,
            kid=kid,
            name=name,
            wrapped_key=header.wrapped_key,
            wrap_alg=header.wrap_alg,
            wrap_mode=header.wrap_mode,
        )
        if isinstance(dst, str | os.PathLike):
            with _writer(dst) as fout:
                decrypt(header, key, fin, fout)
        else:
            # Held until the tag checks: in memory up to 64 MiB, beyond in an
            # unlinked temporary file.
            with tempfile.SpooledTemporaryFile(max_size=64 << 20) as tmp:
                decrypt(header, key, fin, tmp)
                tmp.seek(0)
                while chunk := tmp.read(CHUNK):
                    dst.write(chunk)
                flush = getattr(dst, "flush", None)
                if flush is not None:
                    flush()
    return header


class _reader:
    def __init__(self, src: str | os.PathLike[str] | Readable) -> None:
        self.src = src
        self.f: BinaryIO | None = None

    def __enter__(self) -> Readable:
        if isinstance(self.src, str | os.PathLike):
            f = open(self.src, "rb")  # closed in __exit__
            self.f = f
            return f
        return self.src

    def __exit__(self, *exc: object) -> None:
        if self.f is not None:
            self.f.close()


class _writer:
    """A path written under a temporary name in its directory (0600), renamed when
    the block ends without error, removed otherwise; a stream is used as is."""

    def __init__(self, dst: str | os.PathLike[str] | Writable) -> None:
        self.dst = dst
        self.tmp: str | None = None

    def __enter__(self) -> Writable:
        if not isinstance(self.dst, str | os.PathLike):
            return self.dst
        path = Path(self.dst)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        except OSError as exc:  # name the file asked for, not the temporary one
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        self.tmp = tmp
        self.f = os.fdopen(fd, "wb")
        return self.f

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.tmp is None:
            return
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.dst)  # type: ignore[arg-type]
        else:
            os.unlink(self.tmp)
