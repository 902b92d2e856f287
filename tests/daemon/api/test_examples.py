"""The example plugins in examples/plugins/, run in the real daemon, checked outside."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import err, new_app, new_group, ok

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "plugins"


def push_example(admin: Raw, file: str, groups: list[str], **replace: str) -> dict:
    code = (EXAMPLES / file).read_text()
    for old, new in replace.items():
        code = code.replace(old, new)
    return ok(
        admin.call(
            "POST",
            "/sys/v1/plugins",
            {
                "name": unique(file.removesuffix(".lua")),
                "groups": groups,
                "source": {"language": "LUA", "code": code},
            },
        )
    )


def run(conn: Raw, plugin: dict, body: dict) -> dict:
    return conn.call("POST", f"/sys/v1/plugins/{plugin['plugin_id']}", body)


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def test_envelope_encryption(daemon, admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    kek_value = os.urandom(32)
    name = unique("kek")
    ok(
        admin_raw.call(
            "PUT",
            "/crypto/v1/keys",
            {
                "name": name,
                "obj_type": "AES",
                "value": kek_value,
                "group_id": g,
                "key_ops": ["WRAPKEY", "UNWRAPKEY"],
            },
        )
    )
    p = push_example(admin_raw, "envelope.lua", [g], **{'"envelope-kek"': f'"{name}"'})
    out = ok(run(admin_raw, p, {"op": "encrypt", "plain": b"attack at dawn"}))
    # Outside: unwrap the data key with the KEK, then decrypt.
    dek = aes_key_unwrap_with_padding(kek_value, out["wrapped_key"])
    assert len(dek) == 32
    assert AESGCM(dek).decrypt(out["iv"], out["cipher"] + out["tag"], None) == b"attack at dawn"
    back = ok(run(admin_raw, p, {"op": "decrypt", **out}))
    assert back["plain"] == b"attack at dawn"
    tampered = {**out, "tag": bytes(16)}
    assert run(admin_raw, p, {"op": "decrypt", **tampered})["status"] == 400
    err(run(admin_raw, p, {"op": "shred"}), "plugin_error")
    # Every data key was transient: nothing but the KEK is stored in the group.
    assert [k["name"] for k in ok(admin_raw.call("GET", "/crypto/v1/keys", {"group_id": g}))] == [
        name
    ]


def test_tokenization(daemon, admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    secret = os.urandom(32)
    name = unique("hmac")
    ok(
        admin_raw.call(
            "PUT",
            "/crypto/v1/keys",
            {
                "name": name,
                "obj_type": "HMAC",
                "value": secret,
                "group_id": g,
                "key_ops": ["MACGENERATE"],
            },
        )
    )
    p = push_example(admin_raw, "tokenize.lua", [g], **{'"tokenize-hmac"': f'"{name}"'})
    pan = "4111111111111111"
    token = ok(run(admin_raw, p, {"pan": pan}))["token"]
    mac = hmac.new(secret, pan.encode(), hashlib.sha256).digest()
    assert token == "".join(str(b % 10) for b in mac[:12]) + "1111"
    assert ok(run(admin_raw, p, {"pan": pan}))["token"] == token  # deterministic
    assert err(run(admin_raw, p, {"pan": "12ab"}), "plugin_error")["message"].startswith("pan")


def test_jws_rs256(daemon, admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    name = unique("jws")
    key = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/keys",
            {"name": name, "obj_type": "RSA", "key_size": 2048, "group_id": g, "key_ops": ["SIGN"]},
        )
    )
    p = push_example(admin_raw, "jws.lua", [g], **{'"jws-rs256"': f'"{name}"'})
    claims = {"sub": "alice", "n": 7}
    jws = ok(run(admin_raw, p, {"claims": claims}))["jws"]
    h, c, s = jws.split(".")
    assert json.loads(b64url_decode(h)) == {"alg": "RS256", "typ": "JWT", "kid": key["kid"]}
    assert json.loads(b64url_decode(c)) == claims
    pub = serialization.load_der_public_key(key["pub_key"])
    pub.verify(b64url_decode(s), f"{h}.{c}".encode(), padding.PKCS1v15(), hashes.SHA256())


def test_policy_signs_only_for_the_named_app(daemon, admin_raw: Raw) -> None:
    apps_group, keys_group = new_group(admin_raw), new_group(admin_raw)
    key_name = unique("policy")
    key = ok(
        admin_raw.call(
            "POST",
            "/crypto/v1/keys",
            {
                "name": key_name,
                "obj_type": "EC",
                "elliptic_curve": "NistP256",
                "group_id": keys_group,
                "key_ops": ["SIGN", "VERIFY"],
            },
        )
    )
    signer_name = unique("payments-signer")
    p = push_example(
        admin_raw,
        "policy.lua",
        [apps_group, keys_group],
        **{'"policy-key"': f'"{key_name}"', '"payments-signer"': f'"{signer_name}"'},
    )
    signer = ok(
        admin_raw.call("POST", "/sys/v1/apps", {"name": signer_name, "groups": [apps_group]})
    )
    conn = Raw(daemon.socket)
    conn.login(signer["credential"]["api_key"])
    other = new_app(daemon, admin_raw, [apps_group])
    sig = ok(run(conn, p, {"data": b"pay 10 EUR"}))["signature"]
    pub = serialization.load_der_public_key(key["pub_key"])
    pub.verify(sig, b"pay 10 EUR", ec.ECDSA(hashes.SHA256()))
    refused = run(other.conn, p, {"data": b"pay 10 EUR"})
    assert refused["status"] == 403 and "may sign" in refused["body"]["message"]
    # Neither app can go around the plugin: the key is not in their group.
    for c in (conn, other.conn):
        err(
            c.call(
                "POST",
                "/crypto/v1/sign",
                {"key": {"kid": key["kid"]}, "hash_alg": "SHA256", "data": b"x"},
            ),
            "not_found",
        )
    conn.close()
    other.conn.close()
