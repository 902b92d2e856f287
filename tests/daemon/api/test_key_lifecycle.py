"""Key lifecycle over the socket: rekey with versions, revoke, destroy, private parts.

Every result is checked with ``cryptography`` against exported key values.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_der_public_key

from tests.conftest import Raw, start_daemon, unique
from tests.daemon.api.helpers import err, new_app, new_group, ok

EXPORTABLE = ["ENCRYPT", "DECRYPT", "EXPORT", "APPMANAGEABLE"]


def _value(conn: Raw, kid: str) -> bytes:
    return ok(conn.call("GET", f"/crypto/v1/keys/{kid}/export"))["value"]


def _sealed(out: dict) -> dict:
    return {"mode": "GCM", **{k: out[k] for k in ("cipher", "iv", "tag")}}


def test_rekey_makes_versions_that_keep_decrypting(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    name = unique("rot")
    v1 = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/keys",
            {"name": name, "obj_type": "AES", "group_id": g, "key_ops": EXPORTABLE},
        )
    )
    sealed = {
        v1["kid"]: ok(
            admin_raw.call("POST", f"/crypto/v1/keys/{v1['kid']}/encrypt", {"plain": b"one"})
        )
    }
    versions = [v1]
    for plain in (b"two", b"three"):
        new = ok(admin_raw.call("POST", "/crypto/v1/keys/rekey", {"name": name}))
        assert new["name"] == name and new["kid"] != versions[-1]["kid"]
        assert new["links"] == {"replaced": versions[-1]["kid"]}
        versions.append(new)
        # By name, encryption uses the newest version.
        out = ok(
            admin_raw.call("POST", "/crypto/v1/encrypt", {"key": {"name": name}, "plain": plain})
        )
        assert out["kid"] == new["kid"]
        sealed[new["kid"]] = out
    for older, newer in itertools.pairwise(versions):
        info = ok(admin_raw.call("GET", f"/crypto/v1/keys/{older['kid']}"))
        assert info["links"]["replacement"] == newer["kid"]
        assert info["name"].startswith(f"{name} (rotated at ")
        assert info["state"] == "Active"  # deactivate_rotated_key was not asked
    # Every version decrypts its own data, in the daemon and in cryptography.
    for v, plain in zip(versions, (b"one", b"two", b"three"), strict=True):
        out = sealed[v["kid"]]
        back = ok(admin_raw.call("POST", f"/crypto/v1/keys/{v['kid']}/decrypt", _sealed(out)))
        assert back["plain"] == plain
        key = _value(admin_raw, v["kid"])
        assert AESGCM(key).decrypt(out["iv"], out["cipher"] + out["tag"], None) == plain
    assert len({_value(admin_raw, v["kid"]) for v in versions}) == 3  # new material each time


def test_rekey_can_deactivate_the_old_version(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    name = unique("rot")
    old = ok(
        admin_raw.call("POST", "/crypto/v1/keys", {"name": name, "obj_type": "AES", "group_id": g})
    )
    out = ok(admin_raw.call("POST", f"/crypto/v1/keys/{old['kid']}/encrypt", {"plain": b"x"}))
    ok(
        admin_raw.call(
            "POST", "/crypto/v1/keys/rekey", {"name": name, "deactivate_rotated_key": True}
        )
    )
    info = ok(admin_raw.call("GET", f"/crypto/v1/keys/{old['kid']}"))
    assert info["state"] == "Deactivated" and "deactivation_date" in info
    err(
        admin_raw.call("POST", f"/crypto/v1/keys/{old['kid']}/encrypt", {"plain": b"y"}),
        "forbidden",
    )
    back = ok(admin_raw.call("POST", f"/crypto/v1/keys/{old['kid']}/decrypt", _sealed(out)))
    assert back["plain"] == b"x"


def test_a_revoked_key_refuses_encrypt_and_still_decrypts(daemon, admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    app = new_app(daemon, admin_raw, [g])
    key = ok(app.call("POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES"}))
    out = ok(app.call("POST", f"/crypto/v1/keys/{key['kid']}/encrypt", {"plain": b"kept"}))
    revoked = ok(
        app.call(
            "POST",
            f"/crypto/v1/keys/{key['kid']}/revoke",
            {"code": "KeyCompromise", "message": "laptop lost"},
        )
    )
    assert revoked["state"] == "Compromised"
    assert revoked["revocation_reason"]["code"] == "KeyCompromise"
    assert "compromise_date" in revoked
    err(app.call("POST", f"/crypto/v1/keys/{key['kid']}/encrypt", {"plain": b"new"}), "forbidden")
    back = ok(app.call("POST", f"/crypto/v1/keys/{key['kid']}/decrypt", _sealed(out)))
    assert back["plain"] == b"kept"
    err(
        app.call("POST", f"/crypto/v1/keys/{key['kid']}/revoke", {"code": "Whatever"}),
        "invalid_value",
    )
    # Another group's app cannot revoke it (the denied direction).
    other = new_app(daemon, admin_raw, [new_group(admin_raw)])
    err(
        other.call("POST", f"/crypto/v1/keys/{key['kid']}/revoke", {"code": "Unspecified"}),
        "not_found",
    )


def test_schedule_and_cancel_deletion(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    key = ok(
        admin_raw.call(
            "POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES", "group_id": g}
        )
    )
    kid = key["kid"]
    info = ok(
        admin_raw.call("POST", f"/crypto/v1/keys/{kid}/schedule_deletion", {"pending_days": 3})
    )
    assert "deletion_date" in info
    err(admin_raw.call("POST", f"/crypto/v1/keys/{kid}/encrypt", {"plain": b"x"}), "forbidden")
    info = ok(admin_raw.call("POST", f"/crypto/v1/keys/{kid}/cancel_deletion"))
    assert "deletion_date" not in info
    ok(admin_raw.call("POST", f"/crypto/v1/keys/{kid}/encrypt", {"plain": b"x"}))
    err(admin_raw.call("POST", f"/crypto/v1/keys/{kid}/cancel_deletion"), "conflict")


def test_destroy_erases_material_and_keeps_metadata(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        g = new_group(admin)
        kid = ok(
            admin.call(
                "POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES", "group_id": g}
            )
        )["kid"]
        err(admin.call("POST", f"/crypto/v1/keys/{kid}/destroy"), "conflict")  # revoke first
        ok(admin.call("POST", f"/crypto/v1/keys/{kid}/revoke", {"code": "CessationOfOperation"}))
        info = ok(admin.call("POST", f"/crypto/v1/keys/{kid}/destroy"))
        assert info["state"] == "Destroyed" and "destruction_date" in info
        err(
            admin.call(
                "POST",
                f"/crypto/v1/keys/{kid}/decrypt",
                {"mode": "GCM", "cipher": b"x", "iv": b"0" * 12, "tag": b"t" * 16},
            ),
            "forbidden",
        )
        assert d.stop() == 0
        d.start()
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        assert ok(admin.call("GET", f"/crypto/v1/keys/{kid}"))["state"] == "Destroyed"
    finally:
        d.stop()
    db = sqlite3.connect(d.state_dir / "strongroom.db")
    assert db.execute("SELECT state FROM keys WHERE kid = ?", (kid,)).fetchone() == ("Destroyed",)


def test_deleting_the_private_half_keeps_verifying(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    key = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/keys",
            {"name": unique("rsa"), "obj_type": "RSA", "key_size": 2048, "group_id": g},
        )
    )
    kid = key["kid"]
    sig = ok(
        admin_raw.call("POST", f"/crypto/v1/keys/{kid}/sign", {"hash_alg": "SHA256", "data": b"m"})
    )["signature"]
    info = ok(admin_raw.call("DELETE", f"/crypto/v1/keys/{kid}/private"))
    assert info["public_only"] is True and "SIGN" not in info["key_ops"]
    err(
        admin_raw.call("POST", f"/crypto/v1/keys/{kid}/sign", {"hash_alg": "SHA256", "data": b"m"}),
        "key_op_not_permitted",
    )
    assert ok(
        admin_raw.call(
            "POST",
            f"/crypto/v1/keys/{kid}/verify",
            {"hash_alg": "SHA256", "data": b"m", "signature": sig},
        )
    )["result"]
    load_der_public_key(info["pub_key"]).verify(sig, b"m", padding.PKCS1v15(), hashes.SHA256())
    err(admin_raw.call("DELETE", f"/crypto/v1/keys/{kid}/private"), "invalid_value")


def test_kill9_during_rekeys_leaves_no_key_half_rotated(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        g = new_group(admin)
        names = [unique("r") for _ in range(4)]
        sealed = {}
        for name in names:
            kid = ok(
                admin.call(
                    "POST", "/crypto/v1/keys", {"name": name, "obj_type": "AES", "group_id": g}
                )
            )["kid"]
            sealed[kid] = ok(
                admin.call("POST", f"/crypto/v1/keys/{kid}/encrypt", {"plain": kid.encode()})
            )
        rng = random.Random(7)
        sent = [
            admin.send("POST", "/crypto/v1/keys/rekey", {"name": rng.choice(names)})
            for _ in range(40)
        ]
        acked = []
        for _ in range(6):  # some answers, then the kill, with rekeys still in flight
            r = admin.recv()
            if r["status"] == 200:
                acked.append(r["body"]["kid"])
        assert len(sent) == 40 and acked
        d.kill9()
        d.start()
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        keys = ok(admin.call("GET", "/crypto/v1/keys", {"group_id": g}))
        by_kid = {k["kid"]: k for k in keys}
        for kid in acked:  # every acknowledged version is there
            assert kid in by_kid
        for name in names:  # each name is one key, the newest of its chain
            holders = [k for k in keys if k["name"] == name]
            assert len(holders) == 1 and "replacement" not in holders[0].get("links", {})
        for k in keys:  # links go both ways, to keys that exist
            links = k.get("links", {})
            if "replacement" in links:
                assert by_kid[links["replacement"]]["links"]["replaced"] == k["kid"]
            if "replaced" in links:
                assert by_kid[links["replaced"]]["links"]["replacement"] == k["kid"]
        for kid, out in sealed.items():  # data under the first versions still decrypts
            back = ok(admin.call("POST", f"/crypto/v1/keys/{kid}/decrypt", _sealed(out)))
            assert back["plain"] == kid.encode()
        verify = ok(admin.call("GET", "/sys/v1/logs/verify"))
        assert verify["ok"], verify
    finally:
        d.stop()


def test_kill9_during_batches_loses_nothing_acknowledged(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        g = new_group(admin)
        new = {"name": unique("b"), "obj_type": "AES", "group_id": g, "key_ops": EXPORTABLE}
        kid = ok(admin.call("POST", "/crypto/v1/keys", new))["kid"]
        items = [{"kid": kid, "request": {"plain": b"%d" % i}} for i in range(500)]
        for _ in range(20):
            admin.send("POST", "/crypto/v1/keys/batch/encrypt", items)
        first = admin.recv()  # one batch answered, the others in flight at the kill
        assert first["status"] == 200
        d.kill9()
        d.start()
        admin = Raw(d.socket)
        admin.login(d.admin_key)
        value = _value(admin, kid)  # the key survived, with its material
        for i, r in enumerate(first["body"]):
            b = r["body"]
            assert AESGCM(value).decrypt(b["iv"], b["cipher"] + b["tag"], None) == b"%d" % i
        ok(admin.call("POST", f"/crypto/v1/keys/{kid}/encrypt", {"plain": b"after"}))
        assert ok(admin.call("GET", "/sys/v1/logs/verify"))["ok"]
    finally:
        d.stop()
