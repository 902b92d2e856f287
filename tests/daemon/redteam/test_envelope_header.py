"""Red team: a hostile envelope file's header gets the envelope's own error.

The header (JSON) is read from an untrusted file before anything is checked
by the tag. An iv of a length AES-GCM refuses (empty here) made
``cryptography`` raise a bare ValueError from decrypt, after the data key had
been unwrapped by the daemon; ``read_header`` now refuses it as a damaged
header (EnvelopeError not_envelope) before any request. A header that only
changes the iv of a good file still fails the tag (the header is the AAD).
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct

import pytest
from strongroom import envelope as env
from strongroom._exceptions import EnvelopeError


def _file(iv: bytes, body: bytes = b"\0" * 16) -> bytes:
    doc = {
        "alg": "AES-256-GCM",
        "iv": base64.b64encode(iv).decode(),
        "tag_len": 128,
        "kek": "kid",
        "wrap_alg": "AES",
        "wrap_mode": "KW",
        "wrapped_key": base64.b64encode(b"w" * 40).decode(),
    }
    text = json.dumps(doc).encode()
    return b"SRENV\x01" + struct.pack(">I", len(text)) + text + body


@pytest.mark.parametrize("iv", [b"", b"\0" * 7, b"\0" * 16])
def test_an_iv_encrypt_never_writes_is_a_damaged_header(iv: bytes) -> None:
    with pytest.raises(EnvelopeError) as exc:
        env.read_header(io.BytesIO(_file(iv)))
    assert exc.value.code == "not_envelope"


def test_a_changed_iv_fails_the_tag() -> None:
    key = os.urandom(32)
    dk = {"key_size": 256, "kid": "kid", "wrap_alg": "AES", "wrap_mode": "KW"}
    out = io.BytesIO()
    env.encrypt({**dk, "wrapped_key": b"w" * 40, "plaintext": key}, io.BytesIO(b"data"), out)
    good = out.getvalue()
    header = env.read_header(io.BytesIO(good))
    assert env.decrypt(header, key, io.BytesIO(good[len(header.raw) :]), io.BytesIO()) == 4
    old = base64.b64encode(header.iv).decode().encode()
    new = base64.b64encode(bytes(12)).decode().encode()
    bad = good.replace(old, new)
    h2 = env.read_header(io.BytesIO(bad))
    with pytest.raises(EnvelopeError) as exc:
        env.decrypt(h2, key, io.BytesIO(bad[len(h2.raw) :]), io.BytesIO())
    assert exc.value.code == "bad_tag"
