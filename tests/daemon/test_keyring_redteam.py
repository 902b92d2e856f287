"""Red-team cases against the keyring rework (bc0924e, 7e79436), on a real daemon.

Each test here reproduces a finding and FAILS on the code it was written
against; its comment says what the attack is and what should happen instead.
Races are deterministic: the test parks the token thread by holding
``state/token.lock`` exclusively (see test_keyring.py), or parks the daemon's
SQLite thread by holding the database's write lock (``BEGIN IMMEDIATE`` from
the test process; the daemon's connection waits up to its 5 s busy timeout,
so every hold here is shorter than that unless the test says otherwise).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, Raw, start_daemon, unique
from tests.daemon.api.helpers import new_app, new_group, new_key, ok
from tests.daemon.test_keyring import token_held, token_parked


@contextlib.contextmanager
def db_held(d: Daemon) -> Iterator[None]:
    """Park the daemon's SQLite writer at its next write until the block ends."""
    db = sqlite3.connect(d.state_dir / "strongroom.db", isolation_level=None, timeout=10)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


# -- 1. group deletion races a key creation into that group -------------------------


def test_group_delete_racing_a_key_creation_leaves_a_key_in_no_group(tmp_path: Path) -> None:
    # Attack: DELETE /sys/v1/groups/G checks "no key, no member, no creation in
    # flight" under the catalog lock, then awaits the SQLite delete. Key
    # creations never take the catalog lock and check only `G in store.groups`,
    # which stays true until the delete's await returns. A creation that
    # arrives during that await passes target_group(), and both requests are
    # answered success: the group is gone (204) and a key lives in it (200).
    # Expected: one of the two fails (the creation 404 no group, or the delete
    # 409 group_not_empty); never a key whose group does not exist.
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        other = Raw(d.socket)  # a second admin client (an automation, say)
        other.login(d.admin_key)
        g = new_group(admin)
        with db_held(d):
            rdel = admin.send("DELETE", f"/sys/v1/groups/{g}")
            time.sleep(0.3)  # ordering only: the delete has passed its checks
            rkey = other.send(
                "POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES", "group_id": g}
            )
            time.sleep(0.3)
        deleted, created = admin.recv(), other.recv()
        assert deleted["id"] == rdel and created["id"] == rkey
        group_gone = deleted["status"] == 204
        key_made = created["status"] == 200
        assert not (group_gone and key_made), (
            "group deleted and a key created in it",
            deleted,
            created,
        )
    finally:
        d.stop()


# -- 2. a plugin's principal is frozen for its invocation -------------------------

_PLUGIN = """
function run(input)
  -- a token write: the test parks it, and the admin acts meanwhile
  local t = Sobject.create{obj_type="AES", key_size=256, transient=true}
  local k = Sobject{kid=input.kid}
  if not k then return {seen=false, encrypted=false} end
  local r = k:encrypt{plain=Blob.from_bytes("after revocation")}
  return {seen=true, encrypted=(r ~= nil)}
end
"""


@pytest.mark.parametrize("revoke", ["remove_from_group", "disable", "delete"])
def test_a_revoked_plugin_keeps_using_keys_for_the_rest_of_its_invocation(
    daemon: Daemon, admin_raw: Raw, revoke: str
) -> None:
    # Attack: a plugin in groups [G2, G] is invoked; while it runs, the admin
    # removes it from G (or disables it, or deletes it) and is told 200/204.
    # The invocation's principal is the plugin row as it was when the
    # invocation started (dispatch.authenticate returns owner.principal), so
    # the running plugin still finds and encrypts with G's key afterwards (up
    # to wall_seconds, which the admin can set high). An app is re-read on every
    # request (Authenticator.resolve); a plugin should be too.
    # Expected: once the admin's change is acknowledged, the plugin's next
    # request does not reach G's key (404), or fails as unauthenticated.
    g, g2 = new_group(admin_raw), new_group(admin_raw)
    key = new_key(admin_raw, g)
    plugin = ok(
        admin_raw.call(
            "POST",
            "/sys/v1/plugins",
            {
                "name": unique("p"),
                "groups": [g2, g],
                "source": {"language": "LUA", "code": _PLUGIN},
            },
        )
    )
    pid = plugin["plugin_id"]
    app = new_app(daemon, admin_raw, [g2])
    try:
        with token_held(daemon):
            rid = app.conn.send("POST", f"/sys/v1/plugins/{pid}", {"kid": key["kid"]})
            token_parked(daemon)  # the plugin is parked at the token
            if revoke == "remove_from_group":
                r = admin_raw.call("PATCH", f"/sys/v1/plugins/{pid}", {"del_groups": [g]})
            elif revoke == "disable":
                r = admin_raw.call("PATCH", f"/sys/v1/plugins/{pid}", {"enabled": False})
            else:
                r = admin_raw.call("DELETE", f"/sys/v1/plugins/{pid}")
            assert r["status"] in (200, 204), r
        out = app.conn.recv()
        assert out["id"] == rid
        assert not (out["status"] == 200 and out["body"]["encrypted"]), (
            f"plugin used group G's key after '{revoke}' was acknowledged",
            out,
        )
    finally:
        app.conn.close()


# -- 3. max_transient_keys is checked before the await, counted after it ---------------


def test_pipelined_transient_creations_exceed_max_transient_keys(tmp_path: Path) -> None:
    # Attack: Keyring._make checks len(owner.transient) >= max_transient_keys
    # synchronously, but the key joins owner.transient only after the token
    # answered. Pipelining N creations on one connection lets all N pass the
    # check (here 20 with a cap of 2; in general up to max_inflight per
    # connection beyond the cap, per connection). No token hold is needed for
    # the bug; the hold only makes the count exact.
    # Expected: at most max_transient_keys succeed; the rest 413 too_large.
    d = start_daemon(tmp_path, config="max_transient_keys = 2\n")
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        app = new_app(d, admin, [new_group(admin)])
        with token_held(d):
            ids = [
                app.conn.send("POST", "/crypto/v1/keys", {"obj_type": "AES", "transient": True})
                for _ in range(20)
            ]
            time.sleep(0.5)
        statuses = [app.conn.recv()["status"] for _ in ids]
        held = [k for k in ok(app.call("GET", "/crypto/v1/keys", {})) if k["transient"]]
        assert statuses.count(200) <= 2, statuses
        assert len(held) <= 2, len(held)
    finally:
        d.stop()


# -- 4. persist narrows key_ops in the row, not in the token -------------------------


def test_persist_without_export_leaves_the_token_object_extractable(
    daemon: Daemon, admin_raw: Raw
) -> None:
    # Attack: make a transient AES key with EXPORT, persist it with key_ops
    # narrowed to [ENCRYPT, DECRYPT]. The row refuses export (403), but
    # Core.persist copies the session object with only TOKEN/ID/LABEL set, so
    # the stored object keeps CKA_SENSITIVE=false / CKA_EXTRACTABLE=true and
    # its value can be read from the token with the PIN (a backup, a PKCS#11
    # tool). Keyring.persist even passes exportable="EXPORT" in src.key_ops.
    # The same key created or imported or unwrapped without EXPORT is
    # sensitive; issue 8 case 9 and the rework's "removing EXPORT makes the
    # token object sensitive and unextractable too" say the token must agree.
    # Later narrowing cannot repair it (update only restricts when the row
    # still holds EXPORT).
    # Expected: the persisted object is sensitive and unextractable.
    app = new_app(daemon, admin_raw, [new_group(admin_raw)])
    try:
        t = ok(
            app.call(
                "POST",
                "/crypto/v1/keys",
                {"obj_type": "AES", "transient": True, "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"]},
            )
        )
        kept = ok(
            app.call(
                "POST",
                "/crypto/v1/keys/persist",
                {
                    "key": {"transient_key": t["transient_key"]},
                    "name": unique("kept"),
                    "key_ops": ["ENCRYPT", "DECRYPT"],
                },
            )
        )
        assert "EXPORT" not in kept["key_ops"]
        assert app.call("POST", "/crypto/v1/keys/export", {"kid": kept["kid"]})["status"] == 403
        read = daemon.read_secret(kept["kid"])
        assert read.returncode != 0 and not read.stdout, (
            "the token gives out the value of a key persisted without EXPORT",
            read.stdout.hex(),
        )
    finally:
        app.conn.close()


# -- 5. narrowing EXPORT: the token changes first, irreversibly -------------------------


def test_kill9_while_narrowing_export_leaves_a_key_that_claims_export_but_cannot(
    tmp_path: Path,
) -> None:
    # Attack (crash consistency): PATCH key_ops to drop EXPORT runs
    # token.restrict (CKA_EXTRACTABLE off, irreversible) and only then the row's
    # compare-and-set. A kill -9 (or any failed row write: hold the database
    # lock past the 5 s busy timeout and the PATCH answers 500 with the token
    # already restricted) between the two leaves the row with EXPORT and the
    # token refusing: after restart the key lists EXPORT and export answers
    # 400 "the key is not exportable" for ever.
    # Expected: after the restart the row and the token agree: either key_ops
    # lost EXPORT, or export works. (Narrowing the row first and then the token,
    # with reconcile re-applying restrict to rows without EXPORT, gives that.)
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        g = new_group(admin)
        k = ok(
            admin.call(
                "POST",
                "/crypto/v1/keys",
                {
                    "obj_type": "AES",
                    "name": unique("k"),
                    "group_id": g,
                    "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"],
                },
            )
        )
        with db_held(d):
            admin.send("PATCH", f"/crypto/v1/keys/{k['kid']}", {"key_ops": ["ENCRYPT", "DECRYPT"]})
            time.sleep(1.0)  # the restrict is done; the row write waits on SQLite
            d.kill9()
        d.start()
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        row = ok(admin.call("GET", f"/crypto/v1/keys/{k['kid']}"))
        if "EXPORT" in row["key_ops"]:
            out = admin.call("POST", "/crypto/v1/keys/export", {"kid": k["kid"]})
            assert out["status"] == 200, ("key_ops say EXPORT, the token refuses", row, out)
    finally:
        d.stop()


# -- 6. a rename decided on a read taken before the previous writer finished ----------


def test_a_rename_to_the_current_name_is_dropped_while_another_rename_waits(
    daemon: Daemon, admin_raw: Raw
) -> None:
    # Attack (stale decision): Keyring.update decides whether a PATCH renames by
    # comparing patch.name with the row read *before* the per-kid lock
    # (`patch.name != row.name`). The app renames key "a" -> "b" and parks at
    # the token; the admin then PATCHes {name: "a", description: ...}. Its
    # read still says "a", so it is treated as no rename; it runs after the
    # app's rename, applies only the description and answers 200 with the key
    # named "b". Serially (app, then admin) the key would be named "a".
    # Expected: the key ends named "a" (the admin's PATCH ran last), or the
    # admin's PATCH is refused (409); never 200 with its name silently dropped.
    app = new_app(daemon, admin_raw, [new_group(admin_raw)])
    try:
        a = unique("a")
        kid = ok(app.call("POST", "/crypto/v1/keys", {"obj_type": "AES", "name": a}))["kid"]
        with token_held(daemon):
            app.conn.send("PATCH", f"/crypto/v1/keys/{kid}", {"name": unique("b")})
            token_parked(daemon)  # the app's rename is at the token first
            rid = admin_raw.send(
                "PATCH", f"/crypto/v1/keys/{kid}", {"name": a, "description": "named a"}
            )
            time.sleep(0.3)
        assert app.conn.recv()["status"] == 200
        out = admin_raw.recv()
        assert out["id"] == rid
        final = ok(admin_raw.call("GET", f"/crypto/v1/keys/{kid}"))
        if out["status"] == 200:
            assert final["name"] == a, ("admin's rename answered 200 but dropped", out, final)
    finally:
        app.conn.close()


# -- 7. 404 vs 403 on groups tells an app which group ids exist -------------------------


def test_group_lookup_does_not_tell_an_app_which_groups_exist(
    daemon: Daemon, admin_raw: Raw
) -> None:
    # Attack (existence oracle): an app learns other groups' ids from the
    # plugins it may invoke (GET /sys/v1/plugins lists each plugin's `groups`,
    # including groups the app is not in), then GET /sys/v1/groups/{id}
    # answers 403 "you are not in this group" for a group that exists and 404
    # for one that does not. Keys, plugins and apps answer alike for
    # "missing" and "not yours"; groups should too.
    # Expected: the same status and code for another group's id and a random id.
    mine, theirs = new_group(admin_raw), new_group(admin_raw)
    ok(
        admin_raw.call(
            "POST",
            "/sys/v1/plugins",
            {
                "name": unique("p"),
                "groups": [mine, theirs],
                "source": {"language": "LUA", "code": "function run() return 1 end"},
            },
        )
    )
    app = new_app(daemon, admin_raw, [mine])
    try:
        listed = {g for p in ok(app.call("GET", "/sys/v1/plugins")) for g in p["groups"]}
        assert listed == {mine}  # a plugin no longer shows an app the groups it is not in
        existing = app.call("GET", f"/sys/v1/groups/{theirs}")
        missing = app.call("GET", f"/sys/v1/groups/{uuid.uuid4()}")
        assert (existing["status"], existing["body"]["error"]) == (
            missing["status"],
            missing["body"]["error"],
        ), (existing, missing)
    finally:
        app.conn.close()
