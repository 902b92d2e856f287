"""PgStore on a real PostgreSQL: migrations by name, compare-and-set, conflicts."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from strongroomd.errors import Conflict, NotFound
from strongroomd.pgstore import PgStore, migrations
from strongroomd.store import GroupRow, PrincipalRow, Stale, now_stamp

from tests.conftest import unique
from tests.multinode.pg import Postgres


def fresh(postgres: Postgres) -> str:
    return postgres.create_db(unique("st").replace("-", "_"))


def test_every_sqlite_migration_has_a_postgresql_form() -> None:
    names = [n for n, _ in migrations()]
    assert names[0] == "base" and names[-1].startswith("shared:")
    from strongroomd.store import MIGRATIONS

    assert [n for n in names if n.startswith("sqlite:")] == [
        f"sqlite:{i}" for i in range(1, len(MIGRATIONS) + 1)
    ]


def test_an_app_from_before_the_permissions_step_gets_them(postgres: Postgres) -> None:
    url = fresh(postgres)
    steps = migrations()
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY)")
        for name, sql in steps[:3]:  # base, sqlite:1, sqlite:2
            for stmt in filter(str.strip, sql.split(";")):
                db.execute(stmt)
            db.execute("INSERT INTO schema_migrations VALUES (%s)", (name,))
        db.execute(
            "INSERT INTO principals (id, kind, name, groups, created_at) "
            "VALUES ('a1', 'app', 'old-app', '[\"g1\", \"g2\"]', 'now')"
        )

    async def run() -> PrincipalRow:
        store = PgStore(url, "n1")
        await store.open()
        try:
            return store.principals["a1"]
        finally:
            await store.close()

    row = asyncio.run(run())
    assert set(row.permissions) == {"g1", "g2"}
    assert "ENCRYPT" in row.permissions["g1"] and "MANAGE" in row.permissions["g2"]
    with psycopg.connect(url) as db:  # a second start applies nothing twice
        names = [r[0] for r in db.execute("SELECT name FROM schema_migrations")]
    assert sorted(names) == sorted(n for n, _ in steps)


def test_compare_and_set_and_name_conflicts_between_two_stores(postgres: Postgres) -> None:
    url = fresh(postgres)

    async def run() -> None:
        a, b = PgStore(url, "a"), PgStore(url, "b")
        await a.open()
        await b.open()
        try:
            g = GroupRow("g-1", "one", "", now_stamp())
            await a.insert(g)
            with pytest.raises(Conflict):  # a taken name: 409, never a replace
                await b.insert(GroupRow("g-2", "one", "", now_stamp()))
            # b has heard of g (the insert waited for b's confirmation)
            assert b.groups["g-1"].name == "one"
            stale = b.groups["g-1"]
            await a.change(
                GroupRow, "g-1", lambda r: GroupRow(r.id, r.name, "x", r.created_at, r.version)
            )
            with pytest.raises(Stale):  # a write on a version that moved
                await b._write(
                    stale, GroupRow(stale.id, stale.name, "y", stale.created_at, stale.version + 1)
                )
            assert b.groups["g-1"].description == "x"
            await b.delete(b.groups["g-1"])
            assert "g-1" not in a.groups
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())
    with psycopg.connect(url) as db:
        assert db.execute("SELECT count(*) FROM groups").fetchone()[0] == 0


def test_one_node_does_the_clocks_work_and_another_takes_over(postgres: Postgres) -> None:
    url = fresh(postgres)

    async def run() -> None:
        a, b = PgStore(url, "a"), PgStore(url, "b")
        await a.open()
        await b.open()
        try:
            assert await a.leads() and await a.leads()
            assert not await b.leads()
            await a.close()  # its connection ends: the lock is free
            assert await b.leads()
        finally:
            await b.close()

    asyncio.run(run())


def test_a_group_and_a_key_in_it_cannot_cross_between_nodes(postgres: Postgres) -> None:
    """One node's emptiness check and another's key creation are not serialized by
    the nodes' locks; the database's foreign key refuses whichever comes second."""
    from dataclasses import replace

    from strongroomd.store import KeyRow

    url = fresh(postgres)

    def key(kid: str, group: str) -> KeyRow:
        return KeyRow(
            kid,
            unique("k"),
            "AES",
            256,
            None,
            ["ENCRYPT"],
            group,
            "",
            {},
            now_stamp(),
            {"user": "x"},
            True,
            None,
            False,
        )

    async def run() -> None:
        a, b = PgStore(url, "a"), PgStore(url, "b")
        await a.open()
        await b.open()
        try:
            await a.insert(GroupRow("g-1", "one", "", now_stamp()))
            await b.insert(key("k-1", "g-1"))
            with pytest.raises(Conflict) as exc:  # a group that holds keys stays
                await a.delete(a.groups["g-1"])
            assert exc.value.code == "group_not_empty"
            await b.delete(b.keys["k-1"])
            await a.delete(a.groups["g-1"])
            with pytest.raises(NotFound):  # and no key goes into a group that is gone
                await b.insert(replace(key("k-2", "g-1")))  # (404, as on one node)
            assert "k-2" not in b.keys
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())
