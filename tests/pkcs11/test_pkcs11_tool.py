"""OpenSC's pkcs11-tool on the module: list, sign, verify, with the daemon's rules."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from tests.pkcs11.conftest import World, tool_env


def tool(world: World, *args: str, pin: str | None = None, check: bool = True):
    cmd = ["pkcs11-tool", "--module", str(world.module)]
    if pin is not None:
        cmd += ["--login", "--pin", pin]
    return subprocess.run(
        [*cmd, *args], env=tool_env(world), capture_output=True, text=True, timeout=60, check=check
    )


def pub(world: World, role: str):
    return serialization.load_der_public_key(world.keys[world.names[role]]["pub_key"])


def test_token_and_slot(world: World) -> None:
    out = tool(world, "-L").stdout
    assert "token label        : strongroom" in out
    assert "login required" in out


def test_no_objects_before_login(world: World) -> None:
    out = tool(world, "-O").stdout
    assert world.names["rsa"] not in out


def test_list_objects_after_login(world: World) -> None:
    out = tool(world, "-O", pin=world.api_key).stdout
    for role in ("rsa", "ec", "aes", "hmac", "ed"):
        assert world.names[role] in out
        assert world.id_hex(role) in out.replace(" ", "")
    assert world.names["other"] not in out  # another group's key
    assert "Private Key Object; RSA" in out
    assert "Public Key Object; RSA 2048 bits" in out
    assert "Secret Key Object; AES length 32" in out


def test_other_app_sees_only_its_group(world: World) -> None:
    out = tool(world, "-O", pin=world.other_key).stdout
    assert world.names["other"] in out
    assert world.names["rsa"] not in out


def test_wrong_pin(world: World) -> None:
    r = tool(world, "-O", pin="bm90OmFrZXk=", check=False)
    assert r.returncode != 0
    assert "CKR_PIN_INCORRECT" in r.stderr


def test_sign_rsa_and_verify_with_openssl_key(world: World, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"signed through strongroom\n")
    sig = tmp_path / "sig"
    tool(
        world,
        "--sign",
        "-m",
        "SHA256-RSA-PKCS",
        "--id",
        world.id_hex("rsa"),
        "-i",
        str(data),
        "-o",
        str(sig),
        pin=world.api_key,
    )
    pub(world, "rsa").verify(
        sig.read_bytes(), data.read_bytes(), padding.PKCS1v15(), hashes.SHA256()
    )
    r = tool(
        world,
        "--verify",
        "-m",
        "SHA256-RSA-PKCS",
        "--id",
        world.id_hex("rsa"),
        "-i",
        str(data),
        "--signature-file",
        str(sig),
        pin=world.api_key,
    )
    assert "Signature is valid" in r.stdout


def test_sign_rsa_pss_prehashed(world: World, tmp_path: Path) -> None:
    msg = b"pss message"
    data = tmp_path / "hash"
    data.write_bytes(hashlib.sha256(msg).digest())
    sig = tmp_path / "sig"
    tool(
        world,
        "--sign",
        "-m",
        "RSA-PKCS-PSS",
        "--hash-algorithm",
        "SHA256",
        "--mgf",
        "MGF1-SHA256",
        "--id",
        world.id_hex("rsa"),
        "-i",
        str(data),
        "-o",
        str(sig),
        pin=world.api_key,
    )
    pub(world, "rsa").verify(
        sig.read_bytes(),
        msg,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )


def test_sign_ecdsa(world: World, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"ecdsa through strongroom")
    sig = tmp_path / "sig"
    tool(
        world,
        "--sign",
        "-m",
        "ECDSA-SHA256",
        "--signature-format",
        "openssl",
        "--id",
        world.id_hex("ec"),
        "-i",
        str(data),
        "-o",
        str(sig),
        pin=world.api_key,
    )
    pub(world, "ec").verify(sig.read_bytes(), data.read_bytes(), ec.ECDSA(hashes.SHA256()))
    r = tool(
        world,
        "--verify",
        "-m",
        "ECDSA-SHA256",
        "--signature-format",
        "openssl",
        "--id",
        world.id_hex("ec"),
        "-i",
        str(data),
        "--signature-file",
        str(sig),
        pin=world.api_key,
    )
    assert "Signature is valid" in r.stdout


def test_missing_key_op(world: World, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x")
    r = tool(
        world,
        "--sign",
        "-m",
        "ECDSA-SHA256",
        "--id",
        world.id_hex("verify_only"),
        "-i",
        str(data),
        "-o",
        str(tmp_path / "sig"),
        pin=world.api_key,
        check=False,
    )
    assert r.returncode != 0
    assert "CKR_KEY_FUNCTION_NOT_PERMITTED" in r.stderr


def test_config_file(world: World, tmp_path: Path) -> None:
    key_file = tmp_path / "app.key"
    key_file.write_text(world.api_key)
    conf = tmp_path / "p11.conf"
    conf.write_text(
        f"# example\nsocket = {world.daemon.socket}\ntoken_label = vault-a\n"
        f"api_key_file = {key_file}\ntimeout = 30\n"
    )
    env = tool_env(world, STRONGROOM_PKCS11_CONFIG=str(conf))
    env.pop("STRONGROOM_SOCKET")
    r = subprocess.run(
        ["pkcs11-tool", "--module", str(world.module), "-L"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert "token label        : vault-a" in r.stdout
    assert "login required" not in r.stdout  # the module logs in with the key file
    r = subprocess.run(
        ["pkcs11-tool", "--module", str(world.module), "-O"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert world.names["rsa"] in r.stdout


def test_daemon_down(world: World, tmp_path: Path) -> None:
    env = tool_env(world, STRONGROOM_SOCKET=str(tmp_path / "nothing.sock"))
    r = subprocess.run(
        ["pkcs11-tool", "--module", str(world.module), "--login", "--pin", world.api_key, "-O"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert "CKR_DEVICE_ERROR" in r.stderr


def test_pkcs11_tool_self_test(world: World) -> None:
    """`pkcs11-tool --test`: random, digests, signatures, verify, decrypt on the app's keys."""
    r = tool(world, "--test", pin=world.api_key, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "No errors" in out
    assert "all 4 signature functions seem to work" in out  # needs CKF_HW mechanisms
    assert "SHA256-RSA-PKCS: OK" in out
    assert "RSA-PKCS-OAEP" in out


def test_pkcs11_tool_test_ec(world: World) -> None:
    """`pkcs11-tool --test-ec`: generate a P-256 pair, relabel, sign, delete."""
    r = tool(
        world,
        "--test-ec",
        "--id",
        "0a0b",
        "--label",
        "tool-test-ec",
        "--key-type",
        "EC:prime256v1",
        pin=world.api_key,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Key pair generated" in r.stdout
    assert "Deleting the private and the public key again" in r.stdout
    assert "error" not in (r.stdout + r.stderr).lower()


def test_pkcs11_tool_test_fork(world: World) -> None:
    """`pkcs11-tool --test-fork`: C_Initialize again in a forked child."""
    r = tool(world, "--test-fork", pin=world.api_key, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Calling C_Initialize in forked child process" in r.stdout
