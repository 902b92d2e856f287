"""The CLI streams large input through multi-part encryption (checked with cryptography)."""

from __future__ import annotations

import os
import uuid

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import Raw


def _import(admin: Raw) -> tuple[str, bytes]:
    value = os.urandom(32)
    body = {"name": f"s-{uuid.uuid4().hex[:10]}", "obj_type": "AES", "value": value}
    resp = admin.call("PUT", "/crypto/v1/keys", body)
    assert resp["status"] == 200, resp
    return resp["body"]["kid"], value


def test_50_mib_gcm_file_through_the_cli(sr, admin_raw: Raw, tmp_path) -> None:
    kid, value = _import(admin_raw)
    data = os.urandom(50 * 1024 * 1024)
    plain, ct, back = tmp_path / "plain", tmp_path / "ct", tmp_path / "back"
    plain.write_bytes(data)
    sr("encrypt", "--kid", kid, "--in", str(plain), "--out", str(ct))
    raw = ct.read_bytes()
    assert AESGCM(value).decrypt(raw[:12], raw[12:], None) == data
    sr("decrypt", "--kid", kid, "--in", str(ct), "--out", str(back))
    assert back.read_bytes() == data
    # A wrong tag: the command fails and leaves no plaintext at --out.
    bad = tmp_path / "bad"
    bad.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    out = tmp_path / "out"
    sr("decrypt", "--kid", kid, "--in", str(bad), "--out", str(out), code=1)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cbc_over_stdin_and_stdout(sr, admin_raw: Raw) -> None:
    kid, value = _import(admin_raw)
    data = os.urandom(3 * 1024 * 1024 + 5)
    raw = sr("encrypt", "--kid", kid, "--mode", "CBC", input=data).stdout_bytes
    dec = Cipher(algorithms.AES(value), modes.CBC(raw[:16])).decryptor()
    padded = dec.update(raw[16:]) + dec.finalize()
    assert padded[: -padded[-1]] == data
    assert sr("decrypt", "--kid", kid, "--mode", "CBC", input=raw).stdout_bytes == data
