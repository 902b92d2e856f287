"""Red team: a BIP32 weak child must not carry its parent out of the parent's group.

A non-hardened (weak) child's private key and the parent's extended public key
(its chain code: every key view's pub_key) give the parent's private key:
k_parent = k_child - HMAC-SHA512(chain_code, K_parent || index)[:32] (mod n).
So an app holding only DERIVEKEY (or TRANSFORM) in the parent's group, which may
not EXPORT there, must not put an exportable weak child in another group where
it (or anyone) may export it. Checked: refused with 403 app_permission_denied;
allowed once the app holds EXPORT in the parent's group, and the parent's key
recovered from the child independently (hmac, integer arithmetic) to show what
the refusal protects.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from strongroomd.auth import APP_PERMISSIONS

from tests.conftest import Daemon, Raw, unique
from tests.daemon.api.helpers import new_group, ok
from tests.daemon.api.test_app_permissions import XPRV_0H, denied, make_app
from tests.daemon.api.test_lua_bip32 import b58check_decode

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _parent_from_child(xpub_parent: bytes, xprv_child: bytes, index: int) -> int:
    chain, pub = xpub_parent[13:45], xpub_parent[45:78]
    il = hmac.new(chain, pub + index.to_bytes(4, "big"), hashlib.sha512).digest()[:32]
    k_child = int.from_bytes(xprv_child[46:78], "big")
    return (k_child - int.from_bytes(il, "big")) % N


@pytest.mark.parametrize("route", ["/crypto/v1/derive", "/crypto/v1/keys/transform"])
def test_weak_child_into_another_group_needs_export_in_the_parents(
    daemon: Daemon, admin_raw: Raw, route: str
) -> None:
    parent_group, other = new_group(admin_raw), new_group(admin_raw)
    body = {
        "name": unique("bip"),
        "value": XPRV_0H,
        "group_id": parent_group,
        "key_ops": ["SIGN", "VERIFY", "DERIVEKEY", "EXPORT", "APPMANAGEABLE"],
    }
    parent = ok(admin_raw.call("POST", "/crypto/v1/keys/bip32/import", body))
    ask = {
        "key": {"kid": parent["kid"]},
        "key_type": "BIP32",
        "mechanism": {"bip32_weak_child": {"index": 1}},
        "group_id": other,
        "key_ops": ["SIGN", "EXPORT"],
    }
    perms = ["DERIVEKEY", "TRANSFORM", "CREATE_SOBJECTS"]
    # Both apps may do anything in the other group, EXPORT included.
    everything = list(APP_PERMISSIONS)
    weak = make_app(daemon, admin_raw, {parent_group: perms, other: everything})
    strong = make_app(daemon, admin_raw, {parent_group: [*perms, "EXPORT"], other: everything})
    try:
        denied(weak.call("POST", route, {**ask, "name": unique("c")}), "EXPORT")
        # Same group: exporting the child needs EXPORT there anyway, so it is allowed.
        same = {**ask, "name": unique("c"), "group_id": parent_group}
        assert ok(weak.call("POST", route, same))["group_id"] == parent_group
        child = ok(strong.call("POST", route, {**ask, "name": unique("c")}))
        xprv = ok(
            admin_raw.call("POST", "/crypto/v1/keys/bip32/export", {"key": {"kid": child["kid"]}})
        )["value"]
        xpub = parent["pub_key"]
        xpub = xpub if isinstance(xpub, bytes) else b58check_decode(xpub)
        got = _parent_from_child(xpub, b58check_decode(xprv.decode()), 1)
        assert got == int.from_bytes(b58check_decode(XPRV_0H)[46:78], "big")
    finally:
        weak.conn.close()
        strong.conn.close()


def test_weak_child_made_transient_then_persisted_elsewhere_needs_export(
    daemon: Daemon, admin_raw: Raw
) -> None:
    """The same hop through a transient key: made in the parent's group (where the
    app may not EXPORT), then persisted into a group where it may."""
    parent_group, other = new_group(admin_raw), new_group(admin_raw)
    body = {
        "name": unique("bip"),
        "value": XPRV_0H,
        "group_id": parent_group,
        "key_ops": ["SIGN", "VERIFY", "DERIVEKEY", "EXPORT", "APPMANAGEABLE"],
    }
    parent = ok(admin_raw.call("POST", "/crypto/v1/keys/bip32/import", body))
    everything = list(APP_PERMISSIONS)
    app = make_app(
        daemon,
        admin_raw,
        {parent_group: ["DERIVEKEY", "CREATE_SOBJECTS"], other: everything},
    )
    try:
        ask = {
            "key": {"kid": parent["kid"]},
            "key_type": "BIP32",
            "mechanism": {"bip32_weak_child": {"index": 1}},
            "name": unique("c"),
            "group_id": parent_group,
            "transient": True,
            "key_ops": ["SIGN", "EXPORT"],
        }
        denied(app.call("POST", "/crypto/v1/derive", ask), "EXPORT")
        # Not exportable: allowed, and persisting cannot add EXPORT.
        t = ok(app.call("POST", "/crypto/v1/derive", {**ask, "key_ops": ["SIGN"]}))
        moved = app.call(
            "POST",
            "/crypto/v1/keys/persist",
            {"key": {"transient_key": t["kid"]}, "group_id": other, "key_ops": ["SIGN", "EXPORT"]},
        )
        assert moved["status"] == 400, moved
    finally:
        app.conn.close()
