"""One client connection: frames in, requests dispatched, frames out.

Requests run as tasks, so a connection carries many at once and answers
them as they finish, matched by ``id``. Replies finishing in the same loop
turn are written with one system call. A malformed frame is answered (with
``id: null`` when no id could be read) and the connection goes on; only an
oversized frame, after which the stream cannot be trusted, closes it.

Every resource a connection can hold is bounded (docs/protocol.md, "Resource
bounds"), because a client, authenticated or not, must never be able to
starve the daemon:

- :class:`Admission` and :class:`Listener`: at most ``max_connections`` at
  once; beyond, a new connection gets one ``429 busy`` frame and is closed
  at once. Refusals are counted and logged at most once a minute, never a
  line each.
- Before authentication a connection may send frames of ``max_unauth_bytes``
  at most, one request at a time, and must authenticate within
  ``auth_timeout`` seconds of connecting.
- A frame that has started must arrive whole within ``frame_timeout``.
- :class:`Budget`: request bytes in flight over all connections (and the HTTP
  gateway) stay under ``max_inflight_bytes``; when it is spent, connections
  stop taking frames (and the kernel's socket buffer pushes back on clients)
  until requests finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from strongroom.wire import CODES, FrameError, FrameReader, decode, frame

from strongroomd.context import Owner
from strongroomd.errors import ApiError, BadRequest, Busy

if TYPE_CHECKING:
    import ssl

    from strongroomd.dispatch import Dispatcher
    from strongroomd.keyring import Keyring

log = logging.getLogger("strongroomd.protocol")

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
MAX_PATH = 1024
#: Seconds between two warnings about the same kind of refusal (a flood of idle
#: connections once grew the log 83 MB in 50 s, one line per refusal).
WARN_EVERY = 60.0


class Throttled:
    """A warning logged at most once per :data:`WARN_EVERY`, with a count."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.total = 0
        self._since = 0
        self._last = -WARN_EVERY

    def note(self, detail: str = "") -> None:
        self.total += 1
        self._since += 1
        now = time.monotonic()
        if now - self._last >= WARN_EVERY:
            log.warning("%s: %d since the last warning%s", self.what, self._since, detail)
            self._last = now
            self._since = 0


class Admission:
    """A connection cap for one listener (the socket, or the HTTP gateway)."""

    def __init__(self, name: str, cap: int) -> None:
        self.name = name
        self.cap = cap
        self.refusals = Throttled(f"{name}: connections refused at the cap of {cap}")

    def full(self, current: int) -> bool:
        """True (and the refusal counted) when ``current`` connections fill the cap."""
        if current < self.cap:
            return False
        self.refusals.note(" (raise max_connections if these are legitimate clients)")
        return True


class Budget:
    """Bytes of requests in flight, over every connection and front end.

    A socket connection that finds the budget spent stops taking frames and
    waits here; it is woken when requests finish. The HTTP gateway, which
    cannot hold a request without holding its body, asks :meth:`try_take` and
    answers ``429 busy`` on False.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: dict[Connection, None] = {}  # an ordered set

    @property
    def spent(self) -> bool:
        return self.used >= self.limit

    def take(self, n: int) -> None:
        self.used += n

    def try_take(self, n: int) -> bool:
        """Take ``n`` unless that would pass the limit (one request alone always fits)."""
        if self.used and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n
        if self._waiting and self.used < self.limit:
            waiting, self._waiting = self._waiting, {}
            for conn in waiting:
                conn.pump()

    def wait(self, conn: Connection) -> None:
        self._waiting[conn] = None

    def forget(self, conn: Connection) -> None:
        self._waiting.pop(conn, None)


#: Connections accepted per wake-up of a listener (asyncio's own loop takes its backlog).
ACCEPT_BATCH = 64
#: Errors of accept() that mean "out of descriptors or memory": wait, then try again.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Listener:
    """Accepts connections for one listening socket, enforcing its :class:`Admission`.

    asyncio's own server accepts a whole backlog before any protocol can refuse
    a connection, so a flood held up to three backlogs of descriptors at once,
    and each failed accept() logged a traceback. Here a connection over the cap
    gets ``refusal`` (best effort) and is closed before the next accept(), and
    running out of descriptors pauses accepting for a moment with one
    throttled warning.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        admission: Admission,
        count: Callable[[], int],
        refusal: bytes,
        *,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.sock = sock
        self.factory = factory
        self.admission = admission
        self.count = count
        #: Sent in clear text to a connection over the cap: not over TLS (the
        #: client expects a handshake; it is just closed).
        self.refusal = refusal if tls is None else b""
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.pending = 0  # accepted, transport not yet made
        self._loop = asyncio.get_running_loop()
        self._exhausted = Throttled(f"{admission.name}: accept() failed, out of descriptors")
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _EXHAUSTED and exc.errno != errno.ECONNABORTED:
                    raise
                if exc.errno != errno.ECONNABORTED:
                    self._exhausted.note(" (raise LimitNOFILE or lower the connection caps)")
                    self._loop.remove_reader(self.sock.fileno())
                    self._loop.call_later(0.1, self._resume)
                return
            if self.admission.full(self.count() + self.pending):
                if self.refusal:
                    with contextlib.suppress(OSError):
                        conn.send(self.refusal, socket.MSG_DONTWAIT)
                conn.close()
                continue
            conn.setblocking(False)
            self.pending += 1
            if self.tls is None:
                accepted = self._loop.connect_accepted_socket(self.factory, sock=conn)
            else:
                accepted = self._loop.connect_accepted_socket(
                    self.factory,
                    sock=conn,
                    ssl=self.tls,
                    ssl_handshake_timeout=self.handshake_timeout,
                )
            made = self._loop.create_task(accepted)
            made.add_done_callback(partial(self._made, conn))

    def _made(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self.pending -= 1
        if task.cancelled() or task.exception() is not None:
            conn.close()

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._accept)


@dataclass(slots=True, frozen=True)
class Limits:
    """Per-connection bounds, from :class:`strongroomd.config.Config`."""

    max_frame: int
    max_field: int
    max_inflight: int
    max_unauth_bytes: int
    frame_timeout: float
    auth_timeout: float


#: Connections closed for a deadline, counted (a flood of them must not flood the log).
_AUTH_TIMEOUTS = Throttled("connections closed for not authenticating in time")
_FRAME_TIMEOUTS = Throttled("connections closed for a frame that did not arrive whole in time")


class Connection(asyncio.Protocol):
    def __init__(
        self,
        dispatcher: Dispatcher,
        keyring: Keyring,
        connections: set[Connection],
        *,
        limits: Limits,
        budget: Budget,
    ) -> None:
        self.dispatcher = dispatcher
        self.services = dispatcher.services
        self.keyring = keyring
        self.connections = connections
        self.limits = limits
        self.budget = budget
        self.max_field = limits.max_field
        self.max_inflight = limits.max_inflight
        self.reader = FrameReader(min(limits.max_unauth_bytes, limits.max_frame))
        self.owner = Owner(id=str(uuid.uuid4()))
        self.tasks: set[asyncio.Task[None]] = set()
        self.transport: asyncio.Transport | None = None
        self.authenticated = False
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._closing = False
        self._reading = True
        self._write_paused = False
        self._draining = False
        self._auth_overdue = False
        self._auth_timer: asyncio.TimerHandle | None = None
        self._frame_timer: asyncio.TimerHandle | None = None
        self._frame_mark = -1  # frames read when the partial one began; -1: none
        self._frame_since = 0.0
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.connections.add(self)
        self._auth_timer = self._loop.call_later(self.limits.auth_timeout, self._auth_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timers()
        self.budget.forget(self)
        self.connections.discard(self)
        self._loop.create_task(self._cleanup())

    def pause_writing(self) -> None:  # the client is not reading its replies: take no more
        self._write_paused = True
        self._set_reading(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        self.pump()

    def data_received(self, data: bytes) -> None:
        self.reader.push(data)
        self.pump()

    # -- flow ------------------------------------------------------------------------
    def pump(self) -> None:
        """Take whole frames while nothing holds this connection; then set reading
        and the partial-frame deadline to match."""
        if self._closing:
            return
        while not (held := self._held()):
            try:
                payload = self.reader.next()
            except FrameError as exc:
                self._fail(exc.code, exc.message)
                return
            if payload is None:
                break
            self._on_frame(payload)
            if self._closing:
                return
        if not self.authenticated and self.reader.buffered > self.limits.max_unauth_bytes:
            self._fail(
                "too_large",
                f"before authentication a connection may send {self.limits.max_unauth_bytes} "
                "bytes at a time; wait for the answer to session/auth",
            )
            return
        self._set_reading(not held)
        # The partial-frame deadline: one timer per connection, which re-checks when
        # it fires. (Re-arming a timer per frame left ~100k cancelled handles in the
        # loop's heap at 10k frames/s, and the loop's time went to re-sorting them.)
        if self.reader.buffered and not held:
            if self._frame_mark != self.reader.frames:  # a new partial frame began
                self._frame_mark = self.reader.frames
                self._frame_since = self._loop.time()
            if self._frame_timer is None:
                self._frame_timer = self._loop.call_at(
                    self._frame_since + self.limits.frame_timeout, self._frame_check
                )
        else:
            self._frame_mark = -1  # nothing partial (or held: no deadline meanwhile)

    def _held(self) -> bool:
        """Whether to take no more frames for now (the reasons are in the module doc)."""
        if self._write_paused or self._draining:
            return True
        if not self.authenticated and self.tasks:
            return True  # before authentication, one request at a time
        if self.budget.spent:
            self.budget.wait(self)
            return True
        return False

    def _set_reading(self, on: bool) -> None:
        if on == self._reading or self.transport is None or self._closing:
            return
        self._reading = on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def _authenticated(self) -> None:
        """The connection proved a credential: it gets the full frame size."""
        self.authenticated = True
        self.reader.max_frame = self.limits.max_frame
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None

    def _auth_expired(self) -> None:
        self._auth_timer = None
        if self.authenticated or self._closing:
            return
        if self.tasks:  # a login still being checked decides
            self._auth_overdue = True
            return
        _AUTH_TIMEOUTS.note()
        self._fail("unauthenticated", f"authenticate within {self.limits.auth_timeout:g} s")

    def _frame_check(self) -> None:
        self._frame_timer = None
        if self._closing or self._frame_mark == -1 or not self.reader.buffered:
            return  # nothing partial now; pump() arms the timer again when needed
        if self._frame_mark != self.reader.frames:  # frames came whole meanwhile
            self._frame_mark = self.reader.frames
            self._frame_since = self._loop.time()
        due = self._frame_since + self.limits.frame_timeout
        if self._loop.time() < due:
            self._frame_timer = self._loop.call_at(due, self._frame_check)
            return
        self._frame_expired()

    def _frame_expired(self) -> None:
        self._frame_timer = None
        if self._closing:
            return
        _FRAME_TIMEOUTS.note()
        self._fail(
            "malformed_frame", f"a frame must arrive whole within {self.limits.frame_timeout:g} s"
        )

    def _fail(self, code: str, message: str) -> None:
        """Answer ``id: null`` and close: the stream can no longer be trusted."""
        self._reply(None, CODES[code], {"error": code, "message": message})
        self._flush()
        self.close()

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
        size = len(payload)
        self.budget.take(size)
        task = self._loop.create_task(self._run(rid, method, path, msg.get("body"), auth))
        self.tasks.add(task)
        self.services.socket_pending += 1
        task.add_done_callback(partial(self._done, size))

    def _done(self, size: int, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.services.socket_pending -= 1
        if not self.authenticated and self.owner.token is not None:
            self._authenticated()  # session/auth bound a token to this connection
        self.budget.give(size)
        if self._auth_overdue and not self.authenticated and not self.tasks:
            _AUTH_TIMEOUTS.note()
            self._fail("unauthenticated", f"authenticate within {self.limits.auth_timeout:g} s")
            return
        if not self._reading:  # frames wait only while reading is off (see pump)
            self.pump()

    async def _run(self, rid: int, method: str, path: str, body: Any, auth: str | None) -> None:
        status, out = await self.dispatcher.handle(self.owner, method, path, body, auth)
        guarded = auth is not None and not self.authenticated and status != 401
        if guarded and self._guarded(method, path):  # its per-request token passed the check
            self._authenticated()
        self._reply(rid, status, out)

    def _guarded(self, method: str, path: str) -> bool:
        """Whether the request matched a route that authenticates (so an answer proves a login)."""
        try:
            return not self.dispatcher.router.match(method, path.partition("?")[0])[0].public
        except ApiError:
            return False

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
        self._cancel_timers()
        if self.transport is not None:
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._auth_timer, self._frame_timer):
            if timer is not None:
                timer.cancel()
        self._auth_timer = self._frame_timer = None

    async def drain(self, grace: float) -> None:
        """Stop reading, let in-flight requests finish (up to ``grace``), then close."""
        self._draining = True
        self._set_reading(False)
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None
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


def busy_frame(message: str) -> bytes:
    """The frame a connection over the cap gets before it is closed."""
    return frame(
        {"id": None, "status": CODES["busy"], "body": {"error": "busy", "message": message}}
    )


def _id_of(payload: bytes, limit: int) -> int | None:
    """The id of a request refused for a large field (the frame itself is bounded)."""
    try:
        msg = decode(payload, max_field=limit)
    except FrameError:
        return None
    rid = msg.get("id") if isinstance(msg, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None
