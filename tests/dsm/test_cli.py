"""DSM's sdkms-cli (5.6.2919), unmodified, as a subprocess over the HTTPS gateway.

The API key goes in ``FORTANIX_API_KEY`` (never argv), the CLI's token file in a
temporary directory (``SDKMS_CLI_TOKEN_FILE``), and the gateway is verified
against the test CA (``--ssl-ca-cert``). Results are checked with
``cryptography``/hashlib/hmac from exported values and public keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest
import sdkms.v1 as v1
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from cryptography.hazmat.primitives.padding import PKCS7

from tests.dsm.conftest import App, Cli, Dsm, unique


@pytest.fixture(scope="module")
def cli(dsm: Dsm, app: App, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """sdkms-cli logged in as the app (app-login, the key from the environment)."""
    c = Cli(dsm, tmp_path_factory.mktemp("cli") / "token")
    c.ok("app-login", api_key=app.api_key)
    return c


def admin_cli(dsm: Dsm, token_file: Path) -> Cli:
    """sdkms-cli as Strongroom's administrator, for the commands it sends with a
    *user* session (create-app, list-groups, create-plugin, ...).

    DSM's CLI takes those from its token file's ``user-token``, which ``user-login``
    writes after a username/password login and an account selection. Strongroom has
    no users; its administrator logs in with the admin API key like an app. What
    works without putting a secret in argv: ``app-login`` with the admin key in
    ``FORTANIX_API_KEY``, then the session it wrote as ``app-token`` copied to
    ``user-token`` (the CLI's own file format, ``name=value`` lines).
    (``user-login --username <admin id> --password <secret>`` works too, the
    accounts step included, but puts the secret in argv: 5.6.2919's password
    prompt calls the getpass module instead of getpass.getpass and crashes.)
    """
    c = Cli(dsm, token_file)
    c.ok("app-login", api_key=dsm.admin_key)
    lines = dict(ln.split("=", 1) for ln in token_file.read_text().splitlines())
    lines["user-token"] = lines["app-token"]
    token_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return c


def _unpad(raw: bytes) -> bytes:
    u = PKCS7(128).unpadder()
    return u.update(raw) + u.finalize()


def _kid(cli: Cli, name: str) -> str:
    return json.loads(cli.ok("show-sobject", "--name", name))["kid"]


def test_plain_http_is_refused_by_the_cli(dsm: Dsm, tmp_path: Path) -> None:
    """Why the gateway serves TLS: DSM's CLI will not speak plain http."""
    c = Cli(Dsm(dsm.daemon, dsm.url.replace("https:", "http:"), dsm.certs), tmp_path / "t")
    out = c("server-version")
    assert out.returncode != 0 and b"plain http, which is forbidden" in out.stdout


def test_app_login_token_file_and_logout(dsm: Dsm, app: App, tmp_path: Path) -> None:
    c = Cli(dsm, tmp_path / "token")
    c.ok("app-login", api_key=app.api_key)
    lines = dict(ln.split("=", 1) for ln in c.token_file.read_text().splitlines())
    token = lines["app-token"]
    assert token and app.api_key not in c.token_file.read_text()
    assert lines["end-point"] == dsm.url
    assert c.ok("list-keys") is not None
    c.ok("app-logout")
    cfg = v1.Configuration()
    cfg.host, cfg.ssl_ca_cert = dsm.url, str(dsm.certs.ca)
    cfg.api_key["Authorization"], cfg.api_key_prefix["Authorization"] = token, "Bearer"
    with pytest.raises(v1.rest.ApiException) as err:  # the session was ended on the server
        v1.GroupsApi(v1.ApiClient(cfg)).get_groups()
    assert err.value.status == 401
    out = c("list-keys")
    assert out.returncode == 1 and b"Not logged in" in out.stderr
    bad = c("app-login", api_key="bm90OmFrZXk=")  # base64("not:akey")
    assert bad.returncode == 1 and b"status:   401" in bad.stderr


def test_version_and_health(cli: Cli) -> None:
    out = cli.ok("server-version")
    assert "API Version : 1.0" in out and "Server Mode : ServerMode.Software" in out
    assert cli.ok("server-health").strip() == "Server is Healthy"


def test_aes_key_encrypt_decrypt_export(cli: Cli, tmp_path: Path) -> None:
    name = unique("aes")
    kid = cli.ok(
        "create-key", "--obj-type", "AES", "--name", name, "--key-size", "256", "--exportable", "-f"
    ).strip()
    shown = json.loads(cli.ok("show-sobject", "--kid", kid))
    assert shown["name"] == name and shown["obj_type"] == "AES" and "EXPORT" in shown["key_ops"]
    assert any(kid in line and name in line for line in cli.ok("list-keys").splitlines())
    value = bytes.fromhex(cli.ok("export-object", "--name", name).strip())
    assert len(value) == 32
    # One request (under the CLI's 350 KiB chunk) and a multi-part stream (over it).
    for size in (41, 400 * 1024 + 5):
        plain = os.urandom(size)
        src, ct, back = tmp_path / "in", tmp_path / "ct", tmp_path / "back"
        src.write_bytes(plain)
        iv = os.urandom(16).hex()
        cli.ok(
            "encrypt", "--name", name, "--alg", "AES", "--mode", "CBC", "--iv", iv,
            "--in", str(src), "--out", str(ct),
        )  # fmt: skip
        d = Cipher(algorithms.AES(value), modes.CBC(bytes.fromhex(iv))).decryptor()
        assert _unpad(d.update(ct.read_bytes()) + d.finalize()) == plain
        back.unlink(missing_ok=True)
        cli.ok(
            "decrypt", "--kid", kid, "--alg", "AES", "--mode", "CBC", "--iv", iv,
            "--in", str(ct), "--out", str(back),
        )  # fmt: skip
        assert back.read_bytes() == plain
    # GCM: the CLI keeps the generated iv and the tag beside the output.
    src.write_bytes(b"gcm text")
    cli.ok(
        "encrypt", "--kid", kid, "--alg", "AES", "--mode", "GCM", "--tag-len", "128",
        "--in", str(src), "--out", str(ct),
    )  # fmt: skip
    iv, tag = (Path(f"{ct}.iv").read_text(), Path(f"{ct}.tag").read_text())
    sealed = ct.read_bytes() + bytes.fromhex(tag)
    assert AESGCM(value).decrypt(bytes.fromhex(iv), sealed, None) == b"gcm text"
    back.unlink(missing_ok=True)
    cli.ok(
        "decrypt", "--kid", kid, "--alg", "AES", "--mode", "GCM", "--iv", iv,
        "--tag", f"{ct}.tag", "--in", str(ct), "--out", str(back),
    )  # fmt: skip
    assert back.read_bytes() == b"gcm text"
    zeros = tmp_path / "zeros.tag"  # --tag names a file holding the tag in hex
    zeros.write_text("00" * 16)
    bad = cli(
        "decrypt", "--kid", kid, "--alg", "AES", "--mode", "GCM", "--iv", iv,
        "--tag", str(zeros), "--in", str(ct), "--out", str(tmp_path / "never"),
    )  # fmt: skip
    assert bad.returncode == 1 and b"status:   400" in bad.stderr and b"bad_tag" in bad.stderr


def test_multipart_commands(cli: Cli, tmp_path: Path) -> None:
    name = unique("mp")
    kid = cli.ok(
        "create-key", "--obj-type", "AES", "--name", name, "--key-size", "128", "--exportable", "-f"
    ).strip()
    value = bytes.fromhex(cli.ok("export-object", "--kid", kid).strip())
    state, out = tmp_path / "state", tmp_path / "out"
    iv = os.urandom(16).hex()
    cli.ok("encrypt-init", "--kid", kid, "--alg", "AES", "--mode", "CBC", "--iv", iv,
           "--state", str(state))  # fmt: skip
    for part in ("first part ", "second part"):
        cli.ok("encrypt-update", "--kid", kid, "--state", str(state), "--out", str(out),
               "--plain", part)  # fmt: skip
    cli.ok("encrypt-final", "--kid", kid, "--state", str(state), "--out", str(out))
    d = Cipher(algorithms.AES(value), modes.CBC(bytes.fromhex(iv))).decryptor()
    assert _unpad(d.update(out.read_bytes()) + d.finalize()) == b"first part second part"
    # And back, the ciphertext on stdin in two pieces (decrypt-update reads it there).
    cipher, back = out.read_bytes(), tmp_path / "back"
    cli.ok("decrypt-init", "--kid", kid, "--alg", "AES", "--mode", "CBC", "--iv", iv,
           "--state", str(state))  # fmt: skip
    for piece in (cipher[:20], cipher[20:]):
        cli.ok("decrypt-update", "--kid", kid, "--state", str(state), "--out", str(back),
               stdin=piece)  # fmt: skip
    cli.ok("decrypt-final", "--kid", kid, "--state", str(state), "--out", str(back))
    assert back.read_bytes() == b"first part second part"


def test_digest_hmac_sign_verify(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"message for DSM")
    assert cli.ok("message-digest", "--alg", "SHA256", "--in", str(data)).strip() == (
        hashlib.sha256(b"message for DSM").hexdigest()
    )
    hname = unique("hmac")
    hkid = cli.ok(
        "create-key", "--obj-type", "HMAC", "--name", hname, "--key-size", "256",
        "--exportable", "-f",
    ).strip()  # fmt: skip
    hvalue = cli.raw("export-object", "--kid", hkid)  # an HMAC key comes out as its bytes
    mac = cli.ok("hmac-digest", "--kid", hkid, "--alg", "SHA256", "--in", str(data)).strip()
    assert mac == hmac.new(hvalue, b"message for DSM", hashlib.sha256).hexdigest()
    cli.ok("hmac-verify", "--kid", hkid, "--alg", "SHA256", "--in", str(data), "--digest", mac)
    bad = cli("hmac-verify", "--kid", hkid, "--alg", "SHA256", "--in", str(data),
              "--digest", "00" * 32)  # fmt: skip
    assert bad.returncode == 1 and b"Digest verification fail" in bad.stderr
    for obj_type, size in (("RSA", ["--key-size", "2048"]), ("EC", ["--ec-name", "NistP256"])):
        name = unique(obj_type.lower())
        kid = cli.ok("create-key", "--obj-type", obj_type, "--name", name, *size).strip()
        shown = json.loads(cli.ok("show-sobject", "--kid", kid))
        pub = serialization.load_der_public_key(base64.b64decode(shown["pub_key"]))
        sig = tmp_path / f"{obj_type}.sig"
        cli.ok("sign", "--kid", kid, "--hash-alg", "SHA256", "--in", str(data), "--out", str(sig))
        if obj_type == "RSA":
            pub.verify(sig.read_bytes(), b"message for DSM", padding.PKCS1v15(), hashes.SHA256())
        else:
            pub.verify(sig.read_bytes(), b"message for DSM", ec.ECDSA(hashes.SHA256()))
        cli.ok("verify", "--kid", kid, "--hash-alg", "SHA256", "--in", str(data),
               "--sig-in", str(sig))  # fmt: skip
        data2 = tmp_path / "other"
        data2.write_bytes(b"another message")
        bad = cli("verify", "--kid", kid, "--hash-alg", "SHA256", "--in", str(data2),
                  "--sig-in", str(sig))  # fmt: skip
        assert bad.returncode == 1


def test_wrap_unwrap_import_derive_agree(cli: Cli, tmp_path: Path) -> None:
    kek = unique("kek")
    kek_id = cli.ok(
        "create-key", "--obj-type", "AES", "--name", kek, "--key-size", "256", "--exportable", "-f"
    ).strip()
    kek_value = bytes.fromhex(cli.ok("export-object", "--kid", kek_id).strip())
    # import-key takes a symmetric key as hex text.
    value = os.urandom(16)
    src = tmp_path / "key.hex"
    src.write_text(value.hex())
    subject = unique("imported")
    sub_id = cli.ok(
        "import-key", "--in", str(src), "--obj-type", "AES", "--name", subject, "--exportable",
        "-f",
    ).strip()  # fmt: skip
    assert bytes.fromhex(cli.ok("export-object", "--kid", sub_id).strip()) == value
    wrapped = tmp_path / "wrapped"
    cli.ok(
        "wrap-key", "--kid", sub_id, "--wrapping-kid", kek_id, "--alg", "AES", "--mode", "KW",
        "--out", str(wrapped),
    )  # fmt: skip
    assert aes_key_unwrap(kek_value, wrapped.read_bytes()) == value
    new_id = cli.ok(
        "unwrap-key", "--in", str(wrapped), "--wrapping-kid", kek_id, "--alg", "AES",
        "--mode", "KW", "--obj-type", "AES", "--name", unique("unwrapped"), "--exportable",
    ).strip()  # fmt: skip
    assert bytes.fromhex(cli.ok("export-object", "--kid", new_id).strip()) == value
    plain, iv = "0123456789abcdef", os.urandom(16).hex()
    derived = cli.ok(
        "derive-key", "--kid", kek_id, "--name", unique("derived"), "--key-size", "128",
        "--key-type", "AES", "--plain", plain, "--alg", "AES", "--mode", "CBC", "--iv", iv,
        "--exportable",
    ).strip()  # fmt: skip
    e = Cipher(algorithms.AES(kek_value), modes.CBC(bytes.fromhex(iv))).encryptor()
    expected = e.update(plain.encode()) + e.finalize()
    assert bytes.fromhex(cli.ok("export-object", "--kid", derived).strip()) == expected
    # ECDH between two keys made by the CLI: both sides agree on one secret.
    a = cli.ok("create-key", "--obj-type", "EC", "--name", unique("a"), "--ec-name", "NistP256",
               "--key-ops", "AGREEKEY,EXPORT", "-f", "--exportable").strip()  # fmt: skip
    b = cli.ok("create-key", "--obj-type", "EC", "--name", unique("b"), "--ec-name", "NistP256",
               "--key-ops", "AGREEKEY").strip()  # fmt: skip
    agreed = cli.ok("agree-key", "--private-key", a, "--public-key", b, "--name", unique("s"),
                    "--key-size", "128", "--key-type", "AES").strip()  # fmt: skip
    assert json.loads(cli.ok("show-sobject", "--kid", agreed))["key_size"] == 128


def test_key_lifecycle_commands(cli: Cli) -> None:
    name = unique("life")
    kid = cli.ok("create-key", "--obj-type", "AES", "--name", name, "--key-size", "128").strip()
    cli.ok("update-object", "--kid", kid, "--description", "changed by sdkms-cli")
    assert json.loads(cli.ok("show-sobject", "--kid", kid))["description"] == "changed by sdkms-cli"
    cli.ok("update-object", "--kid", kid, "--key-ops", "ENCRYPT,APPMANAGEABLE")
    assert sorted(json.loads(cli.ok("show-sobject", "--kid", kid))["key_ops"]) == [
        "APPMANAGEABLE",
        "ENCRYPT",
    ]
    cli.ok("activate-object", "--kid", kid)  # already active: accepted, nothing changes
    new = cli.ok("rotate-key", "--name", name).strip()
    assert new != kid and json.loads(cli.ok("show-sobject", "--name", name))["kid"] == new
    cli.ok("revoke-object", "--kid", kid, "--code", "KeyCompromise", "--message", "test")
    assert json.loads(cli.ok("show-sobject", "--kid", kid))["state"] == "Compromised"
    cli.ok("delete-key", "--kid", kid)
    gone = cli("show-sobject", "--kid", kid)
    assert gone.returncode == 1 and b"status:   404" in gone.stderr


def test_plugin_commands(dsm: Dsm, app: App, tmp_path: Path) -> None:
    """create-plugin wants DSM's 201 Created; the plugin is an app's to invoke."""
    admin = admin_cli(dsm, tmp_path / "admin-token")
    code = tmp_path / "p.lua"
    code.write_text("function run(input) return {echo = input.x} end")
    name = unique("plugin")
    pid = admin.ok("create-plugin", "--in", str(code), "--name", name,
                   "--group-id", app.group_id).strip()  # fmt: skip
    caller = Cli(dsm, tmp_path / "app-token")
    caller.ok("app-login", api_key=app.api_key)
    inp, out = tmp_path / "in.json", tmp_path / "out.json"
    inp.write_text('{"x": 7}')
    caller.ok("invoke-plugin", "--name", name, "--in", str(inp), "--out", str(out))
    assert json.loads(out.read_text()) == {"echo": 7}
    code.write_text("function run(input) return {twice = input.x * 2} end")
    assert admin.ok("update-plugin", "--id", pid, "--in", str(code),
                    "--group-id", app.group_id).strip() == pid  # fmt: skip
    caller.ok("invoke-plugin", "--id", pid, "--in", str(inp), "--out", str(out))
    assert json.loads(out.read_text()) == {"twice": 14}
    admin.ok("delete-plugin", "--id", pid)
    gone = caller("invoke-plugin", "--id", pid, "--in", str(inp), "--out", str(out))
    assert gone.returncode == 1 and b"404" in gone.stderr


def test_admin_commands_groups_and_apps(dsm: Dsm, tmp_path: Path) -> None:
    admin = admin_cli(dsm, tmp_path / "token")
    group = unique("cli-group")
    gid = admin.ok("create-group", "--name", group, "--description", "made by sdkms-cli").strip()
    assert f'{gid} "{group}"' in admin.ok("list-groups")
    assert json.loads(admin.ok("show-group", "--group-id", gid))["name"] == group
    admin.ok("update-group", "--group-id", gid, "--description", "changed")
    assert json.loads(admin.ok("show-group", "--group-id", gid))["description"] == "changed"
    name = unique("cli-app")
    app_id = admin.ok("create-app", "--name", name, "--default-group", group,
                      "--groups", group).strip()  # fmt: skip
    assert f'{app_id} "{name}"' in admin.ok("list-apps")
    shown = json.loads(admin.ok("show-app", "--app-id", app_id))
    assert shown["default_group"] == gid and gid in shown["groups"]
    # The secret is kept as a salted hash: get-app-api-key cannot be served (409,
    # with what to do instead); regenerate-app-api-key would reset it and then fail
    # the same way, so its new key is only in the reset's answer (see docs).
    out = admin("get-app-api-key", "--app-id", app_id)
    assert out.returncode == 1 and b"status:   409" in out.stderr
    assert b"reset_secret" in out.stderr
    out = admin("regenerate-app-api-key", "--app-id", app_id)
    assert out.returncode == 1 and b"status:   409" in out.stderr  # reset, then unreadable
    admin.ok("delete-app", "--app-id", app_id)
    assert app_id not in admin.ok("list-apps")
    admin.ok("delete-group", "--group-id", gid)
    assert gid not in admin.ok("list-groups")
    # An app's session is no user session: the CLI itself refuses before asking.
    app_only = Cli(dsm, tmp_path / "app-only")
    app_only.ok("app-login", api_key=dsm.admin_key)
    refused = app_only("list-groups")
    assert refused.returncode == 1 and b"user-login" in refused.stderr


def test_batch_commands(cli: Cli, tmp_path: Path) -> None:
    """batch-encrypt/-decrypt send {kid, request} items; batch-sign/-verify send
    DSM's SignRequestEx/VerifyRequestEx items (the key inside each)."""
    kid = cli.ok(
        "create-key", "--obj-type", "AES", "--name", unique("batch"), "--key-size", "128",
        "--exportable", "-f",
    ).strip()  # fmt: skip
    value = bytes.fromhex(cli.ok("export-object", "--kid", kid).strip())
    plains = {tmp_path / f"p{i}": os.urandom(20 + i) for i in range(2)}
    ivs = {p: os.urandom(16).hex() for p in plains}
    lines = []
    for p, data in plains.items():
        p.write_bytes(data)
        lines.append(f"--kid {kid} --alg AES --mode CBC --iv {ivs[p]} --in {p} --out {p}.ct")
    batch = tmp_path / "enc.txt"
    batch.write_text("\n".join(lines) + "\n")
    out = cli.ok("batch-encrypt", "--in", str(batch))
    assert out.splitlines() == [f"{i + 1} {p}.ct 0" for i, p in enumerate(plains)]
    dec = []
    for p, data in plains.items():
        d = Cipher(algorithms.AES(value), modes.CBC(bytes.fromhex(ivs[p]))).decryptor()
        ct = Path(f"{p}.ct").read_bytes()
        assert _unpad(d.update(ct) + d.finalize()) == data
        dec.append(f"--kid {kid} --alg AES --mode CBC --iv {ivs[p]} --in {p}.ct --out {p}.back")
    batch.write_text("\n".join(dec) + "\n")
    cli.ok("batch-decrypt", "--in", str(batch))
    for p, data in plains.items():
        assert Path(f"{p}.back").read_bytes() == data
    rsa = cli.ok("create-key", "--obj-type", "RSA", "--name", unique("bs"),
                 "--key-size", "2048").strip()  # fmt: skip
    pub = serialization.load_der_public_key(
        base64.b64decode(json.loads(cli.ok("show-sobject", "--kid", rsa))["pub_key"])
    )
    # The CLI hashes batch-sign inputs read as text: give it text.
    for i, p in enumerate(plains):
        plains[p] = f"line {i} to sign".encode()
        p.write_bytes(plains[p])
    sign = tmp_path / "sign.txt"
    sign.write_text(
        "".join(f"--kid {rsa} --hash-alg SHA256 --in {p} --out {p}.sig\n" for p in plains)
    )
    assert cli.ok("batch-sign", "--in", str(sign)).splitlines() == [
        f"{i + 1} {p}.sig 0" for i, p in enumerate(plains)
    ]
    for p, data in plains.items():
        pub.verify(Path(f"{p}.sig").read_bytes(), data, padding.PKCS1v15(), hashes.SHA256())
    verify = tmp_path / "verify.txt"
    first, second = list(plains)
    verify.write_text(
        f"--kid {rsa} --hash-alg SHA256 --in {first} --sig-in {first}.sig\n"
        f"--kid {rsa} --hash-alg SHA256 --in {first} --sig-in {second}.sig\n"
    )
    # "<line> 0" verified, "<line> 1" not.
    assert cli.ok("batch-verify", "--in", str(verify)).splitlines() == ["1 0", "2 1"]


def test_secrets_import_rotate_and_rsa_import(cli: Cli, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("first secret\n")  # the CLI drops the trailing newline
    name = unique("secret")
    cli.ok("import-secret", "--in", str(secret), "--name", name, "--obj-type", "Secret")
    assert cli.raw("export-object", "--name", name) == b"first secret"
    secret.write_text("second secret\n")
    new = cli.ok("rotate-secret", "--name", name, "--in", str(secret)).strip()
    assert json.loads(cli.ok("show-sobject", "--name", name))["kid"] == new
    assert cli.raw("export-object", "--name", name) == b"second secret"
    # An RSA private key in PEM (PKCS#8) in, the same key out.
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(
        priv.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    rname = unique("rsa-in")
    cli.ok("import-key", "--in", str(pem), "--obj-type", "RSA", "--name", rname,
           "--exportable", "-f")  # fmt: skip
    out = cli.ok("export-object", "--name", rname)
    # The CLI wraps the exported value as "RSA PRIVATE KEY" PEM: PKCS#1, as DSM
    # exports a private key (and Strongroom does), so openssl reads the file as is.
    assert out.startswith("-----BEGIN RSA PRIVATE KEY-----\n")
    back = serialization.load_pem_private_key(out.encode(), None)
    assert back.private_numbers() == priv.private_numbers()


def test_the_cli_came_without_its_python2_backports() -> None:
    """scripts/_setup.sh installs sdkms-cli with --no-deps: enum34 would shadow the
    standard library's enum, argparse its argparse."""
    import argparse
    import enum
    import importlib.metadata
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    assert enum.__file__.startswith(stdlib) and argparse.__file__.startswith(stdlib)
    for name in ("enum34", "argparse"):
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(name)
    assert importlib.metadata.version("sdkms-cli") == "5.6.2919"
    assert importlib.metadata.version("sdkms") == "5.6.2919"


def test_import_cert(dsm: Dsm, cli: Cli) -> None:
    name = unique("cert")
    kid = cli.ok("import-cert", "--in", str(dsm.certs.cert), "--name", name).strip()
    shown = json.loads(cli.ok("show-sobject", "--kid", kid))
    assert shown["obj_type"] == "CERTIFICATE" and shown["name"] == name
    cert = x509.load_pem_x509_certificate(dsm.certs.cert.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert base64.b64decode(shown["pub_key"]) == spki
