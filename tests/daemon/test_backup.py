"""Backup while the daemon runs, destroy the state, restore: every key still works."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from strongroomd import _backupcrypt

from tests.conftest import Daemon, Raw, start_daemon
from tests.daemon.api.helpers import ok

AES_VALUE = bytes(range(32))
PASSPHRASE = "correct horse battery staple"


def strongroomd(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "STRONGROOM_STATE_DIR": str(d.state_dir),
        "STRONGROOM_BACKUP_PASSPHRASE": PASSPHRASE,
    }
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
    raw = out.read_bytes()
    assert raw.startswith(_backupcrypt.MAGIC) and d.pin.encode() not in raw  # encrypted
    plain = io.BytesIO()
    _backupcrypt.decrypt(io.BytesIO(raw), plain, PASSPHRASE)
    plain.seek(0)
    with tarfile.open(fileobj=plain) as tar:
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
    env = {
        **os.environ,
        "STRONGROOM_STATE_DIR": str(tmp_path / "none"),
        "STRONGROOM_BACKUP_PASSPHRASE": PASSPHRASE,
    }
    out = subprocess.run(
        [sys.executable, "-m", "strongroomd", "backup", "--out", str(tmp_path / "b.tar")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3 and "nothing to back up" in out.stderr
    assert not Path(tmp_path / "b.tar").exists()


# -- encryption and failed restores ------------------------------------------------------


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "STRONGROOM_BACKUP_PASSPHRASE"}
    return subprocess.run(
        [sys.executable, "-m", "strongroomd", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _no_internals(out: subprocess.CompletedProcess[str]) -> None:
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "tarfile" not in text and "ReadError" not in text, text


def test_backup_needs_a_passphrase_from_a_file_or_the_environment(daemon, tmp_path) -> None:
    state = str(daemon.state_dir)
    out = tmp_path / "b.backup"
    refused = _run("backup", "--out", str(out), STRONGROOM_STATE_DIR=state)
    assert refused.returncode == 3 and not out.exists()
    assert "--passphrase-file" in refused.stderr
    assert "STRONGROOM_BACKUP_PASSPHRASE" in refused.stderr
    secret = tmp_path / "pass"
    secret.write_text("from a file\n")
    args = ("backup", "--out", str(out), "--passphrase-file", str(secret))
    made = _run(*args, STRONGROOM_STATE_DIR=state)
    assert made.returncode == 0, made.stderr
    plain = io.BytesIO()
    with open(out, "rb") as fh:
        _backupcrypt.decrypt(fh, plain, "from a file")  # the trailing newline is not part of it
    plain.seek(0)
    with tarfile.open(fileobj=plain) as tar:
        assert "strongroom.db" in tar.getnames()


def test_failed_restores_leave_nothing_behind(daemon, tmp_path) -> None:
    good = tmp_path / "good.backup"
    made = _run(
        "backup", "--out", str(good),
        STRONGROOM_STATE_DIR=str(daemon.state_dir), STRONGROOM_BACKUP_PASSPHRASE=PASSPHRASE,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    target = tmp_path / "restored"

    wrong = _run("restore", "--in", str(good), "--state-dir", str(target),
                 STRONGROOM_BACKUP_PASSPHRASE="not it")  # fmt: skip
    assert wrong.returncode == 3 and "wrong passphrase" in wrong.stderr, wrong.stderr
    assert not target.exists()
    _no_internals(wrong)

    asked = _run("restore", "--in", str(good), "--state-dir", str(target))
    assert asked.returncode == 3 and "--passphrase-file" in asked.stderr and not target.exists()

    cut = tmp_path / "cut.backup"
    cut.write_bytes(good.read_bytes()[:-100])
    short = _run("restore", "--in", str(cut), "--state-dir", str(target),
                 STRONGROOM_BACKUP_PASSPHRASE=PASSPHRASE)  # fmt: skip
    assert short.returncode == 3 and "truncated" in short.stderr and not target.exists()
    _no_internals(short)

    for name, data in {
        "notes.txt": b"hello, this is not a backup\n" * 20,
        "empty": b"",
        "random.bin": os.urandom(4096),
    }.items():
        junk = tmp_path / name
        junk.write_bytes(data)
        out = _run("restore", "--in", str(junk), "--state-dir", str(target))
        assert out.returncode == 3 and "not a Strongroom backup" in out.stderr, out.stderr
        assert not target.exists()
        _no_internals(out)
    # A tar that is not a backup: the same words.
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    out = _run("restore", "--in", str(other), "--state-dir", str(target))
    assert out.returncode == 3 and "not a Strongroom backup" in out.stderr and not target.exists()
    missing = _run("restore", "--in", str(tmp_path / "nope"), "--state-dir", str(target))
    assert missing.returncode == 3 and "cannot read backup" in missing.stderr
    assert not target.exists()

    # An existing empty directory stays, as it was.
    target.mkdir()
    again = _run("restore", "--in", str(good), "--state-dir", str(target),
                 STRONGROOM_BACKUP_PASSPHRASE="not it")  # fmt: skip
    assert again.returncode == 3 and target.is_dir() and not list(target.iterdir())

    ok_ = _run("restore", "--in", str(good), "--state-dir", str(target),
               STRONGROOM_BACKUP_PASSPHRASE=PASSPHRASE)  # fmt: skip
    assert ok_.returncode == 0, ok_.stderr
    assert (target / "strongroom.db").is_file() and not (target / ".restore.tar").exists()
