"""The audit log cannot be edited unnoticed: offline and online verification."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from strongroom._cli import cli

from tests.conftest import Daemon, Raw, start_daemon
from tests.daemon.api.helpers import err, new_app, new_group, ok


def strongroomd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strongroomd", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def stopped_db(tmp_path_factory) -> Path:
    """A real database with a few dozen audit records, its daemon stopped."""
    tmp = tmp_path_factory.mktemp("audit")
    d = start_daemon(tmp)
    r = Raw(d.socket)
    r.login(d.admin_key)
    for i in range(10):
        ok(r.call("POST", "/crypto/v1/keys", {"name": f"a{i}", "obj_type": "AES"}))
        ok(r.call("GET", "/sys/v1/groups"))
    r.close()
    assert d.stop() == 0
    return d.state_dir / "strongroom.db"


@pytest.fixture
def db(stopped_db, tmp_path) -> Path:
    copy = tmp_path / "copy.db"
    shutil.copy(stopped_db, copy)
    return copy


def _tamper(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as c:
        for sql in statements:
            c.execute(sql)


def test_intact_database_verifies(db) -> None:
    out = strongroomd("audit", "verify", "--db", str(db))
    assert out.returncode == 0, out.stderr
    assert "audit chain intact" in out.stdout
    n = int(out.stdout.split(":")[1].split()[0])
    assert n >= 20


def test_state_dir_form(stopped_db) -> None:
    out = strongroomd("audit", "verify", "--state-dir", str(stopped_db.parent))
    assert out.returncode == 0 and "intact" in out.stdout, out.stdout + out.stderr


def test_edited_record_is_named(db) -> None:
    _tamper(db, "UPDATE audit SET status = 200, code = NULL, actor_id = 'x' WHERE seq = 7")
    out = strongroomd("audit", "verify", "--db", str(db))
    assert out.returncode == 1
    assert "broken at record 7: its contents were changed" in out.stdout


def test_deleted_record_is_named(db) -> None:
    _tamper(db, "DELETE FROM audit WHERE seq = 12")
    out = strongroomd("audit", "verify", "--db", str(db))
    assert out.returncode == 1
    assert "broken at record 12: record 12 is missing" in out.stdout


def test_deleted_record_with_renumbering_is_named(db) -> None:
    """Close the gap in seq too: the next record no longer follows its predecessor."""
    _tamper(
        db,
        "DELETE FROM audit WHERE seq = 12",
        "UPDATE audit SET seq = seq - 1 WHERE seq > 12",
    )
    out = strongroomd("audit", "verify", "--db", str(db))
    assert out.returncode == 1
    assert "broken at record 12: does not follow the previous record" in out.stdout


def test_reordered_records_are_named(db) -> None:
    _tamper(
        db,
        "UPDATE audit SET seq = -1 WHERE seq = 9",
        "UPDATE audit SET seq = 9 WHERE seq = 10",
        "UPDATE audit SET seq = 10 WHERE seq = -1",
    )
    out = strongroomd("audit", "verify", "--db", str(db))
    assert out.returncode == 1
    assert "broken at record 9: does not follow the previous record" in out.stdout


def test_rehashed_edit_breaks_the_next_record(db) -> None:
    """An editor who recomputes the edited record's own hash still breaks the link after it."""
    from strongroomd.audit import COLUMNS, record_hash

    with sqlite3.connect(db) as c:
        cols = ", ".join(COLUMNS)
        row = c.execute(f"SELECT {cols}, prev_hash FROM audit WHERE seq = 5").fetchone()
        rec = (*row[:4], "GET /forged", *row[5 : len(COLUMNS)])
        c.execute(
            "UPDATE audit SET action = ?, hash = ? WHERE seq = 5",
            ("GET /forged", record_hash(row[-1], rec)),
        )
    out = strongroomd("audit", "verify", "--db", str(db))
    assert out.returncode == 1
    assert "broken at record 6: does not follow the previous record" in out.stdout


def test_missing_database_is_an_error(tmp_path) -> None:
    out = strongroomd("audit", "verify", "--db", str(tmp_path / "nope.db"))
    assert out.returncode == 3 and "nope.db" in out.stderr


# -- online ---------------------------------------------------------------------------


def _cli(d: Daemon, tmp: Path, *args: str, code: int = 0) -> str:
    keyfile = tmp / "admin.key"
    keyfile.write_text(d.admin_key)
    env = {
        "STRONGROOM_SOCKET": str(d.socket),
        "STRONGROOM_API_KEY": None,
        "STRONGROOM_API_KEY_FILE": str(keyfile),
    }
    result = CliRunner().invoke(cli, list(args), env=env)
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def test_online_verify_route_and_cli(tmp_path) -> None:
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        g = new_group(admin)
        app = new_app(d, admin, [g])
        for i in range(5):
            ok(admin.call("POST", "/crypto/v1/keys", {"name": f"o{i}", "obj_type": "AES"}))
        err(app.call("GET", "/sys/v1/logs/verify"), "forbidden")
        out = ok(admin.call("GET", "/sys/v1/logs/verify"))
        assert out["ok"] is True and out["records"] >= 8 and out["head"] >= out["records"] - 1
        assert "intact" in _cli(d, tmp_path, "audit", "verify")

        db = d.state_dir / "strongroom.db"
        with sqlite3.connect(db, timeout=10) as c:
            c.execute("UPDATE audit SET object_id = 'forged' WHERE seq = 4")
        out = ok(admin.call("GET", "/sys/v1/logs/verify"))
        assert out["ok"] is False and out["broken_at"] == 4
        assert out["reason"] == "record 4 its contents were changed"
        assert "record 4" in _cli(d, tmp_path, "audit", "verify", code=1)
        app.conn.close()
        admin.close()
    finally:
        assert d.stop() == 0


def test_online_verify_catches_removed_newest_records(tmp_path) -> None:
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        for _ in range(5):
            ok(admin.call("GET", "/sys/v1/groups"))
        head = ok(admin.call("GET", "/sys/v1/logs/verify"))["head"]
        with sqlite3.connect(d.state_dir / "strongroom.db", timeout=10) as c:
            c.execute("DELETE FROM audit WHERE seq > ?", (head - 3,))
        out = ok(admin.call("GET", "/sys/v1/logs/verify"))
        # Either the records written since leave a gap, or (nothing written since)
        # the daemon's own head record is gone: the first removed record is named.
        assert out["ok"] is False, out
        assert out["broken_at"] == head - 2, out
        admin.close()
    finally:
        assert d.stop() == 0


# -- what fails closed, and how floods are bounded -----------------------------------


def test_every_route_has_the_audit_kind_it_should() -> None:
    """Reads stay served while the log cannot be written; uses and changes do not."""
    from strongroomd.api import ROUTES
    from strongroomd.audit import KEY_MAKERS, Kind, kind_of

    kinds = {(r.method, r.path): kind_of(r.method, r.path) for r in ROUTES}
    for (method, path), kind in kinds.items():
        if (method, path) == ("GET", "/sys/v1/plugins/invoke/{plugin_id}"):
            assert kind is Kind.USE, path  # a plugin invoked by GET uses keys
        elif method == "GET" and not path.endswith("/export"):
            assert kind is Kind.READ, path
        elif path in KEY_MAKERS:  # a stored key is made: durable first
            assert kind is Kind.CHANGE, path
            assert kind_of(method, path, {"transient": True}) is Kind.USE, path
        elif path.startswith("/crypto/v1/") and not path.startswith("/crypto/v1/keys"):
            assert kind is Kind.USE, path
    assert kinds[("POST", "/crypto/v1/keys/info")] is Kind.READ
    assert kinds[("POST", "/sys/v1/session/auth")] is Kind.READ
    assert kinds[("POST", "/crypto/v1/keys")] is Kind.CHANGE
    assert kinds[("POST", "/crypto/v1/keys/export")] is Kind.CHANGE
    assert kinds[("POST", "/sys/v1/plugins/{plugin_id}")] is Kind.USE
    assert kind_of("POST", "/crypto/v1/keys", {"transient": True}) is Kind.USE
    assert kind_of("POST", "/sys/v1/some/new/route") is Kind.CHANGE  # unknown: fail closed
    # Per-key and batch forms are uses like the key-in-body forms; an export by any
    # method is a change (recorded before the value leaves).
    for op in ("encrypt", "decrypt", "sign", "verify", "mac", "macverify", "wrapkey"):
        assert kinds[("POST", f"/crypto/v1/keys/{{kid}}/{op}")] is Kind.USE, op
    for op in ("encrypt", "decrypt", "sign", "verify", "mac", "macverify"):
        assert kinds[("POST", f"/crypto/v1/keys/batch/{op}")] is Kind.USE, op
    assert kinds[("GET", "/crypto/v1/keys/{kid}/export")] is Kind.CHANGE
    assert kinds[("POST", "/crypto/v1/keys/kcv")] is Kind.USE
    assert kinds[("POST", "/crypto/v1/keys/rekey")] is Kind.CHANGE
    assert {"/crypto/v1/agree", "/crypto/v1/keys/{kid}/derive"} <= KEY_MAKERS
    # Streaming steps are uses in both forms.
    for step in ("init", "update", "final"):
        for op in ("encrypt", "decrypt"):
            assert kinds[("POST", f"/crypto/v1/{op}/{step}")] is Kind.USE
            assert kinds[("POST", f"/crypto/v1/keys/{{kid}}/{op}/{step}")] is Kind.USE


def test_failed_logins_from_many_sources_make_a_bounded_number_of_records(tmp_path) -> None:
    from strongroomd.audit import LOGIN_SOURCES, Audit
    from strongroomd.store import Store

    audit = Audit(Store(tmp_path / "db"))
    for i in range(5000):
        audit.failed_login(f"connection {i % 500}", None)
    audit._emit_logins(None)
    assert audit.pending <= 2 * (LOGIN_SOURCES + 1)  # one window, or two if it straddled
    counts = [json.loads(r[-1])["count"] for r in audit._pending]
    assert sum(counts) == 5000
    assert any(json.loads(r[-1])["source"] == "other" for r in audit._pending)
