"""The route table: one module per path family, gathered in order."""

from __future__ import annotations

from strongroomd.api import (
    admin,
    apps,
    bip32,
    crypto,
    groups,
    keys,
    logs,
    plugins,
    session,
    stats,
    streams,
    sys,
    tr31,
)
from strongroomd.router import Route

ROUTES: list[Route] = [
    *session.ROUTES,
    *sys.ROUTES,
    *admin.ROUTES,
    *groups.ROUTES,
    *apps.ROUTES,
    *bip32.ROUTES,
    *tr31.ROUTES,
    *keys.ROUTES,
    *crypto.ROUTES,
    *streams.ROUTES,
    *logs.ROUTES,
    *stats.ROUTES,
    *plugins.ROUTES,
]
