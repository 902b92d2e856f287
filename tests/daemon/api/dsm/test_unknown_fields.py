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


def test_a_slip_of_a_known_field_is_refused_not_ignored(admin: Dual) -> None:
    """Ignored, ``keyops`` would leave a key's rights unchanged and ``transiant``
    would store a key meant to die with the connection."""
    g = ok(admin.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]
    key = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("k"), "obj_type": "AES", "group_id": g, "key_ops": ["ENCRYPT"]},
        )
    )
    for body, near in (
        ({"keyops": ["ENCRYPT", "EXPORT"]}, "key_ops"),
        ({"Key_Ops": ["ENCRYPT", "EXPORT"]}, "key_ops"),
        ({"kye_ops": ["ENCRYPT", "EXPORT"]}, "key_ops"),
    ):
        e = err(admin.call("PATCH", f"/crypto/v1/keys/{key['kid']}", body), "unknown_field")
        assert f"did you mean '{near}'" in e["message"]
    assert ok(admin.call("GET", f"/crypto/v1/keys/{key['kid']}"))["key_ops"] == ["ENCRYPT"]
    name = unique("t")
    e = err(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {"name": name, "obj_type": "AES", "group_id": g, "transiant": True},
        ),
        "unknown_field",
    )
    assert "transient" in e["message"]
    listed = ok(admin.call("GET", "/crypto/v1/keys"))
    assert name not in {k["name"] for k in listed}  # nothing was stored
    # A letter more or less is another field (DSM has enable and enabled): ignored.
    ok(admin.call("PATCH", f"/crypto/v1/keys/{key['kid']}", {"enable": False}))
    assert ok(admin.call("GET", f"/crypto/v1/keys/{key['kid']}"))["enabled"] is True
