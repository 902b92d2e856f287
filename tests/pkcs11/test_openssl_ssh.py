"""OpenSSL 3 (libp11's pkcs11 engine) and OpenSSH with keys held in Strongroom."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from tests.pkcs11.conftest import World, tool_env

SSHD = Path("/usr/sbin/sshd")


@pytest.fixture
def env(world: World, tmp_path: Path) -> dict[str, str]:
    """The module logs in with an API key file: no PIN prompt in openssl or ssh."""
    key_file = tmp_path / "api.key"
    key_file.write_text(world.tls_key + "\n")
    key_file.chmod(0o600)
    return tool_env(
        world,
        STRONGROOM_PKCS11_API_KEY_FILE=str(key_file),
        PKCS11_MODULE_PATH=str(world.module),
    )


def run(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def pub(world: World, role: str):
    return serialization.load_der_public_key(world.keys[world.names[role]]["pub_key"])


@pytest.mark.parametrize("role", ["tls_rsa", "tls_ec"])
def test_openssl_engine_signs_with_a_pkcs11_uri(
    world: World, env: dict[str, str], tmp_path: Path, role: str
) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"openssl through strongroom")
    sig = tmp_path / "sig"
    uri = f"pkcs11:object={world.names[role]};type=private"
    r = run(
        ["openssl", "dgst", "-engine", "pkcs11", "-keyform", "engine", "-sign", uri,
         "-sha256", "-out", str(sig), str(data)],
        env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pem = tmp_path / "pub.pem"
    pem.write_bytes(
        pub(world, role).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    r = run(
        ["openssl", "dgst", "-sha256", "-verify", str(pem), "-signature", str(sig), str(data)], env
    )
    assert "Verified OK" in r.stdout, r.stderr
    if role == "tls_rsa":
        pub(world, role).verify(
            sig.read_bytes(), data.read_bytes(), padding.PKCS1v15(), hashes.SHA256()
        )
    else:
        pub(world, role).verify(sig.read_bytes(), data.read_bytes(), ec.ECDSA(hashes.SHA256()))


def self_signed(world: World, env: dict[str, str], tmp_path: Path, role: str) -> Path:
    cert = tmp_path / f"{role}.crt"
    uri = f"pkcs11:object={world.names[role]};type=private"
    r = run(
        ["openssl", "req", "-new", "-x509", "-engine", "pkcs11", "-keyform", "engine",
         "-key", uri, "-subj", "/CN=strongroom-test", "-days", "2", "-out", str(cert)],
        env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return cert


def test_self_signed_certificate(world: World, env: dict[str, str], tmp_path: Path) -> None:
    cert_path = self_signed(world, env, tmp_path, "tls_ec")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.public_key() == pub(world, "tls_ec")
    cert.verify_directly_issued_by(cert)


@pytest.mark.parametrize("role", ["tls_ec", "tls_rsa"])
def test_tls_handshake_with_s_server(
    world: World, env: dict[str, str], tmp_path: Path, role: str
) -> None:
    cert = self_signed(world, env, tmp_path, role)
    port = free_port()
    uri = f"pkcs11:object={world.names[role]};type=private"
    server = subprocess.Popen(
        ["openssl", "s_server", "-engine", "pkcs11", "-keyform", "engine", "-key", uri,
         "-cert", str(cert), "-accept", f"127.0.0.1:{port}", "-www"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_port(port, server)
        r = run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(cert),
             "-verify_return_error", "-servername", "strongroom-test"],
            env,
            input="GET / HTTP/1.0\r\n\r\n",
        )  # fmt: skip
        assert "Verify return code: 0 (ok)" in r.stdout, r.stdout + r.stderr
        assert "TLSv1.3" in r.stdout
    finally:
        server.kill()
        server.wait()


def test_ssh_keygen_lists_public_keys(world: World, env: dict[str, str]) -> None:
    r = run(["ssh-keygen", "-D", str(world.module)], env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rsa = pub(world, "tls_rsa").public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert f"{rsa.decode()} {world.names['tls_rsa']}" in lines
    assert any(line.startswith("ecdsa-sha2-nistp256 ") for line in lines)
    assert not any(world.names["rsa"] in line for line in lines)  # another group's key


@pytest.mark.skipif(not SSHD.exists() or os.geteuid() != 0, reason="sshd runs as root here")
def test_sshd_accepts_a_strongroom_key(world: World, env: dict[str, str], tmp_path: Path) -> None:
    host_key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    authorized = tmp_path / "authorized_keys"
    rsa = pub(world, "tls_rsa").public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    authorized.write_bytes(rsa + b"\n")
    cfg = tmp_path / "sshd_config"
    cfg.write_text(
        f"ListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
        "UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nPidFile none\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    port = free_port()
    sshd = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(cfg), "-p", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_port(port, sshd)
        r = run(
            ["ssh", "-F", "/dev/null", "-I", str(world.module), "-o", "BatchMode=yes",
             "-o", "IdentityFile=none", "-o", "StrictHostKeyChecking=no",
             "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}", "-p", str(port),
             "root@127.0.0.1", "echo", "logged-in-with-strongroom"],
            env,
        )  # fmt: skip
        assert r.stdout.strip() == "logged-in-with-strongroom", r.stderr
    finally:
        sshd.kill()
        out = sshd.communicate()[0]
    assert "Accepted publickey for root" in out
