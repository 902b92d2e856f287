"""Principals, API keys, sessions, and the access rules of API.md section 2.

An API key is ``base64("<principal_id>:<secret>")``; only a salted scrypt
hash of the secret is stored. A successful login yields a bearer token held
in memory (a restart logs everyone out, which costs one re-login). With a
shared database (several nodes) the session is also stored there, under the
token's SHA-256, so every node accepts it; each node caches the sessions it
has seen and asks the database about one it has not.
Every rule that decides who may touch what lives in this module.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from strongroomd.errors import (
    AppPermissionDenied,
    BadRequest,
    Forbidden,
    KeyOpNotPermitted,
    NotFound,
    Unauthenticated,
)
from strongroomd.store import KeyRow, PrincipalRow, Store, stamp_time

SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_DUMMY_SALT = secrets.token_bytes(16)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: an admin, an app, or a plugin acting for an invocation."""

    kind: str  # "admin" | "app" | "plugin"
    id: str
    name: str
    groups: frozenset[str]
    default_group: str | None = None
    #: An app's permissions per group (implied ones included); None for an admin
    #: or a plugin, which DSM's app permissions do not restrict.
    permissions: Mapping[str, frozenset[str]] | None = field(default=None, compare=False)

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    def creator(self) -> dict[str, str]:
        return {"user" if self.is_admin else self.kind: self.id}

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "id": self.id, "name": self.name, "groups": sorted(self.groups)}


def principal_of(row: PrincipalRow) -> Principal:
    perms = None
    if row.kind == "app":
        perms = {g: granted(row.permissions.get(g, ())) for g in row.groups}
    return Principal(row.kind, row.id, row.name, frozenset(row.groups), row.default_group, perms)


def hash_secret(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)


def new_secret() -> tuple[str, bytes, bytes]:
    """A fresh secret, its salt and its hash."""
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return secret, salt, hash_secret(secret, salt)


def api_key(principal_id: str, secret: str) -> str:
    return base64.b64encode(f"{principal_id}:{secret}".encode()).decode()


def parse_api_key(value: str) -> tuple[str, str]:
    try:
        text = base64.b64decode(value.encode(), validate=True).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise Unauthenticated("malformed API key", code="bad_credentials") from None
    pid, sep, secret = text.partition(":")
    if not sep or not pid or not secret:
        raise Unauthenticated("malformed API key", code="bad_credentials")
    return pid, secret


@dataclass(slots=True)
class Session:
    principal_id: str
    expires: float


class Authenticator:
    """Checks API keys (slowly, off the event loop) and keeps bearer tokens."""

    def __init__(self, store: Store, ttl: int) -> None:
        self.store = store
        self.ttl = ttl
        self._sessions: dict[str, Session] = {}
        self._principals: dict[str, tuple[PrincipalRow, Principal]] = {}
        self._slots = asyncio.Semaphore(2)  # scrypt is CPU-bound: never more than the cores
        #: Shared database: session writes that need not delay the answer.
        self._writes: set[asyncio.Task[None]] = set()
        if store.sharing is not None:
            store.sharing.session_observers.append(self._heard)

    async def login(self, principal_id: str, secret: str) -> tuple[str, Principal]:
        row = self.store.principals.get(principal_id)
        salt = row.salt if row and row.salt else _DUMMY_SALT
        async with self._slots:
            digest = await asyncio.to_thread(hash_secret, secret, salt)
        # Same work and one answer whether the id or the secret was wrong.
        if row is None or row.secret_hash is None or not row.enabled:
            raise Unauthenticated("invalid credentials", code="bad_credentials")
        if not hmac.compare_digest(digest, row.secret_hash):
            raise Unauthenticated("invalid credentials", code="bad_credentials")
        # The hash took ~50 ms off the loop: the secret may have been reset, or the
        # principal disabled or deleted, meanwhile. Issue nothing on a stale check.
        now = self.store.principals.get(principal_id)
        if now is None or not now.enabled or now.secret_hash != row.secret_hash:
            raise Unauthenticated("invalid credentials", code="bad_credentials")
        if len(self._sessions) >= 4096:
            self._sweep()
        token = secrets.token_urlsafe(32)
        # Several nodes: stored before it is handed out, and only while the database
        # has the row as checked here (another node may have reset the secret, or
        # disabled or deleted the principal, meanwhile).
        shared = self.store.sharing
        expires = time.time() + self.ttl
        if shared is not None and not await shared.session_put(
            token, now.id, expires, now.secret_hash
        ):
            raise Unauthenticated("invalid credentials", code="bad_credentials")
        self._sessions[token] = Session(now.id, time.monotonic() + self.ttl)
        return token, principal_of(now)

    async def prefetch(self, token: str | None) -> None:
        """Shared database: load a session this node has not seen (or whose expiry
        it holds has passed: another node may have refreshed it) before
        :meth:`resolve`."""
        if token is None or (shared := self.store.sharing) is None:
            return
        s = self._sessions.get(token)
        if s is not None and time.monotonic() < s.expires:
            return
        found = await shared.session_get(token)
        if found is None:
            self._sessions.pop(token, None)
            return
        pid, expires = found
        left = expires - time.time()
        if left > 0:
            if len(self._sessions) >= 4096:
                self._sweep()
            self._sessions[token] = Session(pid, time.monotonic() + left)

    def _heard(self, msg: dict) -> None:
        """Another node ended sessions: drop the cached ones too."""
        if msg.get("all"):
            self._sessions.clear()  # re-read from the database on next use
        elif "p" in msg:
            for tok in [t for t, s in self._sessions.items() if s.principal_id == msg["p"]]:
                del self._sessions[tok]
        elif "s" in msg:
            for tok in list(self._sessions):
                if hashlib.sha256(tok.encode()).hexdigest() == msg["s"]:
                    del self._sessions[tok]

    async def settle(self) -> None:
        """Shared database: wait for the session writes a request started (the
        dispatcher calls it before answering, so a logout is answered once every
        node dropped the session)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _later(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def resolve(self, token: str) -> Principal:
        session = self._sessions.get(token)
        if session is None:
            raise Unauthenticated("unknown or ended session", code="bad_credentials")
        if time.monotonic() >= session.expires:
            del self._sessions[token]
            raise Unauthenticated("session expired; authenticate again", code="token_expired")
        row = self.store.principals.get(session.principal_id)
        if row is None or not row.enabled:
            del self._sessions[token]
            raise Unauthenticated("principal no longer exists", code="bad_credentials")
        cached = self._principals.get(row.id)
        if cached is None or cached[0] is not row:  # rows are replaced, never edited, on change
            cached = self._principals[row.id] = (row, principal_of(row))
        return cached[1]

    def _sweep(self) -> None:
        now = time.monotonic()
        for tok in [t for t, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[tok]

    def terminate(self, token: str) -> None:
        self._sessions.pop(token, None)
        if (shared := self.store.sharing) is not None:
            self._later(shared.session_drop(token=token))

    def refresh(self, token: str) -> None:
        """Give a live session ``ttl`` seconds from now (POST /sys/v1/session/refresh)."""
        session = self._sessions.get(token)
        if session is not None:
            session.expires = time.monotonic() + self.ttl
            if (shared := self.store.sharing) is not None:
                self._later(shared.session_refresh(token, time.time() + self.ttl))

    def drop_principal(self, principal_id: str) -> None:
        """End every session of a principal (deleted, or its secret was reset)."""
        for tok in [t for t, s in self._sessions.items() if s.principal_id == principal_id]:
            del self._sessions[tok]
        if (shared := self.store.sharing) is not None:
            self._later(shared.session_drop(principal_id=principal_id))


# -- app permissions (DSM's AppPermissions, per group) ---------------------------

#: DSM's finer key-management permissions; MANAGE grants every one of them.
_MANAGING: tuple[str, ...] = (
    "CREATE_SOBJECTS",
    "COPY_SOBJECTS",
    "ROTATE_SOBJECTS",
    "ACTIVATE_SOBJECTS",
    "REVOKE_SOBJECTS",
    "REVERT_SOBJECTS",
    "MOVE_SOBJECTS",
    "UPDATE_SOBJECTS_PROFILE",
    "UPDATE_SOBJECTS_ENABLED_STATE",
    "UPDATE_SOBJECT_POLICIES",
    "UPDATE_KEY_OPS",
    "DELETE_KEY_MATERIAL",
    "DELETE_SOBJECTS",
    "DESTROY_SOBJECTS",
    "RESTORE_EXTERNAL_SOBJECTS",
)

#: DSM's AppPermissions, in DSM's order: what an app may do in one of its groups.
APP_PERMISSIONS: tuple[str, ...] = (
    "SIGN",
    "VERIFY",
    "ENCRYPT",
    "DECRYPT",
    "WRAPKEY",
    "UNWRAPKEY",
    "DERIVEKEY",
    "MACGENERATE",
    "MACVERIFY",
    "EXPORT",
    "MANAGE",
    "AGREEKEY",
    "MASKDECRYPT",
    "AUDIT",
    "TRANSFORM",
    *_MANAGING,
    "CALCULATE_DIGEST",
    "ENCAPSULATE",
    "DECAPSULATE",
)

#: An app put in a group with no permission list (DSM's list form of AppGroups,
#: Strongroom's ``groups``) gets all of them: what every app had before
#: permissions existed, and what DSM's console selects by default.
DEFAULT_PERMISSIONS: tuple[str, ...] = APP_PERMISSIONS

#: Permissions that grant others. DSM: MANAGE covers creating, rotating,
#: activating, revoking, updating, deleting and destroying keys. A caller that
#: may read a key's value may also have its digest.
IMPLIES: dict[str, frozenset[str]] = {
    "MANAGE": frozenset(_MANAGING),
    "EXPORT": frozenset({"CALCULATE_DIGEST"}),
}


def granted(permissions: Iterable[str]) -> frozenset[str]:
    """The permissions an app holds: those given and those they imply."""
    out = set(permissions)
    for p in list(out):
        out |= IMPLIES.get(p, frozenset())
    return frozenset(out)


def check_permissions(value: object, where: str) -> list[str]:
    """A permission list from a request: DSM's names, each once, in DSM's order."""
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRequest(f"{where} must be a list of permission names", code="invalid_value")
    unknown = sorted({p.upper() for p in value} - set(APP_PERMISSIONS))
    if unknown:
        raise BadRequest(
            f"{where}: unknown permission(s) {', '.join(unknown)}; DSM's are "
            + ", ".join(APP_PERMISSIONS),
            code="invalid_value",
        )
    asked = {p.upper() for p in value}
    return [p for p in APP_PERMISSIONS if p in asked]


#: The operation the current request performs, "METHOD /route/{template}": set
#: by the dispatcher for each request (nested plugin calls set their own).
OPERATION: ContextVar[str | None] = ContextVar("strongroom_operation", default=None)

#: The checks a handler makes, by what they are called below: a key_op name when
#: it uses a key (check_key_use); "manage" when it changes a key
#: (check_key_manage); "create" for the group a new key goes to
#: (check_group_target); "read" when it reads something of a key's value
#: without a key_op (check_key_read).
_CRYPTO_ONE_KEY = {
    "encrypt": "ENCRYPT",
    "decrypt": "DECRYPT",
    "sign": "SIGN",
    "verify": "VERIFY",
    "mac": "MACGENERATE",
    "macverify": "MACVERIFY",
}


def _use_forms(name: str, op: str) -> dict[str, dict[str, str]]:
    """Every path that does ``name`` with one key: by descriptor, per key, batch."""
    need = {op: op}
    forms = {
        f"POST /crypto/v1/{name}": need,
        f"POST /crypto/v1/keys/{{kid}}/{name}": need,
        f"POST /crypto/v1/keys/batch/{name}": need,
    }
    if name in ("encrypt", "decrypt"):  # multi-part: every step uses the key
        for step in ("init", "update", "final"):
            forms[f"POST /crypto/v1/{name}/{step}"] = need
            forms[f"POST /crypto/v1/keys/{{kid}}/{name}/{step}"] = need
    return forms


#: THE table: what an app needs, in the group of the key concerned, for each
#: operation path and each check that path makes. On top of the key's key_ops
#: (a key still needs DECRYPT in key_ops to decrypt; the app also needs DECRYPT
#: in the key's group). Admins and plugins are not apps: no row applies to them
#: (a plugin keeps its own rules: its groups and the keys' key_ops). An app
#: reaching a check on a path missing here is refused (fail closed).
PERMISSIONS: dict[str, dict[str, str]] = {
    **{
        path: need
        for name, op in _CRYPTO_ONE_KEY.items()
        for path, need in _use_forms(name, op).items()
    },
    # Wrapping reads the wrapped key out: EXPORT in its group, WRAPKEY in the other's.
    "POST /crypto/v1/wrapkey": {"WRAPKEY": "WRAPKEY", "EXPORT": "EXPORT"},
    "POST /crypto/v1/keys/{kid}/wrapkey": {"WRAPKEY": "WRAPKEY", "EXPORT": "EXPORT"},
    # Unwrapping, agreeing and deriving make a stored key: a creation in its group.
    "POST /crypto/v1/unwrapkey": {"UNWRAPKEY": "UNWRAPKEY", "create": "CREATE_SOBJECTS"},
    "POST /crypto/v1/keys/{kid}/unwrapkey": {"UNWRAPKEY": "UNWRAPKEY", "create": "CREATE_SOBJECTS"},
    "POST /crypto/v1/agree": {"AGREEKEY": "AGREEKEY", "create": "CREATE_SOBJECTS"},
    # (BIP32 derivations read the parent's value in the daemon: key_op EXPORT.)
    # An exportable BIP32 weak child put in another group carries the parent out
    # (its private key and the parent's xpub give the parent's): EXPORT there.
    "POST /crypto/v1/derive": {
        "DERIVEKEY": "DERIVEKEY",
        "EXPORT": "DERIVEKEY",
        "create": "CREATE_SOBJECTS",
        "weak_child": "EXPORT",
    },
    "POST /crypto/v1/keys/{kid}/derive": {
        "DERIVEKEY": "DERIVEKEY",
        "EXPORT": "DERIVEKEY",
        "create": "CREATE_SOBJECTS",
        "weak_child": "EXPORT",
    },
    "POST /crypto/v1/keys/transform": {
        "EXPORT": "TRANSFORM",
        "DERIVEKEY": "TRANSFORM",
        "create": "CREATE_SOBJECTS",
        "weak_child": "EXPORT",
    },
    # TR-31 key blocks: opening one is an unwrap, sealing one exports the subject.
    "POST /crypto/v1/keys/tr31/open": {"EXPORT": "UNWRAPKEY"},
    "POST /crypto/v1/keys/tr31/seal": {"EXPORT": "EXPORT"},
    "POST /crypto/v1/keys/bip32/import": {"create": "CREATE_SOBJECTS"},
    "POST /crypto/v1/keys/bip32/export": {"EXPORT": "EXPORT"},
    # A key's value, or something computed from it alone.
    "POST /crypto/v1/keys/export": {"EXPORT": "EXPORT"},
    "GET /crypto/v1/keys/{kid}/export": {"EXPORT": "EXPORT"},
    "POST /crypto/v1/keys/digest": {"EXPORT": "CALCULATE_DIGEST"},
    "POST /crypto/v1/keys/kcv": {"read": "CALCULATE_DIGEST"},
    # Management: MANAGE, or the finer DSM permission named.
    "POST /crypto/v1/keys": {"create": "CREATE_SOBJECTS"},
    "PUT /crypto/v1/keys": {"create": "CREATE_SOBJECTS"},
    "POST /crypto/v1/keys/persist": {"create": "CREATE_SOBJECTS"},
    # A new version with key_ops its predecessor lacked is a key_ops change too.
    "POST /crypto/v1/keys/rekey": {"manage": "ROTATE_SOBJECTS", "widen": "UPDATE_KEY_OPS"},
    # One PATCH may rename, enable/disable and narrow key_ops at once: MANAGE.
    "PATCH /crypto/v1/keys/{kid}": {"manage": "MANAGE"},
    "POST /crypto/v1/keys/{kid}/activate": {"manage": "ACTIVATE_SOBJECTS"},
    "POST /crypto/v1/keys/{kid}/revoke": {"manage": "REVOKE_SOBJECTS"},
    "POST /crypto/v1/keys/{kid}/schedule_deletion": {"manage": "DELETE_SOBJECTS"},
    "POST /crypto/v1/keys/{kid}/cancel_deletion": {"manage": "DELETE_SOBJECTS"},
    "DELETE /crypto/v1/keys/{kid}": {"manage": "DELETE_SOBJECTS"},
    "POST /crypto/v1/keys/{kid}/destroy": {"manage": "DESTROY_SOBJECTS"},
    "POST /crypto/v1/keys/{kid}/delete_key_material": {"manage": "DELETE_KEY_MATERIAL"},
    "DELETE /crypto/v1/keys/{kid}/private": {"manage": "DELETE_KEY_MATERIAL"},
    "PUT /crypto/v1/keys/{kid}/revert": {"manage": "REVERT_SOBJECTS"},
    "POST /crypto/v1/keys/{kid}/restore": {"manage": "RESTORE_EXTERNAL_SOBJECTS"},
}


def check_app_permission(p: Principal, group_id: str, check: str) -> None:
    """An app may do what its operation asks in ``group_id`` only with the
    permission :data:`PERMISSIONS` names for it there (DSM's app permissions)."""
    if p.permissions is None:
        return
    op = OPERATION.get()
    need = PERMISSIONS.get(op or "", {}).get(check)
    if need is None:  # a path or check the table does not know: refuse
        raise AppPermissionDenied(f"no app permission covers {check} on {op}")
    if need not in p.permissions.get(group_id, frozenset()):
        raise AppPermissionDenied(f"the app lacks the {need} permission in the key's group")


# -- access rules --------------------------------------------------------------


def require_admin(p: Principal) -> None:
    if not p.is_admin:
        raise Forbidden("this operation is for administrators")


def can_see_key(p: Principal, key: KeyRow) -> bool:
    """Stored keys: by group. A transient key: only the principal that made it,
    even on a connection that other principals use with per-request ``auth``."""
    if key.transient:
        return key.creator == p.creator()
    return p.is_admin or key.group_id in p.groups


#: Operations that protect new data: refused once a key is deactivated or
#: compromised, which may still process (decrypt, verify, unwrap, check a MAC)
#: what it protected before, as in DSM and KMIP.
PROTECT_OPS = frozenset(
    {"ENCRYPT", "SIGN", "WRAPKEY", "MACGENERATE", "AGREEKEY", "DERIVEKEY", "EXPORT"}
)


def state_of(key: KeyRow, now: float | None = None) -> str:
    """A key's lifecycle state now: the stored one, moved on by its dates."""
    if key.state in ("Deactivated", "Compromised", "Destroyed"):
        return key.state
    t = time.time() if now is None else now
    if key.deactivation_date and stamp_time(key.deactivation_date) <= t:
        return "Deactivated"
    if key.activation_date and stamp_time(key.activation_date) > t:
        return "PreActive"
    if key.state == "PreActive" and not key.activation_date:
        return "PreActive"  # waits for POST .../activate
    return "Active"


def check_key_use(p: Principal, key: KeyRow, op: str, now: float | None = None) -> None:
    """May ``p`` perform ``op`` (a key_ops name) with ``key``, now?"""
    if not can_see_key(p, key):
        # The answer for a key that does not exist: names cannot be probed.
        raise NotFound("no such key")
    if op not in key.key_ops:
        raise KeyOpNotPermitted(f"the key's key_ops do not include {op}")
    check_app_permission(p, key.group_id, op)
    if not key.enabled:
        raise Forbidden("the key is disabled")
    if key.deletion_date:
        raise Forbidden("the key is scheduled for deletion (cancel_deletion to use it again)")
    state = state_of(key, now)
    if state == "Destroyed":
        raise Forbidden("the key's material is destroyed")
    if state == "PreActive":
        raise Forbidden("the key is not active yet")
    if state != "Active" and op in PROTECT_OPS:
        raise Forbidden(f"the key is {state.lower()}: it may only decrypt, verify and unwrap")


def check_key_manage(p: Principal, key: KeyRow) -> None:
    if p.is_admin:
        return
    if not can_see_key(p, key):
        raise Forbidden("the key is not in any of your groups")
    if key.creator.get(p.kind) != p.id and "APPMANAGEABLE" not in key.key_ops:
        raise Forbidden("only the key's creator may manage it (it lacks APPMANAGEABLE)")
    check_app_permission(p, key.group_id, "manage")


def check_key_read(p: Principal, key: KeyRow) -> None:
    """May ``p`` learn something computed from the key's value alone (a KCV)?"""
    if not can_see_key(p, key):
        raise NotFound("no such key")
    check_app_permission(p, key.group_id, "read")


def check_group_target(p: Principal, group_id: str | None) -> str:
    """The group a new key goes to: the one asked for, or the caller's default."""
    gid = group_id or p.default_group
    if gid is None:
        if p.is_admin or len(p.groups) != 1:
            raise BadRequest("group_id is required", code="missing_field")
        gid = next(iter(p.groups))
    if not p.is_admin and gid not in p.groups:
        raise Forbidden("you may create keys only in your own groups")
    check_app_permission(p, gid, "create")
    return gid
