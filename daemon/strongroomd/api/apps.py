"""/sys/v1/apps*: client applications, their API keys and their permissions.

An app's groups come as DSM's AppGroups: a map of group id to the app's
permissions there (``add_groups``, ``mod_groups``), or a list of group ids
(``add_groups``, or Strongroom's ``groups``), where each group gets every
permission (:data:`strongroomd.auth.DEFAULT_PERMISSIONS`). ``del_groups``
takes groups away. The view answers DSM's map.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

from strongroomd.api import listing
from strongroomd.api.groups import membership
from strongroomd.auth import (
    DEFAULT_PERMISSIONS,
    api_key,
    check_permissions,
    new_secret,
    require_admin,
)
from strongroomd.context import Request
from strongroomd.errors import BadRequest, Conflict, Forbidden, NotFound
from strongroomd.keyspec import check_name
from strongroomd.router import F, Route
from strongroomd.store import PrincipalRow, now_stamp


def view(row: PrincipalRow) -> dict[str, Any]:
    return {
        "app_id": row.id,
        "name": row.name,
        "description": row.description,
        # DSM's AppGroups map: group id -> the app's permissions there.
        "groups": {g: list(row.permissions.get(g, [])) for g in row.groups},
        "default_group": row.default_group,
        "enabled": row.enabled,
        "created_at": row.created_at,
    }


def _get(req: Request) -> PrincipalRow:
    aid = req.params["app_id"]
    req.object_id = aid
    if not req.caller.is_admin and req.caller.id != aid:
        raise Forbidden("apps may only see themselves")
    row = req.services.store.principals.get(aid)
    if row is None or row.kind != "app":
        raise NotFound(f"no app {aid}")
    return row


def _app_groups(value: Any, where: str) -> dict[str, list[str] | None]:
    """DSM's AppGroups: {group id: [permission, ...]} or [group id, ...] (None:
    the default permissions, or for a group already held, the ones it has)."""
    if isinstance(value, list):
        if not all(isinstance(g, str) for g in value):
            raise BadRequest(f"{where} must list group ids", code="invalid_value")
        return dict.fromkeys(value)
    if isinstance(value, dict):
        return {g: check_permissions(perms, f"{where}[{g}]") for g, perms in value.items()}
    raise BadRequest(
        f"{where} is a map of group id to permissions, or a list of group ids",
        code="invalid_value",
    )


def _membership(
    req: Request, perms: dict[str, list[str] | None], default: str | None
) -> tuple[list[str], str, dict[str, list[str]]]:
    """Check the groups (they exist, at least one, default among them); fill
    unspecified permissions with the default set."""
    groups, default = membership(req.services.store, list(perms), default, "an app")
    full = {g: list(DEFAULT_PERMISSIONS) if (p := perms[g]) is None else p for g in groups}
    return groups, default, full


def _unique(req: Request, name: str, but: str | None = None) -> None:
    if any(p.name == name and p.id != but for p in req.services.store.principals.values()):
        raise Conflict(f"an app named {name!r} exists", code="name_exists")


async def create(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    b, store = req.body, req.services.store
    name = check_name(b["name"])
    secret, salt, digest = await asyncio.to_thread(new_secret)  # scrypt: ~50 ms
    if "mod_groups" in b or "del_groups" in b:
        raise BadRequest(
            "a new app takes groups and add_groups; mod_groups and del_groups change an "
            "existing app's groups (PATCH)",
            code="invalid_field",
        )
    asked = {**_app_groups(b.get("groups", []), "groups")}
    asked.update(_app_groups(b.get("add_groups", []), "add_groups"))
    async with store.catalog:
        _unique(req, name)
        groups, default, perms = _membership(req, asked, b.get("default_group"))
        row = PrincipalRow(
            str(uuid.uuid4()),
            "app",
            name,
            b.get("description", ""),
            groups,
            default,
            digest,
            salt,
            bool(b.get("enabled", True)),
            now_stamp(),
            permissions=perms,
        )
        req.object_id = row.id
        await store.insert(row)
    return {**view(row), "credential": {"api_key": api_key(row.id, secret)}}


async def list_(req: Request) -> list[dict[str, Any]]:
    require_admin(req.caller)
    apps = [p for p in req.services.store.principals.values() if p.kind == "app"]
    props = {"app_id": lambda p: p.id, "name": lambda p: p.name}
    return [view(p) for p in listing.page(apps, req.body, props, lambda p: p.groups)]


async def get(req: Request) -> dict[str, Any]:
    return view(_get(req))


async def update(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    aid = _get(req).id
    b = req.body
    name = check_name(b["name"]) if "name" in b else None
    replaced = _app_groups(b["groups"], "groups") if "groups" in b else {}
    added = _app_groups(b.get("add_groups", []), "add_groups")
    modified = _app_groups(b.get("mod_groups", []), "mod_groups")
    deleted = _app_groups(b.get("del_groups", []), "del_groups")
    both = (set(added) | set(modified) | set(replaced)) & set(deleted)
    if both:
        raise BadRequest(
            f"group(s) both given and deleted: {', '.join(sorted(both))}", code="invalid_value"
        )
    changes_groups = any(
        f in b for f in ("groups", "add_groups", "mod_groups", "del_groups", "default_group")
    )

    def apply(cur: PrincipalRow) -> PrincipalRow:
        row = replace(cur)  # the row as it is now, never one read before an await
        if name is not None:
            _unique(req, name, but=row.id)
            row.name = name
        if "description" in b:
            row.description = b["description"]
        if changes_groups:
            held: dict[str, list[str] | None] = {g: row.permissions.get(g) for g in row.groups}
            if "groups" in b:  # the whole membership; groups kept keep their permissions
                held = {g: held.get(g) if p is None else p for g, p in replaced.items()}
            for g, p in added.items():
                held[g] = held.get(g) if p is None else p
            for g, p in modified.items():
                if g not in held:
                    raise BadRequest(
                        f"mod_groups: the app is not in group {g} (add_groups adds it)",
                        code="invalid_value",
                    )
                held[g] = list(DEFAULT_PERMISSIONS) if p is None else p
            for g in deleted:
                held.pop(g, None)
            if "default_group" in b:
                default = b["default_group"]
            else:
                default = row.default_group if row.default_group in held else None
            row.groups, row.default_group, row.permissions = _membership(req, held, default)
        if "enabled" in b:
            row.enabled = b["enabled"]
        return row

    async with req.services.store.catalog:
        row = await req.services.store.change(PrincipalRow, aid, apply)
    if not row.enabled:
        req.services.auth.drop_principal(row.id)
    return view(row)


async def delete(req: Request) -> None:
    require_admin(req.caller)
    aid = _get(req).id
    store = req.services.store
    async with store.catalog, store.writing(aid):
        row = store.principals.get(aid)
        if row is None:
            raise NotFound(f"no app {aid}")
        await store.delete(row)
    req.services.auth.drop_principal(aid)


async def reset_secret(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    aid = _get(req).id
    secret, salt, digest = await asyncio.to_thread(new_secret)
    row = await req.services.store.change(
        PrincipalRow, aid, lambda cur: replace(cur, salt=salt, secret_hash=digest)
    )
    # Sessions end now; a login whose hash was checked against the old secret is
    # refused when it is issued (auth.Authenticator.login re-reads the row).
    req.services.auth.drop_principal(row.id)
    return {**view(row), "credential": {"api_key": api_key(row.id, secret)}}


async def credential(req: Request) -> dict[str, Any]:
    """DSM answers the app's credential here. Strongroom keeps an app's secret only
    as a slow salted hash, so it cannot: and every variant of DSM's
    ``AppCredentialResponse.credential`` needs the secret itself (or a certificate
    or other mechanism Strongroom has not). So the answer is ``409 conflict``
    naming what to do instead: reset_secret issues a new API key."""
    require_admin(req.caller)
    row = _get(req)
    raise Conflict(
        f"app {row.id}'s secret is kept only as a salted hash and cannot be returned; "
        f"POST /sys/v1/apps/{row.id}/reset_secret issues a new API key (the old one "
        "stops working at once)"
    )


_GROUPS = F((dict, list), doc="AppGroups: {group id: [permission, ...]} or [group id, ...]")
_FIELDS = {
    "name": F(str),
    "description": F(str),
    "groups": _GROUPS,
    "add_groups": _GROUPS,
    "mod_groups": _GROUPS,
    "del_groups": F(list, items=str),
    "default_group": F(str),
    "enabled": F(bool),
}

ROUTES = [
    Route(
        "POST",
        "/sys/v1/apps",
        create,
        {**_FIELDS, "name": F(str, True)},
        synopsis="Create an app; its API key is returned once.",
    ),
    Route(
        "GET",
        "/sys/v1/apps",
        list_,
        listing.FIELDS,
        synopsis="List apps (group_id filter; sort=app_id|name[:desc], start, offset, limit).",
    ),
    Route("GET", "/sys/v1/apps/{app_id}", get, {}, synopsis="Show an app."),
    Route("PATCH", "/sys/v1/apps/{app_id}", update, _FIELDS, synopsis="Change an app."),
    Route("DELETE", "/sys/v1/apps/{app_id}", delete, {}, synopsis="Delete an app."),
    Route(
        "POST",
        "/sys/v1/apps/{app_id}/reset_secret",
        reset_secret,
        {},
        synopsis="Issue a new API key; the old one stops working at once.",
    ),
    Route(
        "GET",
        "/sys/v1/apps/{app_id}/credential",
        credential,
        {},
        synopsis="DSM's credential read: 409, as only a hash of the secret is kept.",
    ),
]
