"""_backupcrypt: round trip, and every change to the file refused."""

from __future__ import annotations

import io

import pytest
from strongroomd import _backupcrypt as bc


def _seal(data: bytes, chunk: int = 100) -> bytes:
    out = io.BytesIO()
    w = bc.EncryptingWriter(out, "pass", chunk=chunk)
    for i in range(0, len(data), 37):
        w.write(data[i : i + 37])
    w.close()
    return out.getvalue()


def _open(raw: bytes, passphrase: str = "pass") -> bytes:
    out = io.BytesIO()
    bc.decrypt(io.BytesIO(raw), out, passphrase)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, 100, 101, 1000, 12345])
def test_round_trip(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    raw = _seal(data)
    assert raw.startswith(bc.MAGIC) and (size < 16 or data not in raw)
    assert _open(raw) == data


def test_changes_are_refused() -> None:
    raw = _seal(bytes(1000))
    head = len(bc.MAGIC) + 4 + int.from_bytes(raw[len(bc.MAGIC) : len(bc.MAGIC) + 4], "big")
    chunk = 4 + 100 + 16
    first, second = raw[head : head + chunk], raw[head + chunk : head + 2 * chunk]
    swapped = raw[:head] + second + first + raw[head + 2 * chunk :]
    cases = {
        "wrong passphrase": (raw, "other"),
        "flipped byte": (raw[:-1] + bytes([raw[-1] ^ 1]), "pass"),
        "last chunk cut": (raw[:-chunk], "pass"),  # ends on a chunk not marked last
        "cut mid-chunk": (raw[:-7], "pass"),
        "chunks swapped": (swapped, "pass"),
        "header edited": (raw.replace(b'"chunk": 100', b'"chunk": 101'), "pass"),
        "data after the end": (raw + b"x", "pass"),
        "not encrypted": (b"plain tar" * 10, "pass"),
    }
    for name, (bad, passphrase) in cases.items():
        with pytest.raises(bc.BackupCryptError):
            _open(bad, passphrase)
            pytest.fail(name)


def test_an_empty_passphrase_is_refused() -> None:
    with pytest.raises(bc.BackupCryptError):
        bc.EncryptingWriter(io.BytesIO(), "")
