"""Backup while the daemon runs, destroy the state, restore: every key still works."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from tests.conftest import Daemon, Raw, start_daemon
from tests.daemon.api.helpers import ok

AES_VALUE = bytes(range(32))


def strongroomd(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STRONGROOM_STATE_DIR": str(d.state_dir)}
    return subprocess.run(
        [sys.executable, "-m", "strongroomd", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_backup_destroy_restore_keeps_every_key(tmp_path) -> None:
    d = start_daemon(tmp_path)
    r = Raw(d.socket)
    r.login(d.admin_key)
    admin_key = d.admin_key
    aes = ok(r.call("POST", "/crypto/v1/keys", {"name": "aes", "obj_type": "AES"}))
    imported = ok(
        r.call(
            "PUT",
            "/crypto/v1/keys",
            {
                "name": "imported",
                "obj_type": "AES",
                "value": AES_VALUE,
                "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"],
            },
        )
    )
    ec = ok(
        r.call(
            "POST",
            "/crypto/v1/keys",
            {"name": "ec", "obj_type": "EC", "elliptic_curve": "NistP256"},
        )
    )
    rsa = ok(
        r.call("POST", "/crypto/v1/keys", {"name": "rsa", "obj_type": "RSA", "key_size": 2048})
    )
    sealed = {}
    for k in (aes, imported):
        sealed[k["kid"]] = ok(
            r.call(
                "POST",
                "/crypto/v1/encrypt",
                {"key": {"kid": k["kid"]}, "alg": "AES", "mode": "GCM", "plain": b"before"},
            )
        )
    rsa_ct = ok(
        r.call(
            "POST",
            "/crypto/v1/encrypt",
            {"key": {"kid": rsa["kid"]}, "alg": "RSA", "plain": b"rsa before"},
        )
    )
    sig = ok(
        r.call(
            "POST",
            "/crypto/v1/sign",
            {"key": {"kid": ec["kid"]}, "hash_alg": "SHA256", "data": b"signed before"},
        )
    )

    # Keys are made and deleted while the backup runs: the freeze keeps token and DB in step.
    stop = threading.Event()
    churn_errors: list[object] = []

    def churn() -> None:
        c = Raw(d.socket)
        c.login(admin_key)
        i = 0
        while not stop.is_set():
            i += 1
            resp = c.call("POST", "/crypto/v1/keys", {"name": f"churn{i}", "obj_type": "AES"})
            if resp["status"] != 200:
                churn_errors.append(resp)
                break
            if i % 2:
                resp = c.call("DELETE", f"/crypto/v1/keys/{resp['body']['kid']}")
                if resp["status"] != 204:
                    churn_errors.append(resp)
        c.close()

    t = threading.Thread(target=churn)
    t.start()
    time.sleep(0.3)
    out = tmp_path / "backup.tar"
    done = strongroomd(d, "backup", "--out", str(out))
    stop.set()
    t.join(30)
    assert done.returncode == 0, done.stderr
    assert not churn_errors, churn_errors
    assert out.stat().st_mode & 0o777 == 0o600
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert {"strongroom.db", "backup.json", "softhsm/user.pin", "admin.key"} <= names
    assert any(n.startswith("softhsm/tokens/") for n in names)
    assert "strongroomd.lock" not in names and "strongroomd.sock" not in names
    r.close()
    assert d.stop() == 0

    # Destroy, refuse to restore over a non-empty directory, then restore.
    shutil.rmtree(d.state_dir)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "something").write_text("x")
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "strongroomd",
            "restore",
            "--in",
            str(out),
            "--state-dir",
            str(occupied),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 3 and "not empty" in refused.stderr
    assert (occupied / "something").exists()
    restored = strongroomd(d, "restore", "--in", str(out), "--state-dir", str(d.state_dir))
    assert restored.returncode == 0, restored.stderr
    assert d.state_dir.stat().st_mode & 0o777 == 0o700

    d.start()
    assert d.admin_key == admin_key
    r = Raw(d.socket)
    r.login(admin_key)
    for kid, ct in sealed.items():
        back = ok(
            r.call(
                "POST",
                "/crypto/v1/decrypt",
                {
                    "key": {"kid": kid},
                    "alg": "AES",
                    "mode": "GCM",
                    "cipher": ct["cipher"],
                    "iv": ct["iv"],
                    "tag": ct["tag"],
                },
            )
        )
        assert back["plain"] == b"before"
    back = ok(
        r.call(
            "POST",
            "/crypto/v1/decrypt",
            {"key": {"kid": rsa["kid"]}, "alg": "RSA", "cipher": rsa_ct["cipher"]},
        )
    )
    assert back["plain"] == b"rsa before"
    verified = ok(
        r.call(
            "POST",
            "/crypto/v1/verify",
            {
                "key": {"kid": ec["kid"]},
                "hash_alg": "SHA256",
                "data": b"signed before",
                "signature": sig["signature"],
            },
        )
    )
    assert verified["result"] is True
    # The imported value is still that value.
    exported = ok(r.call("POST", "/crypto/v1/keys/export", {"kid": imported["kid"]}))
    assert exported["value"] == AES_VALUE
    # Every restored key row has its material: all of them encrypt, none is missing.
    keys = ok(r.call("GET", "/crypto/v1/keys", {"limit": 1000}))
    assert len(keys) >= 4
    for k in keys:
        assert not k.get("missing"), k
        if k["obj_type"] == "AES":
            ok(
                r.call(
                    "POST",
                    "/crypto/v1/encrypt",
                    {"key": {"kid": k["kid"]}, "alg": "AES", "plain": b"after"},
                )
            )
    r.close()

    # --force replaces, but never under a running daemon.
    busy = strongroomd(d, "restore", "--in", str(out), "--state-dir", str(d.state_dir), "--force")
    assert busy.returncode == 3 and "running" in busy.stderr
    assert d.stop() == 0
    again = strongroomd(d, "restore", "--in", str(out), "--state-dir", str(d.state_dir), "--force")
    assert again.returncode == 0, again.stderr


def test_backup_freezes_token_writes(tmp_path) -> None:
    """While token.lock is held exclusively, a key creation waits; then it completes."""
    d = start_daemon(tmp_path)
    try:
        r = Raw(d.socket)
        r.login(d.admin_key)
        fd = os.open(d.state_dir / "token.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            r.send("POST", "/crypto/v1/keys", {"name": "frozen", "obj_type": "AES"})
            r.sock.settimeout(0.5)
            try:
                r.recv()
                raise AssertionError("a token write went through during the freeze")
            except TimeoutError:
                pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        r.sock.settimeout(30)
        assert r.recv()["status"] == 200
        r.close()
    finally:
        assert d.stop() == 0


def test_backup_of_missing_state_fails_clearly(tmp_path) -> None:
    env = {**os.environ, "STRONGROOM_STATE_DIR": str(tmp_path / "none")}
    out = subprocess.run(
        [sys.executable, "-m", "strongroomd", "backup", "--out", str(tmp_path / "b.tar")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3 and "nothing to back up" in out.stderr
    assert not Path(tmp_path / "b.tar").exists()
