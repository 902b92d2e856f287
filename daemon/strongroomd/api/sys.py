"""/sys/v1/health and /sys/v1/version: is the daemon serving, and which one."""

from __future__ import annotations

from typing import Any

import strongroomd
from strongroomd.context import Request
from strongroomd.router import Route

#: The DSM REST API version whose paths and shapes this daemon follows.
API_VERSION = "1.0"


async def health(req: Request) -> None:
    """204 while the daemon serves; a load balancer needs nothing more."""


async def version(req: Request) -> dict[str, Any]:
    return {
        "version": strongroomd.__version__,
        "api_version": API_VERSION,
        "server_mode": "Software",
    }


ROUTES = [
    Route("GET", "/sys/v1/health", health, {}, public=True, synopsis="204 while serving."),
    Route("GET", "/sys/v1/version", version, {}, public=True, synopsis="Server version."),
]
