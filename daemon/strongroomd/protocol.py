"""One client connection: frames in, requests dispatched, frames out.

Requests run as tasks, so a connection carries many at once and answers
them as they finish, matched by ``id``. Replies finishing in the same loop
turn are written with one system call. A malformed frame is answered (with
``id: null`` when no id could be read) and the connection goes on; only an
oversized frame, after which the stream cannot be trusted, closes it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from strongroom.wire import CODES, FrameError, FrameReader, decode, frame

from strongroomd.context import Owner
from strongroomd.errors import ApiError, BadRequest, Busy

if TYPE_CHECKING:
    from strongroomd.dispatch import Dispatcher
    from strongroomd.keyring import Keyring

log = logging.getLogger("strongroomd.protocol")

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
MAX_PATH = 1024


class Connection(asyncio.Protocol):
    def __init__(
        self,
        dispatcher: Dispatcher,
        keyring: Keyring,
        connections: set[Connection],
        *,
        max_frame: int,
        max_field: int,
        max_inflight: int,
    ) -> None:
        self.dispatcher = dispatcher
        self.services = dispatcher.services
        self.keyring = keyring
        self.connections = connections
        self.max_field = max_field
        self.max_inflight = max_inflight
        self.reader = FrameReader(max_frame)
        self.owner = Owner(id=str(uuid.uuid4()))
        self.tasks: set[asyncio.Task[None]] = set()
        self.transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._closing = False
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.connections.discard(self)
        self._loop.create_task(self._cleanup())

    def pause_writing(self) -> None:  # the client is not reading its replies: stop reading
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            payloads = self.reader.feed(data)
        except FrameError as exc:
            self._reply(None, CODES[exc.code], {"error": exc.code, "message": exc.message})
            self._flush()
            self.close()
            return
        for payload in payloads:
            self._on_frame(payload)

    # -- requests ------------------------------------------------------------------
    def _on_frame(self, payload: bytes) -> None:
        rid = None
        try:
            msg = decode(payload, max_field=self.max_field)
            if not isinstance(msg, dict):
                raise BadRequest("a request is a map", code="malformed_frame")
            rid = msg.get("id")
            if not isinstance(rid, int) or isinstance(rid, bool):
                rid = None
                raise BadRequest("a request needs an integer id", code="malformed_frame")
            method, path, auth = msg.get("method"), msg.get("path"), msg.get("auth")
            if method not in METHODS:
                raise BadRequest(f"method must be one of {sorted(METHODS)}", code="malformed_frame")
            if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH:
                raise BadRequest("path must be an absolute path string", code="malformed_frame")
            if auth is not None and not isinstance(auth, str):
                raise BadRequest("auth must be a string", code="malformed_frame")
            extra = set(msg) - {"id", "method", "path", "body", "auth"}
            if extra:
                raise BadRequest(f"unknown request keys {sorted(extra)}", code="malformed_frame")
            if len(self.tasks) >= self.max_inflight:
                raise Busy(f"more than {self.max_inflight} requests in flight")
        except FrameError as exc:
            if exc.code == "too_large":
                rid = _id_of(payload, self.reader.max_frame)
            self._reply(rid, CODES[exc.code], {"error": exc.code, "message": exc.message})
            return
        except ApiError as exc:
            self._reply(rid, exc.status, exc.body())
            return
        task = self._loop.create_task(self._run(rid, method, path, msg.get("body"), auth))
        self.tasks.add(task)
        self.services.socket_pending += 1
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.services.socket_pending -= 1

    async def _run(self, rid: int, method: str, path: str, body: Any, auth: str | None) -> None:
        status, out = await self.dispatcher.handle(self.owner, method, path, body, auth)
        self._reply(rid, status, out)

    def _reply(self, rid: int | None, status: int, body: Any) -> None:
        if self._closing:
            return
        try:
            data = frame({"id": rid, "status": status, "body": body})
        except (TypeError, ValueError, OverflowError):
            log.exception("unencodable response to %s", rid)
            data = frame(
                {
                    "id": rid,
                    "status": 500,
                    "body": {"error": "internal", "message": "unencodable response"},
                }
            )
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    # -- ending ----------------------------------------------------------------------
    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    async def drain(self, grace: float) -> None:
        """Stop reading, let in-flight requests finish (up to ``grace``), then close."""
        if self.transport is not None:
            self.transport.pause_reading()
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            for t in pending:
                t.cancel()
        self._flush()
        self.close()

    async def _cleanup(self) -> None:
        if self.tasks:  # requests still running may yet make transient keys
            await asyncio.wait(set(self.tasks))
        await self.keyring.drop_owner(self.owner)


def _id_of(payload: bytes, limit: int) -> int | None:
    """The id of a request refused for a large field (the frame itself is bounded)."""
    try:
        msg = decode(payload, max_field=limit)
    except FrameError:
        return None
    rid = msg.get("id") if isinstance(msg, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None
