"""Key lifecycle as DSM has it: states, rotation with versions, scheduled deletion.

A mixin of :class:`strongroomd.keyring.Keyring` (it uses the keyring's
lookup, reservations and change machinery), kept apart because it is a
family of operations of its own: activate, revoke, schedule and cancel
deletion, destroy, drop a private half, rekey, and the clock-driven
:meth:`Lifecycle.tick`.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from strongroomd.auth import Principal, check_app_permission, check_key_manage, state_of
from strongroomd.context import Owner
from strongroomd.errors import BadRequest, Conflict
from strongroomd.keyref import NewKey
from strongroomd.keyspec import (
    MAX_NAME,
    PRIVATE_OPS,
    REVOCATION_CODES,
    check_date,
    check_metadata,
    check_name,
    check_rotation_policy,
    choose_ops,
    next_rotation,
    ref_of,
)
from strongroomd.store import KeyRow, now_stamp, stamp_time

if TYPE_CHECKING:
    from strongroomd.keyring import Keyring

log = logging.getLogger("strongroomd.keyring")


class Lifecycle:
    async def _transition(
        self: Keyring, owner: Owner, principal: Principal, kid: str, fn: Callable[[KeyRow], KeyRow]
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

    async def activate(self: Keyring, owner: Owner, principal: Principal, kid: str) -> KeyRow:
        def fn(cur: KeyRow) -> KeyRow:
            state = state_of(cur, self.clock())
            if state == "Active":
                return cur
            if state != "PreActive":
                raise Conflict(f"a {state} key cannot be activated", code="conflict")
            return replace(cur, state="Active", activation_date=now_stamp(self.clock()))

        return await self._transition(owner, principal, kid, fn)

    async def revoke(
        self: Keyring, owner: Owner, principal: Principal, kid: str, reason: dict[str, Any]
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
            ended = cur.deactivation_date
            if ended is None or stamp_time(ended) > self.clock():
                ended = now  # revoked now, not at a date still ahead
            return replace(
                cur,
                state="Compromised" if compromised else "Deactivated",
                deactivation_date=ended,
                compromise_date=(when or now) if compromised else cur.compromise_date,
                revocation_reason=dict(reason),
                rotation_policy=None,
                scheduled_rotation=None,
            )

        return await self._transition(owner, principal, kid, fn)

    async def schedule_deletion(
        self: Keyring, owner: Owner, principal: Principal, kid: str, days: int
    ) -> KeyRow:
        """The key is unusable from now on and deleted after ``days`` (cancellable)."""
        when = now_stamp(self.clock() + days * 86400)
        return await self._transition(
            owner, principal, kid, lambda c: replace(c, deletion_date=when)
        )

    async def cancel_deletion(
        self: Keyring, owner: Owner, principal: Principal, kid: str
    ) -> KeyRow:
        def fn(cur: KeyRow) -> KeyRow:
            if not cur.deletion_date:
                raise Conflict("the key is not scheduled for deletion", code="conflict")
            return replace(cur, deletion_date=None)

        return await self._transition(owner, principal, kid, fn)

    async def destroy(self: Keyring, owner: Owner, principal: Principal, kid: str) -> KeyRow:
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

    async def delete_private(self: Keyring, owner: Owner, principal: Principal, kid: str) -> KeyRow:
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
        self: Keyring,
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
        self: Keyring,
        cur: KeyRow,
        principal: Principal,
        new_kid: str,
        rotated: str,
        changes: dict[str, Any],
        deactivate_old: bool,
    ) -> tuple[KeyRow, KeyRow]:
        now = self.clock()
        imported = changes.get("value") is not None  # rotation onto a given value
        ops = choose_ops(cur.obj_type, changes.get("key_ops", cur.key_ops), imported=imported)
        if set(ops) - set(cur.key_ops):  # rights the old version did not give
            check_app_permission(principal, cur.group_id, "widen")
        size = changes.get("key_size", cur.key_size if cur.obj_type != "EC" else None)
        curve = changes.get("elliptic_curve", cur.elliptic_curve)
        policy = (
            check_rotation_policy(changes["rotation_policy"])
            if "rotation_policy" in changes
            else cur.rotation_policy
        )
        new_key = NewKey(new_kid, cur.name, cur.obj_type, size, curve, "EXPORT" in ops, False)
        shared = self.store.sharing
        if shared is not None:  # not an orphan to another node's start-up
            await shared.reserve_kid(new_kid)
        try:
            return await self._rotate_made(
                cur, principal, new_key, ops, policy, changes, now, rotated, deactivate_old
            )
        finally:
            if shared is not None:
                with contextlib.suppress(Exception):
                    await shared.release_kid(new_kid)

    async def _rotate_made(
        self: Keyring,
        cur: KeyRow,
        principal: Principal,
        new_key: NewKey,
        ops: list[str],
        policy: Any,
        changes: dict[str, Any],
        now: float,
        rotated: str,
        deactivate_old: bool,
    ) -> tuple[KeyRow, KeyRow]:
        new_kid = new_key.kid
        value = changes.get("value")
        if value is None:
            mat = await self.token.generate(new_key)
        else:  # DSM's rotation by import: the new version holds the given value
            mat = await self.token.import_key(new_key, value)
        try:
            if mat.obj_type != cur.obj_type or mat.public_only:
                raise BadRequest(
                    f"the value is not a {cur.obj_type} key with its private part",
                    code="invalid_value",
                )
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

    def _rotated_name(self: Keyring, name: str) -> str:
        base = f"{name} (rotated at {now_stamp(self.clock())})"
        out, n = base, 1
        while out in self.store.key_names or out in self._reserved:
            n += 1
            out = f"{base} #{n}"
        return check_name(out[:MAX_NAME])

    async def tick(self: Keyring, now: float | None = None) -> dict[str, list[str]]:
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
