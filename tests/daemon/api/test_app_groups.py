"""DSM's AppRequest groups (add_groups / mod_groups / del_groups, default_group)
and the App view's ``groups`` map; the migration that gave existing apps every
permission in their groups."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from strongroomd.auth import APP_PERMISSIONS, principal_of
from strongroomd.store import MIGRATIONS, SCHEMA, Store

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import err, new_group, ok


def _create(admin: Raw, **body) -> dict:
    return ok(admin.call("POST", "/sys/v1/apps", {"name": unique("app"), **body}))


def test_the_old_list_form_still_works_and_gives_every_permission(admin_raw: Raw) -> None:
    g1, g2 = new_group(admin_raw), new_group(admin_raw)
    app = _create(admin_raw, groups=[g1, g2], default_group=g2)
    assert app["groups"] == {g1: list(APP_PERMISSIONS), g2: list(APP_PERMISSIONS)}
    assert app["default_group"] == g2 and app["credential"]["api_key"]
    # DSM's list form of add_groups means the same.
    app2 = _create(admin_raw, add_groups=[g1])
    assert app2["groups"] == {g1: list(APP_PERMISSIONS)} and app2["default_group"] == g1


def test_dsm_map_form_round_trips(admin_raw: Raw) -> None:
    g1, g2 = new_group(admin_raw), new_group(admin_raw)
    app = _create(
        admin_raw,
        add_groups={g1: ["decrypt", "ENCRYPT"], g2: ["SIGN"]},
        default_group=g1,
    )
    # DSM's order, upper case, each once
    assert app["groups"] == {g1: ["ENCRYPT", "DECRYPT"], g2: ["SIGN"]}
    assert ok(admin_raw.call("GET", f"/sys/v1/apps/{app['app_id']}"))["groups"] == app["groups"]
    listed = {a["app_id"]: a for a in ok(admin_raw.call("GET", "/sys/v1/apps"))}
    assert listed[app["app_id"]]["groups"] == app["groups"]
    # Both fields may come together; add_groups wins for a group named twice.
    both = _create(admin_raw, groups=[g1], add_groups={g1: ["MANAGE"], g2: []})
    assert both["groups"] == {g1: ["MANAGE"], g2: []}


def test_patch_adds_modifies_and_deletes_groups(admin_raw: Raw) -> None:
    g1, g2, g3 = new_group(admin_raw), new_group(admin_raw), new_group(admin_raw)
    aid = _create(admin_raw, add_groups={g1: ["ENCRYPT"]})["app_id"]
    path = f"/sys/v1/apps/{aid}"
    out = ok(admin_raw.call("PATCH", path, {"add_groups": {g2: ["DECRYPT"]}}))
    assert out["groups"] == {g1: ["ENCRYPT"], g2: ["DECRYPT"]}
    out = ok(admin_raw.call("PATCH", path, {"add_groups": [g3]}))  # list form: all
    assert out["groups"][g3] == list(APP_PERMISSIONS)
    out = ok(admin_raw.call("PATCH", path, {"mod_groups": {g1: ["EXPORT", "ENCRYPT"]}}))
    assert out["groups"][g1] == ["ENCRYPT", "EXPORT"]
    # add_groups as a list on a group the app is in keeps its permissions
    out = ok(admin_raw.call("PATCH", path, {"add_groups": [g1]}))
    assert out["groups"][g1] == ["ENCRYPT", "EXPORT"]
    out = ok(admin_raw.call("PATCH", path, {"del_groups": [g1], "default_group": g2}))
    assert out["groups"] == {g2: ["DECRYPT"], g3: list(APP_PERMISSIONS)}
    assert out["default_group"] == g2
    # Deleting the default group moves the default to a remaining group.
    out = ok(admin_raw.call("PATCH", path, {"del_groups": [g2]}))
    assert out["groups"] == {g3: list(APP_PERMISSIONS)} and out["default_group"] == g3
    # Strongroom's groups list replaces the membership; kept groups keep permissions.
    ok(admin_raw.call("PATCH", path, {"mod_groups": {g3: ["SIGN"]}}))
    out = ok(admin_raw.call("PATCH", path, {"groups": [g3, g1]}))
    assert out["groups"] == {g3: ["SIGN"], g1: list(APP_PERMISSIONS)}


def test_bad_group_requests_are_refused_clearly(admin_raw: Raw) -> None:
    g1, g2 = new_group(admin_raw), new_group(admin_raw)
    e = err(
        admin_raw.call(
            "POST", "/sys/v1/apps", {"name": unique(), "add_groups": {g1: ["ENCRYPT", "FLY"]}}
        ),
        "invalid_value",
    )
    assert "FLY" in e["message"] and "MASKDECRYPT" in e["message"]
    err(
        admin_raw.call("POST", "/sys/v1/apps", {"name": unique(), "add_groups": {g1: "ENCRYPT"}}),
        "invalid_value",
    )
    err(
        admin_raw.call("POST", "/sys/v1/apps", {"name": unique(), "add_groups": {}}),
        "invalid_value",
    )
    err(admin_raw.call("POST", "/sys/v1/apps", {"name": unique()}), "invalid_value")
    err(
        admin_raw.call("POST", "/sys/v1/apps", {"name": unique(), "add_groups": {"nope": []}}),
        "not_found",
    )
    err(
        admin_raw.call(
            "POST", "/sys/v1/apps", {"name": unique(), "add_groups": [g1], "del_groups": [g1]}
        ),
        "invalid_field",
    )
    aid = _create(admin_raw, add_groups={g1: ["ENCRYPT"]})["app_id"]
    path = f"/sys/v1/apps/{aid}"
    e = err(admin_raw.call("PATCH", path, {"mod_groups": {g2: ["SIGN"]}}), "invalid_value")
    assert "add_groups" in e["message"]
    err(admin_raw.call("PATCH", path, {"add_groups": [g2], "del_groups": [g2]}), "invalid_value")
    err(admin_raw.call("PATCH", path, {"del_groups": [g1]}), "invalid_value")  # none left
    err(admin_raw.call("PATCH", path, {"default_group": g2}), "invalid_value")
    # nothing of that changed the app
    assert ok(admin_raw.call("GET", path))["groups"] == {g1: ["ENCRYPT"]}


def test_only_admins_set_permissions(daemon, admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    app = _create(admin_raw, add_groups={g: ["MANAGE"]})
    conn = Raw(daemon.socket)
    try:
        conn.login(app["credential"]["api_key"])
        path = f"/sys/v1/apps/{app['app_id']}"
        err(conn.call("PATCH", path, {"mod_groups": {g: list(APP_PERMISSIONS)}}), "forbidden")
        assert ok(conn.call("GET", path))["groups"] == {g: ["MANAGE"]}  # it may see itself
    finally:
        conn.close()


def test_migration_keeps_every_existing_apps_rights(tmp_path: Path) -> None:
    """A database from before permissions (user_version 2, no permissions column):
    after the upgrade each app has every permission in each of its groups."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SCHEMA)
    for step in MIGRATIONS[:2]:
        db.executescript(step)
    db.execute("PRAGMA user_version = 2")
    for gid in ("g1", "g2"):
        db.execute("INSERT INTO groups (id, name, created_at) VALUES (?, ?, 'x')", (gid, gid))
    rows = [("app1", "app", '["g1", "g2"]'), ("app2", "app", "[]"), ("adm", "admin", "[]")]
    for pid, kind, groups in rows:
        db.execute(
            "INSERT INTO principals (id, kind, name, groups, created_at) VALUES (?, ?, ?, ?, 'x')",
            (pid, kind, pid, groups),
        )
    db.close()

    async def load() -> Store:
        store = Store(path)
        await store.open()
        await store.close()
        return store

    store = asyncio.run(load())
    app1 = store.principals["app1"]
    assert app1.permissions == {"g1": list(APP_PERMISSIONS), "g2": list(APP_PERMISSIONS)}
    assert store.principals["app2"].permissions == {}
    assert store.principals["adm"].permissions == {}
    p = principal_of(app1)
    assert p.permissions is not None and all(
        p.permissions[g] == frozenset(APP_PERMISSIONS) for g in ("g1", "g2")
    )
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    db.close()
