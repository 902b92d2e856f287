"""An app or plugin put in a group while the group is deleted: never both.

Keys are guarded by a foreign key (test_store.py); app and plugin memberships
are a JSON list, guarded by shared migration 3's triggers (row locks on the
groups, strongroomd.pgstore's docstring). Here: each order, forced one step
at a time on two PostgreSQL connections; then the same race through two nodes'
APIs, many attempts at once; then on one SQLite node.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import errors as pge
from strongroomd.errors import Conflict, NotFound
from strongroomd.pgstore import PgStore
from strongroomd.store import GroupRow, PluginRow, PrincipalRow, now_stamp

from tests.conftest import Daemon, Raw, start_daemon, unique
from tests.daemon.api.helpers import ok
from tests.multinode.conftest import Cluster, token_ids, wait_for, waits_on_a_lock
from tests.multinode.pg import Postgres

LUA = {"language": "LUA", "code": "function run(i) return 1 end"}


def fresh(postgres: Postgres) -> str:
    url = postgres.create_db(unique("mb").replace("-", "_"))

    async def migrate() -> None:  # a node's start applies the schema
        store = PgStore(url, "setup")
        await store.open()
        await store.close()

    asyncio.run(migrate())
    return url


def app_row(aid: str, groups: list[str]) -> PrincipalRow:
    return PrincipalRow(
        aid, "app", unique("app"), "", groups, groups[0], None, None, True, now_stamp(),
        permissions={g: ["ENCRYPT"] for g in groups},
    )  # fmt: skip


def waiting_on_a_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as db:
        (n,) = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ).fetchone()
    return n == 1


def second_waits_for_first(
    url: str, first: Callable[[Any], None], second: Callable[[Any], None]
) -> BaseException | None:
    """``first`` in an open transaction; ``second`` on another connection, which
    must block on ``first``'s lock; then ``first`` commits. What ``second`` raised."""
    a = psycopg.connect(url)
    b = psycopg.connect(url)
    out: list[BaseException | None] = []

    def run_second() -> None:
        try:
            with b.transaction():
                second(b)
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    try:
        with a.transaction():
            first(a)
            t = threading.Thread(target=run_second)
            t.start()
            # The second transaction is inside the lock wait before the first commits.
            assert wait_for(lambda: waiting_on_a_lock(url) or not t.is_alive())
            assert t.is_alive(), out
        t.join(30)
        assert not t.is_alive()
        return out[0]
    finally:
        a.close()
        b.close()


def insert_group(db: Any, gid: str) -> None:
    db.execute(
        "INSERT INTO groups (id, name, created_at) VALUES (%s, %s, 'now')", (gid, unique("g"))
    )


def add_member(table: str, gid: str, member: str) -> Callable[[Any], None]:
    def go(db: Any) -> None:
        (groups,) = db.execute(f"SELECT groups FROM {table} WHERE id = %s", (member,)).fetchone()
        db.execute(
            f"UPDATE {table} SET groups = %s WHERE id = %s",
            (json.dumps([*json.loads(groups), gid]), member),
        )

    return go


def delete_group(gid: str) -> Callable[[Any], None]:
    return lambda db: db.execute("DELETE FROM groups WHERE id = %s", (gid,))


@pytest.mark.parametrize("table", ["principals", "plugins"])
def test_each_order_forced_one_step_at_a_time(postgres: Postgres, table: str) -> None:
    url = fresh(postgres)
    with psycopg.connect(url, autocommit=True) as db:
        for gid in ("home", "g1", "g2"):
            insert_group(db, gid)
        if table == "principals":
            db.execute(
                "INSERT INTO principals (id, kind, name, groups, created_at) "
                "VALUES ('m', 'app', 'm', '[\"home\"]', 'now')"
            )
        else:
            db.execute(
                "INSERT INTO plugins (id, name, code, groups, enabled, version, created_at, "
                "updated_at) VALUES ('m', 'm', '', '[\"home\"]', 1, 1, 'now', 'now')"
            )

    # The member joins first (holding a share lock on g1); the delete waits, then
    # finds the member and fails.
    exc = second_waits_for_first(url, add_member(table, "g1", "m"), delete_group("g1"))
    assert isinstance(exc, pge.ForeignKeyViolation), exc
    assert exc.diag.constraint_name == "group_has_members"

    # The delete goes first (holding g2's row); the member's write waits, then finds
    # the group gone and fails.
    exc = second_waits_for_first(url, delete_group("g2"), add_member(table, "g2", "m"))
    assert isinstance(exc, pge.ForeignKeyViolation), exc
    assert exc.diag.constraint_name == "member_groups_exist"

    with psycopg.connect(url) as db:
        (groups,) = db.execute(f"SELECT groups FROM {table} WHERE id = 'm'").fetchone()
        left = {r[0] for r in db.execute("SELECT id FROM groups")}
    assert json.loads(groups) == ["home", "g1"] and left == {"home", "g1"}


def test_writes_that_keep_the_groups_take_no_lock(postgres: Postgres) -> None:
    """A secret reset or rename of an app does not wait for a group's delete."""
    url = fresh(postgres)
    with psycopg.connect(url, autocommit=True) as db:
        for gid in ("home", "g1"):
            insert_group(db, gid)
        db.execute(
            "INSERT INTO principals (id, kind, name, groups, created_at) "
            "VALUES ('m', 'app', 'm', '[\"home\"]', 'now')"
        )
    with psycopg.connect(url) as a, psycopg.connect(url, autocommit=True) as b:
        a.execute("SELECT 1 FROM groups WHERE id = 'home' FOR UPDATE")  # held, as a delete would
        b.execute("SET lock_timeout = '20s'")  # a wait fails the test instead of hanging it
        b.execute("UPDATE principals SET description = 'x' WHERE id = 'm'")  # no wait
        with pytest.raises(pge.LockNotAvailable):  # while a change of its groups waits
            b.execute("SET lock_timeout = '100ms'")
            b.execute("""UPDATE principals SET groups = '["home", "g1"]' WHERE id = 'm'""")
        a.rollback()


def test_the_store_answers_404_and_409(postgres: Postgres) -> None:
    """Through PgStore on two nodes whose caches do not help: the database refuses."""
    url = fresh(postgres)

    async def run() -> None:
        a, b = PgStore(url, "a"), PgStore(url, "b")
        await a.open()
        await b.open()
        try:
            await a.insert(GroupRow("g-1", unique("g"), "", now_stamp()))
            await a.insert(GroupRow("g-2", unique("g"), "", now_stamp()))
            await b.insert(app_row("app-1", ["g-1"]))
            with pytest.raises(Conflict) as exc:  # a group with an app stays
                await a.delete(a.groups["g-1"])
            assert exc.value.code == "group_not_empty"
            await a.delete(a.groups["g-2"])
            with pytest.raises(NotFound):  # no app goes into a group that is gone
                await b.insert(app_row("app-2", ["g-1", "g-2"]))
            now = now_stamp()
            plugin = PluginRow("p-1", unique("p"), "", "", ["g-2"], "g-2", True, 1, {}, now, now)
            with pytest.raises(NotFound):  # nor a plugin
                await b.insert(plugin)
            assert "app-2" not in b.principals and "p-1" not in b.plugins
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


# -- through the API: many attempts at once, then every answer checked against the end --

ROUNDS = 16


def race(
    admin: Raw, socks: dict[str, Any], key: str, flip: bool = False
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Rounds of: delete a fresh group (one node) while an app, a plugin and a key
    join it (the other node), the four released together. Then the final state:
    nothing names a missing group, and every 200 is true in it. The answers, and
    each key's name with its creation's status."""
    home = ok(admin.call("POST", "/sys/v1/groups", {"name": unique("home")}))["group_id"]
    app = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("app"), "groups": [home]}))
    plugin = ok(
        admin.call(
            "POST", "/sys/v1/plugins", {"name": unique("p"), "source": LUA, "add_groups": [home]}
        )
    )
    groups = [
        ok(admin.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]
        for _ in range(ROUNDS)
    ]

    def conn(node: str) -> Raw:
        r = Raw(socks[node])
        r.login(key)
        return r

    jobs = ("delete", "app", "plugin", "key")
    conns = {(n, j): conn(n) for n in socks for j in jobs}

    def step(job: str, node: str, gid: str, barrier: threading.Barrier) -> int:
        c = conns[(node, job)]
        barrier.wait()
        if job == "delete":
            r = c.call("DELETE", f"/sys/v1/groups/{gid}")
        elif job == "app":
            r = c.call("PATCH", f"/sys/v1/apps/{app['app_id']}", {"add_groups": [gid]})
        elif job == "plugin":
            r = c.call("PATCH", f"/sys/v1/plugins/{plugin['plugin_id']}", {"add_groups": [gid]})
        else:
            body = {"name": f"k-{gid}", "obj_type": "AES", "key_size": 128, "group_id": gid}
            r = c.call("POST", "/crypto/v1/keys", body)
        assert r["status"] in (200, 204, 404, 409), r  # a clean answer, never a 500
        return 200 if r["status"] == 204 else r["status"]

    nodes = sorted(socks)
    out: dict[str, list[int]] = {j: [] for j in jobs}
    with ThreadPoolExecutor(len(jobs)) as pool:
        for i, gid in enumerate(groups):
            deleter = nodes[(i + flip) % len(nodes)]
            joiner = nodes[(i + 1 + flip) % len(nodes)]
            barrier = threading.Barrier(len(jobs))
            futs = {
                j: pool.submit(step, j, deleter if j == "delete" else joiner, gid, barrier)
                for j in jobs
            }
            for j, f in futs.items():
                out[j].append(f.result())
    for c in conns.values():
        c.close()

    for node in socks:  # every node's view of the end
        c = conn(node)
        left = {g["group_id"] for g in ok(c.call("GET", "/sys/v1/groups"))}
        a = ok(c.call("GET", f"/sys/v1/apps/{app['app_id']}"))
        p = ok(c.call("GET", f"/sys/v1/plugins/{plugin['plugin_id']}"))
        keys = {k["name"]: k["group_id"] for k in ok(c.call("GET", "/crypto/v1/keys"))}
        c.close()
        assert set(a["groups"]) <= left and a["default_group"] in left
        assert set(p["groups"]) <= left and p["default_group"] in left
        assert set(keys.values()) <= left
        for i, gid in enumerate(groups):
            if out["delete"][i] == 200:
                assert gid not in left
            if out["app"][i] == 200:
                assert gid in a["groups"] and gid in left
            if out["plugin"][i] == 200:
                assert gid in p["groups"] and gid in left
            if out["key"][i] == 200:
                assert keys.get(f"k-{gid}") == gid and gid in left
    return out, {f"k-{gid}": out["key"][i] for i, gid in enumerate(groups)}


def check_database(url: str) -> None:
    with psycopg.connect(url) as db:
        left = {r[0] for r in db.execute("SELECT id FROM groups")}
        for table in ("principals", "plugins"):
            for (groups,) in db.execute(f"SELECT groups FROM {table}"):
                assert set(json.loads(groups)) <= left


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("pair"), postgres, names=("A", "B")).start()
    yield c
    c.stop()


@pytest.mark.parametrize("first", ["delete", "join"])
@pytest.mark.parametrize("member", ["app", "plugin"])
def test_two_nodes_forced_order(pair: Cluster, first: str, member: str) -> None:
    """Both nodes past their own checks, their writes held at the database in a
    chosen order (a third connection holds the group's row until both wait on it):
    the first one wins and the second is refused."""
    admin = pair["A"].connect(pair.admin_key)
    home = ok(admin.call("POST", "/sys/v1/groups", {"name": unique("home")}))["group_id"]
    gid = ok(admin.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]
    if member == "app":
        mid = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("app"), "groups": [home]}))[
            "app_id"
        ]
        path = f"/sys/v1/apps/{mid}"
    else:
        body = {"name": unique("p"), "source": LUA, "add_groups": [home]}
        path = f"/sys/v1/plugins/{ok(admin.call('POST', '/sys/v1/plugins', body))['plugin_id']}"
    admin.close()
    a, b = pair["A"].connect(pair.admin_key), pair["B"].connect(pair.admin_key)
    calls = {
        "delete": ("A", lambda: a.call("DELETE", f"/sys/v1/groups/{gid}")),
        "join": ("B", lambda: b.call("PATCH", path, {"add_groups": [gid]})),
    }
    order = [first, "join" if first == "delete" else "delete"]
    out: dict[str, dict[str, Any]] = {}
    with psycopg.connect(pair.url) as gate, ThreadPoolExecutor(2) as pool:
        gate.execute("SELECT 1 FROM groups WHERE id = %s FOR UPDATE", (gid,))
        futs = {}
        for what in order:  # each queued behind the gate before the next is sent
            node, call = calls[what]
            futs[what] = pool.submit(call)
            f = futs[what]
            assert wait_for(lambda node=node, f=f: waits_on_a_lock(pair.url, node) or f.done())
            assert not futs[what].done(), futs[what].result()  # it waits on the group's lock
        gate.rollback()
        out = {what: f.result(timeout=60) for what, f in futs.items()}
    a.close()
    b.close()
    if first == "delete":
        assert out["delete"]["status"] == 204, out
        assert out["join"]["status"] == 404, out
    else:
        assert out["join"]["status"] == 200, out
        assert out["delete"]["status"] == 409, out
        assert out["delete"]["body"]["error"] == "group_not_empty"
    check_database(pair.url)


def test_two_nodes_racing_deletes_and_joins(pair: Cluster) -> None:
    admin = pair["A"].connect(pair.admin_key)
    socks = {n: pair[n].socket for n in "AB"}
    gid = ok(admin.call("GET", "/sys/v1/groups"))[0]["group_id"]
    body = {"name": unique("k"), "obj_type": "AES", "key_size": 128, "group_id": gid}
    ok(admin.call("POST", "/crypto/v1/keys", body))  # the token lists at least one object
    out, keys = race(admin, socks, pair.admin_key)
    out2, keys2 = race(admin, socks, pair.admin_key, flip=True)
    admin.close()
    check_database(pair.url)
    # A refused key creation left no object in the shared token; a made one is there.
    labels = set(re.findall(r"label:\s+(\S+)", token_ids(pair)))
    for name, status in {**keys, **keys2}.items():
        assert (name in labels) == (status == 200), (name, status)
    print("two nodes:", out, out2)


def test_one_sqlite_node_racing_deletes_and_joins(tmp_path) -> None:
    d: Daemon = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        out, _ = race(admin, {"one": d.socket}, d.admin_key)
        admin.close()
        print("one node:", out)
    finally:
        assert d.stop() == 0
