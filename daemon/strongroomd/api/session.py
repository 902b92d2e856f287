"""/sys/v1/session/*: log in with an API key, log out.

A failed login is not stored as a record of its own: it is counted per source
and minute, and written as one record with the count
(:meth:`strongroomd.audit.Audit.failed_login`), so a flood of guesses cannot
fill the disk. The source is the socket connection, or "http" for the gateway
(:func:`strongroomd.audit.source_of`).
"""

from __future__ import annotations

from typing import Any

from strongroomd.audit import source_of
from strongroomd.auth import parse_api_key
from strongroomd.context import Request
from strongroomd.errors import BadRequest, Unauthenticated
from strongroomd.router import F, Route


async def auth(req: Request) -> dict[str, Any]:
    body = req.body
    if "api_key" in body:
        if "app_id" in body or "secret" in body:
            raise BadRequest("give api_key, or app_id and secret, not both", code="invalid_field")
        pid, secret = parse_api_key(body["api_key"])
    elif "app_id" in body and "secret" in body:
        pid, secret = body["app_id"], body["secret"]
    else:
        raise BadRequest("api_key (or app_id and secret) is required", code="missing_field")
    services = req.services
    try:
        token, principal = await services.auth.login(pid, secret)
    except Unauthenticated:
        known = pid if pid in services.store.principals else None  # never a made-up id
        services.audit.failed_login(source_of(req.owner), known)
        raise
    req.principal = principal
    req.object_id = principal.id
    owner = req.owner
    if owner.token is not None:
        services.auth.terminate(owner.token)
    owner.token = token
    owner.principal = principal
    return {
        "token_type": "Bearer",
        "access_token": token,
        "expires_in": services.config.session_ttl,
        "entity_id": principal.id,
        "kind": principal.kind,
    }


async def terminate(req: Request) -> None:
    owner = req.owner
    if owner.token is not None:
        req.services.auth.terminate(owner.token)
    owner.token = None
    owner.principal = None


async def refresh(req: Request) -> None:
    """Keep this connection's session (or the HTTP bearer token) from expiring: a
    fresh ``session_ttl`` from now, as DSM's no-op refresh does. A request
    authenticated some other way (per-request ``auth``, a plugin) has nothing to
    extend here and is answered the same."""
    if req.owner.token is not None:
        req.services.auth.refresh(req.owner.token)


ROUTES = [
    Route(
        "POST",
        "/sys/v1/session/auth",
        auth,
        {
            "api_key": F(str, doc="base64(id:secret)"),
            "app_id": F(str),
            "secret": F(str),
        },
        public=True,
        synopsis="Authenticate this connection; returns a bearer token.",
    ),
    Route(
        "POST",
        "/sys/v1/session/terminate",
        terminate,
        {},
        synopsis="End this connection's session.",
    ),
    Route(
        "POST",
        "/sys/v1/session/refresh",
        refresh,
        {},
        synopsis="Keep this session from expiring (session_ttl from now).",
    ),
]
