"""What a key request means, and how a key is shown.

Plain functions and values, no I/O: the keyring (``strongroomd.keyring``)
takes a :class:`KeySpec` or a :class:`KeyPatch` built here, and handlers show
rows with :func:`sobject`. The rules of key_ops (which apply to which type,
which are the defaults, which need the private half) live here too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from strongroomd.auth import state_of
from strongroomd.errors import BadRequest, Unsupported
from strongroomd.keyref import KeyRef
from strongroomd.store import KeyRow, now_stamp, stamp_time

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
    "DES": frozenset({"ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY", "DERIVEKEY"} | _COMMON),
    # Stored and exported, never used for crypto (DSM's opaque objects).
    "OPAQUE": frozenset(_COMMON),
    "HMAC": frozenset({"MACGENERATE", "MACVERIFY", "DERIVEKEY"} | _COMMON),
    "SECRET": frozenset({"DERIVEKEY"} | _COMMON),
    "RSA": frozenset({"SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY"} | _COMMON),
    "EC": frozenset({"SIGN", "VERIFY", "AGREEKEY", "DERIVEKEY"} | _COMMON),
    "CERTIFICATE": frozenset({"VERIFY", "ENCRYPT", "WRAPKEY"} | _COMMON),
}
DEFAULT_OPS: dict[str, list[str]] = {
    "AES": ["ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY", "APPMANAGEABLE"],
    "DES3": ["ENCRYPT", "DECRYPT", "WRAPKEY", "UNWRAPKEY", "APPMANAGEABLE"],
    "DES": ["ENCRYPT", "DECRYPT", "APPMANAGEABLE"],
    "OPAQUE": ["EXPORT", "APPMANAGEABLE"],
    "HMAC": ["MACGENERATE", "MACVERIFY", "APPMANAGEABLE"],
    "SECRET": ["DERIVEKEY", "APPMANAGEABLE"],
    "RSA": ["SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "APPMANAGEABLE"],
    "EC": ["SIGN", "VERIFY", "APPMANAGEABLE"],
    # Public operations only (a certificate holds no secret), as DSM allows them.
    "CERTIFICATE": ["VERIFY", "ENCRYPT", "WRAPKEY", "APPMANAGEABLE"],
}
DEFAULT_SIZE = {"AES": 256, "DES3": 168, "DES": 56, "HMAC": 256, "SECRET": 256, "RSA": 2048}
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
    out["state"] = state_of(row)
    for name in LIFECYCLE_DATES:
        if getattr(row, name):
            out[name] = getattr(row, name)
    if row.revocation_reason:
        out["revocation_reason"] = dict(row.revocation_reason)
    if row.links:
        out["links"] = dict(row.links)
    if row.rotation_policy:
        out["rotation_policy"] = dict(row.rotation_policy)
    if row.missing:
        out["state"] = "missing"
    return out


LIFECYCLE_DATES = (
    "activation_date",
    "deactivation_date",
    "compromise_date",
    "destruction_date",
    "deletion_date",
    "scheduled_rotation",
)
#: DSM's RevocationReasonCode values; the two compromise codes make a key Compromised.
REVOCATION_CODES = frozenset(
    {
        "Unspecified",
        "KeyCompromise",
        "CACompromise",
        "AffiliationChanged",
        "Superseded",
        "CessationOfOperation",
        "PrivilegeWithdrawn",
    }
)


def check_date(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a timestamp like 20261130T120000Z", code="invalid_value")
    try:
        stamp_time(value)
    except ValueError:
        raise BadRequest(
            f"{name} must be a timestamp like 20261130T120000Z", code="invalid_value"
        ) from None
    return value


def check_rotation_policy(policy: Any) -> dict[str, Any] | None:
    """DSM's RotationPolicy: interval_days or interval_months, effective_at,
    deactivate_rotated_key. None (or {}) removes a policy."""
    if not policy:
        return None
    if not isinstance(policy, dict) or set(policy) - {
        "interval_days",
        "interval_months",
        "effective_at",
        "deactivate_rotated_key",
    }:
        raise BadRequest(
            "rotation_policy takes interval_days or interval_months, effective_at, "
            "deactivate_rotated_key",
            code="invalid_value",
        )
    days, months = policy.get("interval_days"), policy.get("interval_months")
    if (days is None) == (months is None):
        raise BadRequest(
            "rotation_policy needs one of interval_days, interval_months", code="invalid_value"
        )
    n = days if days is not None else months
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= 100 * 366:
        raise BadRequest("a rotation interval is a positive number", code="invalid_value")
    if "effective_at" in policy:
        check_date(policy["effective_at"], "rotation_policy.effective_at")
    if not isinstance(policy.get("deactivate_rotated_key", False), bool):
        raise BadRequest("deactivate_rotated_key must be a boolean", code="invalid_value")
    return dict(policy)


def next_rotation(policy: dict[str, Any] | None, after: float) -> str | None:
    """When a key under ``policy`` is next rotated, counting from ``after``."""
    if not policy:
        return None
    if "effective_at" in policy and stamp_time(policy["effective_at"]) > after:
        return policy["effective_at"]
    days = policy.get("interval_days")
    if days is None:
        days = 30 * policy["interval_months"]  # DSM counts months; 30 days each here
    return now_stamp(after + days * 86400)


def normalize_type(body: dict[str, Any]) -> tuple[str, str | None]:
    obj_type = body["obj_type"].upper()
    curve = body.get("elliptic_curve")
    if obj_type == "OKP":
        obj_type, curve = "EC", curve or "Ed25519"
    if obj_type not in ALLOWED_OPS:
        raise Unsupported(f"unsupported obj_type {body['obj_type']!r}")
    return obj_type, curve


def check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise BadRequest(f"name must be 1..{MAX_NAME} printable characters", code="invalid_value")
    return name


def check_group_id(value: str | None) -> str | None:
    """A group id is a UUID: anything else is a bad request (400, as DSM's typed
    body), not a group the caller may not use (DSM's kvp plugin relies on it)."""
    if value is not None:
        try:
            uuid.UUID(value)
        except (ValueError, AttributeError, TypeError):
            raise BadRequest("group_id must be a group's UUID", code="invalid_value") from None
    return value


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
        if imported and "EXPORT" not in ops:
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


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A key to make, as the caller asked for it (checked by :func:`key_spec`)."""

    obj_type: str
    name: str | None = None
    key_size: int | None = None
    curve: str | None = None
    #: None: the type's defaults (chosen once the token says what it holds).
    key_ops: list[str] | None = None
    group_id: str | None = None
    description: str = ""
    custom_metadata: dict[str, str] = field(default_factory=dict)
    enabled: bool = True
    transient: bool = False
    activation_date: str | None = None
    deactivation_date: str | None = None
    rotation_policy: dict[str, Any] | None = None


def key_spec(body: dict[str, Any], obj_type: str, **overrides: Any) -> KeySpec:
    """The common fields of a request that makes a key."""
    fields_ = {
        "name": body.get("name"),
        "key_size": body.get("key_size"),
        "curve": body.get("elliptic_curve"),
        "key_ops": body.get("key_ops"),
        "group_id": check_group_id(body.get("group_id")),
        "description": body.get("description", ""),
        "custom_metadata": check_metadata(body.get("custom_metadata", {})),
        "enabled": bool(body.get("enabled", True)),
        "transient": bool(body.get("transient", False)),
        "activation_date": (
            check_date(body["activation_date"], "activation_date")
            if "activation_date" in body
            else None
        ),
        "deactivation_date": (
            check_date(body["deactivation_date"], "deactivation_date")
            if "deactivation_date" in body
            else None
        ),
        "rotation_policy": check_rotation_policy(body.get("rotation_policy")),
    }
    fields_.update(overrides)
    return KeySpec(obj_type, **fields_)


@dataclass(frozen=True, slots=True)
class KeyPatch:
    """A change to a key's row; None leaves a field as it is."""

    name: str | None = None
    description: str | None = None
    custom_metadata: dict[str, str] | None = None
    enabled: bool | None = None
    key_ops: list[str] | None = None
    #: activation_date, deactivation_date, rotation_policy: only those given.
    lifecycle: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Deleted:
    """What a delete did: the row is gone; the token object may not be yet."""

    kid: str
    token_object_destroyed: bool


ALG_FROM_KEY = frozenset(("encrypt", "decrypt", "wrap", "unwrap"))


def key_alg(row: KeyRow) -> str | None:
    """The algorithm a key's type fixes (RSA for certificates with an RSA key)."""
    if row.obj_type in ("AES", "DES3", "DES", "RSA"):
        return row.obj_type
    if row.obj_type == "CERTIFICATE" and not row.elliptic_curve:
        return "RSA"
    return None


def with_alg(row: KeyRow, req: dict[str, Any]) -> dict[str, Any]:
    """``req`` with ``alg`` taken from the key when it was left out and the key's
    type fixes it (DSM's rule); otherwise ``req`` as it is."""
    if "alg" in req:
        return req
    alg = key_alg(row)
    return req if alg is None else {**req, "alg": alg}


def patched(cur: KeyRow, patch: KeyPatch, name: str | None, now: float) -> KeyRow:
    new = replace(cur, key_ops=list(cur.key_ops), custom_metadata=dict(cur.custom_metadata))
    if name is not None:
        new.name = name
    if patch.description is not None:
        new.description = patch.description
    if patch.custom_metadata is not None:
        new.custom_metadata = check_metadata(patch.custom_metadata)
    if patch.enabled is not None:
        new.enabled = patch.enabled
    for date in ("activation_date", "deactivation_date"):
        if date in patch.lifecycle:
            value = patch.lifecycle[date]
            setattr(new, date, None if value is None else check_date(value, date))
    if "rotation_policy" in patch.lifecycle:
        new.rotation_policy = check_rotation_policy(patch.lifecycle["rotation_policy"])
        new.scheduled_rotation = next_rotation(new.rotation_policy, now)
    if patch.key_ops is not None:
        wider = sorted(set(patch.key_ops) - set(cur.key_ops))
        if wider:
            raise BadRequest(
                f"key_ops can only be narrowed; not held: {wider}", code="invalid_value"
            )
        new.key_ops = choose_ops(
            cur.obj_type, patch.key_ops, imported=False, public_only=cur.public_only
        )
    return new
