"""Unknown body fields are ignored, as DSM's server ignores them (serde's default).

Handlers never see them (the router drops fields a route does not declare).
DSM fields that would change a request's meaning and that Strongroom does not
implement are declared and refused instead: an OAEP ``label``.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import unique
from tests.daemon.api.dsm.conftest import Dual, blob
from tests.daemon.api.helpers import err, ok


def test_unknown_fields_are_ignored(admin: Dual) -> None:
    g = ok(admin.call("POST", "/sys/v1/groups", {"name": unique("g"), "colour": "red"}))
    key = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {
                "name": unique("k"),
                "obj_type": "AES",
                "group_id": g["group_id"],
                "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"],
                "some_future_field": {"nested": [1, 2]},
            },
        )
    )
    assert "some_future_field" not in key
    value = blob(ok(admin.call("GET", f"/crypto/v1/keys/{key['kid']}/export"))["value"])
    out = ok(
        admin.call(
            "POST",
            "/crypto/v1/encrypt",
            {"key": {"kid": key["kid"]}, "plain": b"hi", "colour": 1, "frobnicate": True},
        )
    )
    assert AESGCM(value).decrypt(blob(out["iv"]), blob(out["cipher"]) + blob(out["tag"]), None) == (
        b"hi"
    )
    items = [{"kid": key["kid"], "request": {"plain": b"b", "extra": 1}, "note": "x"}]
    (one,) = ok(admin.call("POST", "/crypto/v1/keys/batch/encrypt", items))
    assert one["status"] == 200
    # Known fields are still checked: a wrong type or a missing field is an error.
    err(admin.call("POST", "/crypto/v1/encrypt", {"key": {"kid": key["kid"]}}), "missing_field")
    err(
        admin.call("POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": 5}),
        "invalid_field",
    )


def test_an_oaep_label_is_refused_not_ignored(admin: Dual) -> None:
    g = ok(admin.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]
    aes = ok(
        admin.call(
            "POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES", "group_id": g}
        )
    )
    err(
        admin.call("POST", f"/crypto/v1/keys/{aes['kid']}/encrypt", {"plain": b"x", "label": b"l"}),
        "invalid_field",
    )
    rsa = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("r"), "obj_type": "RSA", "key_size": 2048, "group_id": g},
        )
    )
    err(
        admin.call("POST", f"/crypto/v1/keys/{rsa['kid']}/encrypt", {"plain": b"x", "label": b"l"}),
        "unsupported_algorithm",
    )
