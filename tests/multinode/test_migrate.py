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
