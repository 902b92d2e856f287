"""Passphrase encryption of backup files: scrypt, then AES-256-GCM in chunks.

A backup holds the token's files and its PINs, so it is never written in
the clear. The file is::

    MAGIC | header length (4 bytes, big-endian) | header (JSON) | chunks...

The header names the KDF and its parameters (scrypt, a fresh 16-byte salt) and
the chunk size. Each chunk is ``length (4 bytes) | AES-GCM(ciphertext || tag)``
with the nonce ``counter (11 bytes) || last (1 byte)`` and the whole header as
associated data. The salt makes the key unique to the file, so counter nonces
never repeat under one key; the counter stops reordering, the last flag stops
truncation, the associated data stops header edits. A wrong passphrase and a
damaged file look the same (the first tag fails), on purpose.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MAGIC = b"STRONGROOM-BACKUP\n"
CHUNK = 1024 * 1024
#: scrypt cost: 64 MiB and ~0.2 s per derivation on the machines measured.
SCRYPT = {"n": 2**16, "r": 8, "p": 1}
_LEN = struct.Struct(">I")
_MAX_HEADER = 4096


class BackupCryptError(Exception):
    """Not an encrypted backup, the wrong passphrase, or a damaged file."""


def _key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if not passphrase:
        raise BackupCryptError("the passphrase is empty")
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class EncryptingWriter:
    """A write-only file object: what is written goes out encrypted to ``out``."""

    def __init__(self, out: BinaryIO, passphrase: str, chunk: int = CHUNK) -> None:
        salt = os.urandom(16)
        header = {
            "kdf": "scrypt",
            **SCRYPT,
            "salt": base64.b64encode(salt).decode(),
            "cipher": "AES-256-GCM",
            "chunk": chunk,
        }
        self._header = json.dumps(header, sort_keys=True).encode()
        self._aead = AESGCM(_key(passphrase, salt, **SCRYPT))
        self._out = out
        self._chunk = chunk
        self._buf = bytearray()
        self._counter = 0
        self._written = 0
        self._closed = False
        out.write(MAGIC + _LEN.pack(len(self._header)) + self._header)

    def tell(self) -> int:
        """Plaintext bytes written so far (tarfile asks)."""
        return self._written

    def write(self, data: bytes) -> int:
        self._buf += data
        self._written += len(data)
        while len(self._buf) > self._chunk:  # keep one chunk back: the last is marked
            self._emit(bytes(self._buf[: self._chunk]), last=False)
            del self._buf[: self._chunk]
        return len(data)

    def _emit(self, plain: bytes, *, last: bool) -> None:
        sealed = self._aead.encrypt(_nonce(self._counter, last), plain, self._header)
        self._counter += 1
        self._out.write(_LEN.pack(len(sealed)) + sealed)

    def close(self) -> None:
        """Write the last chunk (the only one marked last); ``out`` stays open."""
        if not self._closed:
            self._emit(bytes(self._buf), last=True)
            self._buf.clear()
            self._closed = True


def is_encrypted(path: os.PathLike[str] | str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def decrypt(src: BinaryIO, out: BinaryIO, passphrase: str) -> None:
    """Decrypt a whole backup from ``src`` into ``out``; raise BackupCryptError."""
    if src.read(len(MAGIC)) != MAGIC:
        raise BackupCryptError("not an encrypted Strongroom backup")
    header = _read_sized(src, _MAX_HEADER, "header")
    try:
        h = json.loads(header)
        params = {k: int(h[k]) for k in ("n", "r", "p")}
        salt = base64.b64decode(h["salt"], validate=True)
        chunk = int(h["chunk"])
        ok = h["kdf"] == "scrypt" and h["cipher"] == "AES-256-GCM" and 0 < chunk <= 64 * CHUNK
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok or params["n"] > 2**20 or params["r"] > 32 or params["p"] > 16:
        raise BackupCryptError("the backup's header is damaged or of an unknown kind")
    aead = AESGCM(_key(passphrase, salt, **params))
    counter = 0
    while True:
        sealed = _read_sized(src, chunk + 16, "chunk")
        for last in (False, True):
            try:
                plain = aead.decrypt(_nonce(counter, last), sealed, header)
                break
            except InvalidTag:
                continue
        else:
            raise BackupCryptError(
                "wrong passphrase, or the backup is damaged"
                if counter == 0
                else f"the backup is damaged (chunk {counter})"
            )
        out.write(plain)
        counter += 1
        if last:
            if src.read(1):
                raise BackupCryptError("the backup has data after its end")
            return


def _read_sized(src: BinaryIO, limit: int, what: str) -> bytes:
    raw = src.read(_LEN.size)
    if len(raw) < _LEN.size:
        raise BackupCryptError("the backup is truncated")
    (size,) = _LEN.unpack(raw)
    if size > limit:
        raise BackupCryptError(f"the backup's {what} is damaged")
    data = src.read(size)
    if len(data) < size:
        raise BackupCryptError("the backup is truncated")
    return data
