"""Client-only tests: a mock transport, or a scripted stand-in daemon on a temp socket.

Nothing here touches keys; what the daemon does with requests is tested
against the real daemon in test_client.py and test_async_client.py.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import strongroom
from strongroom import (
    ApiError,
    AsyncClient,
    BadRequest,
    BadTag,
    Client,
    ConnectError,
    MockTransport,
    NotFound,
    PluginError,
    PluginRuntimeError,
    ProtocolError,
    Record,
    Response,
    Sobject,
    TimeLimit,
    TransportError,
    Unauthenticated,
    error_for,
    wire,
)

API_KEY = "c2VjcmV0LWFwcDpzM2NyM3Q="  # never to be seen in reprs or messages
AUTH = "/sys/v1/session/auth"


def echo(request: strongroom.Request) -> Response:
    if request.path == AUTH:
        return Response(200, {"access_token": "t", "entity_id": "e1"})
    return Response(200, {"method": request.method, "path": request.path, "body": request.body})


# -- public surface -------------------------------------------------------------------


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in dir(strongroom) if not n.startswith("_")} - {"wire", "envelope"}
    assert public == set(strongroom.__all__) - {"__version__"}
    for name in strongroom.__all__:
        assert getattr(strongroom, name) is not None


def test_import_needs_only_msgpack() -> None:
    code = (
        "import sys, strongroom\n"
        "mods = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(mods - set(sys.stdlib_module_names)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    third = {m for m in eval(out.stdout) if not m.startswith("_")} - {
        "strongroom",
        "cython_runtime",
    }
    assert third == {"msgpack"}


# -- encoding --------------------------------------------------------------------------


def test_bodies_paths_and_binary_fields() -> None:
    mock = MockTransport(echo)
    c = Client(transport=mock)
    r = c.keys.create("k1", "AES", key_size=256, key_ops=("ENCRYPT", "DECRYPT"))
    assert isinstance(r, Record)
    assert r.method == "POST" and r.path == "/crypto/v1/keys"
    assert r.body == {
        "name": "k1",
        "obj_type": "AES",
        "key_size": 256,
        "key_ops": ["ENCRYPT", "DECRYPT"],
    }
    r = c.crypto.encrypt(kid="abc", alg="AES", plain=b"\x00\xff", iv=None)
    assert r.body == {"key": {"kid": "abc"}, "alg": "AES", "plain": b"\x00\xff"}
    assert isinstance(r.body.plain, bytes)
    assert c.keys.get("abc").path == "/crypto/v1/keys/abc"
    assert c.apps.reset_secret({"app_id": "a1"}).path == "/sys/v1/apps/a1/reset_secret"
    assert c.plugins.invoke("p1", {"x": [1, 2]})["body"] == {"x": [1, 2]}  # as decoded
    assert c.plugins.update("p1", code="function run() end").body == {
        "source": {"language": "LUA", "code": "function run() end"}
    }
    assert c.request("GET", "/sys/v1/groups") == {
        "method": "GET",
        "path": "/sys/v1/groups",
        "body": None,
    }
    assert all(r.auth is None for r in mock.requests)
    assert [r.id for r in mock.requests] == sorted({r.id for r in mock.requests})


def test_key_descriptors() -> None:
    c = Client(transport=MockTransport(echo))
    s = Sobject(kid="k-1", name="n", obj_type="AES")
    assert c.crypto.encrypt(s, plain=b"x").body == {
        "key": {"kid": "k-1"},
        "alg": "AES",
        "plain": b"x",
    }
    t = Sobject(transient_key="tk", obj_type="EC")
    assert c.crypto.sign(t, data=b"d", hash_alg="SHA256").body["key"] == {"transient_key": "tk"}
    assert c.crypto.mac(key={"name": "m"}, alg="SHA256", data=b"d").body["key"] == {"name": "m"}
    assert c.keys.info(name="n").body == {"name": "n"}
    w = c.crypto.wrapkey(kid="w", subject=s, alg="AES", mode="KW").body
    assert w["subject"] == {"kid": "k-1"}
    with pytest.raises(TypeError):
        c.crypto.encrypt("k-1", plain=b"x")  # a bare string is ambiguous
    with pytest.raises(TypeError):
        c.crypto.encrypt(kid="a", name="b", plain=b"x")
    with pytest.raises(TypeError):
        c.crypto.encrypt(plain=b"x")


@pytest.mark.parametrize("bad", ["", "..", "a/b", "a?b", "x\n"])
def test_ids_cannot_change_the_path(bad: str) -> None:
    c = Client(transport=MockTransport(echo))
    with pytest.raises(ValueError):
        c.groups.get(bad)


def test_unencodable_body_fails_before_sending() -> None:
    mock = MockTransport(echo)
    with pytest.raises(TypeError):
        Client(transport=mock).request("POST", "/x", {"s": {1, 2}})
    assert mock.requests == []


def test_records() -> None:
    r = Record({"a": 1, "credential": {"api_key": "k"}, "items": [{"b": 2}]})
    assert r.a == 1 and r.credential.api_key == "k" and r["items"][0].b == 2
    assert r == {"a": 1, "credential": {"api_key": "k"}, "items": [{"b": 2}]}
    with pytest.raises(AttributeError):
        _ = r.missing
    s = Sobject(kid="k", name="n", value=b"secret")
    assert "secret" not in repr(s)


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "missing_field", BadRequest),
        (400, "bad_tag", BadTag),
        (401, "token_expired", Unauthenticated),
        (403, "key_op_not_permitted", strongroom.Forbidden),
        (404, "no_such_route", NotFound),
        (405, "method_not_allowed", strongroom.MethodNotAllowed),
        (409, "group_not_empty", strongroom.Conflict),
        (413, "memory_limit", strongroom.MemoryLimit),
        (422, "unsupported_algorithm", strongroom.Unsupported),
        (429, "busy", strongroom.Busy),
        (500, "internal", strongroom.InternalError),
        (500, "plugin_runtime_error", PluginRuntimeError),
        (504, "time_limit", TimeLimit),
        (409, "brand_new_conflict", strongroom.Conflict),  # unknown code: by status
        (418, "teapot", ApiError),
    ],
)
def test_error_for(status: int, code: str, cls: type[ApiError]) -> None:
    exc = error_for(status, {"error": code, "message": "m"})
    assert type(exc) is cls
    assert (exc.status, exc.code, exc.message) == (status, code, "m")
    assert str(exc) == f"{code}: m"


def test_every_wire_code_has_its_class() -> None:
    for code, status in wire.CODES.items():
        exc = error_for(status, {"error": code, "message": ""})
        assert exc.code == code and type(exc) is not ApiError, code
    assert issubclass(strongroom.MemoryLimit, strongroom.TooLarge)
    assert issubclass(ConnectError, TransportError)


def test_plugin_errors_keep_their_status_and_traceback() -> None:
    exc = error_for(403, {"error": "plugin_error", "message": "no"})
    assert isinstance(exc, PluginError) and exc.status == 403
    exc = error_for(500, {"error": "plugin_runtime_error", "message": "boom", "traceback": "tb"})
    assert isinstance(exc, PluginError) and exc.traceback == "tb"
    assert isinstance(error_for(400, b"junk"), BadRequest)
    assert error_for(500, None).code == "internal"


def test_error_response_raises() -> None:
    def handler(request: strongroom.Request) -> Response:
        return Response(400, {"error": "bad_tag", "message": "authentication failed"})

    with pytest.raises(BadTag) as info:
        Client(transport=MockTransport(handler)).crypto.decrypt(kid="k", cipher=b"c")
    assert info.value.code == "bad_tag"


def test_no_content_is_none() -> None:
    c = Client(transport=MockTransport(lambda r: Response(204)))
    assert c.groups.delete("g") is None


# -- authentication --------------------------------------------------------------------


class AuthDaemon:
    """A mock daemon with sessions: a token per auth, expiring on demand."""

    def __init__(self) -> None:
        self.auths = 0
        self.expire_next = 0

    def __call__(self, request: strongroom.Request) -> Response:
        if request.path == AUTH:
            if request.body != {"api_key": API_KEY}:
                return Response(401, {"error": "bad_credentials", "message": "bad credentials"})
            self.auths += 1
            return Response(200, {"access_token": f"t{self.auths}", "entity_id": "app-1"})
        if not self.auths:
            return Response(401, {"error": "unauthenticated", "message": "log in first"})
        if self.expire_next:
            self.expire_next -= 1
            return Response(401, {"error": "token_expired", "message": "expired"})
        return Response(200, {"ok": True})


def test_lazy_auth_once_and_reauth_on_expiry() -> None:
    d = AuthDaemon()
    mock = MockTransport(d)
    c = Client(api_key=API_KEY, transport=mock)
    assert mock.requests == []
    assert c.groups.list() == {"ok": True}
    assert c.groups.list() == {"ok": True}
    assert d.auths == 1
    d.expire_next = 1
    assert c.groups.list() == {"ok": True}
    assert d.auths == 2
    d.expire_next = 2  # still expired after re-authenticating: give up
    with pytest.raises(Unauthenticated) as info:
        c.groups.list()
    assert info.value.code == "token_expired"
    assert API_KEY not in repr(c)
    assert all(API_KEY not in repr(r) for r in mock.requests)


def test_bad_key_is_not_echoed() -> None:
    c = Client(api_key="wrong-" + API_KEY, transport=MockTransport(AuthDaemon()))
    with pytest.raises(Unauthenticated) as info:
        c.keys.list()
    assert info.value.code == "bad_credentials"
    assert API_KEY not in str(info.value) and API_KEY not in repr(info.value)


def test_api_key_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STRONGROOM_API_KEY", raising=False)
    f = tmp_path / "key"
    f.write_text(API_KEY + "\n")
    monkeypatch.setenv("STRONGROOM_API_KEY_FILE", str(f))
    monkeypatch.setenv("STRONGROOM_SOCKET", "/tmp/elsewhere.sock")
    d = AuthDaemon()
    c = Client(transport=MockTransport(d))
    assert c.socket_path == "/tmp/elsewhere.sock"
    c.logs.list(limit=5)
    assert d.auths == 1


def test_explicit_session_calls() -> None:
    d = AuthDaemon()
    c = Client(api_key=API_KEY, transport=MockTransport(d))
    assert c.session.auth().entity_id == "app-1"
    c.groups.list()
    assert d.auths == 1


def test_pipeline() -> None:
    def handler(request: strongroom.Request) -> Response:
        if request.path == "/missing":
            return Response(404, {"error": "not_found", "message": "nope"})
        return Response(200, request.body)

    c = Client(transport=MockTransport(handler))
    assert c.pipeline([("POST", "/a", 1), ("POST", "/b", 2), ("GET", "/c")]) == [1, 2, None]
    out = c.pipeline([("POST", "/a", 1), ("GET", "/missing")], return_exceptions=True)
    assert out[0] == 1 and isinstance(out[1], NotFound)
    with pytest.raises(NotFound):
        c.pipeline([("GET", "/missing")])


# -- async over the mock ---------------------------------------------------------------


def test_async_gather_out_of_order_with_one_auth() -> None:
    d = AuthDaemon()

    async def handler(request: strongroom.Request) -> Response:
        await asyncio.sleep(random.random() / 100)
        if request.path == AUTH:
            return d(request)
        return Response(200, {"n": request.body["n"]})

    async def main() -> None:
        async with AsyncClient(api_key=API_KEY, transport=MockTransport(handler)) as c:
            out = await asyncio.gather(*(c.request("POST", "/echo", {"n": i}) for i in range(500)))
            assert [o["n"] for o in out] == list(range(500))
            assert d.auths == 1
            with pytest.raises(TypeError):
                c.crypto.encrypt("k", plain=b"x")

    asyncio.run(main())


# -- the Unix transports against a scripted stand-in daemon -----------------------------

Script = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One accepted connection, as the scripted daemon sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = wire.FrameReader()
        self.buffered: list[Any] = []

    async def recv(self) -> dict[str, Any]:
        while not self.buffered:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.buffered += [wire.decode(p) for p in self.frames.feed(data)]
        return self.buffered.pop(0)

    def send(self, rid: int | None, status: int = 200, body: Any = None) -> None:
        self.writer.write(wire.frame({"id": rid, "status": status, "body": body}))


class StandIn:
    """Runs ``script`` for each connection on a temp socket, in its own thread."""

    def __init__(self, path: Path, script: Script) -> None:
        self.path, self.script = path, script
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(Conn(reader, writer))
                await writer.drain()
            except (EOFError, ConnectionError):
                pass
            finally:
                writer.close()

        async def main() -> None:
            self.stopping = asyncio.Event()
            server = await asyncio.start_unix_server(on_conn, str(self.path))
            ready.set()
            await self.stopping.wait()
            server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await server.wait_closed()

        self.loop.run_until_complete(main())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(5)


@pytest.fixture
def standin(tmp_path: Path):
    made: list[StandIn] = []

    def make(script: Script) -> StandIn:
        made.append(StandIn(tmp_path / "d.sock", script))
        return made[-1]

    yield make
    for s in made:
        s.stop()


async def serve_echo(conn: Conn) -> None:
    while True:
        msg = await conn.recv()
        conn.send(msg["id"], 200, msg["body"])


async def serve_reversed(conn: Conn) -> None:
    """Collects requests in batches of 10 and answers each batch backwards."""
    while True:
        batch = [await conn.recv() for _ in range(10)]
        for msg in reversed(batch):
            conn.send(msg["id"], 200, msg["body"])
        await conn.writer.drain()


def test_connect_error_names_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "nothing.sock"
    with pytest.raises(ConnectError) as info:
        Client(path).groups.list()
    assert str(path) in str(info.value) and info.value.socket_path == str(path)

    async def main() -> None:
        with pytest.raises(ConnectError):
            await AsyncClient(path).groups.list()

    asyncio.run(main())


def test_sync_unix_roundtrip_and_pipeline(standin) -> None:
    s = standin(serve_reversed)
    with Client(s.path, timeout=5) as c:
        out = c.pipeline([("POST", "/e", {"i": i, "b": bytes([i])}) for i in range(20)])
        assert out == [{"i": i, "b": bytes([i])} for i in range(20)]


def test_sync_reconnects_after_drop(standin) -> None:
    async def one_answer_then_hang_up(conn: Conn) -> None:
        msg = await conn.recv()
        conn.send(msg["id"], 200, "ok")
        await conn.recv()

    s = standin(one_answer_then_hang_up)
    with Client(s.path, timeout=5) as c:
        assert c.request("GET", "/x") == "ok"
        with pytest.raises(ProtocolError):
            c.request("GET", "/x")
        assert c.request("GET", "/x") == "ok"
    assert s.connections == 2


def test_sync_rejects_a_wrong_id(standin) -> None:
    async def wrong(conn: Conn) -> None:
        msg = await conn.recv()
        conn.send(msg["id"] + 1000, 200, "?")
        await conn.recv()

    with Client(standin(wrong).path, timeout=5) as c, pytest.raises(ProtocolError):
        c.request("GET", "/x")


def test_sync_timeout(standin) -> None:
    async def silent(conn: Conn) -> None:
        await conn.recv()
        await asyncio.sleep(10)

    with Client(standin(silent).path, timeout=0.2) as c, pytest.raises(strongroom.Timeout):
        c.request("GET", "/x")


def test_connection_level_error_answers_the_request(standin) -> None:
    async def refuse(conn: Conn) -> None:
        await conn.recv()
        conn.send(None, 400, {"error": "malformed_frame", "message": "unreadable"})

    s = standin(refuse)
    with Client(s.path, timeout=5) as c, pytest.raises(BadRequest) as info:
        c.request("GET", "/x")
    assert info.value.code == "malformed_frame"

    async def main() -> None:
        async with AsyncClient(s.path, timeout=5) as c:
            with pytest.raises(BadRequest):
                await c.request("GET", "/x")

    asyncio.run(main())


def test_async_pipelining_out_of_order(standin) -> None:
    s = standin(serve_reversed)

    async def main() -> None:
        async with AsyncClient(s.path, timeout=10) as c:
            out = await asyncio.gather(*(c.request("POST", "/e", i) for i in range(2000)))
            assert out == list(range(2000))
            assert c._transport.connections == 1

    asyncio.run(main())
    assert s.connections == 1


def test_async_drop_fails_pending_then_reconnects(standin) -> None:
    async def answer_three_then_drop(conn: Conn) -> None:
        for _ in range(3):
            msg = await conn.recv()
            conn.send(msg["id"], 200, msg["body"])
        if s.connections == 1:
            await conn.recv()
            return  # hang up with requests in flight
        await serve_echo(conn)

    s = standin(answer_three_then_drop)

    async def main() -> None:
        async with AsyncClient(s.path, timeout=10) as c:
            for i in range(3):
                assert await c.request("POST", "/e", i) == i
            out = await asyncio.gather(
                *(c.request("POST", "/e", i) for i in range(50)), return_exceptions=True
            )
            assert all(isinstance(o, TransportError) for o in out)
            assert await c.request("POST", "/e", "again") == "again"

    asyncio.run(main())
    assert s.connections == 2


def test_async_close_fails_pending(standin) -> None:
    async def silent(conn: Conn) -> None:
        await conn.recv()
        await asyncio.sleep(10)

    s = standin(silent)

    async def main() -> None:
        c = AsyncClient(s.path, timeout=10)
        task = asyncio.ensure_future(c.request("GET", "/x"))
        await asyncio.sleep(0.1)
        await c.aclose()
        with pytest.raises(TransportError):
            await task

    asyncio.run(main())


def test_async_timeout_leaves_connection_usable(standin) -> None:
    async def first_slow(conn: Conn) -> None:
        slow = await conn.recv()
        fast = await conn.recv()
        conn.send(fast["id"], 200, "fast")
        await asyncio.sleep(1.5)  # longer than the timeout, whenever the clock started
        conn.send(slow["id"], 200, "late")  # dropped: nobody waits for it
        await serve_echo(conn)

    s = standin(first_slow)

    async def main() -> None:
        # 1 s: each answered request has that long (0.2 s was tight on a loaded machine).
        async with AsyncClient(s.path, timeout=1.0) as c:
            slow = asyncio.ensure_future(c.request("GET", "/slow"))
            await asyncio.sleep(0.01)
            assert await c.request("GET", "/fast") == "fast"
            with pytest.raises(strongroom.Timeout):
                await slow
            await asyncio.sleep(1.0)  # the late answer comes meanwhile
            assert await c.request("GET", "/e") is None

    asyncio.run(main())


def test_typed_records_read_declared_fields_as_none() -> None:
    out = strongroom.EncryptResult(kid="k", cipher=b"c")  # CBC-less answer: no iv, no tag
    assert out.cipher == b"c" and out.iv is None and out.tag is None
    assert "iv" not in out and out == {"kid": "k", "cipher": b"c"}
    with pytest.raises(AttributeError):
        _ = out.not_a_field
    assert strongroom.Sobject(kid="k").elliptic_curve is None
    dk = strongroom.DataKey(kid="k", key_size=256, wrapped_key=b"w", plaintext=b"p" * 32)
    assert "pppp" not in repr(dk) and "<hidden>" in repr(dk)


def test_datakey_flow_deletes_the_transient_key_when_wrapping_fails() -> None:
    """The flow's steps, and its clean-up when a step fails, without a daemon."""

    def daemon(request: strongroom.Request) -> Response:
        if request.path == AUTH:
            return Response(200, {"access_token": "t", "entity_id": "e1"})
        if request.path == "/crypto/v1/keys/info":
            return Response(200, {"kid": "kek1", "name": "kek", "obj_type": "AES"})
        if request.path == "/crypto/v1/keys":
            return Response(200, {"kid": "t1", "obj_type": "AES", "transient_key": "t1"})
        if request.path == "/crypto/v1/wrapkey":
            return Response(403, {"error": "key_op_not_permitted", "message": "no WRAPKEY"})
        return Response(204)

    mock = MockTransport(daemon)
    with pytest.raises(strongroom.Forbidden):
        Client(api_key=API_KEY, transport=mock).datakey(name="kek")
    steps = [(r.method, r.path) for r in mock.requests if r.path != AUTH]
    assert steps == [
        ("POST", "/crypto/v1/keys/info"),
        ("POST", "/crypto/v1/keys"),
        ("POST", "/crypto/v1/wrapkey"),
        ("DELETE", "/crypto/v1/keys/t1"),
    ]
    created = next(r.body for r in mock.requests if r.path == "/crypto/v1/keys")
    assert created["transient"] is True and created["key_ops"] == ["EXPORT"]
