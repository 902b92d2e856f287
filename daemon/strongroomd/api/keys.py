"""/crypto/v1/keys*: create, import, list, show, change, delete, export."""

from __future__ import annotations

import base64
import binascii
from dataclasses import replace
from typing import Any

from strongroomd.auth import can_see_key, check_key_manage, check_key_use
from strongroomd.context import Request
from strongroomd.errors import BadRequest, Conflict, NotFound
from strongroomd.keyring import (
    DEFAULT_SIZE,
    Keyring,
    check_metadata,
    check_name,
    choose_ops,
    normalize_type,
    ref_of,
    sobject,
)
from strongroomd.router import KEY, F, Route
from strongroomd.store import KeyRow

SYMMETRIC = {"AES", "DES3", "HMAC", "SECRET"}


def _keyring(req: Request) -> Keyring:
    return req.services.keyring


async def create(req: Request) -> dict[str, Any]:
    b, p = req.body, req.caller
    obj_type, curve = normalize_type(b)
    if obj_type == "CERTIFICATE":
        raise BadRequest("a CERTIFICATE can only be imported (PUT)", code="invalid_value")
    if obj_type == "EC" and not curve:
        raise BadRequest("elliptic_curve is required for EC keys", code="missing_field")
    size = None if obj_type == "EC" else b.get("key_size", DEFAULT_SIZE[obj_type])
    ops = choose_ops(obj_type, b.get("key_ops"), imported=False)
    group = _keyring(req).target_group(p, b.get("group_id"))
    kr = _keyring(req)
    new = kr.new_key(req.owner, p, b, obj_type, curve, size, exportable="EXPORT" in ops)
    req.object_id = new.kid
    mat = await req.services.token.generate(new)
    return sobject(await kr.register(req.owner, p, new, mat, b, ops, group))


def _value(b: dict[str, Any]) -> bytes:
    v = b["value"]
    if isinstance(v, str):  # base64 text, as DSM's JSON API carries it
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            if "-----BEGIN" in v:
                return v.encode()
            raise BadRequest("value must be bytes or base64", code="invalid_value") from None
    return v


async def import_(req: Request) -> dict[str, Any]:
    b, p = req.body, req.caller
    obj_type, curve = normalize_type(b)
    value = _value(b)
    kr = _keyring(req)
    group = kr.target_group(p, b.get("group_id"))
    # Ops are chosen once the token tells whether the value held a private key.
    asked = b.get("key_ops")
    exportable = asked is None or "EXPORT" in asked
    size = len(value) * 8 if obj_type in SYMMETRIC else None
    new = kr.new_key(req.owner, p, b, obj_type, curve, size, exportable=exportable)
    req.object_id = new.kid
    mat = await req.services.token.import_key(new, value)
    try:
        ops = choose_ops(mat.obj_type, asked, imported=True, public_only=mat.public_only)
    except BaseException:
        await req.services.token.remove(new.kid)
        raise
    return sobject(await kr.register(req.owner, p, new, mat, b, ops, group))


async def list_(req: Request) -> list[dict[str, Any]]:
    b, p = req.body, req.caller
    rows = [r for r in req.services.store.keys.values() if can_see_key(p, r)]
    rows += list(req.owner.transient.values())
    if "group_id" in b:
        rows = [r for r in rows if r.group_id == b["group_id"]]
    if "name" in b:
        rows = [r for r in rows if r.name == b["name"]]
    offset, limit = b.get("offset", 0), b.get("limit", 1000)
    if offset < 0 or not 0 < limit <= 10000:
        raise BadRequest("offset >= 0 and 0 < limit <= 10000", code="invalid_value")
    rows.sort(key=lambda r: (r.created_at, r.kid))
    return [sobject(r) for r in rows[offset : offset + limit]]


def _visible(req: Request, descriptor: dict[str, Any]) -> KeyRow:
    row = _keyring(req).find(req.owner, descriptor)
    req.object_id = row.kid
    if not can_see_key(req.caller, row):
        # The same answer as for a key that does not exist: names cannot be probed.
        raise NotFound("no such key")
    return row


def _descriptor(b: dict[str, Any]) -> dict[str, Any]:
    picks = {k: b[k] for k in ("kid", "name", "transient_key") if k in b}
    if len(picks) != 1:
        raise BadRequest("give exactly one of kid, name, transient_key", code="invalid_field")
    return picks


async def get(req: Request) -> dict[str, Any]:
    return sobject(_visible(req, {"kid": req.params["kid"]}))


async def info(req: Request) -> dict[str, Any]:
    return sobject(_visible(req, _descriptor(req.body)))


async def update(req: Request) -> dict[str, Any]:
    b, p = req.body, req.caller
    row = _visible(req, {"kid": req.params["kid"]})
    check_key_manage(p, row)
    new = replace(row, key_ops=list(row.key_ops), custom_metadata=dict(row.custom_metadata))
    if "name" in b and b["name"] != row.name:
        name = check_name(b["name"])
        if not row.transient and name in req.services.store.key_names:
            raise Conflict(f"a key named {name!r} exists", code="name_exists")
        new.name = name
    if "description" in b:
        new.description = b["description"]
    if "custom_metadata" in b:
        new.custom_metadata = check_metadata(b["custom_metadata"])
    if "enabled" in b:
        new.enabled = b["enabled"]
    if "key_ops" in b:
        asked = b["key_ops"]
        wider = sorted(set(asked) - set(row.key_ops))
        if wider:
            raise BadRequest(
                f"key_ops can only be narrowed; not held: {wider}", code="invalid_value"
            )
        new.key_ops = choose_ops(row.obj_type, asked, imported=False, public_only=row.public_only)
    if row.transient:
        req.owner.transient[row.kid] = new
        return sobject(new)
    if new.name != row.name:
        await req.services.token.rename(ref_of(new), new.name)
    await req.services.store.put_key(new)
    return sobject(new)


async def delete(req: Request) -> None:
    row = _visible(req, {"kid": req.params["kid"]})
    check_key_manage(req.caller, row)
    await _keyring(req).delete(req.owner, row)


async def export(req: Request) -> dict[str, Any]:
    row = _visible(req, _descriptor(req.body))
    check_key_use(req.caller, row, "EXPORT")
    value = await req.services.token.export(ref_of(row))
    return {**sobject(row), "value": value}


async def persist(req: Request) -> dict[str, Any]:
    """Store a transient key (Lua's ``:persist{}``): a token copy under a new kid."""
    b, p = req.body, req.caller
    kr = _keyring(req)
    row = kr.find(req.owner, b["key"])
    if not row.transient:
        raise BadRequest("only a transient key can be persisted", code="invalid_value")
    ops = choose_ops(
        row.obj_type, b.get("key_ops", row.key_ops), imported=False, public_only=row.public_only
    )
    if set(ops) - set(row.key_ops):
        raise BadRequest("key_ops can only be narrowed", code="invalid_value")
    group = kr.target_group(p, b.get("group_id") or row.group_id)
    body = {
        "name": b.get("name") or row.name,
        "description": b.get("description", row.description),
        "custom_metadata": b.get("custom_metadata", row.custom_metadata),
    }
    new = kr.new_key(
        req.owner,
        p,
        body,
        row.obj_type,
        row.elliptic_curve,
        row.key_size,
        exportable="EXPORT" in row.key_ops,
    )
    req.object_id = new.kid
    mat = await req.services.token.persist(ref_of(row), new)
    return sobject(await kr.register(req.owner, p, new, mat, body, ops, group))


_CREATE = {
    "name": F(str),
    "obj_type": F(str, True),
    "key_size": F(int),
    "elliptic_curve": F(str),
    "key_ops": F(list, items=str),
    "group_id": F(str),
    "description": F(str),
    "custom_metadata": F(dict),
    "transient": F(bool),
    "enabled": F(bool),
    "deterministic_signatures": F(bool),
}
_WHICH = {"kid": F(str), "name": F(str), "transient_key": F(str)}

ROUTES = [
    Route("POST", "/crypto/v1/keys/info", info, _WHICH, synopsis="Show a key by descriptor."),
    Route(
        "POST",
        "/crypto/v1/keys/export",
        export,
        _WHICH,
        synopsis="A key with its value; only keys whose key_ops include EXPORT.",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/persist",
        persist,
        {
            "key": KEY,
            "name": F(str),
            "key_ops": F(list, items=str),
            "group_id": F(str),
            "description": F(str),
            "custom_metadata": F(dict),
        },
        synopsis="Store a transient key under a new kid.",
    ),
    Route("POST", "/crypto/v1/keys", create, _CREATE, synopsis="Generate a key in the token."),
    Route(
        "PUT",
        "/crypto/v1/keys",
        import_,
        {**_CREATE, "value": F((bytes, str), True)},
        synopsis="Import a key value or certificate.",
    ),
    Route(
        "GET",
        "/crypto/v1/keys",
        list_,
        {"group_id": F(str), "name": F(str), "limit": F(int), "offset": F(int)},
        synopsis="List the keys you can see.",
    ),
    Route("GET", "/crypto/v1/keys/{kid}", get, {}, synopsis="Show a key."),
    Route(
        "PATCH",
        "/crypto/v1/keys/{kid}",
        update,
        {
            "name": F(str),
            "description": F(str),
            "custom_metadata": F(dict),
            "enabled": F(bool),
            "key_ops": F(list, items=str),
        },
        synopsis="Rename, describe, enable, narrow key_ops.",
    ),
    Route("DELETE", "/crypto/v1/keys/{kid}", delete, {}, synopsis="Destroy a key."),
]
