"""AsyncClient against a real strongroomd; mirrors test_client.py."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import pytest
import strongroom
from strongroom import AsyncClient


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run(coro):
    return asyncio.run(coro)


def test_lazy_auth_and_session(daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, api_key=daemon.admin_key) as c:
            assert await c.groups.list()
            assert (await c.session.auth()).entity_id

    run(main())


def test_key_lifecycle_and_errors(daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, api_key=daemon.admin_key) as c:
            name = unique("k")
            k = await c.keys.create(name, "AES", key_size=256)
            assert (await c.keys.info(name=name)).kid == k.kid
            with pytest.raises(strongroom.Conflict):
                await c.keys.create(name, "AES", key_size=256)
            out = await c.crypto.encrypt(k, plain=b"hi")
            bad = bytes(16)
            with pytest.raises(strongroom.BadTag):
                await c.crypto.decrypt(k, cipher=out.cipher, iv=out.iv, tag=bad)
            await c.keys.delete(k)
            with pytest.raises(strongroom.NotFound):
                await c.keys.get(k)

    run(main())


def test_gather_thousands_on_one_connection(daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, api_key=daemon.admin_key) as c:
            k = await c.keys.create(unique("k"), "AES", key_size=256)
            msgs = [b"m%d" % i for i in range(3000)]
            outs = await asyncio.gather(*(c.crypto.encrypt(k, plain=m) for m in msgs))
            backs = await asyncio.gather(
                *(c.crypto.decrypt(k, cipher=o.cipher, iv=o.iv, tag=o.tag) for o in outs)
            )
            assert [b.plain for b in backs] == msgs
            digests = await asyncio.gather(*(c.crypto.digest(m) for m in msgs[:500]))
            assert [d.digest for d in digests] == [hashlib.sha256(m).digest() for m in msgs[:500]]
            assert c._transport.connections == 1

    run(main())


def test_errors_in_a_gather_stay_with_their_request(daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, api_key=daemon.admin_key) as c:
            calls = [c.crypto.digest(b"x") if i % 2 else c.keys.get(str(uuid.uuid4()))
                     for i in range(100)]  # fmt: skip
            out = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(o, strongroom.NotFound) for o in out[::2])
            assert all(isinstance(o, strongroom.Record) for o in out[1::2])

    run(main())


def test_app_client(daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, api_key=daemon.admin_key) as admin:
            g = await admin.groups.create(unique("g"))
            app = await admin.apps.create(unique("app"), groups=[g])
            k = await admin.keys.create(unique("k"), "HMAC", key_size=256, group_id=g)
        async with AsyncClient(daemon.socket, api_key=app.credential.api_key) as c:
            m = (await c.crypto.mac(k, alg="SHA256", data=b"d")).mac
            assert (await c.crypto.macverify(k, alg="SHA256", data=b"d", mac=m)).result

    run(main())


def test_unreachable_socket(tmp_path) -> None:
    async def main() -> None:
        async with AsyncClient(tmp_path / "x.sock") as c:
            with pytest.raises(strongroom.ConnectError):
                await c.groups.list()

    run(main())
