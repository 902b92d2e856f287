"""The audit trail fails closed (issue 8, case 7), against the real daemon.

A full disk is simulated with RLIMIT_FSIZE on the daemon process, set from
here after start (as ``prlimit --pid PID --fsize=N`` does): every write past
the database's current end fails with EFBIG (the daemon ignores SIGXFSZ),
while the short log file stays writable, so the test can read what was logged.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.conftest import Daemon, Raw, start_daemon
from tests.daemon.api.helpers import err, new_app, new_group, new_key, ok
from tests.daemon.test_metrics import gateway_url

ENCRYPT = "/crypto/v1/encrypt"
FAILING = "audit log cannot be written"
RECOVERED = "audit log writable again"


@contextlib.contextmanager
def disk_full(d: Daemon) -> Iterator[None]:
    """Writes past the database's WAL end fail until the block ends."""
    assert d.proc is not None
    wal = d.state_dir / "strongroom.db-wal"
    limit = wal.stat().st_size
    assert d.log.stat().st_size + 65536 < limit  # the log itself stays writable
    inf = resource.RLIM_INFINITY
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, inf))
    try:
        yield
    finally:
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (inf, inf))


def _enc(kid: str) -> dict[str, Any]:
    return {"key": {"kid": kid}, "alg": "AES", "mode": "GCM", "plain": b"audit me"}


def encrypt_until_refused(conn: Raw, kid: str, most: int = 20000) -> int:
    """Encrypt until the daemon notices the log cannot be written; return the 200s."""
    for acked in range(most):
        resp = conn.call("POST", ENCRYPT, _enc(kid))
        if resp["status"] != 200:
            err(resp, "unavailable")
            assert resp["status"] == 503
            return acked
    raise AssertionError(f"{most} encrypts answered 200 with the audit log unwritable")


def until_ok(conn: Raw, method: str, path: str, body: Any, most: int = 600) -> dict[str, Any]:
    """The first 200 once the log is writable again (the daemon retries by itself)."""
    for _ in range(most):
        resp = conn.call(method, path, body)
        if resp["status"] == 200:
            return resp["body"]
        err(resp, "unavailable")
        time.sleep(0.05)
    raise AssertionError(f"{method} {path} still refused after the disk freed up")


def records(d: Daemon, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"{(d.state_dir / 'strongroom.db').as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def test_full_disk_refuses_use_and_change_then_recovers_whole(tmp_path) -> None:
    """(a) with writes failing: encrypt and key creation get 503, reads are served;
    (b) once they succeed again, no restart, and verify covers every 200."""
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        g = new_group(admin)
        app = new_app(d, admin, [g])
        kid = new_key(app.conn, g)["kid"]
        ok(app.call("POST", ENCRYPT, _enc(kid)))
        acked = 1
        with disk_full(d):
            acked += encrypt_until_refused(app.conn, kid)
            for _ in range(20):  # refused from now on, not now and then
                err(app.call("POST", ENCRYPT, _enc(kid)), "unavailable")
            body = {"name": "while-full", "obj_type": "AES", "group_id": g}
            assert err(app.call("POST", "/crypto/v1/keys", body), "unavailable")
            err(admin.call("POST", "/sys/v1/groups", {"name": "while-full"}), "unavailable")
            ok(app.call("GET", "/crypto/v1/keys"))  # a read changes nothing: served
            out = ok(admin.call("GET", "/sys/v1/logs/verify"))
            assert out["ok"] is False and out["unwritten"] > 0, out
        # No restart: the daemon's retries find the disk writable again.
        until_ok(app.conn, "POST", ENCRYPT, _enc(kid))
        acked += 1
        names = [k["name"] for k in ok(app.call("GET", "/crypto/v1/keys"))]
        assert "while-full" not in names  # the refused creation left nothing behind
        ok(app.call("POST", "/crypto/v1/keys", body))  # and its name is free
        out = ok(admin.call("GET", "/sys/v1/logs/verify"))
        assert out["ok"] is True and out["unwritten"] == 0, out
        logged = ok(admin.call("GET", "/sys/v1/logs", {"object_id": kid, "limit": 10000}))
        uses = [r for r in logged if r["action"] == f"POST {ENCRYPT}" and r["status"] == 200]
        assert len(uses) == acked  # every acknowledged encrypt has its record
        app.conn.close()
        admin.close()
    finally:
        assert d.stop() == 0
    text = d.log.read_text()
    assert text.count(FAILING) == 1 and text.count(RECOVERED) == 1, text[-3000:]


def test_kill9_loses_no_change_and_verify_names_the_unclean_stop(tmp_path) -> None:
    """A change is answered only once its record is on disk; after a kill -9 the
    chain verifies and the unclean stop is named, where key use may be missing."""
    d = start_daemon(tmp_path)
    assert d.stop() == 0
    d.start()  # after a clean stop: no gap named
    admin = Raw(d.socket)
    admin.login(d.admin_key)
    assert ok(admin.call("GET", "/sys/v1/logs/verify"))["unclean_stops"] == []
    g = new_group(admin)
    kid = new_key(admin, g)["kid"]
    d.kill9()  # right after the answer, well inside one group-commit window
    admin.close()
    d.start()
    try:
        created = records(d, "SELECT status FROM audit WHERE object_id = ?", (kid,))
        assert created == [(200,)]
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        out = ok(admin.call("GET", "/sys/v1/logs/verify"))
        assert out["ok"] is True and len(out["unclean_stops"]) == 1, out
        (action,) = records(d, "SELECT action FROM audit WHERE seq = ?", (out["unclean_stops"][0],))
        assert action == ("daemon.unclean_stop",)
        admin.close()
    finally:
        assert d.stop() == 0


def test_full_queue_refuses_even_reads_and_drops_nothing(tmp_path) -> None:
    """With a small queue bound, reads during the failure fill it; then they are
    refused too, and every read that was answered is on disk afterwards."""
    d = start_daemon(tmp_path, config="audit_max_pending = 2000\n")
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        kid = new_key(admin, new_group(admin))["kid"]
        with disk_full(d):
            encrypt_until_refused(admin, kid)
            served = 0
            for _ in range(4000):
                resp = admin.call("GET", "/sys/v1/groups")
                if resp["status"] != 200:
                    assert "queue is full" in err(resp, "unavailable")["message"]
                    break
                served += 1
            else:
                raise AssertionError("4000 reads queued into a queue of 2000")
            assert 0 < served < 2000
        until_ok(admin, "GET", "/sys/v1/groups", None)
        out = ok(admin.call("GET", "/sys/v1/logs/verify"))
        assert out["ok"] is True, out
        reads = records(d, "SELECT count(*) FROM audit WHERE action = 'GET /sys/v1/groups'")
        assert reads[0][0] == served + 1
        admin.close()
    finally:
        assert d.stop() == 0


def _http_login(url: str, body: dict[str, str]) -> int:
    req = urllib.request.Request(
        url + "/sys/v1/session/auth",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_failed_login_flood_is_counted_not_stored_per_attempt(tmp_path) -> None:
    """(c) 100 failed logins over HTTP and 5 on one socket connection: one record
    per source and minute, with the count; made-up ids are never stored."""
    d = start_daemon(tmp_path, config="http_enabled = true\nhttp_port = 0\n")
    url = gateway_url(d)
    admin = Raw(d.socket)
    admin.login(d.admin_key)
    app = new_app(d, admin, [new_group(admin)])
    app.conn.close()
    n = 100  # half against a real app, half against made-up ids
    bodies = [
        {"app_id": app.id if i % 2 else f"nobody-{i}", "secret": f"guess-{i}"} for i in range(n)
    ]
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda b: _http_login(url, b), bodies)) == {401}
    guesser = Raw(d.socket)  # one request at a time before authentication
    for i in range(5):
        body = {"app_id": app.id, "secret": f"again-{i}"}
        err(guesser.call("POST", "/sys/v1/session/auth", body), "bad_credentials")
    guesser.close()
    admin.close()
    assert d.stop() == 0  # a clean stop writes the counts of the current minute
    rows = records(
        d,
        "SELECT detail FROM audit WHERE action = 'POST /sys/v1/session/auth' AND status = 401",
    )
    details = [json.loads(r[0]) for r in rows]
    # One record per source and minute (a flood slowed by a loaded machine may span
    # several minutes, so the windows are compared, not the number of rows).
    windows = [(x["source"], x["window_start"]) for x in details]
    assert len(rows) >= 2 and len(set(windows)) == len(windows), windows
    by_source: dict[str, int] = {}
    for x in details:
        by_source[x["source"]] = by_source.get(x["source"], 0) + x["count"]
    assert by_source.pop("http") == n
    assert list(by_source.values()) == [5]  # the socket connection
    assert sum(x["unknown"] for x in details) == n // 2
    assert {p for x in details for p in x["principals"]} == {app.id}
    assert not any("nobody-" in r[0] for r in rows)


def _metric(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"no {series} in:\n{text}"
    return float(m.group(1))


def test_unauthenticated_and_unmatched_requests_are_counted_not_stored(tmp_path) -> None:
    """(d) 1,000 requests without a caller add no audit rows; metrics count them."""
    d = start_daemon(tmp_path, config="http_enabled = true\nhttp_port = 0\n")
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        before = ok(admin.call("GET", "/sys/v1/logs/verify"))["records"]
        anon = Raw(d.socket)
        long_path = "/no/such/" + "x" * 1000
        codes = set()
        for _ in range(50):  # in batches: an unauthenticated connection gets little buffer
            for i in range(20):
                anon.send("GET", long_path if i % 2 else "/crypto/v1/keys")
            codes |= {anon.recv()["body"]["error"] for _ in range(20)}
        assert codes == {"no_such_route", "unauthenticated"}
        anon.close()
        after = ok(admin.call("GET", "/sys/v1/logs/verify"))["records"]
        assert after - before == 1  # the first verify's own record, nothing else
        with urllib.request.urlopen(gateway_url(d) + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
        assert _metric(text, 'strongroom_unaudited_requests_total{reason="unmatched"}') >= 500
        assert _metric(text, 'strongroom_unaudited_requests_total{reason="unauthenticated"}') >= 500
        assert _metric(text, "strongroom_audit_failing") == 0
        assert "x" * 100 not in text
        admin.close()
    finally:
        assert d.stop() == 0


def test_audit_failure_shows_in_metrics(tmp_path) -> None:
    d = start_daemon(tmp_path, config="http_enabled = true\nhttp_port = 0\n")
    try:
        url = gateway_url(d) + "/metrics"
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        kid = new_key(admin, new_group(admin))["kid"]
        with disk_full(d):
            encrypt_until_refused(admin, kid)
            with urllib.request.urlopen(url, timeout=30) as resp:
                text = resp.read().decode()
        assert _metric(text, "strongroom_audit_failing") == 1
        assert _metric(text, "strongroom_audit_pending_records") >= 1
        assert _metric(text, "strongroom_audit_write_failures_total") >= 1
        assert _metric(text, 'strongroom_audit_refused_requests_total{reason="failing"}') >= 1
        until_ok(admin, "POST", ENCRYPT, _enc(kid))
        with urllib.request.urlopen(url, timeout=30) as resp:
            text = resp.read().decode()
        assert _metric(text, "strongroom_audit_failing") == 0
        admin.close()
    finally:
        assert d.stop() == 0
