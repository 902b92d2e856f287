"""Unix-socket transports. Socket, framing and msgpack failures become ours here.

Both send each request as one frame and match responses by ``id``. A
response whose ``id`` is nil is the daemon refusing a frame it could not
read; it answers every request then in flight, and the connection is closed.
A later request opens a new connection (and the client authenticates again).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
from collections.abc import Sequence

from strongroom import wire
from strongroom._exceptions import ConnectError, ProtocolError, Timeout, TransportError
from strongroom._models import Request, Response
from strongroom._transports.base import AsyncBaseTransport, BaseTransport

__all__ = ["AsyncUnixTransport", "UnixTransport"]

_CHUNK = 256 * 1024
_HIGH_WATER = 1024 * 1024


def _connect_error(path: str, exc: OSError) -> ConnectError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return ConnectError(f"cannot connect to strongroomd at {path}: {reason}", socket_path=path)


def _parse(payload: bytes, max_field: int) -> Response:
    try:
        return Response.from_wire(wire.decode(payload, max_field=max_field))
    except wire.FrameError as exc:
        raise ProtocolError(f"unreadable response: {exc.message}") from None
    except ValueError as exc:
        raise ProtocolError(f"unreadable response: {exc}") from None


class UnixTransport(BaseTransport):
    """One connection to the daemon's socket, opened on first use.

    Parameters:

    * **path** - the socket's path.
    * **timeout** - seconds to connect, and to get all responses of one call.
    * **max_frame** - largest response frame accepted.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        max_frame: int = wire.MAX_FRAME,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.max_frame = max_frame
        self._sock: socket.socket | None = None
        self._frames = wire.FrameReader(max_frame)
        #: How many connections this transport has opened.
        self.connections = 0

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except TimeoutError:
            sock.close()
            raise Timeout(f"timed out connecting to {self.path}", socket_path=self.path) from None
        except OSError as exc:
            sock.close()
            raise _connect_error(self.path, exc) from None
        self._sock = sock
        self._frames = wire.FrameReader(self.max_frame)
        self.connections += 1
        return sock

    def handle_request(self, request: Request) -> Response:
        return self.handle_requests([request])[0]

    def handle_requests(self, requests: Sequence[Request]) -> list[Response]:
        if not requests:
            return []
        index = {r.id: i for i, r in enumerate(requests)}
        if len(index) != len(requests):
            raise ValueError("request ids must be unique")
        data = b"".join(wire.frame(r.to_wire()) for r in requests)  # TypeError before I/O
        sock = self._sock or self._connect()
        try:
            return self._exchange(sock, data, index)
        except TransportError:
            self.close()
            raise
        except TimeoutError:
            self.close()
            raise Timeout(
                f"no response from strongroomd at {self.path} within {self.timeout}s",
                socket_path=self.path,
            ) from None
        except OSError as exc:
            self.close()
            raise ProtocolError(
                f"connection to strongroomd at {self.path} failed: {exc.strerror or exc}",
                socket_path=self.path,
            ) from None

    def _exchange(self, sock: socket.socket, data: bytes, index: dict[int, int]) -> list[Response]:
        deadline = time.monotonic() + self.timeout
        sock.settimeout(self.timeout)
        sock.sendall(data)
        out: list[Response | None] = [None] * len(index)
        left = len(index)
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(_CHUNK)
            if not chunk:
                raise ProtocolError(
                    f"strongroomd at {self.path} closed the connection", socket_path=self.path
                )
            try:
                payloads = self._frames.feed(chunk)
            except wire.FrameError as exc:
                raise ProtocolError(exc.message, socket_path=self.path) from None
            for payload in payloads:
                resp = _parse(payload, self.max_frame)
                if resp.id is None:  # the daemon could not read one of our frames
                    self.close()
                    return [resp if r is None else r for r in out]
                i = index.get(resp.id)
                if i is None or out[i] is not None:
                    raise ProtocolError(f"response with unexpected id {resp.id}")
                out[i] = resp
                left -= 1
        return out  # type: ignore[return-value]

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class _Connection:
    """One pipelined connection: a reader task hands each response to its future."""

    def __init__(
        self,
        path: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_frame: int,
    ) -> None:
        self.path = path
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self.pending: dict[int, asyncio.Future[Response]] = {}
        self.deadlines: collections.deque[tuple[float, asyncio.Future[Response]]] = (
            collections.deque()
        )
        self.sweeper: asyncio.TimerHandle | None = None
        self.outbox: list[bytes] = []
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        frames = wire.FrameReader(self.max_frame)
        try:
            while True:
                chunk = await self.reader.read(_CHUNK)
                if not chunk:
                    raise ProtocolError(
                        f"strongroomd at {self.path} closed the connection", socket_path=self.path
                    )
                try:
                    payloads = frames.feed(chunk)
                except wire.FrameError as exc:
                    raise ProtocolError(exc.message, socket_path=self.path) from None
                for payload in payloads:
                    resp = _parse(payload, self.max_frame)
                    if resp.id is None:
                        for fut in self.pending.values():
                            if not fut.done():
                                fut.set_result(resp)
                        raise ProtocolError("the daemon refused a frame", socket_path=self.path)
                    waiter = self.pending.get(resp.id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(resp)
                    # else: the late answer to a request that timed out or was cancelled
        except ProtocolError as exc:
            self.fail(exc.message)
        except OSError as exc:
            self.fail(f"connection to strongroomd at {self.path} failed: {exc.strerror or exc}")
        except Exception as exc:  # a bug must not leave requests waiting forever
            self.fail(f"reading from strongroomd at {self.path} failed: {exc!r}")

    def fail(self, message: str) -> None:
        """Close, failing every request still waiting with a ProtocolError."""
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ProtocolError(message, socket_path=self.path))
        self.writer.close()

    async def send(self, request_id: int, data: bytes, timeout: float) -> Response:
        if self.closed:
            raise ProtocolError("the connection is closed", socket_path=self.path)
        if request_id in self.pending:
            raise ValueError(f"request id {request_id} is already in flight")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Response] = loop.create_future()
        self.pending[request_id] = fut
        # One timer for the whole connection, not one per request (heap pushes
        # and pops per request cost more than the rest of the client put together).
        self.deadlines.append((loop.time() + timeout, fut))
        if self.sweeper is None:
            self.sweeper = loop.call_later(min(timeout, 1.0), self._sweep, timeout)
        try:
            # Frames written in the same loop turn go out in one system call.
            self.outbox.append(data)
            if len(self.outbox) == 1:
                loop.call_soon(self._flush)
            if self.writer.transport.get_write_buffer_size() > _HIGH_WATER:
                try:
                    await self.writer.drain()
                except OSError as exc:
                    self.fail(
                        f"connection to strongroomd at {self.path} failed: {exc.strerror or exc}"
                    )
            return await fut
        finally:
            del self.pending[request_id]

    def _flush(self) -> None:
        data, self.outbox = b"".join(self.outbox), []
        if not self.closed:
            self.writer.write(data)

    def _sweep(self, timeout: float) -> None:
        now = asyncio.get_running_loop().time()
        q = self.deadlines
        while q and (q[0][1].done() or q[0][0] <= now):
            _, fut = q.popleft()
            if not fut.done():
                fut.set_exception(
                    Timeout(
                        f"no response from strongroomd at {self.path} within {timeout}s",
                        socket_path=self.path,
                    )
                )
        self.sweeper = None
        if q and not self.closed:
            delay = max(0.0, min(q[0][0] - now, 1.0))
            self.sweeper = asyncio.get_running_loop().call_later(delay, self._sweep, timeout)

    async def aclose(self) -> None:
        if not self.closed:
            self.fail("the client was closed")
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class AsyncUnixTransport(AsyncBaseTransport):
    """One pipelined connection to the daemon's socket, opened on first use.

    Many requests may be in flight at once; responses are matched by id in
    whatever order they come. Parameters as for :class:`UnixTransport`
    (``timeout`` applies to each request once sent), plus:

    * **max_in_flight** - requests sent but not yet answered; more wait here.
      The daemon answers 429 ``busy`` beyond its own limit (1024 by default),
      so ``asyncio.gather`` of any number of requests stays within it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        max_frame: int = wire.MAX_FRAME,
        max_in_flight: int = 512,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.max_frame = max_frame
        self.max_in_flight = max_in_flight
        self._slots: asyncio.Semaphore | None = None
        self._conn: _Connection | None = None
        self._lock: asyncio.Lock | None = None
        #: How many connections this transport has opened.
        self.connections = 0

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = self._conn
            if conn is None or conn.closed:
                try:
                    async with asyncio.timeout(self.timeout):
                        reader, writer = await asyncio.open_unix_connection(self.path)
                except TimeoutError:
                    raise Timeout(
                        f"timed out connecting to {self.path}", socket_path=self.path
                    ) from None
                except OSError as exc:
                    raise _connect_error(self.path, exc) from None
                conn = self._conn = _Connection(self.path, reader, writer, self.max_frame)
                self.connections += 1
            return conn

    async def handle_async_request(self, request: Request) -> Response:
        data = wire.frame(request.to_wire())  # TypeError before I/O
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_in_flight)
        async with self._slots:
            conn = await self._connection()
            return await conn.send(request.id, data, self.timeout)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()
