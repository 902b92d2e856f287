"""Crypto.derive in the client library and ``strongroom keys derive`` in the CLI,
against the session daemon; derived values checked with ``cryptography``."""

from __future__ import annotations

import json
import os
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from strongroom import Client


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _ecb(value: bytes, data: bytes) -> bytes:
    e = Cipher(algorithms.AES(value), modes.ECB()).encryptor()
    return e.update(data) + e.finalize()


def test_client_derive_encrypt_data_and_hkdf(daemon) -> None:
    with Client(daemon.socket, api_key=daemon.admin_key, timeout=30) as c:
        base = c.keys.create(_name("base"), "AES", key_ops=["ENCRYPT", "DERIVEKEY", "EXPORT"])
        value = c.keys.export(kid=base["kid"])["value"]
        data = os.urandom(32)
        new = c.crypto.derive(
            base,
            key_type="AES",
            key_size=256,
            mechanism={"encrypt_data": {"alg": "AES", "mode": "ECB", "plain": data}},
            name=_name("d"),
            key_ops=["ENCRYPT", "EXPORT"],
        )
        assert new["obj_type"] == "AES"
        assert c.keys.export(kid=new["kid"])["value"] == _ecb(value, data)
        h = c.crypto.derive(
            kid=base["kid"],
            key_type="HMAC",
            key_size=256,
            mechanism={"hkdf": {"hash_alg": "SHA256", "info": b"i"}},
            name=_name("h"),
            key_ops=["MACGENERATE", "EXPORT"],
        )
        want = HKDF(hashes.SHA256(), 32, None, b"i").derive(value)
        assert c.keys.export(kid=h["kid"])["value"] == want


def test_cli_keys_derive(daemon, sr) -> None:
    with Client(daemon.socket, api_key=daemon.admin_key, timeout=30) as c:
        base = c.keys.create(_name("base"), "AES", key_ops=["ENCRYPT", "DERIVEKEY", "EXPORT"])
        value = c.keys.export(kid=base["kid"])["value"]
        data, iv = os.urandom(32), os.urandom(16)
        name = _name("cli")
        out = sr(
            "--json", "keys", "derive", name, "--kid", base["kid"], "--type", "AES",
            "--size", "128", "--mode", "CBC", "--iv", iv.hex(), "--ops", "ENCRYPT,EXPORT",
            input=data,
        )  # fmt: skip
        assert json.loads(out.output)["name"] == name
        e = Cipher(algorithms.AES(value), modes.CBC(iv)).encryptor()
        assert c.keys.export(name=name)["value"] == (e.update(data) + e.finalize())[:16]
        name2 = _name("cli")
        sr(
            "keys", "derive", name2, "--key", base["name"], "--type", "SECRET", "--size", "256",
            "--hkdf", "sha512", "--salt", "00ff", "--info", "ctx", "--ops", "DERIVEKEY,EXPORT",
        )  # fmt: skip
        want = HKDF(hashes.SHA512(), 32, bytes.fromhex("00ff"), b"ctx").derive(value)
        assert c.keys.export(name=name2)["value"] == want
