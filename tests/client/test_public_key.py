"""Public keys in PEM, DER, JWK and OpenSSH: the library and ``strongroom keys public``.

Each form is checked against pyca/cryptography's own encoding of the key the
daemon reports (the daemon depends on cryptography; the client does not).
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization as ser
from strongroom import AsyncClient, Client
from strongroom._cli import cli

from tests.conftest import unique

CASES = [("RSA", {"key_size": 2048}), ("EC", {"elliptic_curve": "NistP256"}),
         ("EC", {"elliptic_curve": "NistP384"}), ("EC", {"elliptic_curve": "NistP521"}),
         ("EC", {"elliptic_curve": "Ed25519"})]  # fmt: skip


def _int(b64url: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(b64url + "=="), "big")


@pytest.mark.parametrize(("obj_type", "fields"), CASES)
def test_public_key_forms(daemon, obj_type, fields) -> None:
    with Client(daemon.socket, api_key=daemon.admin_key) as c:
        key = c.keys.create(unique("pub"), obj_type, **fields)
        reference = ser.load_der_public_key(key.pub_key)
        pem = c.keys.public(key)
        assert pem.encode() == reference.public_bytes(
            ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo
        )
        assert c.keys.public(name=key.name, format="der") == key.pub_key
        ssh = c.keys.public(kid=key.kid, format="OpenSSH")
        openssh = reference.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
        assert ssh == f"{openssh.decode()} {key.name}"
        jwk = c.keys.public(key, format="JWK")
        assert jwk["kid"] == key.kid
        if obj_type == "RSA":
            nums = reference.public_numbers()
            assert (jwk["kty"], _int(jwk["n"]), _int(jwk["e"])) == ("RSA", nums.n, nums.e)
        elif fields["elliptic_curve"] == "Ed25519":
            raw = reference.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
            assert jwk == {"kty": "OKP", "crv": "Ed25519", "x": jwk["x"], "kid": key.kid}
            assert base64.urlsafe_b64decode(jwk["x"] + "=") == raw
        else:
            nums = reference.public_numbers()
            assert jwk["kty"] == "EC" and jwk["crv"] == "P-" + fields["elliptic_curve"][-3:]
            assert (_int(jwk["x"]), _int(jwk["y"])) == (nums.x, nums.y)


def test_public_key_of_a_symmetric_key_says_so(daemon) -> None:
    with Client(daemon.socket, api_key=daemon.admin_key) as c:
        key = c.keys.create(unique("aes"), "AES", key_size=256)
        with pytest.raises(ValueError, match="has no public key"):
            c.keys.public(key)
        with pytest.raises(ValueError, match="unknown format"):
            c.keys.public(key, format="XML")


def test_async_public_key(daemon) -> None:
    async def main() -> str:
        async with AsyncClient(daemon.socket, api_key=daemon.admin_key) as c:
            key = await c.keys.create(unique("pub"), "EC", elliptic_curve="NistP256")
            return await c.keys.public(key)

    assert asyncio.run(main()).startswith("-----BEGIN PUBLIC KEY-----\n")


def test_cli_keys_public(daemon, tmp_path) -> None:
    env = {"STRONGROOM_SOCKET": str(daemon.socket), "STRONGROOM_API_KEY": daemon.admin_key}

    def run(*args: str, code: int = 0):
        r = CliRunner().invoke(cli, list(args), env=env)
        assert r.exit_code == code, (r.output, r.exception)
        return r

    name = unique("pub")
    run("keys", "create", name, "--type", "RSA", "--size", "2048")
    pem = run("keys", "public", name).stdout
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n") and pem.endswith(
        "-----END PUBLIC KEY-----\n"
    )
    assert run("keys", "public", "--key", name, "--format", "openssh").stdout.startswith("ssh-rsa ")
    assert json.loads(run("keys", "public", name, "--format", "JWK").stdout)["kty"] == "RSA"
    out = tmp_path / "pub.der"
    run("keys", "public", name, "--format", "DER", "--out", str(out))
    assert ser.load_der_public_key(out.read_bytes())
    shown = json.loads(run("--json", "keys", "public", name).stdout)
    assert shown["format"] == "PEM" and shown["public_key"] == pem
    aes = unique("aes")
    run("keys", "create", aes, "--type", "AES")
    r = run("keys", "public", aes, code=1)
    assert "has no public key" in r.stderr
