"""DSM's REST shapes: per-key paths, batch, alg from the key, digest on mac, health/version.

Results are checked with ``cryptography``, never only against the daemon itself.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import err, new_app, new_group, ok


def _exportable_aes(admin: Raw, group: str) -> tuple[str, bytes]:
    key = ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {
                "name": unique("k"),
                "obj_type": "AES",
                "group_id": group,
                "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT", "MACGENERATE", "MACVERIFY"],
            },
        )
    )
    value = ok(admin.call("GET", f"/crypto/v1/keys/{key['kid']}/export"))["value"]
    assert value == ok(admin.call("POST", "/crypto/v1/keys/export", {"kid": key["kid"]}))["value"]
    return key["kid"], value


def test_per_key_paths_and_alg_taken_from_the_key(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    kid, value = _exportable_aes(admin_raw, g)
    out = ok(admin_raw.call("POST", f"/crypto/v1/keys/{kid}/encrypt", {"plain": b"hello"}))
    assert out["kid"] == kid
    plain = AESGCM(value).decrypt(out["iv"], out["cipher"] + out["tag"], None)
    assert plain == b"hello"
    back = ok(
        admin_raw.call(
            "POST",
            f"/crypto/v1/keys/{kid}/decrypt",
            {"cipher": out["cipher"], "iv": out["iv"], "tag": out["tag"], "mode": "GCM"},
        )
    )
    assert back["plain"] == b"hello"
    # The key-in-body form takes alg from the key too.
    out2 = ok(admin_raw.call("POST", "/crypto/v1/encrypt", {"key": {"kid": kid}, "plain": b"x"}))
    assert AESGCM(value).decrypt(out2["iv"], out2["cipher"] + out2["tag"], None) == b"x"
    # A per-key path ignores a key in the body, as DSM ignores unknown fields: the
    # path names the key.
    other = ok(admin_raw.call("POST", "/crypto/v1/keys", {"name": unique("o"), "obj_type": "AES"}))
    out3 = ok(
        admin_raw.call(
            "POST", f"/crypto/v1/keys/{kid}/encrypt", {"key": {"kid": other["kid"]}, "plain": b"x"}
        )
    )
    assert out3["kid"] == kid
    assert AESGCM(value).decrypt(out3["iv"], out3["cipher"] + out3["tag"], None) == b"x"


def test_mac_answers_digest_as_well(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    hk = ok(
        admin_raw.call(
            "PUT",
            "/crypto/v1/keys",
            {"name": unique("h"), "obj_type": "HMAC", "value": b"k" * 32, "group_id": g},
        )
    )
    out = ok(
        admin_raw.call(
            "POST", f"/crypto/v1/keys/{hk['kid']}/mac", {"alg": "SHA256", "data": b"msg"}
        )
    )
    want = hmac.new(b"k" * 32, b"msg", hashlib.sha256).digest()
    assert out["mac"] == out["digest"] == want


def test_batch_encrypt_keeps_order_and_isolates_failures(daemon, admin_raw: Raw) -> None:
    g, other = new_group(admin_raw), new_group(admin_raw)
    app = new_app(daemon, admin_raw, [g])
    mine, value = _exportable_aes(admin_raw, g)
    theirs, _ = _exportable_aes(admin_raw, other)
    items = []
    for i in range(1000):
        if i % 10 == 3:
            items.append({"kid": theirs, "request": {"plain": b"%d" % i}})  # not in its groups
        elif i % 10 == 7:
            items.append({"kid": mine, "request": {"plain": "not bytes"}})  # wrong type
        else:
            items.append({"kid": mine, "request": {"alg": "AES", "plain": b"%d" % i}})
    out = ok(app.call("POST", "/crypto/v1/keys/batch/encrypt", items))
    assert len(out) == 1000
    for i, r in enumerate(out):
        if i % 10 == 3:
            assert (r["status"], r["code"]) == (404, "not_found"), r
        elif i % 10 == 7:
            assert (r["status"], r["code"]) == (400, "invalid_field"), r
        else:
            b = r["body"]
            assert r["status"] == 200 and b["kid"] == mine
            assert AESGCM(value).decrypt(b["iv"], b["cipher"] + b["tag"], None) == b"%d" % i
    # Decrypt them back in one batch, in order.
    back = ok(
        app.call(
            "POST",
            "/crypto/v1/keys/batch/decrypt",
            [
                {
                    "kid": mine,
                    "request": {
                        "mode": "GCM",
                        **{k: r["body"][k] for k in ("cipher", "iv", "tag")},
                    },
                }
                for r in out
                if r["status"] == 200
            ],
        )
    )
    plains = [r["body"]["plain"] for r in back]
    assert plains == [b"%d" % i for i in range(1000) if i % 10 not in (3, 7)]
    # One audit record per batch, naming each key with its items' outcomes.
    logs = ok(admin_raw.call("GET", "/sys/v1/logs", {"actor_id": app.id}))
    batch = [r for r in logs if r["action"] == "POST /crypto/v1/keys/batch/encrypt"]
    assert len(batch) == 1
    assert batch[0]["detail"]["keys"] == {
        mine: {"ok": 800, "invalid_field": 100},
        theirs: {"not_found": 100},
    }


def test_batch_refuses_what_is_not_a_batch(admin_raw: Raw) -> None:
    err(admin_raw.call("POST", "/crypto/v1/keys/batch/sign", {"kid": "x"}), "invalid_field")
    out = ok(admin_raw.call("POST", "/crypto/v1/keys/batch/sign", [{"kid": 1}, "x"]))
    assert [r["code"] for r in out] == ["invalid_field", "invalid_field"]


def test_health_and_version_need_no_login(daemon) -> None:
    anon = Raw(daemon.socket)
    try:
        assert anon.call("GET", "/sys/v1/health")["status"] == 204
        v = ok(anon.call("GET", "/sys/v1/version"))
        assert set(v) == {"version", "api_version", "server_mode"}
        assert v["server_mode"] == "Software"
        # Everything else still needs a login (the denied direction).
        err(anon.call("GET", "/crypto/v1/keys"), "unauthenticated")
    finally:
        anon.close()


def test_rsa_wraps_and_unwraps_with_oaep_sha256(admin_raw: Raw) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    g = new_group(admin_raw)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs8 = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    kek = ok(
        admin_raw.call(
            "PUT",
            "/crypto/v1/keys",
            {
                "name": unique("kek"),
                "obj_type": "RSA",
                "value": pkcs8,
                "group_id": g,
                "key_ops": ["WRAPKEY", "UNWRAPKEY", "ENCRYPT", "DECRYPT"],
            },
        )
    )
    subject, value = _exportable_aes(admin_raw, g)
    oaep256 = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    mode = {"OAEP": {"mgf": {"mgf1": {"hash": "SHA256"}}}}
    wrapped = ok(
        admin_raw.call(
            "POST",
            f"/crypto/v1/keys/{kek['kid']}/wrapkey",
            {"subject": {"kid": subject}, "mode": mode},
        )
    )["wrapped_key"]
    assert private.decrypt(wrapped, oaep256) == value
    fresh = bytes(range(32))
    made = ok(
        admin_raw.call(
            "POST",
            f"/crypto/v1/keys/{kek['kid']}/unwrapkey",
            {
                "wrapped_key": private.public_key().encrypt(fresh, oaep256),
                "obj_type": "AES",
                "mode": mode,
                "name": unique("unwrapped"),
                "group_id": g,
                "key_ops": ["ENCRYPT", "EXPORT"],
            },
        )
    )
    assert _value_of(admin_raw, made["kid"]) == fresh
    bad = ok(admin_raw.call("POST", "/crypto/v1/keys/info", {"kid": kek["kid"]}))
    err(
        admin_raw.call(
            "POST",
            f"/crypto/v1/keys/{bad['kid']}/unwrapkey",
            {"wrapped_key": b"\x01" * 256, "obj_type": "AES", "mode": mode, "name": unique()},
        ),
        "bad_tag",
    )


def _value_of(conn: Raw, kid: str) -> bytes:
    return ok(conn.call("GET", f"/crypto/v1/keys/{kid}/export"))["value"]


def test_des_is_single_des_and_opaque_is_stored_only(admin_raw: Raw) -> None:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    g = new_group(admin_raw)
    value = bytes.fromhex("133457799bbcdff1")
    des = ok(
        admin_raw.call(
            "PUT",
            "/crypto/v1/keys",
            {"name": unique("des"), "obj_type": "DES", "value": value, "group_id": g},
        )
    )
    assert (des["obj_type"], des["key_size"]) == ("DES", 56)
    iv = bytes(8)
    out = ok(
        admin_raw.call(
            "POST",
            f"/crypto/v1/keys/{des['kid']}/encrypt",
            {"plain": b"8 bytes!", "mode": "CBCNOPAD", "iv": iv},
        )
    )
    # TripleDES with K||K||K is single DES in cryptography too.
    dec = Cipher(TripleDES(value * 3), modes.CBC(iv)).decryptor()
    assert dec.update(out["cipher"]) + dec.finalize() == b"8 bytes!"
    assert _value_of(admin_raw, des["kid"]) == value
    # The classic single-DES worked example (FIPS 46 walk-throughs): one block, ECB.
    ecb = ok(
        admin_raw.call(
            "POST",
            f"/crypto/v1/keys/{des['kid']}/encrypt",
            {"plain": bytes.fromhex("0123456789abcdef"), "mode": "ECB"},
        )
    )
    assert ecb["cipher"].hex() == "85e813540f0ab405"
    made = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/keys",
            {
                "name": unique("des"),
                "obj_type": "DES",
                "group_id": g,
                "key_ops": ["ENCRYPT", "EXPORT"],
            },
        )
    )
    generated = _value_of(admin_raw, made["kid"])
    assert len(generated) == 8 and all(bin(b).count("1") % 2 for b in generated)

    blob = b"any bytes at all, kept and given back"
    opaque = ok(
        admin_raw.call(
            "PUT",
            "/crypto/v1/keys",
            {"name": unique("op"), "obj_type": "OPAQUE", "value": blob, "group_id": g},
        )
    )
    assert opaque["key_ops"] == ["EXPORT", "APPMANAGEABLE"]
    assert _value_of(admin_raw, opaque["kid"]) == blob
    err(
        admin_raw.call("POST", f"/crypto/v1/keys/{opaque['kid']}/encrypt", {"plain": b"x"}),
        "key_op_not_permitted",
    )
    err(
        admin_raw.call(
            "POST", "/crypto/v1/keys", {"name": unique("op"), "obj_type": "OPAQUE", "group_id": g}
        ),
        "invalid_value",
    )


def test_key_check_values_and_key_digests(admin_raw: Raw) -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.cmac import CMAC

    g = new_group(admin_raw)
    value = bytes(range(16))
    key = ok(
        admin_raw.call(
            "PUT",
            "/crypto/v1/keys",
            {"name": unique("kcv"), "obj_type": "AES", "value": value, "group_id": g},
        )
    )
    enc = Cipher(algorithms.AES(value), modes.ECB()).encryptor().update(bytes(16))
    mac = CMAC(algorithms.AES(value))
    mac.update(bytes(16))
    want_enc, want_cmac = enc[:3].hex().upper(), mac.finalize()[:5].hex().upper()
    assert ok(admin_raw.call("POST", "/crypto/v1/keys/kcv", {"kid": key["kid"]}))["kcv"] == want_enc
    got = ok(
        admin_raw.call("POST", "/crypto/v1/keys/kcv", {"name": key["name"], "kcv_method": "Cmac"})
    )
    assert got["kcv"] == want_cmac
    for kcv, method, verified in ((want_enc, "Encrypt", True), ("000000", "Encrypt", False),
                                  (want_cmac.lower(), "Cmac", True)):  # fmt: skip
        out = ok(
            admin_raw.call(
                "POST",
                "/crypto/v1/keys/kcv/verify",
                {"kcv": kcv, "value": value, "obj_type": "AES", "kcv_method": method},
            )
        )
        assert out["verified"] is verified
    digest = ok(
        admin_raw.call(
            "POST", "/crypto/v1/keys/digest", {"key": {"kid": key["kid"]}, "alg": "SHA256"}
        )
    )
    assert digest["digest"] == hashlib.sha256(value).digest()
    sealed = ok(
        admin_raw.call(
            "POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES", "group_id": g}
        )
    )
    err(
        admin_raw.call(
            "POST", "/crypto/v1/keys/digest", {"key": {"kid": sealed["kid"]}, "alg": "SHA256"}
        ),
        "key_op_not_permitted",
    )


def test_audit_range_to_takes_its_whole_second(admin_raw: Raw) -> None:
    """range_to is epoch seconds and records have milliseconds: a record at
    T.5 s is in [T, T], so windows [a, T] and [T + 1, b] miss nothing."""
    g = new_group(admin_raw)  # an audited change, its group id the record's object
    rec = ok(admin_raw.call("GET", "/sys/v1/logs", {"object_id": g}))[0]
    while rec["time"].endswith(".000Z"):  # 1 in 1000: make one with milliseconds
        g = new_group(admin_raw)
        rec = ok(admin_raw.call("GET", "/sys/v1/logs", {"object_id": g}))[0]
    t = calendar.timegm(time.strptime(rec["time"][:19], "%Y-%m-%dT%H:%M:%S"))
    found = ok(admin_raw.call("GET", "/sys/v1/logs", {"object_id": g, "range_to": t}))
    assert [r["seq"] for r in found] == [rec["seq"]]
    window = {"object_id": g, "range_from": t, "range_to": t}
    assert [r["seq"] for r in ok(admin_raw.call("GET", "/sys/v1/logs", window))] == [rec["seq"]]
    # The second before it and the one after it do not hold it.
    for bounds in ({"range_to": t - 1}, {"range_from": t + 1}):
        assert ok(admin_raw.call("GET", "/sys/v1/logs", {"object_id": g, **bounds})) == []
    err(admin_raw.call("GET", "/sys/v1/logs", {"range_to": 253402300799}), "invalid_value")
