"""A transport backed by a handler function, for client-only unit tests."""

from __future__ import annotations

import inspect
from typing import Any

from strongroom import wire
from strongroom._models import Request, Response
from strongroom._transports.base import AsyncBaseTransport, BaseTransport

__all__ = ["MockTransport"]


class MockTransport(BaseTransport, AsyncBaseTransport):
    """Answer requests by calling ``handler(request)``; usable by either client.

    Usage::

        def handler(request):
            return Response(200, {"digest": b"..."})

        client = Client(transport=MockTransport(handler))

    Requests and responses go through the msgpack codec on the way, so the
    handler sees what the daemon would see. The handler returns a
    :class:`Response` (its ``id`` filled in from the request when None) or a
    raw response map, sent as is (``{"id": None, ...}`` for a connection-level
    error). It may be a coroutine function when used by an ``AsyncClient``.
    Every request seen is appended to ``requests``.
    """

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.closed = False

    def _request(self, request: Request) -> Request:
        msg = wire.decode(wire.encode(request.to_wire()))
        seen = Request(msg["id"], msg["method"], msg["path"], msg["body"], msg.get("auth"))
        self.requests.append(seen)
        return seen

    @staticmethod
    def _response(request: Request, result: Any) -> Response:
        if isinstance(result, Response):
            rid = request.id if result.id is None else result.id
            result = {"id": rid, "status": result.status, "body": result.body}
        return Response.from_wire(wire.decode(wire.encode(result)))

    def handle_request(self, request: Request) -> Response:
        result = self.handler(self._request(request))
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError("an async handler needs an AsyncClient")
        return self._response(request, result)

    async def handle_async_request(self, request: Request) -> Response:
        result = self.handler(self._request(request))
        if inspect.isawaitable(result):
            result = await result
        return self._response(request, result)

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True
