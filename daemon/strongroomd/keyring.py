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
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from strongroomd import mechanisms
from strongroomd.auth import (
    Principal,
    can_see_key,
    check_group_target,
    check_key_manage,
    check_key_use,
)
from strongroomd.context import Owner
from strongroomd.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Internal,
    KeyOpNotPermitted,
    NotFound,
    TooLarge,
)
from strongroomd.keyref import KeyMaterial, NewKey
from strongroomd.keyspec import (
    ALG_FROM_KEY,
    Deleted,
    KeyPatch,
    KeySpec,
    check_name,
    choose_ops,
    next_rotation,
    patched,
    ref_of,
    with_alg,
)
from strongroomd.lifecycle import Lifecycle
from strongroomd.store import KeyRow, Store, now_stamp

if TYPE_CHECKING:
    from strongroomd._token import Token
    from strongroomd.config import Config

log = logging.getLogger("strongroomd.keyring")
T = TypeVar("T")
#: Batch items per token job.
CHUNK = 64


class Keyring(Lifecycle):
    """The one door to key rows and token writes (see the module's docstring).

    >>> row = await keyring.create(owner, principal, KeySpec("AES", name="k", key_size=256))
    >>> out = await keyring.operate(keyring.use(owner, principal, {"name": "k"}, "ENCRYPT"),
    ...                             "encrypt", {"plain": b"x"})
    """

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
        if store.sharing is not None:
            store.sharing.observers.append(self._heard)

    async def _heard(self, table: str, kid: str, old: Any, new: Any) -> bool:
        """Another node changed a key row (several nodes, one token): a new key's
        token object is found by its CKA_ID before its row is served here; a
        deleted or destroyed key's session copies are dropped.

        False when a new key's object cannot be found (the change is then not
        confirmed to its node, whose answer names this one); a later use looks
        it up again."""
        if table != "keys":
            return True
        try:
            if new is None or new.state == "Destroyed":
                await self.token.forget(kid)
            elif old is not None and set(old.key_ops) - set(new.key_ops):
                # Narrowed (EXPORT made unexportable in the token by the other node):
                # session copies made before go; the next use copies the object anew.
                await self.token.forget(kid)
            elif old is None:
                for delay in (0.0, 0.01, 0.05, 0.1, 0.25):
                    await asyncio.sleep(delay)
                    if await self.token.learn(kid):
                        return True
                log.error("key %s made by another node is not found in the token", kid)
                return False
        except Exception as exc:
            log.warning("token lookup of %s failed: %s", kid, exc)
            return False
        return True

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

    def manageable(self, owner: Owner, principal: Principal, kid: str) -> KeyRow:
        """A key the caller can see and manage (for paths that check, then refuse)."""
        row = self.find(owner, principal, {"kid": kid})
        check_key_manage(principal, row)
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
        if method in ALG_FROM_KEY:
            req = with_alg(row, req)
        out = await getattr(self.token, method)(ref_of(row), req)
        if method == "mac":
            out["digest"] = out["mac"]
        return out

    async def operate_many(
        self, row: KeyRow, method: str, reqs: list[dict]
    ) -> list[dict[str, Any] | ApiError]:
        """Many encrypts or decrypts with one AES/DES3 key from :meth:`use`, in token
        jobs of CHUNK items (a batch's fast path; other principals' work interleaves
        between the jobs); per item a result or its own error."""
        reqs = [with_alg(row, r) for r in reqs]
        decrypting = method == "decrypt"
        parts = await asyncio.gather(
            *(
                self.token.symmetric_many(ref_of(row), reqs[i : i + CHUNK], decrypting=decrypting)
                for i in range(0, len(reqs), CHUNK)
            )
        )
        return [out for part in parts for out in part]

    async def wrap(self, row: KeyRow, subject: KeyRow, req: dict) -> dict[str, Any]:
        """Wrap ``subject`` (found with :meth:`use` for EXPORT) under ``row`` (WRAPKEY)."""
        return await self.token.wrap(ref_of(row), ref_of(subject), with_alg(row, req))

    async def kcv(self, row: KeyRow, method: str) -> str:
        """The key check value of a key the caller can see (it reveals 24 or 40
        bits of one encryption, not the key)."""
        if method not in ("Encrypt", "Cmac"):
            raise BadRequest("kcv_method is Encrypt or Cmac", code="invalid_value")
        return await self.token.kcv(ref_of(row), method)

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
        req = with_alg(row, req)
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

    async def derive(
        self, owner: Owner, principal: Principal, base: Any, spec: KeySpec, mechanism: Any
    ) -> KeyRow:
        """DSM's derive: a new key from a base key the caller may DERIVEKEY with.

        ``encrypt_data`` runs in the token (C_DeriveKey, *_ENCRYPT_DATA): the new
        value never leaves it. ``hkdf``, which the token lacks, is computed here
        with ``cryptography`` from the base key's value, so it is only for base
        keys whose key_ops include EXPORT (a value that may leave the token anyway).
        """
        row = self.use(owner, principal, base, "DERIVEKEY")
        d = mechanisms.derive_spec(row.obj_type, spec.obj_type, spec.key_size, mechanism)
        ops = choose_ops(spec.obj_type, spec.key_ops, imported=False)
        if "EXPORT" in ops and "EXPORT" not in row.key_ops:
            # An exportable key derived from a sensitive one would read out
            # AES(base, chosen data): an encryption oracle under a key the caller
            # may not read or encrypt with. Derived keys keep the base's
            # sensitivity, as PKCS#11 tokens keep CKA_SENSITIVE.
            raise KeyOpNotPermitted(
                "the base key's key_ops lack EXPORT: a key derived from it cannot have EXPORT"
            )
        make: Callable[[NewKey], Awaitable[KeyMaterial]]
        if d.kind == "ENCRYPT_DATA":

            def make(new: NewKey) -> Awaitable[KeyMaterial]:
                return self.token.derive(ref_of(row), new, d)

        else:
            if "EXPORT" not in row.key_ops:
                raise KeyOpNotPermitted(
                    "hkdf is computed outside the token from the base key's value: "
                    "the base key needs EXPORT in its key_ops"
                )

            async def make(new: NewKey) -> KeyMaterial:
                value = mechanisms.hkdf(await self.token.export(ref_of(row)), d)
                return await self.token.import_key(new, value)

        return await self._make(owner, principal, spec, "EXPORT" in ops, make, lambda _m: ops)

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
            shared = None if transient else self.store.sharing
            try:
                if shared is not None:  # another node's start-up must not take it for an orphan
                    await shared.reserve_kid(new.kid)
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
                if shared is not None:
                    with contextlib.suppress(Exception):  # a start-up clears its own
                        await shared.release_kid(new.kid)
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
            new = patched(cur, patch, name, self.clock())
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
        if store.sharing is not None:
            # Several nodes: a key whose row another node wrote since this node read
            # the rows, or is about to write (reserved), is no orphan.
            orphans -= await store.sharing.claimed(orphans)
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
            if lost and store.shared:  # made by another node after this one's index
                lost = not await self.token.learn(row.kid)
            if lost != row.missing:
                try:
                    await store.change(
                        KeyRow, row.kid, lambda r, lost=lost: replace(r, missing=lost)
                    )
                except (NotFound, Conflict):  # another node deleted or changed it meanwhile
                    continue
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
