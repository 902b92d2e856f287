"""Typed use of both clients: tests/client/test_typing.py runs mypy on it (no errors allowed)."""

from __future__ import annotations

import asyncio

import strongroom
from strongroom import envelope


def sync_use(c: strongroom.Client) -> tuple[bytes, bool, str]:
    key: strongroom.Sobject = c.keys.create("k1", "AES", key_size=256)
    kid: str = key.kid
    size: int | None = key.key_size
    out: strongroom.EncryptResult = c.crypto.encrypt(key, plain=b"hi")
    cipher: bytes = out.cipher
    iv: bytes | None = out.iv
    plain: bytes = c.crypto.decrypt(kid=kid, cipher=cipher, iv=iv, tag=out.tag).plain
    ok: bool = c.crypto.verify(name="signer", data=b"x", signature=b"s").result
    sig: bytes = c.crypto.sign(name="signer", data=b"x").signature
    keys: list[strongroom.Sobject] = c.keys.list(limit=10)
    group: strongroom.Group = c.groups.create("payments")
    app: strongroom.App = c.apps.create("checkout", groups=[group])
    groups: dict[str, list[str]] = app.groups
    plugin: strongroom.Plugin = c.plugins.create("p", "function run() end", groups=[group])
    version: int = plugin.version
    printed: str = c.plugins.output("inv").output
    records: list[strongroom.AuditRecord] = c.logs.list(limit=5)
    action: str = records[0].action
    dk: strongroom.DataKey = c.datakey(name="kek", bits=256)
    wrapped: bytes = dk.wrapped_key
    key_bytes: bytes = c.unwrap_datakey(dk)
    header: envelope.Header = envelope.encrypt_file(c, "in", "out.env", name="kek")
    pem: str = c.keys.public(name="signer")
    der: bytes = c.keys.public(name="signer", format="DER")
    jwk: dict[str, object] = c.keys.public(name="signer", format="jwk")
    c.keys.delete(name="k1")
    del pem, der, jwk
    del size, plain, sig, keys, groups, version, printed, action, wrapped, key_bytes
    return cipher, ok, header.kek


async def async_use(ac: strongroom.AsyncClient) -> bytes:
    key = await ac.keys.info(name="k1")
    outs = await asyncio.gather(*(ac.crypto.encrypt(key, plain=m) for m in (b"a", b"b")))
    first: bytes = outs[0].cipher
    back = await ac.crypto.decrypt(key, cipher=first, iv=outs[0].iv, tag=outs[0].tag)
    ssh: str = await ac.keys.public(key, format="OpenSSH")
    del ssh
    dk = await ac.datakey(kid=key.kid, plaintext=False)
    wrapped: bytes = dk.wrapped_key
    del wrapped
    return back.plain
