"""Keys as the daemon sees them: rows in the store, material in the token.

This is the one place that creates, finds and removes keys, so the order that
makes creation crash-safe (token object first under a fresh CKA_ID, then the
row; on delete the row first) and the start-up reconcile stay together.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from strongroomd.auth import Principal, check_group_target, check_key_use
from strongroomd.context import Owner
from strongroomd.errors import ApiError, BadRequest, Conflict, Internal, NotFound, TooLarge
from strongroomd.keyref import KeyMaterial, KeyRef, NewKey
from strongroomd.store import KeyRow, Store, now_stamp

if TYPE_CHECKING:
    from strongroomd._token import Token
    from strongroomd.config import Config

log = logging.getLogger("strongroomd.keyring")

KEY_OPS = frozenset(
    {
        "ENCRYPT",
        "DECRYPT",
        "SIGN",
        "VERIFY",
        "WRAPKEY",
        "UNWRAPKEY",
        "DERIVEKEY",
        "MACGENERATE",
        "MACVERIFY",
        "EXPORT",
        "AGREEKEY",
        "APPMANAGEABLE",
        "HIGHVOLUME",
    }
)
_COMMON = {"EXPORT", "APPMANAGEABLE", "HIGHVOLUME"}
ALLOWED_OPS: dict[str, frozenset[str]] = {
    "AES": frozenset(
        {"ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY", "DERIVEKEY", "MACGENERATE", "MACVERIFY"}
        | _COMMON
    ),
    "DES3": frozenset({"ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY", "DERIVEKEY"} | _COMMON),
    "HMAC": frozenset({"MACGENERATE", "MACVERIFY", "DERIVEKEY"} | _COMMON),
    "SECRET": frozenset({"DERIVEKEY"} | _COMMON),
    "RSA": frozenset({"SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY"} | _COMMON),
    "EC": frozenset({"SIGN", "VERIFY", "AGREEKEY", "DERIVEKEY"} | _COMMON),
    "CERTIFICATE": frozenset({"VERIFY", "ENCRYPT", "WRAPKEY"} | _COMMON),
}
DEFAULT_OPS: dict[str, list[str]] = {
    "AES": ["ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY", "APPMANAGEABLE"],
    "DES3": ["ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY", "APPMANAGEABLE"],
    "HMAC": ["MACGENERATE", "MACVERIFY", "APPMANAGEABLE"],
    "SECRET": ["DERIVEKEY", "APPMANAGEABLE"],
    "RSA": ["SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "APPMANAGEABLE"],
    "EC": ["SIGN", "VERIFY", "APPMANAGEABLE"],
    "CERTIFICATE": ["VERIFY", "APPMANAGEABLE"],
}
DEFAULT_SIZE = {"AES": 256, "DES3": 168, "HMAC": 256, "SECRET": 256, "RSA": 2048}
PRIVATE_OPS = frozenset({"SIGN", "DECRYPT", "UNWRAPKEY", "AGREEKEY", "DERIVEKEY"})
MAX_NAME = 256
MAX_METADATA = 64


def ref_of(row: KeyRow) -> KeyRef:
    return KeyRef(
        row.kid, row.obj_type, row.key_size, row.elliptic_curve, row.transient, row.public_only
    )


def sobject(row: KeyRow) -> dict[str, Any]:
    """The REST view of a key (never its value)."""
    out: dict[str, Any] = {
        "kid": row.kid,
        "name": row.name,
        "obj_type": row.obj_type,
        "key_size": row.key_size,
        "key_ops": list(row.key_ops),
        "group_id": row.group_id,
        "description": row.description,
        "custom_metadata": dict(row.custom_metadata),
        "created_at": row.created_at,
        "creator": dict(row.creator),
        "enabled": row.enabled,
        "transient": row.transient,
        "public_only": row.public_only,
    }
    if row.elliptic_curve:
        out["elliptic_curve"] = row.elliptic_curve
    if row.pub_key:
        out["pub_key"] = row.pub_key
    if row.transient:
        out["transient_key"] = row.kid
    if row.missing:
        out["state"] = "missing"
    return out


def normalize_type(body: dict[str, Any]) -> tuple[str, str | None]:
    obj_type = body["obj_type"].upper()
    curve = body.get("elliptic_curve")
    if obj_type == "OKP":
        obj_type, curve = "EC", curve or "Ed25519"
    if obj_type not in ALLOWED_OPS:
        raise ApiError(f"unsupported obj_type {body['obj_type']!r}", code="unsupported_algorithm")
    return obj_type, curve


def check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise BadRequest(f"name must be 1..{MAX_NAME} printable characters", code="invalid_value")
    return name


def check_metadata(meta: dict[Any, Any]) -> dict[str, str]:
    if len(meta) > MAX_METADATA or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 256 and len(v) <= 4096
        for k, v in meta.items()
    ):
        raise BadRequest(
            "custom_metadata must map at most 64 strings to strings", code="invalid_value"
        )
    return dict(meta)


def choose_ops(
    obj_type: str, asked: list[str] | None, *, imported: bool, public_only: bool = False
) -> list[str]:
    if asked is None:
        ops = list(DEFAULT_OPS[obj_type])
        if imported:
            ops.append("EXPORT")
        if public_only:
            ops = [op for op in ops if op not in PRIVATE_OPS]
        return ops
    unknown = [op for op in asked if op not in KEY_OPS]
    if unknown:
        raise BadRequest(f"unknown key_ops {unknown}", code="invalid_value")
    wrong = sorted(set(asked) - ALLOWED_OPS[obj_type])
    if public_only:
        wrong = sorted(set(wrong) | (set(asked) & PRIVATE_OPS))
    if wrong:
        raise BadRequest(
            f"key_ops {wrong} do not apply to this {obj_type} key", code="invalid_value"
        )
    return list(dict.fromkeys(asked))


class Keyring:
    def __init__(self, config: Config, store: Store, token: Token) -> None:
        self.config = config
        self.store = store
        self.token = token

    # -- lookup ---------------------------------------------------------------
    def find(self, owner: Owner, descriptor: Any) -> KeyRow:
        if not isinstance(descriptor, dict) or len(descriptor) != 1:
            raise BadRequest(
                "a key descriptor is a map with exactly one of kid, name, transient_key",
                code="invalid_field",
            )
        ((field, value),) = descriptor.items()
        if not isinstance(value, str):
            raise BadRequest(f"key descriptor {field!r} must be a string", code="invalid_field")
        store = self.store
        row: KeyRow | None
        if field in ("kid", "id"):
            row = store.keys.get(value) or owner.transient.get(value)
        elif field == "name":
            kid = store.key_names.get(value)
            row = store.keys.get(kid) if kid else None
        elif field == "transient_key":
            row = owner.transient.get(value)
        else:
            raise BadRequest(f"unknown key descriptor field {field!r}", code="invalid_field")
        if row is None:
            raise NotFound("no such key")
        return row

    def use(self, req_owner: Owner, principal: Principal, descriptor: Any, op: str) -> KeyRow:
        """Find a key and check that the caller may perform ``op`` with it."""
        row = self.find(req_owner, descriptor)
        check_key_use(principal, row, op)
        if row.missing:
            raise Internal("the key's material is missing from the token")
        return row

    # -- create ---------------------------------------------------------------
    def new_key(
        self,
        owner: Owner,
        principal: Principal,
        body: dict[str, Any],
        obj_type: str,
        curve: str | None,
        key_size: int | None,
        exportable: bool,
    ) -> NewKey:
        transient = bool(body.get("transient", False))
        name = check_name(body.get("name") or ("transient" if transient else ""))
        if transient:
            if len(owner.transient) >= self.config.max_transient_keys:
                raise TooLarge("too many transient keys on this connection")
        elif name in self.store.key_names:
            raise Conflict(f"a key named {name!r} exists", code="name_exists")
        return NewKey(str(uuid.uuid4()), name, obj_type, key_size, curve, exportable, transient)

    async def register(
        self,
        owner: Owner,
        principal: Principal,
        new: NewKey,
        mat: KeyMaterial,
        body: dict[str, Any],
        ops: list[str],
        group_id: str,
    ) -> KeyRow:
        """Record a key the token now holds; undo the token object if that fails."""
        row = KeyRow(
            kid=new.kid,
            name=new.name,
            obj_type=mat.obj_type,
            key_size=mat.key_size,
            elliptic_curve=mat.curve,
            key_ops=ops,
            group_id=group_id,
            description=body.get("description", ""),
            custom_metadata=check_metadata(body.get("custom_metadata", {})),
            created_at=now_stamp(),
            creator=principal.creator(),
            enabled=bool(body.get("enabled", True)),
            pub_key=mat.pub_key,
            public_only=mat.public_only,
            transient=new.transient,
        )
        if new.transient:
            owner.transient[row.kid] = row
            return row
        try:
            if new.name in self.store.key_names:  # lost a race with another creation
                raise Conflict(f"a key named {new.name!r} exists", code="name_exists")
            await self.store.put_key(row)
        except BaseException:
            await self.token.remove(new.kid)
            raise
        return row

    def target_group(self, principal: Principal, group_id: str | None) -> str:
        gid = check_group_target(principal, group_id)
        if gid not in self.store.groups:
            raise NotFound(f"no group {gid}")
        return gid

    # -- remove -----------------------------------------------------------------
    async def delete(self, owner: Owner, row: KeyRow) -> None:
        if row.transient:
            owner.transient.pop(row.kid, None)
        else:
            await self.store.delete_key(row.kid)
        await self.token.remove(row.kid)

    async def drop_owner(self, owner: Owner) -> None:
        """Destroy the transient keys of a connection or invocation that ended."""
        rows, owner.transient = list(owner.transient.values()), {}
        for row in rows:
            try:
                await self.token.remove(row.kid)
            except Exception:
                log.exception("could not destroy transient key %s", row.kid)

    # -- start-up -----------------------------------------------------------------
    async def reconcile(self) -> dict[str, int]:
        """Make token and database agree after any crash.

        A token object without a row was never acknowledged to a client: remove
        it. A row without a token object is kept but marked missing, so the
        operator sees it instead of it vanishing.
        """
        on_token = self.token.kids()
        store = self.store
        orphans = on_token - set(store.keys)
        for kid in orphans:
            log.warning("removing token object %s that has no database row", kid)
            await self.token.remove(kid)
        marked = 0
        for row in list(store.keys.values()):
            lost = row.kid not in on_token
            if lost != row.missing:
                row.missing = lost
                await store.put_key(row)
                marked += lost
                if lost:
                    log.error("key %s (%s) has no token object; marked missing", row.kid, row.name)
        return {"orphans_removed": len(orphans), "rows_missing": marked}
