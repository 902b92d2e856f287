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
from strongroomd.auth import parse_api_key, require_admin
from strongroomd.context import Request
from strongroomd.errors import BadRequest, NotFound, Unauthenticated
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


#: Strongroom is one account. DSM's clients ask a signed-in user which accounts it
#: belongs to and select one before acting (sdkms-cli's user-login does); an
#: administrator here belongs to this one, under this id (acct_id in DSM's views).
ACCOUNT_ID = "00000000-0000-0000-0000-000000000000"


async def accounts(req: Request) -> dict[str, Any]:
    """DSM's ``GET /sys/v1/users/accounts`` for an administrator: the one account.
    Apps have no accounts to choose (DSM answers apps 403 here too)."""
    require_admin(req.caller)
    return {ACCOUNT_ID: ["ACCOUNTADMINISTRATOR", "STATEENABLED"]}


async def select_account(req: Request) -> dict[str, Any]:
    """DSM's account selection: the one account is always selected; another id is 404."""
    require_admin(req.caller)
    if req.body["acct_id"] != ACCOUNT_ID:
        raise NotFound("no such account: Strongroom has one, " + ACCOUNT_ID)
    return {"acct_id": ACCOUNT_ID}


ROUTES = [
    Route(
        "GET",
        "/sys/v1/users/accounts",
        accounts,
        {},
        synopsis="The accounts an administrator belongs to: the one account (DSM's shape).",
    ),
    Route(
        "POST",
        "/sys/v1/session/select_account",
        select_account,
        {"acct_id": F(str, True)},
        synopsis="Select the account to act in: there is one (DSM's clients ask).",
    ),
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
