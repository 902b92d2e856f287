"""strongroomd migrate --to postgresql://...: one node's SQLite data into PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, Raw, start_daemon, unique
from tests.daemon.api.helpers import ok
from tests.multinode.pg import Postgres


def migrate(state, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strongroomd", "--state-dir", str(state), "migrate", "--to", url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_migrate_keeps_kids_and_what_was_encrypted_decrypts(tmp_path, postgres: Postgres) -> None:
    d = start_daemon(tmp_path, "one")
    admin = Raw(d.socket)
    admin.login(d.admin_key)
    gid = ok(admin.call("GET", "/sys/v1/groups"))[0]["group_id"]
    app = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("app"), "groups": [gid]}))
    key = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("k"), "obj_type": "AES", "key_size": 256, "group_id": gid},
        )
    )
    rsa = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("r"), "obj_type": "RSA", "key_size": 2048, "group_id": gid},
        )
    )
    ct = ok(
        admin.call(
            "POST",
            "/crypto/v1/encrypt",
            {"key": {"kid": key["kid"]}, "alg": "AES", "mode": "GCM", "plain": b"kept across"},
        )
    )
    before = ok(admin.call("GET", "/sys/v1/logs/verify"))
    admin.close()

    url = postgres.create_db(unique("mig").replace("-", "_"))
    busy = migrate(d.state_dir, url)  # the daemon runs: refused, nothing copied
    assert busy.returncode != 0 and "stop the daemon" in busy.stderr, busy
    assert d.stop() == 0
    done = migrate(d.state_dir, url)
    assert done.returncode == 0, done.stderr
    backups = list(d.state_dir.glob("strongroom.db.before-postgresql-*"))
    assert len(backups) == 1 and backups[0].stat().st_mode & 0o777 == 0o600
    again = migrate(d.state_dir, url)  # never into a database that holds data
    assert again.returncode != 0 and "empty" in again.stderr

    cfg = tmp_path / "pg.toml"
    cfg.write_text(f'database_url = "{url}"\n')
    d.config = cfg
    d.start()
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)  # the admin's credential moved too
        got = ok(admin.call("GET", f"/crypto/v1/keys/{key['kid']}"))
        assert got["name"] == key["name"]  # same kid, same name
        dec = {
            "key": {"kid": key["kid"]},
            "alg": "AES",
            "mode": "GCM",
            **{k: ct[k] for k in ("cipher", "iv", "tag")},
        }
        assert ok(admin.call("POST", "/crypto/v1/decrypt", dec))["plain"] == b"kept across"
        sig = ok(
            admin.call(
                "POST",
                "/crypto/v1/sign",
                {"key": {"kid": rsa["kid"]}, "hash_alg": "SHA256", "data": b"x"},
            )
        )
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        pub = serialization.load_der_public_key(rsa["pub_key"])
        pub.verify(sig["signature"], b"x", padding.PKCS1v15(), hashes.SHA256())
        a = Raw(d.socket)
        a.login(app["credential"]["api_key"])  # and the app's
        a.close()
        after = ok(admin.call("GET", "/sys/v1/logs/verify"))
        assert after["ok"] and after["records"] > before["records"], (before, after)
        admin.close()
    finally:
        assert d.stop() == 0
    # The SQLite file left behind is no longer the data: backup points elsewhere.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "strongroomd",
            "--config",
            str(cfg),
            "--state-dir",
            str(d.state_dir),
            "backup",
            "--out",
            str(tmp_path / "b.bak"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={**__import__("os").environ, "STRONGROOM_BACKUP_PASSPHRASE": "x" * 16},
    )
    assert out.returncode == 3 and "pg_dump" in out.stderr, out


def test_migrate_and_a_node_starting_on_the_database_take_turns(tmp_path, postgres) -> None:
    """The copy holds the first-start lock: a node deciding whether to make the admin
    (here: a connection holding that lock) makes the migration wait, and the
    migration's own emptiness check then runs after it."""
    import concurrent.futures

    import psycopg
    from strongroomd.pgstore import FIRST_START_LOCK, PgStore

    from tests.multinode.conftest import wait_for

    d = start_daemon(tmp_path, "one")
    assert d.stop() == 0
    url = postgres.create_db(unique("mig").replace("-", "_"))
    with psycopg.connect(url, autocommit=True) as db:
        PgStore._migrate_pg(db)  # the schema, as a node's start makes it first
    node = psycopg.connect(url, autocommit=True)
    node.execute("SELECT pg_advisory_lock(%s)", (FIRST_START_LOCK,))

    def waiting() -> bool:
        with psycopg.connect(url, autocommit=True) as db:
            (n,) = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event = 'advisory'"
            ).fetchone()
        return n == 1

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(migrate, d.state_dir, url)
        assert wait_for(lambda: waiting() or run.done()) and not run.done()
        node.close()  # the node's decision is over (it made nothing)
        done = run.result(timeout=120)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(url) as db:
        (admins,) = db.execute("SELECT count(*) FROM principals WHERE kind = 'admin'").fetchone()
    assert admins == 1
