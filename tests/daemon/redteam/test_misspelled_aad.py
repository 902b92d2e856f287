"""Red team: associated data sent under the common name ``aad`` must not vanish.

DSM's field is ``ad``. Unknown fields are ignored (as DSM does), so an
``aad`` field used to be dropped: the GCM ciphertext was bound to no
associated data, and a decrypt sending the same ``aad`` succeeded too, so the
caller never learnt that its context binding did not exist. Like the OAEP
``label``, ``aad`` is declared in order to be refused (400 invalid_field,
naming ``ad``), single and batch; ``ad`` still binds (checked with
cryptography's AESGCM).
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import err, new_group, ok


def _key(c: Raw) -> tuple[str, bytes]:
    g = new_group(c)
    body = {
        "name": unique("k"),
        "obj_type": "AES",
        "key_size": 256,
        "group_id": g,
        "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"],
    }
    kid = ok(c.call("POST", "/crypto/v1/keys", body))["kid"]
    return kid, ok(c.call("GET", f"/crypto/v1/keys/{kid}/export"))["value"]


@pytest.mark.parametrize("op", ["encrypt", "decrypt"])
def test_aad_is_refused_not_dropped(admin_raw: Raw, op: str) -> None:
    kid, _ = _key(admin_raw)
    body = {"key": {"kid": kid}, "alg": "AES", "mode": "GCM", "aad": b"context"}
    if op == "encrypt":
        body["plain"] = b"secret"
    else:
        body.update(cipher=b"x" * 16, iv=b"\0" * 12, tag=b"\0" * 16)
    out = err(admin_raw.call("POST", f"/crypto/v1/{op}", body), "invalid_field")
    assert "'ad'" in out["message"], out


def test_aad_in_a_batch_item_is_refused(admin_raw: Raw) -> None:
    kid, _ = _key(admin_raw)
    item = {"kid": kid, "request": {"alg": "AES", "mode": "GCM", "plain": b"s", "aad": b"c"}}
    out = ok(admin_raw.call("POST", "/crypto/v1/keys/batch/encrypt", [item]))
    assert out[0]["status"] == 400 and out[0]["code"] == "invalid_field", out
    assert "'ad'" in out[0]["error"], out


def test_ad_still_binds(admin_raw: Raw) -> None:
    kid, value = _key(admin_raw)
    enc = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/encrypt",
            {"key": {"kid": kid}, "alg": "AES", "mode": "GCM", "plain": b"secret", "ad": b"ctx"},
        )
    )
    assert AESGCM(value).decrypt(enc["iv"], enc["cipher"] + enc["tag"], b"ctx") == b"secret"
