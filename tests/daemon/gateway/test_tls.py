"""The gateway serving HTTPS itself (``http_tls_cert_file``/``http_tls_key_file``):
a request verified against the test CA, plain HTTP refused on the TLS port, a
key file others can read refused at start, and the settings' checks."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import Daemon, start_daemon
from tests.daemon.gateway.conftest import gateway_url
from tests.daemon.test_operations import strongroomd as run
from tests.dsm.certs import Certs, make_certs, tls_config


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory, certs: Certs):
    d = start_daemon(tmp_path_factory.mktemp("tls"), config=tls_config(certs))
    yield d
    assert d.stop() == 0


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_https_verified_against_the_ca(tls_daemon: Daemon, certs: Certs) -> None:
    url = gateway_url(tls_daemon)
    assert url.startswith("https://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", _port(url), context=ctx, timeout=30)
    conn.request(
        "POST",
        "/sys/v1/session/auth",
        headers={"Authorization": f"Basic {tls_daemon.admin_key}"},
    )
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200, body
    assert resp.getheader("Strict-Transport-Security") == "max-age=31536000"
    sock = conn.sock
    assert isinstance(sock, ssl.SSLSocket)
    assert sock.version() in ("TLSv1.2", "TLSv1.3")
    conn.request(
        "GET", "/sys/v1/version", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["version"]
    conn.close()


def test_an_untrusted_certificate_fails_verification(tls_daemon: Daemon) -> None:
    ctx = ssl.create_default_context()  # the system CAs only: the test CA is not among them
    conn = http.client.HTTPSConnection(
        "127.0.0.1", _port(gateway_url(tls_daemon)), context=ctx, timeout=30
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/sys/v1/health")
    conn.close()


def test_tls_below_1_2_is_refused(tls_daemon: Daemon, certs: Certs) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client itself would offer TLS 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    port = _port(gateway_url(tls_daemon))
    with socket.create_connection(("127.0.0.1", port), 30) as raw, pytest.raises(ssl.SSLError) as e:
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    # The client did offer TLS 1.1 (not "no protocols available"); the server hung up.
    assert "NO_PROTOCOLS" not in str(e.value).upper(), e.value


def test_plain_http_to_the_tls_port_fails(tls_daemon: Daemon, certs: Certs) -> None:
    port = _port(gateway_url(tls_daemon))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/sys/v1/health")
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            conn.getresponse()  # no HTTP answer: the server only speaks TLS
    finally:
        conn.close()
    # ... and the daemon still serves HTTPS afterwards.
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    conn.request("GET", "/sys/v1/health")
    assert conn.getresponse().status == 204
    conn.close()


def test_a_key_readable_by_others_is_refused_at_start(tmp_path: Path, certs: Certs) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(certs.key.read_bytes())
    loose.chmod(0o640)
    cfg = tls_config(Certs(certs.ca, certs.cert, loose))
    with pytest.raises(RuntimeError) as err:
        start_daemon(tmp_path, config=cfg)
    text = str(err.value)
    assert f"http_tls_key_file {loose} is readable by others (mode 640); chmod 600 it" in text
    assert "PRIVATE KEY" not in text  # the key is never logged
    out = run("check-config", "--config", str(tmp_path / "state.toml"))
    assert out.returncode != 0
    assert "readable by others" in out.stderr


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path: Path, certs: Certs) -> None:
    other = make_certs(tmp_path / "other")
    cfg = tls_config(Certs(certs.ca, certs.cert, other.key))
    with pytest.raises(RuntimeError) as err:
        start_daemon(tmp_path, config=cfg)
    assert "cannot be used together" in str(err.value)
    assert "PRIVATE KEY" not in str(err.value)
    out = run("check-config", "--config", str(tmp_path / "state.toml"))
    assert out.returncode != 0 and "cannot be used together" in out.stderr


def test_settings(tmp_path: Path, certs: Certs) -> None:
    one = tmp_path / "one.toml"
    one.write_text(f'http_enabled = true\nhttp_tls_cert_file = "{certs.cert}"\n')
    out = run("check-config", "--config", str(one))
    assert out.returncode == 2 and "http_tls_cert_file and http_tls_key_file together" in out.stderr
    good = tmp_path / "good.toml"
    good.write_text(tls_config(certs))
    out = run("check-config", "--config", str(good), env={"STRONGROOM_STATE_DIR": str(tmp_path)})
    assert out.returncode == 0, out
    assert f'http_tls_key_file = "{certs.key}"' in out.stdout
    assert "gateway       https (TLS 1.2+)" in out.stdout
    # A TLS gateway on a network address still needs http_allow_remote, without the
    # "behind a TLS proxy" condition.
    remote = tmp_path / "remote.toml"
    remote.write_text(tls_config(certs, 'http_host = "0.0.0.0"\n'))
    out = run("check-config", "--config", str(remote))
    assert out.returncode == 2 and "set http_allow_remote = true to serve" in out.stderr
    remote.write_text(tls_config(certs, 'http_host = "0.0.0.0"\nhttp_allow_remote = true\n'))
    out = run("check-config", "--config", str(remote), env={"STRONGROOM_STATE_DIR": str(tmp_path)})
    assert out.returncode == 0, out
    plain = tmp_path / "plain.toml"
    plain.write_text('http_enabled = true\nhttp_host = "0.0.0.0"\n')
    out = run("check-config", "--config", str(plain))
    assert out.returncode == 2 and "TLS-terminating proxy" in out.stderr


def test_an_encrypted_key_is_refused_at_start(tmp_path: Path, certs: Certs) -> None:
    key = serialization.load_pem_private_key(certs.key.read_bytes(), None)
    enc = tmp_path / "enc.key"
    fd = os.open(enc, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
    with pytest.raises(RuntimeError) as err:
        start_daemon(tmp_path, config=tls_config(Certs(certs.ca, certs.cert, enc)))
    assert "http_tls_key_file is encrypted" in str(err.value)
