"""The ``strongroom`` CLI against a real strongroomd (in process, via CliRunner)."""

from __future__ import annotations

import hashlib
import json
import uuid


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_login_prints_entity(sr) -> None:
    assert sr("login").stdout.strip()


def test_groups_keys_and_crypto(sr, tmp_path) -> None:
    g = unique("g")
    sr("groups", "create", g)
    assert g in sr("groups", "list").stdout
    k = unique("k")
    created = json.loads(sr("--json", "keys", "create", k, "--type", "AES", "--size", "256",
                            "--ops", "ENCRYPT,DECRYPT", "--group", g).stdout)  # fmt: skip
    assert created["key_ops"] == ["ENCRYPT", "DECRYPT"]
    assert k in sr("keys", "list", "--group", g).stdout
    ct = tmp_path / "ct"
    sr("encrypt", "--key", k, "--out", str(ct), input=b"secret words")
    assert sr("decrypt", "--kid", created["kid"], "--in", str(ct)).stdout_bytes == b"secret words"
    out = json.loads(sr("--json", "digest", input=b"abc").stdout)
    assert out["digest"] == "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
    assert sr("digest", input=b"abc").stdout_bytes == hashlib.sha256(b"abc").digest()
    sr("keys", "delete", "--key", k)
    sr("groups", "delete", g)


def test_sign_verify(sr, tmp_path) -> None:
    k = unique("k")
    sr("keys", "create", k, "--type", "EC", "--curve", "NistP256")
    sig = tmp_path / "sig"
    sr("sign", "--key", k, "--out", str(sig), input=b"data")
    assert sr("verify", "--key", k, "--signature", str(sig), input=b"data").stdout == "valid\n"
    sr("verify", "--key", k, "--signature", str(sig), input=b"dat4", code=1)


def test_apps_create_prints_the_key_once(sr) -> None:
    g = unique("g")
    sr("groups", "create", g)
    app = json.loads(sr("--json", "apps", "create", unique("app"), "--group", g).stdout)
    assert app["credential"]["api_key"]
    shown = sr("apps", "show", app["app_id"]).stdout
    assert app["credential"]["api_key"] not in shown


def test_exit_statuses(sr, tmp_path) -> None:
    r = sr("keys", "show", "--key", unique("none"), code=1)
    assert r.stderr.startswith("error: not_found: ")
    sr("keys", "show", code=2)
    sr("no-such-command", code=2)
    r = sr("--socket", str(tmp_path / "x.sock"), "groups", "list", code=3)
    assert str(tmp_path / "x.sock") in r.stderr
