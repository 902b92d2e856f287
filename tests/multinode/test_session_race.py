"""A login on one node while another resets the app's secret (or disables or
deletes it): the session is refused, or stored before the change commits and
then ended by it. Never a session that outlives the change.

Forced at the database: the change holds the app's row (an open transaction)
while node b's session insert waits on it; then the change commits.
"""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest
from strongroomd.pgstore import SESSION_PUT, PgStore, token_hash
from strongroomd.store import GroupRow, PrincipalRow, now_stamp

from tests.conftest import unique
from tests.multinode.conftest import wait_for, waits_on_a_lock
from tests.multinode.pg import Postgres

OLD, NEW = b"\x01" * 32, b"\x02" * 32


def sessions(url: str, token: str) -> int:
    with psycopg.connect(url) as db:
        return db.execute(
            "SELECT count(*) FROM sessions WHERE token_hash = %s", (token_hash(token),)
        ).fetchone()[0]


CHANGES = {
    "reset": "UPDATE principals SET secret_hash = %s, version = version + 1 WHERE id = %s",
    "disable": "UPDATE principals SET enabled = 0, version = version + 1 WHERE id = %s",
    "delete": "DELETE FROM principals WHERE id = %s",
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_session_insert_waits_for_a_change_of_its_app(postgres: Postgres, change: str) -> None:
    url = postgres.create_db(unique("ss").replace("-", "_"))

    async def run() -> None:
        b = PgStore(url, "b")
        await b.open()
        try:
            await b.insert(GroupRow("g", unique("g"), "", now_stamp()))
            app = PrincipalRow(
                "app-1", "app", unique("app"), "", ["g"], "g", OLD, b"salt", True, now_stamp()
            )
            await b.insert(app)
            assert await b.session_put("t-ok", "app-1", 9e9, OLD)  # the plain case
            assert not await b.session_put("t-bad", "app-1", 9e9, NEW)  # another secret

            other = psycopg.connect(url)  # "node a", mid-change: it holds the app's row
            try:
                params = (NEW, "app-1") if change == "reset" else ("app-1",)
                other.execute(CHANGES[change], params)
                put = asyncio.create_task(b.session_put("t-1", "app-1", 9e9, OLD))
                waiting = lambda: waits_on_a_lock(url, "b") or put.done()  # noqa: E731
                held = await asyncio.to_thread(wait_for, waiting)
                assert held and not put.done()  # the insert waits for the change
                await asyncio.to_thread(other.commit)
                assert await put is False  # and then finds it: refused, nothing stored
            finally:
                other.close()  # a failed check must not leave b's insert waiting forever
        finally:
            await b.close()

    asyncio.run(run())
    assert sessions(url, "t-1") == 0 and sessions(url, "t-bad") == 0
    # A session stored before the change stays until the daemon's session DELETE,
    # which follows the change (Authenticator.drop_principal), as before.
    assert sessions(url, "t-ok") == 1


def test_a_change_waits_for_a_session_insert_in_progress(postgres: Postgres) -> None:
    """The other order: the insert holds the app's row (its share lock, here in an
    open transaction); a secret reset waits for it, so the session is there when
    the reset commits, and the reset's session DELETE (the daemon's next step)
    removes it."""
    url = postgres.create_db(unique("ss").replace("-", "_"))

    async def setup() -> None:
        b = PgStore(url, "b")
        await b.open()
        await b.insert(GroupRow("g", unique("g"), "", now_stamp()))
        app = PrincipalRow(
            "app-1", "app", unique("app"), "", ["g"], "g", OLD, b"salt", True, now_stamp()
        )
        await b.insert(app)
        await b.close()

    asyncio.run(setup())
    insert, reset = psycopg.connect(url), psycopg.connect(url, application_name="strongroomd:a")
    insert.execute(SESSION_PUT, (token_hash("t-2"), 9e9, "app-1", OLD))  # not committed yet
    done = threading.Event()

    def do_reset() -> None:
        reset.execute(CHANGES["reset"], (NEW, "app-1"))
        reset.commit()
        done.set()

    t = threading.Thread(target=do_reset)
    t.start()
    assert wait_for(lambda: waits_on_a_lock(url, "a") or done.is_set()) and not done.is_set()
    insert.commit()
    t.join(30)
    assert done.is_set()
    with psycopg.connect(url, autocommit=True) as db:
        assert db.execute("DELETE FROM sessions WHERE principal_id = 'app-1'").rowcount == 1
    insert.close()
    reset.close()
