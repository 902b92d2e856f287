"""GnuTLS on the module: p11tool lists the objects, certtool signs with a Strongroom key;
p11-kit finds the module through pkcs11/strongroom.module."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import ROOT
from tests.pkcs11.conftest import World, tool_env


def gnutls_env(world: World) -> dict[str, str]:
    # The PIN (the app's API key) goes by environment, never on the command line.
    return tool_env(world, GNUTLS_PIN=world.api_key)


def test_p11tool_lists_objects_after_login(world: World) -> None:
    r = subprocess.run(
        ["p11tool", "--provider", str(world.module), "--list-all", "--login"],
        env=gnutls_env(world),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for role in ("rsa", "ec", "aes"):
        assert f"Label: {world.names[role]}" in out
    assert f"object={world.names['rsa']};type=private" in out
    assert f"object={world.names['rsa']};type=public" in out
    assert "Type: Private key (RSA-2048)" in out
    assert "Type: Private key (EC/ECDSA-SECP256R1)" in out
    assert world.names["other"] not in out  # another group's key


def test_p11tool_token(world: World) -> None:
    r = subprocess.run(
        ["p11tool", "--provider", str(world.module), "--list-tokens"],
        env=tool_env(world),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Label: strongroom" in r.stdout
    assert "Requires login" in r.stdout


@pytest.mark.parametrize("role", ["rsa", "ec"])
def test_certtool_self_signed(world: World, tmp_path: Path, role: str) -> None:
    template = tmp_path / "cert.cfg"
    template.write_text('cn = "strongroom gnutls"\nserial = 7\nexpiration_days = 30\nsigning_key\n')
    cert = tmp_path / "cert.pem"
    url = f"pkcs11:token=strongroom;object={world.names[role]};type=private"
    r = subprocess.run(
        [
            "certtool",
            "--generate-self-signed",
            "--provider",
            str(world.module),
            "--load-privkey",
            url,
            "--template",
            str(template),
            "--outfile",
            str(cert),
        ],
        env=gnutls_env(world),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # OpenSSL checks the signature made in Strongroom ...
    v = subprocess.run(
        ["openssl", "verify", "-CAfile", str(cert), str(cert)], capture_output=True, text=True
    )
    assert v.returncode == 0 and f"{cert}: OK" in v.stdout, v.stdout + v.stderr
    # ... and the certificate holds the Strongroom key's public key.
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    spki = c.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki == world.keys[world.names[role]]["pub_key"]
    assert c.subject.rfc4514_string() == "CN=strongroom gnutls"


def test_p11kit_module_file(world: World) -> None:
    """p11-kit lists the module through strongroom.module in a user config dir.

    p11-kit reads ~/.config/pkcs11/modules only for non-root users, so as root
    the check runs as nobody (setpriv) with a world-readable temporary HOME."""
    text = (ROOT / "pkcs11" / "strongroom.module").read_text()
    assert "\nmodule: libstrongroom-pkcs11.so\n" in text
    home = Path(tempfile.mkdtemp(prefix="p11kit-home-"))
    try:
        modules = home / ".config" / "pkcs11" / "modules"
        modules.mkdir(parents=True)
        lib = home / "libstrongroom-pkcs11.so"  # readable by nobody wherever the tree is
        shutil.copy(world.module, lib)
        # what an operator does: point module: at where the library lives
        (modules / "strongroom.module").write_text(
            text.replace("module: libstrongroom-pkcs11.so", f"module: {lib}")
        )
        for p in [home, *home.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        cmd = ["p11-kit", "list-modules"]
        if os.getuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: p11-kit ignores user config")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        r = subprocess.run(
            cmd,
            env={**tool_env(world), "HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert f"strongroom: {lib}" in r.stdout
        section = r.stdout.split(f"strongroom: {lib}", 1)[1]
        assert "library-manufacturer: Strongroom" in section
        assert "token: strongroom" in section
    finally:
        shutil.rmtree(home)
