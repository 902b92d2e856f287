"""Misuse that the types must catch: tests/client/test_typing.py expects an error on each
line marked ``# error``."""

from __future__ import annotations

import strongroom


def sync_misuse(c: strongroom.Client) -> None:
    out = c.crypto.encrypt(name="k", plain=b"x")
    n: int = out.cipher  # error
    k: str = c.keys.info(name="k").key_size  # error
    c.crypto.encrypt(name="k", plain="text")  # error
    c.keys.create("k", "AES", key_size="256")  # error
    flag: str = c.crypto.verify(name="k", data=b"", signature=b"").result  # error
    der: str = c.keys.public(name="k", format="DER")  # error
    del n, k, flag, der


async def async_misuse(ac: strongroom.AsyncClient) -> None:
    out = ac.crypto.encrypt(name="k", plain=b"x")
    cipher: bytes = out.cipher  # error
    info = await ac.keys.info(name="k")
    name: int = info.name  # error
    del cipher, name
