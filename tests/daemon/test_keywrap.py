"""RFC 3394/5649 over a block-cipher callable, checked against `cryptography`."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)
from strongroomd import keywrap
from strongroomd.errors import BadRequest, BadTag

KEK = os.urandom(32)


def enc(block: bytes) -> bytes:
    e = Cipher(algorithms.AES(KEK), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()


def dec(block: bytes) -> bytes:
    d = Cipher(algorithms.AES(KEK), modes.ECB()).decryptor()
    return d.update(block) + d.finalize()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 14, 20, 31, 32, 33, 64, 200])
def test_kwp_matches_rfc5649(n: int) -> None:
    key = os.urandom(n)
    wrapped = keywrap.wrap(enc, key, pad=True)
    assert wrapped == aes_key_wrap_with_padding(KEK, key)
    assert keywrap.unwrap(dec, wrapped, pad=True) == key
    assert aes_key_unwrap_with_padding(KEK, wrapped) == key


@pytest.mark.parametrize("n", [16, 24, 32, 64])
def test_kw_matches_rfc3394(n: int) -> None:
    key = os.urandom(n)
    wrapped = keywrap.wrap(enc, key, pad=False)
    assert wrapped == aes_key_wrap(KEK, key)
    assert keywrap.unwrap(dec, wrapped, pad=False) == aes_key_unwrap(KEK, wrapped) == key


def test_tampering_and_bad_lengths() -> None:
    wrapped = bytearray(keywrap.wrap(enc, os.urandom(20), pad=True))
    wrapped[5] ^= 1
    with pytest.raises(BadTag):
        keywrap.unwrap(dec, bytes(wrapped), pad=True)
    with pytest.raises(BadTag):
        keywrap.unwrap(dec, os.urandom(17), pad=True)
    with pytest.raises(BadTag):  # a KW blob is not a KWP blob
        keywrap.unwrap(dec, aes_key_wrap(KEK, os.urandom(16)), pad=True)
    with pytest.raises(BadRequest):
        keywrap.wrap(enc, os.urandom(20), pad=False)
