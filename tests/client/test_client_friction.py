"""The Python client's first-hour rough edges (issue 12, items 7 and 9), against a real daemon."""

from __future__ import annotations

import asyncio
import pydoc
from pathlib import Path

import pytest
import strongroom
from strongroom import AsyncClient, Client, NotFound, PluginError

from tests.conftest import unique


@pytest.fixture
def c(daemon):
    with Client(daemon.socket, api_key=daemon.admin_key) as client:
        yield client


def test_encrypt_decrypt_infer_alg_by_name_and_kid(c) -> None:
    key = c.keys.create(unique("k"), "AES")
    out = c.crypto.encrypt(name=key.name, plain=b"no alg needed")
    back = c.crypto.decrypt(kid=key.kid, cipher=out.cipher, iv=out.iv, tag=out.tag)
    assert back.plain == b"no alg needed"
    again = c.crypto.decrypt({"name": key.name}, cipher=out.cipher, iv=out.iv, tag=out.tag)
    assert again.plain == b"no alg needed"


def test_async_encrypt_infers_alg(daemon) -> None:
    async def main() -> bytes:
        async with AsyncClient(daemon.socket, api_key=daemon.admin_key) as ac:
            key = await ac.keys.create(unique("k"), "AES")
            out = await ac.crypto.encrypt(name=key.name, plain=b"async")
            back = await ac.crypto.decrypt(kid=key.kid, cipher=out.cipher, iv=out.iv, tag=out.tag)
            await ac.keys.delete(name=key.name)
            return back.plain

    assert asyncio.run(main()) == b"async"


def test_delete_and_invoke_by_name(c) -> None:
    g = c.groups.create(unique("g"))
    key = c.keys.create(unique("k"), "AES", group_id=g)
    c.keys.delete(name=key.name)
    with pytest.raises(NotFound):
        c.keys.info(kid=key.kid)
    p = c.plugins.create(unique("p"), "function run(x) return {twice = x * 2} end", groups=[g])
    assert c.plugins.invoke(name=p.name, input=21) == {"twice": 42}
    c.plugins.delete(p)
    c.groups.delete(name=g.name)
    assert g.name not in [x.name for x in c.groups.list()]
    with pytest.raises(ValueError, match="no groups named"):
        c.groups.delete(name=g.name)
    with pytest.raises(TypeError):
        c.keys.delete()


def test_plugin_error_has_invocation_id(c) -> None:
    g = c.groups.create(unique("g"))
    p = c.plugins.create(unique("p"), 'function run() error("boom") end', groups=[g])
    with pytest.raises(PluginError) as info:
        c.plugins.invoke(p)
    inv = info.value.invocation_id
    assert inv
    assert {r.invocation_id for r in c.logs.list(invocation_id=inv)} == {inv}


def test_a_plugin_failing_on_a_missing_key_names_it(c) -> None:
    g = c.groups.create(unique("g"))
    missing = unique("absent-key")
    code = f'function run() local k = assert(Sobject{{name = "{missing}"}}) return 1 end'
    p = c.plugins.create(unique("p"), code, groups=[g])
    with pytest.raises(PluginError) as info:
        c.plugins.invoke(p)
    assert f"no such key: {missing}" in info.value.message
    run = c.plugins.test(code, groups=[g])
    assert f"no such key: {missing}" in run.traceback


def test_no_api_key_says_which_variables(daemon, monkeypatch) -> None:
    monkeypatch.delenv("STRONGROOM_API_KEY", raising=False)
    monkeypatch.delenv("STRONGROOM_API_KEY_FILE", raising=False)
    with Client(daemon.socket) as anon, pytest.raises(strongroom.Unauthenticated) as info:
        anon.keys.list()
    assert "STRONGROOM_API_KEY_FILE" in str(info.value)


def test_state_dir_locates_the_socket(daemon, monkeypatch) -> None:
    monkeypatch.delenv("STRONGROOM_SOCKET", raising=False)
    monkeypatch.setenv("STRONGROOM_STATE_DIR", str(daemon.state_dir))
    with Client(api_key=daemon.admin_key) as client:
        assert client.socket_path == str(daemon.state_dir / "strongroomd.sock")
        assert client.session.auth().entity_id
    monkeypatch.setenv("STRONGROOM_SOCKET", "/elsewhere.sock")
    assert Client().socket_path == "/elsewhere.sock"  # the explicit socket wins


def test_help_lists_resources_and_package_is_typed() -> None:
    text = pydoc.render_doc(Client, renderer=pydoc.plaintext)
    for resource in ("session", "groups", "apps", "keys", "crypto", "logs", "plugins"):
        assert f"{resource}:" in text or f"**{resource}**" in text, resource
    assert (Path(strongroom.__file__).parent / "py.typed").exists()
