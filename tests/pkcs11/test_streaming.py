"""Multi-part encryption and decryption through the module: the daemon's
streaming paths (one update request per C_*Update), so data larger than one
frame (4 MiB) goes through; results checked with cryptography."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import padding as sympad
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.mechanisms import GCMParams

from tests.pkcs11.conftest import World

#: uneven pieces, some larger than the daemon's field limit (1 MiB), 6 MiB in all
SIZES = [1, 700_000, 3 * 1024 * 1024 + 5, 17, 1024 * 1024, 1_500_000 - 23]


def pieces(data: bytes) -> Iterator[bytes]:
    off = 0
    for n in SIZES:
        yield data[off : off + n]
        off += n
    if off < len(data):
        yield data[off:]


def aes(session: Any) -> tuple[Any, bytes]:
    k = session.generate_key(KeyType.AES, 256, store=False, template={Attribute.EXTRACTABLE: True})
    return k, k[Attribute.VALUE]


def crypt(k: Any, decrypt: bool, data: bytes, mech: Mechanism, param: Any) -> bytes:
    f = k.decrypt if decrypt else k.encrypt
    # buffer_size below the output of the large pieces: the module answers the
    # length query and keeps the result for the call that takes it
    return b"".join(f(pieces(data), mechanism=mech, mechanism_param=param, buffer_size=4096))


MSG_LEN = sum(SIZES)


def test_gcm_multipart_larger_than_a_frame(session: Any) -> None:
    k, value = aes(session)
    msg = os.urandom(MSG_LEN)
    assert len(msg) > 4 * 1024 * 1024
    nonce, aad = os.urandom(12), b"streamed header"
    ct = crypt(k, False, msg, Mechanism.AES_GCM, GCMParams(nonce, aad))
    assert ct == AESGCM(value).encrypt(nonce, msg, aad)
    assert crypt(k, True, ct, Mechanism.AES_GCM, GCMParams(nonce, aad)) == msg
    # a 96-bit tag
    ct = crypt(k, False, msg, Mechanism.AES_GCM, GCMParams(nonce, aad, 96))
    full = AESGCM(value).encrypt(nonce, msg, aad)
    assert ct == full[:-4]
    assert crypt(k, True, ct, Mechanism.AES_GCM, GCMParams(nonce, aad, 96)) == msg


def test_gcm_multipart_wrong_tag_fails(session: Any) -> None:
    k, value = aes(session)
    msg = os.urandom(MSG_LEN)
    nonce = os.urandom(12)
    ct = AESGCM(value).encrypt(nonce, msg, None)
    bad = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(pkcs11.exceptions.PKCS11Error):
        crypt(k, True, bad, Mechanism.AES_GCM, GCMParams(nonce))
    # the session is usable again afterwards
    assert crypt(k, True, ct, Mechanism.AES_GCM, GCMParams(nonce)) == msg


def test_cbc_pad_multipart_larger_than_a_frame(session: Any) -> None:
    k, value = aes(session)
    msg = os.urandom(MSG_LEN)
    iv = os.urandom(16)
    ct = crypt(k, False, msg, Mechanism.AES_CBC_PAD, iv)
    p = sympad.PKCS7(128).padder()
    e = Cipher(algorithms.AES(value), modes.CBC(iv)).encryptor()
    assert ct == e.update(p.update(msg) + p.finalize()) + e.finalize()
    assert crypt(k, True, ct, Mechanism.AES_CBC_PAD, iv) == msg


def test_ctr_multipart_larger_than_a_frame(session: Any) -> None:
    k, value = aes(session)
    msg = os.urandom(MSG_LEN)
    cb = os.urandom(8) + bytes(7) + b"\x01"
    param = struct.pack("@L16s", 64, cb)
    ct = crypt(k, False, msg, Mechanism.AES_CTR, param)
    e = Cipher(algorithms.AES(value), modes.CTR(cb)).encryptor()
    assert ct == e.update(msg) + e.finalize()
    assert crypt(k, True, ct, Mechanism.AES_CTR, param) == msg


def test_cbc_nopad_and_small_multipart(session: Any) -> None:
    k, value = aes(session)
    iv = os.urandom(16)
    msg = os.urandom(64)
    chunks = [msg[:5], msg[5:40], b"", msg[40:]]
    ct = b"".join(k.encrypt(iter(chunks), mechanism=Mechanism.AES_CBC, mechanism_param=iv))
    e = Cipher(algorithms.AES(value), modes.CBC(iv)).encryptor()
    assert ct == e.update(msg) + e.finalize()
    back = k.decrypt(iter([ct[:3], ct[3:]]), mechanism=Mechanism.AES_CBC, mechanism_param=iv)
    assert b"".join(back) == msg
    # GCM decryption whose pieces are shorter than the tag
    nonce = os.urandom(12)
    ct = AESGCM(value).encrypt(nonce, b"tiny", None)
    parts = [ct[i : i + 3] for i in range(0, len(ct), 3)]
    out = k.decrypt(iter(parts), mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce))
    assert b"".join(out) == b"tiny"


def test_des3_cbc_pad_multipart(session: Any) -> None:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

    k = session.generate_key(KeyType.DES3, store=False, template={Attribute.EXTRACTABLE: True})
    value = k[Attribute.VALUE]
    iv = os.urandom(8)
    msg = os.urandom(2 * 1024 * 1024 + 3)
    ct = crypt(k, False, msg, Mechanism.DES3_CBC_PAD, iv)
    p = sympad.PKCS7(64).padder()
    e = Cipher(TripleDES(value), modes.CBC(iv)).encryptor()
    assert ct == e.update(p.update(msg) + p.finalize()) + e.finalize()
    assert crypt(k, True, ct, Mechanism.DES3_CBC_PAD, iv) == msg


def test_closing_a_session_ends_its_stream(p11: Any, world: World) -> None:
    # More abandoned streams than the daemon allows one caller at once (16):
    # each C_CloseSession ends its stream, so the next ones still start.
    tok = p11.get_token(token_label="strongroom")
    for _ in range(20):
        s = tok.open(user_pin=world.api_key, rw=True)
        try:
            k = s.generate_key(KeyType.AES, 256, store=False)
            gen = k.encrypt(
                iter([b"a" * 100, b"b" * 100]),
                mechanism=Mechanism.AES_CBC_PAD,
                mechanism_param=bytes(16),
            )
            assert len(next(gen)) == 96
        finally:
            s.close()
        del gen
