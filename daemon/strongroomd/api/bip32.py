"""BIP32 keys (DSM's native forms): derive a master key from a seed, derive and
transform children, import and export the ``xprv`` serialization.

The computation is :mod:`strongroomd.bip32`, in the daemon, from the value of a
key whose key_ops include EXPORT (a key without it is refused with the
keyring's "the key's key_ops do not include EXPORT"). The result goes into the
token through the keyring, as an EC SecP256K1 key whose ``custom_metadata``
carries its extended public key; the answer shows it as DSM does, with
``obj_type`` ``BIP32`` and ``pub_key`` the 78-byte serialized public key.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from strongroomd import bip32
from strongroomd.auth import check_app_permission
from strongroomd.context import Request
from strongroomd.errors import BadRequest
from strongroomd.keyspec import ALLOWED_OPS, check_metadata, key_spec, sobject
from strongroomd.router import KEY, F, Route
from strongroomd.store import KeyRow

#: What a derived key may do when the request names no key_ops.
DERIVED_OPS = ("SIGN", "VERIFY", "DERIVEKEY", "EXPORT", "APPMANAGEABLE")
SEED_TYPES = ("HMAC", "SECRET", "AES")


def view(row: KeyRow, node: bip32.Node) -> dict[str, Any]:
    out = sobject(row)
    out["obj_type"] = "BIP32"
    out["pub_key"] = node.serialize(private=False)
    return out


def _mechanism(b: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    key_type = b.get("key_type", "BIP32")
    if not isinstance(key_type, str) or key_type.upper() != "BIP32":
        raise BadRequest("only key_type BIP32 is derived here", code="invalid_value")
    mech = b["mechanism"]
    if len(mech) != 1:
        raise BadRequest("mechanism is a map with one entry", code="invalid_value")
    ((kind, params),) = mech.items()
    if not isinstance(params, dict):
        raise BadRequest(f"mechanism {kind} takes a map", code="invalid_value")
    return kind, params


def _index(params: dict[str, Any], hardened: bool) -> int:
    index = params.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1 << 32:
        raise BadRequest(
            "a BIP32 child index is an integer from 0 to 2^32 - 1", code="invalid_value"
        )
    if hardened and index < bip32.HARDENED:
        index += bip32.HARDENED  # {index = n} names the hardened child n (n')
    if not hardened and index >= bip32.HARDENED:
        raise BadRequest(
            "bip32_weak_child takes an index below 2^31 (use bip32_hardened_child)",
            code="invalid_value",
        )
    return index


async def _node_of(req: Request, row: KeyRow) -> bip32.Node:
    xpub = row.custom_metadata.get(bip32.METADATA)
    if row.obj_type != "EC" or row.elliptic_curve != "SecP256K1" or not xpub:
        raise BadRequest("the key is not a BIP32 key", code="invalid_value")
    return bip32.from_parts(xpub, bip32.scalar_of(await req.services.keyring.export(row)))


async def _store(
    req: Request, b: dict[str, Any], node: bip32.Node, ops: list[str] | None
) -> dict[str, Any]:
    meta = dict(check_metadata(b.get("custom_metadata", {})))
    meta[bip32.METADATA] = bip32.b58check(node.serialize(private=False))
    body = {**b, "custom_metadata": meta, "key_ops": b.get("key_ops", ops)}
    spec = key_spec(body, "EC", curve="SecP256K1", key_size=256)
    row = await req.services.keyring.import_(req.owner, req.caller, spec, bip32.pkcs8(node))
    return view(row, node)


async def _derive(req: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    b = req.body
    kind, params = _mechanism(b)
    if kind not in allowed:
        raise BadRequest(
            f"mechanism {kind!r} is not one of {', '.join(allowed)} here", code="invalid_value"
        )
    kr = req.services.keyring
    row = kr.use(req.owner, req.caller, b["key"], "EXPORT")  # the value is read
    req.object_id = row.kid
    if kind == "bip32_master_key":
        if row.obj_type not in SEED_TYPES:
            raise BadRequest(
                f"a BIP32 seed is an {', '.join(SEED_TYPES)} key, not {row.obj_type}",
                code="invalid_value",
            )
        network = params.get("network", "mainnet")
        node = bip32.master(await kr.export(row), str(network).lower())
    else:
        parent = await _node_of(req, row)
        node = bip32.child(parent, _index(params, kind == "bip32_hardened_child"))
    ops = [op for op in row.key_ops if op in ALLOWED_OPS["EC"]] or list(DERIVED_OPS)
    for op in ("SIGN", "VERIFY"):
        if op not in ops:
            ops.append(op)
    target = b.get("group_id") or req.caller.default_group
    if (
        kind == "bip32_weak_child"
        and "EXPORT" in (b.get("key_ops") or ops)
        and (target != row.group_id or b.get("transient"))  # persist moves a transient key
    ):
        # A weak child's private key and the parent's xpub (its pub_key) give the
        # parent's private key: an exportable one elsewhere is an export of the parent.
        check_app_permission(req.caller, row.group_id, "weak_child")
    return await _store(req, b, node, ops)


async def derive(req: Request) -> dict[str, Any]:
    """DSM's derive (``POST /crypto/v1/derive`` hands bip32_* mechanisms here):
    bip32_master_key from a seed, bip32_hardened_child (and weak)."""
    return await _derive(req, ("bip32_master_key", "bip32_hardened_child", "bip32_weak_child"))


async def transform(req: Request) -> dict[str, Any]:
    """DSM's transform: bip32_weak_child (the non-hardened child)."""
    return await _derive(req, ("bip32_weak_child",))


async def import_(req: Request) -> dict[str, Any]:
    """A BIP32 extended private key from its text (xprv...) or its 78/82 bytes."""
    b = dict(req.body)
    v = b.pop("value")
    if isinstance(v, str):
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raw = v.encode()
    else:
        raw = v
    b.pop("obj_type", None)
    return await _store(req, b, bip32.parse_private(raw), b.get("key_ops", list(DERIVED_OPS)))


async def export(req: Request) -> dict[str, Any]:
    """The key with ``value`` its xprv text (keys with EXPORT only)."""
    kr = req.services.keyring
    row = kr.use(req.owner, req.caller, req.body["key"], "EXPORT")
    req.object_id = row.kid
    node = await _node_of(req, row)
    return {**view(row, node), "value": bip32.b58check(node.serialize(private=True)).encode()}


_MAKE = {
    "name": F(str),
    "group_id": F(str),
    "key_ops": F(list, items=str),
    "description": F(str),
    "custom_metadata": F(dict),
    "transient": F(bool),
    "enabled": F(bool),
}
_DERIVE = {
    **_MAKE,
    "key": KEY,
    "key_type": F(str),
    "key_size": F(int),  # DSM's plugins send key_size = 0: unused
    "mechanism": F(dict, True),
}

ROUTES = [
    Route(
        "POST",
        "/crypto/v1/keys/transform",
        transform,
        _DERIVE,
        synopsis="BIP32: the non-hardened (weak) child of a BIP32 key (EXPORT).",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/bip32/import",
        import_,
        {**_MAKE, "value": F((bytes, str), True), "obj_type": F(str)},
        synopsis="Import a BIP32 extended private key (xprv text or bytes).",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/bip32/export",
        export,
        {"key": KEY},
        synopsis="A BIP32 key with its xprv text as value (EXPORT).",
    ),
]
