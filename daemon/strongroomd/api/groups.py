"""/sys/v1/groups*: the containers that keys, apps and plugins live in."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from strongroomd.auth import require_admin
from strongroomd.context import Request
from strongroomd.errors import BadRequest, Conflict, NotFound
from strongroomd.keyspec import check_name
from strongroomd.router import F, Route
from strongroomd.store import GroupRow, Store, now_stamp


def view(row: GroupRow) -> dict[str, Any]:
    return {
        "group_id": row.id,
        "name": row.name,
        "description": row.description,
        "created_at": row.created_at,
    }


def membership(
    store: Store, groups: list[str], default: str | None, who: str
) -> tuple[list[str], str]:
    """Check the groups an app or plugin is put in; returns them (deduplicated) and its default."""
    if not groups:
        raise BadRequest(f"{who} needs at least one group", code="invalid_value")
    for gid in groups:
        if gid not in store.groups:
            raise NotFound(f"no group {gid}")
    default = default or groups[0]
    if default not in groups:
        raise BadRequest("default_group must be one of groups", code="invalid_value")
    return list(dict.fromkeys(groups)), default


def _get(req: Request) -> GroupRow:
    gid = req.params["group_id"]
    req.object_id = gid
    row = req.services.store.groups.get(gid)
    # A group the caller is not in answers as one that does not exist: group ids
    # cannot be probed.
    if row is None or not (req.caller.is_admin or gid in req.caller.groups):
        raise NotFound(f"no group {gid}")
    return row


def _unique(req: Request, name: str, *, but: str | None = None) -> None:
    if any(g.name == name and g.id != but for g in req.services.store.groups.values()):
        raise Conflict(f"a group named {name!r} exists", code="name_exists")


async def create(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    name = check_name(req.body["name"])
    row = GroupRow(str(uuid.uuid4()), name, req.body.get("description", ""), now_stamp())
    req.object_id = row.id
    async with req.services.store.catalog:
        _unique(req, name)
        await req.services.store.insert(row)
    return view(row)


async def list_(req: Request) -> list[dict[str, Any]]:
    p = req.caller
    rows = req.services.store.groups.values()
    return [view(g) for g in rows if p.is_admin or g.id in p.groups]


async def get(req: Request) -> dict[str, Any]:
    return view(_get(req))


async def update(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    b = req.body
    gid = _get(req).id
    name = check_name(b["name"]) if "name" in b else None

    def apply(cur: GroupRow) -> GroupRow:
        if name is not None:
            _unique(req, name, but=cur.id)
        return replace(
            cur,
            name=cur.name if name is None else name,
            description=b.get("description", cur.description),
        )

    async with req.services.store.catalog:
        return view(await req.services.store.change(GroupRow, gid, apply))


async def delete(req: Request) -> None:
    require_admin(req.caller)
    gid = _get(req).id
    s = req.services
    store = s.store
    async with store.catalog:  # no app, plugin or key joins it between the check and the delete
        row = store.groups.get(gid)
        if row is None:
            raise NotFound(f"no group {gid}")
        if s.keyring.group_in_use(gid):
            raise Conflict("the group still holds keys", code="group_not_empty")
        users = [p.name for p in store.principals.values() if gid in p.groups]
        users += [p.name for p in store.plugins.values() if gid in p.groups]
        if users:
            raise Conflict(
                f"the group still has members: {', '.join(sorted(users))}", code="group_not_empty"
            )
        # From here no key may be made in it, though the row goes only after an await.
        s.keyring.closing.add(gid)
        try:
            await store.delete(row)
        finally:
            s.keyring.closing.discard(gid)


ROUTES = [
    Route(
        "POST",
        "/sys/v1/groups",
        create,
        {"name": F(str, True), "description": F(str)},
        synopsis="Create a group.",
    ),
    Route("GET", "/sys/v1/groups", list_, {}, synopsis="List groups you can see."),
    Route("GET", "/sys/v1/groups/{group_id}", get, {}, synopsis="Show a group."),
    Route(
        "PATCH",
        "/sys/v1/groups/{group_id}",
        update,
        {"name": F(str), "description": F(str)},
        synopsis="Rename or describe a group.",
    ),
    Route(
        "DELETE",
        "/sys/v1/groups/{group_id}",
        delete,
        {},
        synopsis="Delete an empty group (409 while it holds keys or members).",
    ),
]
