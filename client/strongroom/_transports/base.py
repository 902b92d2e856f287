"""The two transport interfaces: one sending method each, plus close.

A transport turns socket and framing failures into
:class:`~strongroom.TransportError` subclasses; it never interprets statuses.
Error responses come back as ordinary :class:`~strongroom._models.Response`
values, and the client decides what they mean.
"""

from __future__ import annotations

from collections.abc import Sequence

from strongroom._models import Request, Response

__all__ = ["AsyncBaseTransport", "BaseTransport"]


class BaseTransport:
    """Synchronous transport. Callers serialise access (the Client holds a lock)."""

    def handle_request(self, request: Request) -> Response:
        raise NotImplementedError

    def handle_requests(self, requests: Sequence[Request]) -> list[Response]:
        """Send several requests; responses in request order. Pipelines when it can."""
        return [self.handle_request(r) for r in requests]

    def close(self) -> None:
        """Release the connection; a later request may open a new one."""


class AsyncBaseTransport:
    """Asynchronous transport; must accept many concurrent ``handle_async_request`` calls."""

    async def handle_async_request(self, request: Request) -> Response:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release the connection, failing requests still in flight."""
