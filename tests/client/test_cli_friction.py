"""The CLI's first-hour rough edges (issue 12, items 4, 8, 9, 11), against a real daemon."""

from __future__ import annotations

import base64
import json
import os

import click
from strongroom import __version__
from strongroom._cli import cli
from strongroom._cli import crypto as cli_crypto

from tests.conftest import unique


def test_decrypt_reads_what_json_encrypt_wrote(sr, tmp_path) -> None:
    k = unique("k")
    sr("keys", "create", k, "--type", "AES")
    doc = tmp_path / "ct.json"
    doc.write_text(sr("--json", "encrypt", "--key", k, input=b"round trip").stdout)
    assert json.loads(doc.read_text())["alg"] == "AES"
    # The JSON names the key; both forms round-trip.
    assert sr("decrypt", "--in", str(doc)).stdout_bytes == b"round trip"
    assert sr("decrypt", "--key", k, "--in", str(doc)).stdout_bytes == b"round trip"
    raw = tmp_path / "ct.bin"
    sr("encrypt", "--key", k, "--out", str(raw), input=b"raw form")
    assert sr("decrypt", "--key", k, "--in", str(raw)).stdout_bytes == b"raw form"
    cbc = tmp_path / "cbc.json"
    cbc.write_text(sr("--json", "encrypt", "--key", k, "--mode", "CBC", input=b"cbc").stdout)
    assert sr("decrypt", "--in", str(cbc)).stdout_bytes == b"cbc"


def test_tag_len_is_in_bits(sr, tmp_path) -> None:
    k = unique("k")
    sr("keys", "create", k, "--type", "AES")
    ct = tmp_path / "ct"
    sr("encrypt", "--key", k, "--out", str(ct), input=b"bits")
    assert sr("decrypt", "--key", k, "--in", str(ct), "--tag-len", "128").stdout_bytes == b"bits"
    r = sr("decrypt", "--key", k, "--in", str(ct), "--tag-len", "16", code=2)
    assert "32<=x<=128" in r.stderr or "range" in r.stderr


def test_too_large_names_the_limit_and_what_to_do(sr, monkeypatch) -> None:
    # AES and DES3 input this large is streamed (tests/client/test_cli_streams.py);
    # an RSA key's is not.
    k = unique("k")
    sr("keys", "create", k, "--type", "RSA")
    big = os.urandom(cli_crypto.MAX_FIELD + 1)
    r = sr("encrypt", "--key", k, input=big, code=1)
    assert r.stderr.startswith("error: too_large: ")
    assert "1,048,576" in r.stderr and "max_field" in r.stderr and "split the input" in r.stderr
    r = sr("--json", "encrypt", "--key", k, input=big, code=1)
    err = json.loads(r.stderr)
    assert err["error"] == "too_large" and "max_frame" in err["hint"]


def test_errors_say_what_to_do(sr, tmp_path) -> None:
    r = sr("keys", "list", code=1, env_={"STRONGROOM_API_KEY_FILE": None})
    assert "STRONGROOM_API_KEY" in r.stderr and "STRONGROOM_API_KEY_FILE" in r.stderr
    assert "POST /sys/v1/session/auth" not in r.stderr
    r = sr("--json", "keys", "list", code=1, env_={"STRONGROOM_API_KEY_FILE": None})
    err = json.loads(r.stderr)
    assert err["error"] == "unauthenticated" and "STRONGROOM_API_KEY" in err["message"]
    r = sr("keys", "create", unique("k"), "--type", "Ed25519", code=2)
    assert "--type EC --curve Ed25519" in r.stderr
    r = sr("--json", "keys", "show", unique("none"), code=1)
    assert json.loads(r.stderr)["error"] == "not_found"
    r = sr("--json", "--socket", str(tmp_path / "none.sock"), "keys", "list", code=3)
    assert "STRONGROOM_STATE_DIR" in json.loads(r.stderr)["hint"]


def test_state_dir_finds_the_socket(sr, daemon) -> None:
    env = {"STRONGROOM_SOCKET": None, "STRONGROOM_STATE_DIR": str(daemon.state_dir)}
    assert sr("login", env_=env).stdout.strip()


def test_keys_show_and_delete_take_a_name(sr) -> None:
    k = unique("k")
    sr("keys", "create", k, "--type", "AES")
    assert k in sr("keys", "show", k).stdout
    sr("keys", "show", k, "--key", k, code=2)
    r = sr("keys", "delete", k)  # no terminal: no prompt
    assert "deleted key" in r.stderr
    sr("keys", "show", k, code=1)


def test_confirmation_on_a_terminal(sr, monkeypatch) -> None:
    k = unique("k")
    sr("keys", "create", k, "--type", "AES")
    monkeypatch.setattr("strongroom._cli._common._interactive", lambda: True)
    r = sr("keys", "delete", k, input=b"n\n", code=1)
    assert "Delete key" in r.output and "Aborted" in r.output
    sr("keys", "show", k)
    sr("keys", "delete", k, input=b"y\n")
    sr("keys", "show", k, code=1)
    k2 = unique("k")
    sr("keys", "create", k2, "--type", "AES")
    r = sr("--json", "keys", "delete", "--yes", k2)
    assert json.loads(r.stdout)["name"] == k2


def test_call_sends_binary_fields(sr, tmp_path) -> None:
    body = json.dumps({"alg": "SHA256", "data": {"$base64": base64.b64encode(b"abc").decode()}})
    out = json.loads(sr("call", "POST", "/crypto/v1/digest", "--body", body).stdout)
    assert out["digest"] == "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
    f = tmp_path / "body.json"
    f.write_text(body)
    assert json.loads(sr("call", "POST", "/crypto/v1/digest", "--body", f"@{f}").stdout) == out


def test_version_and_help(sr) -> None:
    assert __version__ in sr("--version").stdout

    def walk(cmd: click.Command, path: str) -> None:
        assert cmd.help, f"{path} has no help"
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                assert p.help, f"{path} {p.name} has no help"
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=path)
            names = cmd.list_commands(ctx)
            for name in names:
                sub = cmd.get_command(ctx, name)
                summary = sub.get_short_help_str(80 - 6 - max(map(len, names)))
                assert not summary.endswith("..."), f"{path} {name}: {summary}"
                walk(sub, f"{path} {name}")

    walk(cli, "strongroom")
    assert "_STRONGROOM_COMPLETE" in sr("--help").stdout


def test_completion_lists_key_names(sr, daemon, tmp_path) -> None:
    k = unique("compl")
    sr("keys", "create", k, "--type", "AES")
    env = {"_STRONGROOM_COMPLETE": "bash_complete", "COMP_WORDS": f"strongroom keys show {k[:8]}",
           "COMP_CWORD": "3"}  # fmt: skip
    r = sr(env_=env)
    assert f"plain,{k}" in r.stdout.splitlines()
    env["COMP_WORDS"] = f"strongroom encrypt --key {k[:8]}"
    assert f"plain,{k}" in sr(env_=env).stdout.splitlines()


def test_logs_by_invocation(sr, tmp_path) -> None:
    g = unique("g")
    sr("groups", "create", g)
    code = tmp_path / "fails.lua"
    code.write_text('function run(input)\n  error("boom")\nend\n')
    name = unique("p")
    sr("plugin", "push", str(code), "--group", g, "--name", name)
    r = sr("--json", "plugin", "invoke", name, code=1)
    inv = json.loads(r.stderr)["invocation_id"]
    rows = json.loads(sr("--json", "logs", "--invocation", inv).stdout)
    assert rows and all(row["invocation_id"] == inv for row in rows)
    assert "strongroom logs --invocation" in sr("plugin", "invoke", name, code=1).stderr


def test_plugin_push_refuses_code_without_run(sr, tmp_path) -> None:
    g = unique("g")
    sr("groups", "create", g)
    code = tmp_path / "norun.lua"
    code.write_text("function main(input) return input end\n")
    r = sr("plugin", "push", str(code), "--group", g, code=1)
    assert "defines no run() function" in r.stderr
    assert code.stem not in sr("plugin", "list").stdout
