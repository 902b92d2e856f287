"""Keys as the daemon sees them: rows in the store, material in the token.

The keyring is the only code that writes key rows or changes the token.
Handlers parse a request, check who may ask (``strongroomd.auth``) and call
one typed method here; the view of the result is theirs again. Keeping every
change in one place is what makes these rules hold:

- One writer per key. Changes to one kid run one at a time
  (:meth:`strongroomd.store.Store.change`), each applied to the row as it is
  after the previous change, and written as a compare-and-set on the row's
  version. A rename waiting on the token can no longer write back the row it
  read before an admin disabled the key.
- Names are reserved before the first ``await``. Two creators of one name
  cannot both pass the check; the loser gets 409 and its token object is
  destroyed before the answer. The database's UNIQUE(name) and a plain
  INSERT back this up (a second daemon on the same database).
- Crash-safe order. A key's token object is made under a fresh CKA_ID before
  its row is written; on delete the row goes first. Start-up reconciles the
  two (:meth:`Keyring.reconcile`): a kill -9 at any instant loses no key a
  client was told exists.
- A change, once started, finishes: it runs in a task of its own, so a
  cancelled request (a client gone, a forced shutdown) cannot stop it
  between the token and the row.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from strongroomd.auth import (
    Principal,
    can_see_key,
    check_group_target,
    check_key_manage,
    check_key_use,
    state_of,
)
from strongroomd.context import Owner
from strongroomd.errors import BadRequest, Conflict, Internal, NotFound, TooLarge, Unsupported
from strongroomd.keyref import KeyMaterial, KeyRef, NewKey
from strongroomd.store import KeyRow, Store, now_stamp, stamp_time

if TYPE_CHECKING:
    from strongroomd._token import Token
    from strongroomd.config import Config

log = logging.getLogger("strongroomd.keyring")
T = TypeVar("T")

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
        "group_id": body.get("group_id"),
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


class Keyring:
    def __init__(
        self, config: Config, store: Store, token: Token, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.store = store
        self.token = token
        #: Injectable, so tests move time instead of sleeping (rotation, deletion).
        self.clock = clock
        #: Names taken by creations and renames that have not written their row yet.
        self._reserved: set[str] = set()
        #: Groups that creations in flight will put a key in (a group being
        #: deleted must not get one after its emptiness was checked).
        self._filling: Counter[str] = Counter()
        #: Groups whose deletion is under way: no key may be made in them.
        self.closing: set[str] = set()
        self._changes: set[asyncio.Task[Any]] = set()
        self._retries: set[asyncio.Task[Any]] = set()

    # -- lookup ---------------------------------------------------------------
    def find(self, owner: Owner, principal: Principal, descriptor: Any) -> KeyRow:
        """The key a descriptor names, if the caller may see it (404 otherwise).

        A key outside the caller's groups, or a transient key made by someone
        else (even on the same connection), answers exactly like a key that
        does not exist: names and kids cannot be probed.
        """
        if not isinstance(descriptor, dict) or len(descriptor) != 1:
            raise BadRequest(
                "a key descriptor is a map with exactly one of kid, name, transient_key",
                code="invalid_field",
            )
        ((kind, value),) = descriptor.items()
        if not isinstance(value, str):
            raise BadRequest(f"key descriptor {kind!r} must be a string", code="invalid_field")
        store = self.store
        row: KeyRow | None
        if kind in ("kid", "id"):
            row = store.keys.get(value) or owner.transient.get(value)
        elif kind == "name":
            kid = store.key_names.get(value)
            row = store.keys.get(kid) if kid else None
        elif kind == "transient_key":
            row = owner.transient.get(value)
        else:
            raise BadRequest(f"unknown key descriptor field {kind!r}", code="invalid_field")
        if row is None or not can_see_key(principal, row):
            raise NotFound(f"no such key: {value}" if kind == "name" else "no such key")
        return row

    def use(self, owner: Owner, principal: Principal, descriptor: Any, op: str) -> KeyRow:
        """Find a key and check that the caller may perform ``op`` with it."""
        row = self.find(owner, principal, descriptor)
        check_key_use(principal, row, op, self.clock())
        if row.missing:
            raise Internal("the key's material is missing from the token")
        return row

    def visible(self, owner: Owner, principal: Principal) -> list[KeyRow]:
        rows = [r for r in self.store.keys.values() if can_see_key(principal, r)]
        rows += [r for r in owner.transient.values() if can_see_key(principal, r)]
        return rows

    def group_in_use(self, group_id: str) -> bool:
        """Whether any key is in the group, or a creation in flight will put one there."""
        return self._filling[group_id] > 0 or any(
            k.group_id == group_id for k in self.store.keys.values()
        )

    # -- use ------------------------------------------------------------------
    async def operate(self, row: KeyRow, method: str, req: dict) -> dict[str, Any]:
        """One crypto operation (``method`` of the token) with a key from :meth:`use`.

        As in DSM, ``alg`` may be left out where the key's type fixes it, and a
        MAC comes back under ``digest`` as well as ``mac``.
        """
        if "alg" not in req and method in _ALG_FROM_KEY:
            alg = _key_alg(row)
            if alg is not None:
                req = {**req, "alg": alg}
        out = await getattr(self.token, method)(ref_of(row), req)
        if method == "mac":
            out["digest"] = out["mac"]
        return out

    async def wrap(self, row: KeyRow, subject: KeyRow, req: dict) -> dict[str, Any]:
        """Wrap ``subject`` (found with :meth:`use` for EXPORT) under ``row`` (WRAPKEY)."""
        if "alg" not in req and _key_alg(row) is not None:
            req = {**req, "alg": _key_alg(row)}
        return await self.token.wrap(ref_of(row), ref_of(subject), req)

    async def export(self, row: KeyRow) -> bytes:
        """The value of a key found with :meth:`use` for EXPORT."""
        return await self.token.export(ref_of(row))

    # -- create ---------------------------------------------------------------
    async def create(self, owner: Owner, principal: Principal, spec: KeySpec) -> KeyRow:
        """Generate a key in the token."""
        ops = choose_ops(spec.obj_type, spec.key_ops, imported=False)
        return await self._make(
            owner, principal, spec, "EXPORT" in ops, self.token.generate, lambda _m: ops
        )

    async def import_(
        self, owner: Owner, principal: Principal, spec: KeySpec, value: bytes
    ) -> KeyRow:
        """Import a key value or a certificate; key_ops default once the value is known."""

        def ops(mat: KeyMaterial) -> list[str]:
            return choose_ops(
                mat.obj_type, spec.key_ops, imported=True, public_only=mat.public_only
            )

        exportable = spec.key_ops is None or "EXPORT" in spec.key_ops
        return await self._make(
            owner, principal, spec, exportable, lambda new: self.token.import_key(new, value), ops
        )

    async def unwrap(
        self, owner: Owner, principal: Principal, key: Any, spec: KeySpec, req: dict
    ) -> KeyRow:
        """Unwrap a key into the token under a key the caller may UNWRAPKEY with."""
        row = self.use(owner, principal, key, "UNWRAPKEY")
        if "alg" not in req and _key_alg(row) is not None:
            req = {**req, "alg": _key_alg(row)}
        ops = choose_ops(spec.obj_type, spec.key_ops, imported=False)
        return await self._make(
            owner,
            principal,
            spec,
            "EXPORT" in ops,
            lambda new: self.token.unwrap(ref_of(row), new, req),
            lambda _m: ops,
        )

    async def agree(
        self, owner: Owner, principal: Principal, private: Any, public: Any, spec: KeySpec
    ) -> KeyRow:
        """ECDH: a new key from the caller's private key and a public key it can see."""
        priv = self.use(owner, principal, private, "AGREEKEY")
        pub = self.find(owner, principal, public)
        ops = choose_ops(spec.obj_type, spec.key_ops, imported=False)
        return await self._make(
            owner,
            principal,
            spec,
            "EXPORT" in ops,
            lambda new: self.token.agree(ref_of(priv), ref_of(pub), new),
            lambda _m: ops,
        )

    async def persist(self, owner: Owner, principal: Principal, key: Any, spec: KeySpec) -> KeyRow:
        """Store a transient key (Lua's ``:persist{}``): a token copy under a new kid.

        Only the principal that made the transient key can see it, so only it
        can persist it; key_ops can only be narrowed.
        """
        src = self.find(owner, principal, key)
        if not src.transient:
            raise BadRequest("only a transient key can be persisted", code="invalid_value")
        asked = src.key_ops if spec.key_ops is None else spec.key_ops
        ops = choose_ops(src.obj_type, asked, imported=False, public_only=src.public_only)
        if set(ops) - set(src.key_ops):
            raise BadRequest("key_ops can only be narrowed", code="invalid_value")
        spec = replace(
            spec,
            obj_type=src.obj_type,
            name=spec.name or src.name,
            key_size=src.key_size,
            curve=src.elliptic_curve,
            group_id=spec.group_id or src.group_id,
            transient=False,
        )
        return await self._make(
            owner,
            principal,
            spec,
            "EXPORT" in ops,  # a copy without EXPORT is sensitive in the token too
            lambda new: self.token.persist(ref_of(src), new),
            lambda _m: ops,
        )

    async def _make(
        self,
        owner: Owner,
        principal: Principal,
        spec: KeySpec,
        exportable: bool,
        make: Callable[[NewKey], Awaitable[KeyMaterial]],
        ops_for: Callable[[KeyMaterial], list[str]],
    ) -> KeyRow:
        # Everything up to the reservation is synchronous: no other request runs
        # between the checks and the reservation.
        group = self.target_group(principal, spec.group_id)
        transient = spec.transient
        name = check_name(spec.name or ("transient" if transient else ""))
        if transient:
            if len(owner.transient) + owner.transient_pending >= self.config.max_transient_keys:
                raise TooLarge("too many transient keys on this connection")
            owner.transient_pending += 1
        else:
            self._reserve(name)
        new = NewKey(
            str(uuid.uuid4()), name, spec.obj_type, spec.key_size, spec.curve, exportable, transient
        )
        self._filling[group] += 1

        async def run() -> KeyRow:
            try:
                mat = await make(new)
                try:
                    row = KeyRow(
                        kid=new.kid,
                        name=name,
                        obj_type=mat.obj_type,
                        key_size=mat.key_size,
                        elliptic_curve=mat.curve,
                        key_ops=ops_for(mat),
                        group_id=group,
                        description=spec.description,
                        custom_metadata=dict(spec.custom_metadata),
                        created_at=now_stamp(),
                        creator=principal.creator(),
                        enabled=spec.enabled,
                        pub_key=mat.pub_key,
                        public_only=mat.public_only,
                        transient=transient,
                        activation_date=spec.activation_date,
                        deactivation_date=spec.deactivation_date,
                        rotation_policy=spec.rotation_policy,
                        scheduled_rotation=next_rotation(spec.rotation_policy, self.clock()),
                    )
                    if transient:
                        if owner.closed:  # the connection ended while the token worked
                            raise Conflict("the connection ended", code="conflict")
                        owner.transient[row.kid] = row
                    else:
                        await self.store.insert(row)
                except BaseException:
                    await self._destroy(new.kid)
                    raise
                return row
            finally:
                if transient:
                    owner.transient_pending -= 1
                else:
                    self._reserved.discard(name)
                self._filling[group] -= 1
                if not self._filling[group]:
                    del self._filling[group]

        return await self._finish(run())

    def _reserve(self, name: str) -> None:
        if name in self.store.key_names or name in self._reserved:
            # Names are unique across the deployment (a {name} descriptor carries no
            # group), so this says only that the name is taken: no kid, no group.
            raise Conflict(f"a key named {name!r} exists", code="name_exists")
        self._reserved.add(name)

    def target_group(self, principal: Principal, group_id: str | None) -> str:
        gid = check_group_target(principal, group_id)
        if gid not in self.store.groups or gid in self.closing:
            raise NotFound(f"no group {gid}")
        return gid

    # -- change ---------------------------------------------------------------
    async def update(self, owner: Owner, principal: Principal, kid: str, patch: KeyPatch) -> KeyRow:
        """Rename, describe, enable/disable, narrow key_ops; one writer per key.

        Everything is decided on the row as it is under the key's lock, never on
        a row read before it. EXPORT taken away is written to the row first and
        then to the token (the row is the safe side: a crash between the two
        leaves a key the daemon refuses to export, and start-up's reconcile
        finishes the token's side).
        """
        row = self.find(owner, principal, {"kid": kid})
        check_key_manage(principal, row)
        name = check_name(patch.name) if patch.name is not None else None
        reserved: list[str] = []

        async def apply(cur: KeyRow) -> KeyRow:
            check_key_manage(principal, cur)
            if name is not None and name != cur.name and not cur.transient:
                self._reserve(name)  # synchronous with its check, before any await
                reserved.append(name)
            new = _patched(cur, patch, name, self.clock())
            if name is not None and name != cur.name and not cur.transient:
                await self.token.rename(ref_of(cur), name)
            return new

        async def run() -> KeyRow:
            try:
                if row.transient:
                    async with self.store.writing(kid):
                        cur = owner.transient.get(kid)
                        if cur is None:
                            raise NotFound("no such key")
                        new = await apply(cur)
                        owner.transient[kid] = new
                else:
                    new = await self.store.change(KeyRow, kid, apply)
                if "EXPORT" in row.key_ops and "EXPORT" not in new.key_ops:
                    await self.token.restrict(ref_of(new))
                return new
            finally:
                for n in reserved:
                    self._reserved.discard(n)

        return await self._finish(run())

    async def delete(self, owner: Owner, principal: Principal, kid: str) -> Deleted:
        """Destroy a key: the row first (the delete is then durable), then its material.

        If the token refuses to destroy the object, the key is still gone for
        every caller; the object is retried in the background and, failing
        that, removed by the next start-up's reconcile. The result says which.
        """
        row = self.find(owner, principal, {"kid": kid})
        check_key_manage(principal, row)

        async def run() -> Deleted:
            async with self.store.writing(kid):
                if row.transient:
                    if owner.transient.pop(kid, None) is None:
                        raise NotFound("no such key")
                else:
                    cur = self.store.keys.get(kid)
                    if cur is None:
                        raise NotFound("no such key")
                    check_key_manage(principal, cur)
                    await self.store.delete(cur)
                return Deleted(kid, await self._destroy(kid, retry=not row.transient))

        return await self._finish(run())

    async def drop_owner(self, owner: Owner) -> None:
        """Destroy the transient keys of a connection or invocation that ended."""
        owner.closed = True
        rows, owner.transient = list(owner.transient.values()), {}
        for row in rows:
            await self._destroy(row.kid)

    async def _destroy(self, kid: str, *, retry: bool = False) -> bool:
        """Remove a token object; False (logged, maybe retried) if the token refused."""
        try:
            await self.token.remove(kid)
            return True
        except Exception as exc:
            log.error("could not destroy token object %s: %s", kid, exc)
            if retry:
                self._spawn(self._retries, self._retry_destroy(kid))
            return False

    async def _retry_destroy(self, kid: str) -> None:
        delay = 1.0
        while kid not in self.store.keys:  # never destroy a key that came back
            await asyncio.sleep(delay)
            try:
                await self.token.remove(kid)
                log.info("destroyed token object %s on retry", kid)
                return
            except Exception:
                delay = min(delay * 2, 60.0)

    @staticmethod
    def _spawn(tasks: set[asyncio.Task[Any]], coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    async def _finish(self, coro: Awaitable[T]) -> T:
        """Run a change to its end even if the request that asked is cancelled."""
        return await asyncio.shield(self._spawn(self._changes, coro))

    async def close(self, grace: float = 10.0) -> None:
        """At shutdown: let changes in flight finish; drop pending destroy retries
        (the next start-up's reconcile removes those objects)."""
        for task in list(self._retries):
            task.cancel()
        pending = [*self._changes, *self._retries]
        if pending:
            await asyncio.wait(pending, timeout=grace)

    # -- lifecycle (DSM's states, rotation with versions, scheduled deletion) ----
    async def _transition(
        self, owner: Owner, principal: Principal, kid: str, fn: Callable[[KeyRow], KeyRow]
    ) -> KeyRow:
        """A row-only lifecycle change of a stored key, by someone who may manage it."""
        row = self.find(owner, principal, {"kid": kid})
        if row.transient:
            raise BadRequest("a transient key has no lifecycle", code="invalid_value")
        check_key_manage(principal, row)

        def apply(cur: KeyRow) -> KeyRow:
            check_key_manage(principal, cur)
            return fn(cur)

        return await self._finish(self.store.change(KeyRow, kid, apply))

    async def activate(self, owner: Owner, principal: Principal, kid: str) -> KeyRow:
        def fn(cur: KeyRow) -> KeyRow:
            state = state_of(cur, self.clock())
            if state == "Active":
                return cur
            if state != "PreActive":
                raise Conflict(f"a {state} key cannot be activated", code="conflict")
            return replace(cur, state="Active", activation_date=now_stamp(self.clock()))

        return await self._transition(owner, principal, kid, fn)

    async def revoke(
        self, owner: Owner, principal: Principal, kid: str, reason: dict[str, Any]
    ) -> KeyRow:
        """Deactivated, or Compromised for a compromise code: it still decrypts and
        verifies what it protected, and protects nothing new."""
        code = reason.get("code")
        if code not in REVOCATION_CODES:
            raise BadRequest(
                f"code must be one of {sorted(REVOCATION_CODES)}", code="invalid_value"
            )
        if not isinstance(reason.get("message", ""), str):
            raise BadRequest("message must be a string", code="invalid_value")
        when = reason.get("compromise_occurance_date")
        if when is not None:
            check_date(when, "compromise_occurance_date")
        compromised = code in ("KeyCompromise", "CACompromise")

        def fn(cur: KeyRow) -> KeyRow:
            state = state_of(cur, self.clock())
            if state == "Destroyed":
                raise Conflict("a destroyed key cannot be revoked", code="conflict")
            now = now_stamp(self.clock())
            return replace(
                cur,
                state="Compromised" if compromised else "Deactivated",
                deactivation_date=cur.deactivation_date or now,
                compromise_date=(when or now) if compromised else cur.compromise_date,
                revocation_reason=dict(reason),
                rotation_policy=None,
                scheduled_rotation=None,
            )

        return await self._transition(owner, principal, kid, fn)

    async def schedule_deletion(
        self, owner: Owner, principal: Principal, kid: str, days: int
    ) -> KeyRow:
        """The key is unusable from now on and deleted after ``days`` (cancellable)."""
        when = now_stamp(self.clock() + days * 86400)
        return await self._transition(
            owner, principal, kid, lambda c: replace(c, deletion_date=when)
        )

    async def cancel_deletion(self, owner: Owner, principal: Principal, kid: str) -> KeyRow:
        def fn(cur: KeyRow) -> KeyRow:
            if not cur.deletion_date:
                raise Conflict("the key is not scheduled for deletion", code="conflict")
            return replace(cur, deletion_date=None)

        return await self._transition(owner, principal, kid, fn)

    async def destroy(self, owner: Owner, principal: Principal, kid: str) -> KeyRow:
        """Destroyed: the material leaves the token, the metadata stays (DSM's destroy
        and delete_key_material). Only a deactivated or compromised key: revoke first.
        The row goes first, so a crash leaves a Destroyed row whose object start-up
        removes."""

        def fn(cur: KeyRow) -> KeyRow:
            state = state_of(cur, self.clock())
            if state not in ("Deactivated", "Compromised"):
                raise Conflict(f"revoke the key first (it is {state})", code="conflict")
            return replace(cur, state="Destroyed", destruction_date=now_stamp(self.clock()))

        row = await self._transition(owner, principal, kid, fn)
        await self._destroy(kid, retry=False)
        return row

    async def delete_private(self, owner: Owner, principal: Principal, kid: str) -> KeyRow:
        """Keep only the public half of a key pair (DELETE .../private)."""

        def fn(cur: KeyRow) -> KeyRow:
            if cur.obj_type not in ("RSA", "EC") or cur.public_only:
                raise BadRequest("only a key pair has a private part", code="invalid_value")
            ops = [op for op in cur.key_ops if op not in PRIVATE_OPS]
            return replace(cur, public_only=True, key_ops=ops)

        row = await self._transition(owner, principal, kid, fn)
        await self.token.remove_private(kid)
        return row

    async def rekey(
        self,
        owner: Owner,
        principal: Principal,
        name: str,
        changes: dict[str, Any],
        *,
        deactivate_old: bool = False,
    ) -> KeyRow:
        """Rotate a key (DSM's rekey): a new key takes the name and the metadata; the
        old version is renamed "<name> (rotated at <timestamp>)" and linked.

        The new version's token object is made first; the old row's rename and
        links and the new row are then written in one transaction, so a crash
        leaves either the old key alone (and an orphan object start-up removes)
        or both versions, linked. Old versions still decrypt and verify; names
        resolve to the newest.
        """
        row = self.find(owner, principal, {"name": name})
        if row.transient or row.obj_type == "CERTIFICATE" or row.public_only:
            raise BadRequest(
                "only a stored key with its private part can be rotated", code="invalid_value"
            )
        check_key_manage(principal, row)
        rotated = self._rotated_name(row.name)
        self._reserve(rotated)  # before the first await
        new_kid = str(uuid.uuid4())

        async def run() -> KeyRow:
            try:
                # Rotations of one name queue on the name: each rotates the version
                # that holds it when its turn comes.
                async with self.store.writing(f"name:{name}"):
                    return await rotate_holder()
            finally:
                self._reserved.discard(rotated)

        async def rotate_holder() -> KeyRow:
            holder = self.find(owner, principal, {"name": name})
            async with self.store.writing(holder.kid):
                cur = self.store.keys.get(holder.kid)
                if cur is None or cur.name != name:
                    raise Conflict("the key was renamed or deleted meanwhile", code="conflict")
                check_key_manage(principal, cur)
                if state_of(cur, self.clock()) in ("Destroyed", "Compromised"):
                    raise Conflict(f"a {cur.state} key cannot be rotated", code="conflict")
                old, new = await self._rotate(
                    cur, principal, new_kid, rotated, changes, deactivate_old
                )
            try:  # the old version's label follows its new name (cosmetic)
                await self.token.rename(ref_of(old), rotated)
            except Exception as exc:
                log.warning("rotated key %s keeps its old token label: %s", old.kid, exc)
            return new

        return await self._finish(run())

    async def _rotate(
        self,
        cur: KeyRow,
        principal: Principal,
        new_kid: str,
        rotated: str,
        changes: dict[str, Any],
        deactivate_old: bool,
    ) -> tuple[KeyRow, KeyRow]:
        now = self.clock()
        ops = choose_ops(cur.obj_type, changes.get("key_ops", cur.key_ops), imported=False)
        size = changes.get("key_size", cur.key_size if cur.obj_type != "EC" else None)
        curve = changes.get("elliptic_curve", cur.elliptic_curve)
        policy = (
            check_rotation_policy(changes["rotation_policy"])
            if "rotation_policy" in changes
            else cur.rotation_policy
        )
        new_key = NewKey(new_kid, cur.name, cur.obj_type, size, curve, "EXPORT" in ops, False)
        mat = await self.token.generate(new_key)
        try:
            new = KeyRow(
                kid=new_kid,
                name=cur.name,
                obj_type=mat.obj_type,
                key_size=mat.key_size,
                elliptic_curve=mat.curve,
                key_ops=ops,
                group_id=cur.group_id,
                description=changes.get("description", cur.description),
                custom_metadata=check_metadata(changes.get("custom_metadata", cur.custom_metadata)),
                created_at=now_stamp(now),
                creator=principal.creator(),
                enabled=bool(changes.get("enabled", cur.enabled)),
                pub_key=mat.pub_key,
                public_only=False,
                activation_date=changes.get("activation_date"),
                deactivation_date=changes.get("deactivation_date"),
                links={"replaced": cur.kid},
                rotation_policy=policy,
                scheduled_rotation=next_rotation(policy, now),
            )
            old = replace(
                cur,
                name=rotated,
                links={**cur.links, "replacement": new_kid},
                rotation_policy=None,
                scheduled_rotation=None,
            )
            if deactivate_old:
                old = replace(old, state="Deactivated", deactivation_date=now_stamp(now))
            await self.store.commit([(cur, old)], [new])
        except BaseException:
            await self._destroy(new_kid)
            raise
        return self.store.keys[cur.kid], new

    def _rotated_name(self, name: str) -> str:
        base = f"{name} (rotated at {now_stamp(self.clock())})"
        out, n = base, 1
        while out in self.store.key_names or out in self._reserved:
            n += 1
            out = f"{base} #{n}"
        return check_name(out[:MAX_NAME])

    async def tick(self, now: float | None = None) -> dict[str, list[str]]:
        """Do what the clock has made due: scheduled deletions, then rotations.

        The daemon calls it every ``lifecycle_interval`` seconds; tests call it
        with a ``now`` of their choosing instead of sleeping.
        """
        t = self.clock() if now is None else now
        daemon = Principal("admin", "strongroomd", "strongroomd", frozenset())
        nobody = Owner(id="lifecycle", principal=daemon)
        done: dict[str, list[str]] = {"deleted": [], "rotated": []}
        for row in list(self.store.keys.values()):
            if row.deletion_date and stamp_time(row.deletion_date) <= t:
                try:
                    await self.delete(nobody, daemon, row.kid)
                    done["deleted"].append(row.kid)
                except Exception as exc:
                    log.error("scheduled deletion of %s failed: %s", row.kid, exc)
        for row in list(self.store.keys.values()):
            due = row.scheduled_rotation
            if not due or stamp_time(due) > t or row.deletion_date:
                continue
            if state_of(row, t) != "Active":
                continue
            try:
                deactivate = bool((row.rotation_policy or {}).get("deactivate_rotated_key"))
                new = await self.rekey(nobody, daemon, row.name, {}, deactivate_old=deactivate)
                done["rotated"].append(f"{row.kid} -> {new.kid}")
            except Exception as exc:
                log.error("scheduled rotation of %s failed: %s", row.kid, exc)
        return done

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
        # Lifecycle changes whose row was written but not their token side.
        finished = 0
        for row in list(store.keys.values()):
            if row.state == "Destroyed" and row.kid in on_token:
                await self.token.remove(row.kid)
                finished += 1
            elif (
                row.public_only
                and row.obj_type != "CERTIFICATE"
                and self.token.has_private(row.kid)
            ):
                await self.token.remove_private(row.kid)
                finished += 1
        on_token = self.token.kids()
        marked = 0
        for row in list(store.keys.values()):
            if row.state == "Destroyed":
                continue  # no material, on purpose
            lost = row.kid not in on_token
            if lost != row.missing:
                await store.change(KeyRow, row.kid, lambda r, lost=lost: replace(r, missing=lost))
                marked += lost
                if lost:
                    log.error("key %s (%s) has no token object; marked missing", row.kid, row.name)
        # A crash between an EXPORT narrowing's row and its token change: finish it.
        unexportable = [
            r.kid
            for r in store.keys.values()
            if "EXPORT" not in r.key_ops and not r.missing and r.state != "Destroyed"
        ]
        restricted = await self.token.restrict_many(unexportable) if unexportable else 0
        if restricted:
            log.warning("made %d token objects unexportable, as their rows say", restricted)
        return {
            "orphans_removed": len(orphans),
            "rows_missing": marked,
            "unexportable_restricted": restricted,
            "lifecycle_finished": finished,
        }


_ALG_FROM_KEY = frozenset(("encrypt", "decrypt", "wrap", "unwrap"))


def _key_alg(row: KeyRow) -> str | None:
    """The algorithm a key's type fixes (RSA for certificates with an RSA key)."""
    if row.obj_type in ("AES", "DES3", "RSA"):
        return row.obj_type
    if row.obj_type == "CERTIFICATE" and not row.elliptic_curve:
        return "RSA"
    return None


def _patched(cur: KeyRow, patch: KeyPatch, name: str | None, now: float) -> KeyRow:
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
