"""Operator commands: check-config, the documented settings, admin rotate, quiet logs."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

from strongroomd.config import Config

from tests.conftest import ROOT, Raw, start_daemon
from tests.daemon.api.helpers import err, new_group, ok

EXAMPLE = ROOT / "docs" / "strongroomd.example.toml"


def strongroomd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strongroomd", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- configuration -----------------------------------------------------------------------


def test_every_setting_is_documented_with_its_default() -> None:
    documented = {}
    for line in EXAMPLE.read_text().splitlines():
        text = line.removeprefix("# ")
        if " = " in text and text.split(" = ")[0].isidentifier():
            documented.update(tomllib.loads(text))
    for f in fields(Config):
        if f.name == "extra":
            continue
        assert f.name in documented, f"{f.name} is not in {EXAMPLE.name}"
        default = f.default if f.default is not MISSING else None
        if default is not None:  # unset-by-default settings show an example value
            value = documented[f.name]
            assert value == (str(default) if isinstance(default, Path) else default), f.name
    assert set(documented) <= {f.name for f in fields(Config)}


def test_example_file_loads_and_check_config_prints_it(tmp_path) -> None:
    uncommented = tmp_path / "all.toml"
    lines = [ln.removeprefix("# ") for ln in EXAMPLE.read_text().splitlines()]
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    text = "\n".join(ln for ln in lines if " = " in ln and ln[0].isalpha())
    uncommented.write_text(text.replace("/etc/strongroom/pin", str(pin)))
    env = {"STRONGROOM_STATE_DIR": str(tmp_path / "s"), "STRONGROOM_SOCKET": ""}
    out = strongroomd("check-config", "--config", str(uncommented), env=env)
    assert out.returncode == 0, out.stderr
    assert f'state_dir = "{tmp_path / "s"}"' in out.stdout  # the environment wins over the file
    assert f'pin_file = "{pin}"' in out.stdout
    assert "socket_mode = 0o660" in out.stdout


def test_check_config_errors_are_clear(tmp_path) -> None:
    cases = {
        "bogus = 1": "unknown setting 'bogus'",
        "max_frame = -1": "'max_frame' must be positive",
        "max_frame = 'big'": "'max_frame' must be int",
        "state_dir = [": "config file",
        'pkcs11_module = "/nonexistent/libvendor.so"': "PIN must be given",
    }
    for text, message in cases.items():
        cfg = tmp_path / "c.toml"
        cfg.write_text(text + "\n")
        out = strongroomd("check-config", "--config", str(cfg))
        assert out.returncode == 2, (text, out.stdout)
        assert "configuration error" in out.stderr and message in out.stderr, (text, out.stderr)
    cfg.write_text('pkcs11_module = "/nonexistent/libvendor.so"\npin_file = "/nonexistent/pin"\n')
    out = strongroomd("check-config", "--config", str(cfg))
    assert out.returncode == 2
    assert "pkcs11_module /nonexistent/libvendor.so does not exist" in out.stderr
    assert "the PIN file /nonexistent/pin does not exist" in out.stderr
    out = strongroomd("check-config", "--config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "cannot read config file" in out.stderr


def test_environment_overrides_socket_and_state_dir(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('state_dir = "/from/file"\nsocket = "/from/file.sock"\n')
    env = {"STRONGROOM_STATE_DIR": str(tmp_path / "env"), "STRONGROOM_SOCKET": "/env.sock"}
    out = strongroomd("check-config", "--config", str(cfg), env=env)
    assert f'state_dir = "{tmp_path / "env"}"' in out.stdout
    assert 'socket = "/env.sock"' in out.stdout


# -- admin key rotation ---------------------------------------------------------------------


def test_admin_rotate(tmp_path) -> None:
    d = start_daemon(tmp_path)
    old = d.admin_key
    env = {"STRONGROOM_STATE_DIR": str(d.state_dir)}
    # Online: through the running daemon, which writes admin.key itself.
    before = Raw(d.socket)
    before.login(old)
    body = {"name": "rotator", "groups": [new_group(before)]}
    app = ok(before.call("POST", "/sys/v1/apps", body))
    live = strongroomd("admin", "rotate", env=env)
    assert live.returncode == 0, live.stderr
    online = d.admin_key
    assert online != old and (d.state_dir / "admin.key").stat().st_mode & 0o777 == 0o600
    r = Raw(d.socket)
    err(r.call("POST", "/sys/v1/session/auth", {"api_key": old}), "bad_credentials")
    r.login(online)
    records = ok(r.call("GET", "/sys/v1/logs", {"limit": 20}))
    assert any(x["action"] == "POST /sys/v1/admin/rotate" for x in records)
    assert online.split(".")[-1] not in str(records)
    a = Raw(d.socket)
    a.login(app["credential"]["api_key"])
    err(a.call("POST", "/sys/v1/admin/rotate"), "forbidden")
    a.close()
    r.close()
    before.close()
    assert d.admin_key == online
    # A broken key file cannot ask the daemon: the message says to rotate offline.
    (d.state_dir / "admin.key").write_text(old + "\n")
    refused = strongroomd("admin", "rotate", env=env)
    assert refused.returncode == 3 and "stop the daemon" in refused.stderr
    assert d.stop() == 0
    # Offline.
    out = strongroomd("admin", "rotate", env=env)
    assert out.returncode == 0, out.stderr
    new = d.admin_key
    old = online
    assert new != old and (d.state_dir / "admin.key").stat().st_mode & 0o777 == 0o600
    d.start()
    try:
        r = Raw(d.socket)
        err(r.call("POST", "/sys/v1/session/auth", {"api_key": old}), "bad_credentials")
        r.login(new)
        assert ok(r.call("GET", "/sys/v1/logs/verify"))["ok"] is True
        actions = [x["action"] for x in ok(r.call("GET", "/sys/v1/logs", {"limit": 50}))]
        assert "admin.rotate" in actions
        r.close()
    finally:
        assert d.stop() == 0


# -- no secrets in the log ------------------------------------------------------------------


def test_no_secret_reaches_the_log(tmp_path) -> None:
    d = start_daemon(tmp_path)
    value = bytes.fromhex("5ec2e7000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c")
    admin_id = base64.b64decode(d.admin_key).decode().split(":", 1)[0]
    wrong = base64.b64encode(f"{admin_id}:not-the-secret".encode()).decode()
    try:
        r = Raw(d.socket)
        err(r.call("POST", "/sys/v1/session/auth", {"api_key": wrong}), "bad_credentials")
        r.login(d.admin_key)
        g = new_group(r)
        app = ok(r.call("POST", "/sys/v1/apps", {"name": "quiet", "groups": [g]}))
        app_key = app["credential"]["api_key"]
        a = Raw(d.socket)
        a.login(app_key)
        body = {
            "name": "known",
            "obj_type": "AES",
            "value": value,
            "group_id": g,
            "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"],
        }
        kid = ok(a.call("PUT", "/crypto/v1/keys", body))["kid"]
        assert ok(a.call("POST", "/crypto/v1/keys/export", {"kid": kid}))["value"] == value
        code = (
            "function run(input)\n"
            "  local k = assert(Sobject { name = 'known' })\n"
            "  local v = k:export()\n"
            "  print(v.value)\n"
            "  error('failing on purpose')\n"
            "end"
        )
        ok(r.call("POST", "/sys/v1/plugins/test", {"code": code, "input": {}, "groups": [g]}))
        ok(r.call("POST", f"/sys/v1/apps/{app['app_id']}/reset_secret"))
        a.close()
        r.close()
    finally:
        assert d.stop() == 0
    log = d.log.read_text(errors="replace")
    assert "level=info" in log  # logfmt lines
    secrets = {
        "PIN": d.pin,
        "SO PIN": (d.state_dir / "softhsm" / "so.pin").read_text().strip(),
        "admin API key": d.admin_key,
        "admin secret": base64.b64decode(d.admin_key).decode().split(":", 1)[1],
        "app API key": app_key,
        "app secret": base64.b64decode(app_key).decode().split(":", 1)[1],
        "key value (hex)": value.hex(),
        "key value (base64)": base64.b64encode(value).decode(),
    }
    for what, secret in secrets.items():
        assert secret not in log, f"the {what} is in the daemon's log"
    assert value not in d.log.read_bytes()
    for line in log.splitlines():  # one line per event
        assert line.startswith(("ts=", "strongroomd: ")), line
