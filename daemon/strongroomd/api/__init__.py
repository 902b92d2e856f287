"""The route table: one module per path family, gathered in order."""

from __future__ import annotations

from strongroomd.api import (
    admin,
    apps,
    crypto,
    groups,
    keys,
    logs,
    plugins,
    session,
    stats,
    streams,
    sys,
)
from strongroomd.router import Route

ROUTES: list[Route] = [
    *session.ROUTES,
    *sys.ROUTES,
    *admin.ROUTES,
    *groups.ROUTES,
    *apps.ROUTES,
    *keys.ROUTES,
    *crypto.ROUTES,
    *streams.ROUTES,
    *logs.ROUTES,
    *stats.ROUTES,
    *plugins.ROUTES,
]
