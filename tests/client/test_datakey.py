"""Data keys and envelope files (issue 12): the client, the CLI, checked with cryptography.

The KEKs are imported with known values, so every wrapped key and envelope
is opened here a second time without the daemon: AES KW with
``cryptography``'s aes_key_unwrap, RSA-OAEP with its RSA key, the file with
AESGCM over the documented format.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from strongroom import AsyncClient, BadTag, Client, EnvelopeError, Forbidden, NotFound, envelope

from tests.conftest import unique

WRAP_OPS = ["WRAPKEY", "UNWRAPKEY", "ENCRYPT", "DECRYPT"]


@pytest.fixture
def c(daemon):
    with Client(daemon.socket, api_key=daemon.admin_key) as client:
        yield client


@pytest.fixture
def kek(c):
    """An AES-256 KEK with a known value, in its own group: (Sobject, value, group)."""
    group = c.groups.create(unique("g"))
    value = os.urandom(32)
    key = c.keys.import_key(unique("kek"), "AES", value, key_ops=WRAP_OPS, group_id=group)
    return key, value, group


def _transients(client: Client) -> list[str]:
    return [k.kid for k in client.keys.list() if k.transient]


def test_datakey_plaintext_and_wrapped(c, kek) -> None:
    key, value, _ = kek
    dk = c.datakey(name=key.name)
    assert (dk.kid, dk.obj_type, dk.key_size) == (key.kid, "AES", 256)
    assert (dk.wrap_alg, dk.wrap_mode) == ("AES", "KW")
    assert len(dk.plaintext) == 32
    assert aes_key_unwrap(value, dk.wrapped_key) == dk.plaintext  # independent unwrap
    assert c.unwrap_datakey(dk) == dk.plaintext
    assert "plaintext" not in repr(dk) or "<hidden>" in repr(dk)
    assert dk.plaintext.hex() not in repr(dk)
    assert _transients(c) == []  # the transient key was deleted again


def test_datakey_wrapped_only(c, kek) -> None:
    key, value, _ = kek
    dk = c.datakey(key, bits=128, plaintext=False)
    assert dk.plaintext is None and dk.key_size == 128
    plain = aes_key_unwrap(value, dk.wrapped_key)
    assert len(plain) == 16
    assert c.unwrap_datakey(kid=key.kid, wrapped_key=dk.wrapped_key) == plain
    assert _transients(c) == []


def test_datakey_under_an_rsa_kek(c) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = c.keys.import_key(unique("rsakek"), "RSA", der, key_ops=["WRAPKEY", "UNWRAPKEY"])
    dk = c.datakey(key)
    assert (dk.wrap_alg, dk.wrap_mode) == ("RSA", "OAEP_MGF1_SHA256")
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    assert private.decrypt(dk.wrapped_key, oaep) == dk.plaintext
    assert c.unwrap_datakey(dk) == dk.plaintext


def test_datakey_refusals_leave_no_transient_key(c, kek) -> None:
    _, _, group = kek
    no_wrap = c.keys.create(unique("k"), "AES", key_ops=["ENCRYPT", "DECRYPT"], group_id=group)
    with pytest.raises(Forbidden) as err:
        c.datakey(no_wrap)  # fails at wrapkey, after the transient key was made
    assert err.value.code == "key_op_not_permitted"
    assert _transients(c) == []
    ec = c.keys.create(unique("k"), "EC", elliptic_curve="NistP256")
    with pytest.raises(ValueError, match=r"AES key .* or an RSA key"):
        c.datakey(ec)
    with pytest.raises(ValueError, match="128, 192 or 256"):
        c.datakey(no_wrap, bits=100)
    with pytest.raises(NotFound):
        c.datakey(name=unique("missing"))


def test_unwrap_with_the_wrong_kek_or_a_changed_key_fails(c, kek) -> None:
    key, _, group = kek
    other = c.keys.create(unique("k"), "AES", key_ops=WRAP_OPS, group_id=group)
    dk = c.datakey(key)
    with pytest.raises(BadTag):
        c.unwrap_datakey(dk, kek=other)
    changed = bytes([dk.wrapped_key[0] ^ 1]) + dk.wrapped_key[1:]
    with pytest.raises(BadTag):
        c.unwrap_datakey(kid=key.kid, wrapped_key=changed)
    assert _transients(c) == []


def test_an_app_needs_the_kek_in_its_groups_and_unwrapkey(c, daemon, kek) -> None:
    key, value, group = kek
    member = c.apps.create(unique("app"), groups=[group]).credential.api_key
    stranger_group = c.groups.create(unique("g"))
    stranger = c.apps.create(unique("app"), groups=[stranger_group]).credential.api_key
    with Client(daemon.socket, api_key=member) as app:
        dk = app.datakey(kid=key.kid)
        assert aes_key_unwrap(value, dk.wrapped_key) == dk.plaintext
        assert app.unwrap_datakey(dk) == dk.plaintext
        assert _transients(app) == []
    with Client(daemon.socket, api_key=stranger) as app, pytest.raises(NotFound):
        app.datakey(kid=key.kid)
    wrap_only = c.keys.create(unique("k"), "AES", key_ops=["WRAPKEY"], group_id=group)
    with Client(daemon.socket, api_key=member) as app:
        dk = app.datakey(wrap_only, plaintext=False)  # WRAPKEY is enough to make one
        with pytest.raises(Forbidden):
            app.unwrap_datakey(dk)  # but opening it needs UNWRAPKEY


def test_async_datakey(daemon, kek) -> None:
    key, value, _ = kek

    async def main() -> tuple[bytes, bytes, bytes]:
        async with AsyncClient(daemon.socket, api_key=daemon.admin_key) as ac:
            dk = await ac.datakey(name=key.name)
            back = await ac.unwrap_datakey(dk)
            return dk.plaintext, dk.wrapped_key, back

    plain, wrapped, back = asyncio.run(main())
    assert aes_key_unwrap(value, wrapped) == plain == back


# -- envelope files ----------------------------------------------------------------------


def _open_independently(blob: bytes, kek_value: bytes) -> bytes:
    """The documented format, read with nothing of Strongroom's."""
    assert blob[:5] == b"SRENV" and blob[5] == 1
    (n,) = struct.unpack(">I", blob[6:10])
    header = json.loads(blob[10 : 10 + n])
    assert header["alg"] == "AES-256-GCM" and header["tag_len"] == 128
    assert (header["wrap_alg"], header["wrap_mode"]) == ("AES", "KW")
    data_key = aes_key_unwrap(kek_value, base64.b64decode(header["wrapped_key"]))
    iv = base64.b64decode(header["iv"])
    return AESGCM(data_key).decrypt(iv, blob[10 + n :], blob[: 10 + n])


def test_envelope_round_trip_and_independent_decryption(c, kek) -> None:
    key, value, _ = kek
    data = os.urandom(3 * 1024 * 1024 + 5)  # more than a frame: never sent to the daemon
    out = io.BytesIO()
    header = envelope.encrypt_file(c, io.BytesIO(data), out, kid=key.kid)
    blob = out.getvalue()
    assert header.kek == key.kid and len(blob) == len(header.raw) + len(data) + 16
    assert _open_independently(blob, value) == data
    back = io.BytesIO()
    envelope.decrypt_file(c, io.BytesIO(blob), back)  # the KEK named in the file
    assert back.getvalue() == data
    empty = io.BytesIO()
    envelope.encrypt_file(c, io.BytesIO(b""), empty, kid=key.kid)
    assert _open_independently(empty.getvalue(), value) == b""
    assert _transients(c) == []


def test_envelope_tampering_and_wrong_kek_fail(c, kek, tmp_path: Path) -> None:
    key, _, group = kek
    src, sealed = tmp_path / "plain", tmp_path / "sealed.env"
    src.write_bytes(b"card data " * 1000)
    envelope.encrypt_file(c, src, sealed, name=key.name)
    blob = sealed.read_bytes()
    n = struct.unpack(">I", blob[6:10])[0]
    out = tmp_path / "out"
    for i in (10 + n + 7, len(blob) - 1):  # a ciphertext byte, a tag byte
        bad = tmp_path / f"bad{i}"
        bad.write_bytes(blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1 :])
        with pytest.raises(EnvelopeError) as err:
            envelope.decrypt_file(c, bad, out)
        assert err.value.code == "bad_tag" and not out.exists()
    doc = json.loads(blob[10 : 10 + n])
    doc["iv"] = base64.b64encode(os.urandom(12)).decode()  # the header is in the AAD too
    text = json.dumps(doc).encode()
    (tmp_path / "hdr").write_bytes(blob[:6] + struct.pack(">I", len(text)) + text + blob[10 + n :])
    with pytest.raises(EnvelopeError, match="bad_tag"):
        envelope.decrypt_file(c, tmp_path / "hdr", out)
    other = c.keys.create(unique("k"), "AES", key_ops=WRAP_OPS, group_id=group)
    with pytest.raises(BadTag):
        envelope.decrypt_file(c, sealed, out, kek=other)
    assert not out.exists()
    (tmp_path / "short").write_bytes(blob[:-20])
    with pytest.raises(EnvelopeError, match=r"bad_tag|cut short"):
        envelope.decrypt_file(c, tmp_path / "short", out)
    with pytest.raises(EnvelopeError, match="not_envelope"):
        envelope.decrypt_file(c, src, out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# -- the CLI -------------------------------------------------------------------------------


def test_cli_datakey(sr, kek) -> None:
    key, value, _ = kek
    doc = json.loads(sr("--json", "datakey", "--key", key.name).stdout)
    assert doc["kid"] == key.kid and (doc["wrap_alg"], doc["wrap_mode"]) == ("AES", "KW")
    wrapped, plain = base64.b64decode(doc["wrapped_key"]), base64.b64decode(doc["plaintext"])
    assert aes_key_unwrap(value, wrapped) == plain and len(plain) == 32
    doc = json.loads(sr("--json", "datakey", "--kid", key.kid, "--wrapped-only").stdout)
    assert "plaintext" not in doc
    assert len(aes_key_unwrap(value, base64.b64decode(doc["wrapped_key"]))) == 32
    text = sr("datakey", "--key", key.name, "--bits", "128").stdout
    assert "wrapped_key" in text and "plaintext" in text
    r = sr("datakey", code=2)
    assert "--key NAME or --kid KID" in r.stderr


def test_cli_envelope_round_trip_and_failures(sr, c, kek, tmp_path: Path) -> None:
    key, value, group = kek
    plain, sealed, back = tmp_path / "report.pdf", tmp_path / "report.pdf.env", tmp_path / "back"
    plain.write_bytes(os.urandom(2 * 1024 * 1024))
    sr("envelope", "encrypt", "--key", key.name, "--in", str(plain), "--out", str(sealed))
    assert _open_independently(sealed.read_bytes(), value) == plain.read_bytes()
    sr("envelope", "decrypt", "--in", str(sealed), "--out", str(back))
    assert back.read_bytes() == plain.read_bytes()
    # stdin to stdout
    piped = sr("envelope", "encrypt", "--kid", key.kid, input=b"piped").stdout_bytes
    assert sr("envelope", "decrypt", input=piped).stdout_bytes == b"piped"
    # wrong KEK, tampered file, not an envelope: exit 1, nothing written
    other = c.keys.create(unique("k"), "AES", key_ops=WRAP_OPS, group_id=group)
    out = tmp_path / "out"
    args = ("envelope", "decrypt", "--in", str(sealed), "--out", str(out))
    r = sr(*args, "--key", other.name, code=1)
    assert r.stderr.startswith("error: bad_tag") and not out.exists()
    blob = bytearray(sealed.read_bytes())
    blob[-100] ^= 1
    (tmp_path / "bad.env").write_bytes(bytes(blob))
    r = sr("envelope", "decrypt", "--in", str(tmp_path / "bad.env"), "--out", str(out), code=1)
    assert "error: bad_tag" in r.stderr and "hint:" in r.stderr and not out.exists()
    r = sr("--json", "envelope", "decrypt", "--in", str(plain), "--out", str(out), code=1)
    assert json.loads(r.stderr)["error"] == "not_envelope" and not out.exists()
    # Files that cannot be read or written are named as given.
    missing, nowhere = tmp_path / "missing", tmp_path / "no" / "dir" / "x.env"
    r = sr(
        "envelope", "encrypt", "--key", key.name, "--in", str(missing), "--out", str(out), code=2
    )
    assert f"{missing}: No such file" in r.stderr and not out.exists()
    r = sr(
        "envelope", "encrypt", "--key", key.name, "--in", str(plain), "--out", str(nowhere), code=2
    )
    assert f"{nowhere}: No such file" in r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_app_permissions_a_data_key_needs(c, daemon, kek) -> None:
    """DSM app permissions: WRAPKEY in the KEK's group, and where the transient key is
    made (the app's default group) CREATE_SOBJECTS and EXPORT; DELETE_SOBJECTS lets it
    go at once (else it goes with the connection)."""
    key, value, group = kek
    wrap_only = c.apps.create(unique("app"), groups={group.group_id: ["WRAPKEY"]})
    with Client(daemon.socket, api_key=wrap_only.credential.api_key) as app:
        with pytest.raises(Forbidden) as err:
            app.datakey(kid=key.kid)
        assert err.value.code == "app_permission_denied" and "CREATE_SOBJECTS" in str(err.value)
    enough = ["WRAPKEY", "UNWRAPKEY", "CREATE_SOBJECTS", "EXPORT", "DELETE_SOBJECTS"]
    full = c.apps.create(unique("app"), groups={group.group_id: enough})
    with Client(daemon.socket, api_key=full.credential.api_key) as app:
        dk = app.datakey(kid=key.kid)
        assert aes_key_unwrap(value, dk.wrapped_key) == dk.plaintext
        assert app.unwrap_datakey(dk) == dk.plaintext
        assert _transients(app) == []
    no_unwrap = [p for p in enough if p != "UNWRAPKEY"]
    limited = c.apps.create(unique("app"), groups={group.group_id: no_unwrap})
    with Client(daemon.socket, api_key=limited.credential.api_key) as app:
        dk = app.datakey(kid=key.kid, plaintext=False)
        with pytest.raises(Forbidden) as err:
            app.unwrap_datakey(dk)
        assert err.value.code == "app_permission_denied" and "UNWRAPKEY" in str(err.value)
