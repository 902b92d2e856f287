"""/crypto/v1/keys*: create, import, list, show, change, delete, export."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from strongroomd import mechanisms
from strongroomd.api import listing
from strongroomd.auth import check_key_read
from strongroomd.context import Request
from strongroomd.errors import BadRequest, Conflict, Unsupported
from strongroomd.keyspec import (
    DEFAULT_SIZE,
    KeyPatch,
    KeySpec,
    check_metadata,
    key_spec,
    normalize_type,
    sobject,
)
from strongroomd.router import KEY, F, Route
from strongroomd.store import KeyRow

SYMMETRIC = {"AES", "DES3", "DES", "HMAC", "SECRET", "OPAQUE"}


def _refuse_unoffered(b: dict[str, Any], *, generated: bool = True) -> None:
    """DSM key-request fields that would change what is made, and that Strongroom
    does not implement: refused, never dropped (the key would silently differ).
    An imported key's exponent is its value's."""
    if generated and b.get("pub_exponent", 65537) != 65537:
        raise Unsupported("RSA keys are made with the public exponent 65537 only")
    if b.get("rsa"):
        raise Unsupported(
            "RSA key options (rsa: encryption_policy, signature_policy, ...) are not "
            "supported; key_ops limit what a key does"
        )


async def create(req: Request) -> dict[str, Any]:
    b = req.body
    _refuse_unoffered(b)
    obj_type, curve = normalize_type(b)
    if obj_type in ("CERTIFICATE", "OPAQUE"):
        raise BadRequest(f"a {obj_type} can only be imported (PUT)", code="invalid_value")
    if obj_type == "EC" and not curve:
        raise BadRequest("elliptic_curve is required for EC keys", code="missing_field")
    size = None if obj_type == "EC" else b.get("key_size", DEFAULT_SIZE[obj_type])
    spec = key_spec(b, obj_type, curve=curve, key_size=size)
    row = await req.services.keyring.create(req.owner, req.caller, spec)
    req.object_id = row.kid
    return sobject(row)


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
    b = req.body
    _refuse_unoffered(b, generated=False)
    obj_type, curve = normalize_type(b)
    value = _value(b)
    size = len(value) * 8 if obj_type in SYMMETRIC else None
    spec = key_spec(b, obj_type, curve=curve, key_size=size)
    row = await req.services.keyring.import_(req.owner, req.caller, spec, value)
    req.object_id = row.kid
    return sobject(row)


async def list_(req: Request) -> list[dict[str, Any]]:
    b = req.body
    rows = req.services.keyring.visible(req.owner, req.caller)
    if "name" in b:
        rows = [r for r in rows if r.name == b["name"]]
    if "creator" in b:  # an app's or an admin's id, as DSM's creator filter
        rows = [r for r in rows if b["creator"] in (r.creator or {}).values()]
    rows.sort(key=lambda r: (r.created_at, r.kid))  # without sort: oldest first
    props = {"kid": lambda r: r.kid, "name": lambda r: r.name}
    rows = listing.page(rows, {"limit": 1000, **b}, props, lambda r: (r.group_id,))
    return [sobject(r) for r in rows]


def _find(req: Request, descriptor: dict[str, Any]) -> KeyRow:
    row = req.services.keyring.find(req.owner, req.caller, descriptor)
    req.object_id = row.kid
    return row


def _descriptor(b: dict[str, Any]) -> dict[str, Any]:
    picks = {k: b[k] for k in ("kid", "name", "transient_key") if k in b}
    if len(picks) != 1:
        raise BadRequest("give exactly one of kid, name, transient_key", code="invalid_field")
    return picks


async def get(req: Request) -> dict[str, Any]:
    return sobject(_find(req, {"kid": req.params["kid"]}))


async def info(req: Request) -> dict[str, Any]:
    return sobject(_find(req, _descriptor(req.body)))


async def update(req: Request) -> dict[str, Any]:
    b, kid = req.body, req.params["kid"]
    req.object_id = kid
    if "group_id" in b:  # DSM moves a key to another group this way; not offered
        row = req.services.keyring.find(req.owner, req.caller, {"kid": kid})
        if b["group_id"] != row.group_id:
            raise BadRequest(
                "moving a key to another group is not supported (group_id may only "
                "name the key's own group)",
                code="invalid_value",
            )
    patch = KeyPatch(
        name=b.get("name"),
        description=b.get("description"),
        custom_metadata=b.get("custom_metadata"),
        enabled=b.get("enabled"),
        key_ops=b.get("key_ops"),
        lifecycle=_lifecycle(b),
    )
    return sobject(await req.services.keyring.update(req.owner, req.caller, kid, patch))


async def delete(req: Request) -> dict[str, Any] | None:
    kid = req.params["kid"]
    req.object_id = kid
    done = await req.services.keyring.delete(req.owner, req.caller, kid)
    if done.token_object_destroyed:
        return None
    # The key is gone for every caller; say that its material is not destroyed yet.
    req.audit_detail = {"token_object": "destroy pending"}
    return {
        "kid": kid,
        "deleted": True,
        "token_object_destroyed": False,
        "message": "the key is deleted; the token refused to destroy its object now, "
        "so it is retried and removed at the latest at the next start",
    }


async def export(req: Request) -> dict[str, Any]:
    kr = req.services.keyring
    row = kr.use(req.owner, req.caller, _descriptor(req.body), "EXPORT")
    req.object_id = row.kid
    return {**sobject(row), "value": await kr.export(row)}


def _lifecycle(b: dict[str, Any]) -> dict[str, Any]:
    return {k: b[k] for k in ("activation_date", "deactivation_date", "rotation_policy") if k in b}


async def rekey(req: Request) -> dict[str, Any]:
    """DSM's rotation: a new version takes the name; the old one is renamed and linked.
    With ``value``, the new version is that value, imported (DSM's rotate by import)."""
    b = dict(req.body)
    if "value" in b:  # DSM's rotation onto a given value (sdkms-cli's rotate-secret)
        b["value"] = _value(b)
    name, deactivate = b.pop("name"), b.pop("deactivate_rotated_key", False)
    row = await req.services.keyring.rekey(
        req.owner, req.caller, name, b, deactivate_old=bool(deactivate)
    )
    req.object_id = row.kid
    return sobject(row)


def _transition(method: str):
    async def handler(req: Request) -> dict[str, Any]:
        kid = req.params["kid"]
        req.object_id = kid
        fn = getattr(req.services.keyring, method)
        return sobject(await fn(req.owner, req.caller, kid))

    handler.__name__ = method
    return handler


async def revoke(req: Request) -> dict[str, Any]:
    kid = req.params["kid"]
    req.object_id = kid
    return sobject(await req.services.keyring.revoke(req.owner, req.caller, kid, req.body))


async def schedule_deletion(req: Request) -> dict[str, Any]:
    kid = req.params["kid"]
    req.object_id = kid
    # pending_window_in_days: DSM's ScheduleDeletionRequest (its SDK sends it)
    days = req.body.get(
        "pending_days",
        req.body.get("pending_window_in_days", req.services.config.key_deletion_pending_days),
    )
    if not 0 <= days <= 3650:
        raise BadRequest("pending_days is 0..3650", code="invalid_value")
    return sobject(await req.services.keyring.schedule_deletion(req.owner, req.caller, kid, days))


async def kcv(req: Request) -> dict[str, Any]:
    """DSM's key check value of a key (AES, DES, DES3)."""
    b = req.body
    row = _find(req, _descriptor(b))
    check_key_read(req.caller, row)  # an app needs CALCULATE_DIGEST in the key's group
    return {
        "kid": row.kid,
        "kcv": await req.services.keyring.kcv(row, b.get("kcv_method", "Encrypt")),
    }


async def kcv_verify(req: Request) -> dict[str, Any]:
    """Check a KCV against a key given by value (no key of the daemon's is used)."""
    b = req.body
    obj_type = b["obj_type"].upper()
    value = _value(b)
    got = mechanisms.kcv_of_value(obj_type, value, b.get("kcv_method", "Encrypt"))
    return {"verified": hmac.compare_digest(got, b["kcv"].upper())}


async def key_digest(req: Request) -> dict[str, Any]:
    """The digest of an exportable key's value (DSM's keys/digest): needs EXPORT."""
    b = req.body
    kr = req.services.keyring
    row = kr.use(req.owner, req.caller, b["key"], "EXPORT")
    req.object_id = row.kid
    value = await kr.export(row)
    return {"kid": row.kid, **mechanisms.digest({"alg": b["alg"], "data": value})}


async def revert(req: Request) -> None:
    """DSM's ``PUT /crypto/v1/keys/{kid}/revert``: back to a state of the key's
    history, kept only under DSM's key history (undo) policy. Strongroom keeps
    no such history (see docs/protocol.md, "DSM paths"), so no id can name one."""
    req.object_id = req.services.keyring.manageable(req.owner, req.caller, req.params["kid"]).kid
    raise Conflict(
        "this key has no history state to revert to: Strongroom offers no key history "
        "(undo) policy, because taking EXPORT away and destroying material cannot be "
        "undone in the token",
        code="conflict",
    )


async def restore(req: Request) -> None:
    """DSM's ``POST /crypto/v1/keys/{kid}/restore``: bring back the material of a
    key backed by an external HSM or cloud KMS. Every Strongroom key lives in its
    own token, so there is nothing to restore from."""
    req.object_id = req.services.keyring.manageable(req.owner, req.caller, req.params["kid"]).kid
    raise Conflict(
        "restore is for keys backed by an external HSM or cloud KMS; Strongroom's keys "
        "all live in its own token",
        code="conflict",
    )


async def export_by_kid(req: Request) -> dict[str, Any]:
    """``GET /crypto/v1/keys/{kid}/export`` (DSM's form of export)."""
    req.body = {"kid": req.params["kid"]}
    return await export(req)


async def persist(req: Request) -> dict[str, Any]:
    """Store a transient key (Lua's ``:persist{}``): a token copy under a new kid."""
    b = req.body
    spec = KeySpec(
        "",
        name=b.get("name"),
        key_ops=b.get("key_ops"),
        group_id=b.get("group_id"),
        description=b.get("description", ""),
        custom_metadata=check_metadata(b.get("custom_metadata", {})),
    )
    if "transient_key" in b:  # DSM's PersistTransientKeyRequest names it at the top
        if "key" in b:
            raise BadRequest("give key or transient_key, not both", code="invalid_field")
        key = {"transient_key": b["transient_key"]}
    elif "key" in b:
        key = b["key"]
    else:
        raise BadRequest("field 'transient_key' (or 'key') is required", code="missing_field")
    row = await req.services.keyring.persist(req.owner, req.caller, key, spec)
    req.object_id = row.kid
    return sobject(row)


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
    "activation_date": F(str),
    "deactivation_date": F(str),
    "rotation_policy": F(dict),
    # Declared so that they are refused unless they ask for what is made anyway.
    "pub_exponent": F(int),
    "rsa": F(dict),
}
_WHICH = {"kid": F(str), "name": F(str), "transient_key": F(str)}

ROUTES = [
    Route("POST", "/crypto/v1/keys/info", info, _WHICH, synopsis="Show a key by descriptor."),
    Route(
        "POST",
        "/crypto/v1/keys/kcv",
        kcv,
        {**_WHICH, "kcv_method": F(str)},
        synopsis="Key check value of an AES, DES or DES3 key (Encrypt or Cmac).",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/kcv/verify",
        kcv_verify,
        {
            "kcv": F(str, True),
            "value": F((bytes, str), True),
            "obj_type": F(str, True),
            "kcv_method": F(str),
        },
        synopsis="Check a key check value against a key given by value.",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/digest",
        key_digest,
        {"key": KEY, "alg": F(str, True)},
        synopsis="Digest of an exportable key's value.",
    ),
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
            "key": F(dict, doc="{transient_key}"),
            "transient_key": F(str, doc="DSM's PersistTransientKeyRequest form"),
            "name": F(str),
            "key_ops": F(list, items=str),
            "group_id": F(str),
            "description": F(str),
            "custom_metadata": F(dict),
        },
        synopsis="Store a transient key under a new kid.",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/rekey",
        rekey,
        {
            "name": F(str, True),
            "deactivate_rotated_key": F(bool),
            "key_ops": F(list, items=str),
            "key_size": F(int),
            "elliptic_curve": F(str),
            "description": F(str),
            "custom_metadata": F(dict),
            "enabled": F(bool),
            "activation_date": F(str),
            "deactivation_date": F(str),
            "rotation_policy": F(dict),
            "value": F(
                (bytes, str), doc="the new version's value (an import), as PUT /crypto/v1/keys"
            ),
        },
        synopsis="Rotate a key: a new version takes its name; the old one stays, linked.",
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
        {**listing.FIELDS, "name": F(str), "creator": F(str)},
        synopsis="List the keys you can see (oldest first, or by sort=kid|name[:desc]).",
    ),
    Route("GET", "/crypto/v1/keys/{kid}", get, {}, synopsis="Show a key."),
    Route(
        "GET",
        "/crypto/v1/keys/{kid}/export",
        export_by_kid,
        {},
        synopsis="A key with its value; only keys whose key_ops include EXPORT.",
    ),
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
            "activation_date": F((str, type(None))),
            "deactivation_date": F((str, type(None))),
            "rotation_policy": F((dict, type(None))),
            # DSM moves a key to another group with it: declared so that it is refused.
            "group_id": F(str),
        },
        synopsis="Rename, describe, enable, narrow key_ops, set dates and rotation policy.",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/{kid}/activate",
        _transition("activate"),
        {},
        synopsis="PreActive -> Active.",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/{kid}/revoke",
        revoke,
        {"code": F(str, True), "message": F(str), "compromise_occurance_date": F(str)},
        synopsis="Deactivated (or Compromised): decrypt and verify only, from now on.",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/{kid}/schedule_deletion",
        schedule_deletion,
        {"pending_days": F(int), "pending_window_in_days": F(int, doc="DSM's name for it")},
        synopsis="Unusable now, deleted after pending_days (key_deletion_pending_days).",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/{kid}/cancel_deletion",
        _transition("cancel_deletion"),
        {},
        synopsis="Undo schedule_deletion.",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/{kid}/destroy",
        _transition("destroy"),
        {},
        synopsis="Destroyed: the material is erased, the metadata stays (revoke first).",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/{kid}/delete_key_material",
        _transition("destroy"),
        {},
        synopsis="The same as destroy (DSM's name for it).",
    ),
    Route(
        "DELETE",
        "/crypto/v1/keys/{kid}/private",
        _transition("delete_private"),
        {},
        synopsis="Keep only the public half of a key pair.",
    ),
    Route(
        "PUT",
        "/crypto/v1/keys/{kid}/revert",
        revert,
        {"ids": F(list, True, "history state ids", items=str)},
        synopsis="DSM's revert to a history state: 409, Strongroom keeps no key history.",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/{kid}/restore",
        restore,
        {},
        synopsis="DSM's restore of externally backed material: 409, no key is external.",
    ),
    Route("DELETE", "/crypto/v1/keys/{kid}", delete, {}, synopsis="Destroy a key."),
]
