"""Transports: how a client gets a Request to the daemon and a Response back."""

from strongroom._transports.base import AsyncBaseTransport, BaseTransport
from strongroom._transports.mock import MockTransport
from strongroom._transports.unix import AsyncUnixTransport, UnixTransport

__all__ = [
    "AsyncBaseTransport",
    "AsyncUnixTransport",
    "BaseTransport",
    "MockTransport",
    "UnixTransport",
]
