"""DSM's Python SDK managing keys: create, read, list, update, export, import,
rotate, lifecycle (activate, revoke, destroy, scheduled deletion), digests and
check values. Exported and imported values are compared with what was put in or
computed outside."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os

import pytest
import sdkms.v1 as v1
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.conftest import Raw
from tests.dsm.conftest import App, Dsm, raw_json, sdk, unique

K = v1.KeyOperations


def _so(app: App) -> v1.SecurityObjectsApi:
    return v1.SecurityObjectsApi(app.client)


def _raw(app: App, kid: str) -> dict:
    """A key's view as JSON, for DSM fields the SDK's KeyObject model leaves out."""
    return raw_json(_so(app).get_security_object_with_http_info(kid, _preload_content=False))


def test_generate_read_list_update_delete(app: App) -> None:
    so = _so(app)
    name = unique("key")
    key = so.generate_security_object(
        v1.SobjectRequest(
            name=name,
            obj_type=v1.ObjectType.AES,
            key_size=192,
            key_ops=[K.ENCRYPT, K.DECRYPT, K.APPMANAGEABLE],
            description="first",
            custom_metadata={"team": "x"},
        )
    )
    # The view deserializes into DSM's KeyObject with DSM's enums and types.
    assert key.name == name and key.key_size == 192 and key.obj_type == v1.ObjectType.AES
    assert key.group_id == app.group_id and key.enabled is True
    assert key.state == v1.KeyObjectState.ACTIVE
    assert sorted(op.value for op in key.key_ops) == ["APPMANAGEABLE", "DECRYPT", "ENCRYPT"]
    assert key.custom_metadata == {"team": "x"} and key.creator.app == app.app_id
    assert len(key.created_at) == 16 and key.created_at.endswith("Z")  # DSM's 20170101T000000Z
    got = so.get_security_object(key.kid)
    assert got.kid == key.kid and got.description == "first"
    ex = so.get_security_object_ex(v1.SobjectDescriptor(name=name))
    assert ex.kid == key.kid
    listed = so.get_security_objects(name=name)
    assert [k.kid for k in listed] == [key.kid]
    assert key.kid in {k.kid for k in so.get_security_objects(group_id=app.group_id, limit=1000)}
    upd = so.update_security_object(
        key.kid, v1.SobjectRequest(description="second", enabled=False, key_ops=[K.ENCRYPT])
    )
    assert upd.description == "second" and upd.enabled is False and upd.key_ops == [K.ENCRYPT]
    so.delete_security_object(key.kid)
    with pytest.raises(v1.rest.ApiException) as err:
        so.get_security_object(key.kid)
    assert err.value.status == 404 and '"not_found"' in err.value.body


def test_export_and_import_compare_values(app: App) -> None:
    so = _so(app)
    value = os.urandom(32)
    imported = so.import_security_object(
        v1.SobjectRequest(
            name=unique("imp"),
            obj_type=v1.ObjectType.AES,
            value=bytearray(value),
            key_ops=[K.ENCRYPT, K.DECRYPT, K.EXPORT],
        )
    )
    assert imported.key_size == 256
    assert bytes(so.get_security_object_value(imported.kid).value) == value
    by_name = so.get_security_object_value_ex(v1.SobjectDescriptor(name=imported.name))
    assert bytes(by_name.value) == value
    # A ciphertext made by the imported key opens outside with the value we gave.
    enc = v1.EncryptionAndDecryptionApi(app.client).encrypt(
        imported.kid,
        v1.EncryptRequest(alg=v1.ObjectType.AES, mode=v1.CryptMode.CTR, plain=bytearray(b"hi")),
    )
    d = Cipher(algorithms.AES(value), modes.CTR(bytes(enc.iv))).decryptor()
    assert d.update(bytes(enc.cipher)) == b"hi"
    # An RSA private key imported as PKCS#8 DER exports as the same key.
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = priv.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    r = so.import_security_object(
        v1.SobjectRequest(
            name=unique("rsa-imp"),
            obj_type=v1.ObjectType.RSA,
            value=bytearray(der),
            key_ops=[K.SIGN, K.VERIFY, K.EXPORT],
        )
    )
    assert r.key_size == 2048
    out = serialization.load_der_private_key(bytes(so.get_security_object_value(r.kid).value), None)
    assert out.private_numbers() == priv.private_numbers()
    pub = serialization.load_der_public_key(bytes(r.pub_key))
    assert pub.public_numbers() == priv.public_key().public_numbers()
    # Without EXPORT: 403 key_op_not_permitted, DSM's answer.
    plain = so.generate_security_object(
        v1.SobjectRequest(name=unique("noexp"), obj_type=v1.ObjectType.AES, key_size=128)
    )
    with pytest.raises(v1.rest.ApiException) as err:
        so.get_security_object_value(plain.kid)
    assert err.value.status == 403 and '"key_op_not_permitted"' in err.value.body


def test_rotate_rekey_links_the_new_key(app: App) -> None:
    so = _so(app)
    name = unique("rot")
    old = so.generate_security_object(
        v1.SobjectRequest(
            name=name, obj_type=v1.ObjectType.AES, key_size=128, key_ops=[K.ENCRYPT, K.EXPORT]
        )
    )
    new = so.rotate_security_object(v1.SobjectRequest(name=name))
    assert new.kid != old.kid and new.name == name and new.obj_type == v1.ObjectType.AES
    # DSM's links are not in the SDK's KeyObject model: read them from the raw JSON.
    assert _raw(app, new.kid)["links"]["replaced"] == old.kid
    before = _raw(app, old.kid)
    assert before["links"]["replacement"] == new.kid and before["name"] != name
    assert bytes(so.get_security_object_value(new.kid).value) != bytes(
        so.get_security_object_value(old.kid).value
    )


def test_rotate_onto_a_given_value(app: App) -> None:
    """DSM rotates onto a given value (an import); it was ignored before, and the
    new version was a random key where the caller meant their secret."""
    so = _so(app)
    name = unique("rot-value")
    so.import_security_object(
        v1.SobjectRequest(
            name=name, obj_type=v1.ObjectType.SECRET, value=bytearray(b"first secret"),
            key_ops=[K.EXPORT, K.APPMANAGEABLE],
        )
    )  # fmt: skip
    new = so.rotate_security_object(v1.SobjectRequest(name=name, value=bytearray(b"second")))
    assert new.obj_type == v1.ObjectType.SECRET
    assert bytes(so.get_security_object_value(new.kid).value) == b"second"
    assert _raw(app, new.kid)["links"]["replaced"]
    aes_name = unique("rot-aes")
    so.generate_security_object(
        v1.SobjectRequest(
            name=aes_name, obj_type=v1.ObjectType.AES, key_size=128,
            key_ops=[K.ENCRYPT, K.EXPORT],
        )
    )  # fmt: skip
    value = os.urandom(32)
    rotated = so.rotate_security_object(v1.SobjectRequest(name=aes_name, value=bytearray(value)))
    assert rotated.key_size == 256 and rotated.key_ops == [K.ENCRYPT, K.EXPORT]
    assert bytes(so.get_security_object_value(rotated.kid).value) == value
    # A value of another type is refused and the name stays with the current version.
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = priv.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(v1.rest.ApiException) as err:
        so.rotate_security_object(v1.SobjectRequest(name=aes_name, value=bytearray(der)))
    assert err.value.status == 400, err.value.body
    assert so.get_security_objects(name=aes_name)[0].kid == rotated.kid


def test_lifecycle_activate_revoke_destroy(app: App) -> None:
    so = _so(app)
    ops = [K.ENCRYPT, K.APPMANAGEABLE]
    key = so.generate_security_object(
        v1.SobjectRequest(
            name=unique("life"),
            obj_type=v1.ObjectType.AES,
            key_size=128,
            key_ops=ops,
            activation_date="20991231T000000Z",
        )
    )
    assert key.state == v1.KeyObjectState.PREACTIVE
    so.activate_security_object(key.kid)
    assert so.get_security_object(key.kid).state == v1.KeyObjectState.ACTIVE
    # Destroying an active key is refused, as DSM does (revoke it first).
    with pytest.raises(v1.rest.ApiException) as err:
        so.destroy_security_object(key.kid)
    assert err.value.status == 409
    so.revoke_security_object(
        key.kid,
        v1.RevocationReason(code=v1.RevocationReasonCode.KEYCOMPROMISE, message="leaked"),
    )
    assert so.get_security_object(key.kid).state == v1.KeyObjectState.COMPROMISED
    assert _raw(app, key.kid)["revocation_reason"] == {"code": "KeyCompromise", "message": "leaked"}
    so.destroy_security_object(key.kid)
    assert so.get_security_object(key.kid).state == v1.KeyObjectState.DESTROYED


def test_scheduled_deletion_and_key_material(app: App) -> None:
    so, aws = _so(app), v1.AWSApi(app.client)
    ops = [K.ENCRYPT, K.APPMANAGEABLE]
    key = so.generate_security_object(
        v1.SobjectRequest(
            name=unique("sched"), obj_type=v1.ObjectType.AES, key_size=128, key_ops=ops
        )
    )
    aws.schedule_deletion(key.kid, v1.ScheduleDeletionRequest(pending_window_in_days=7))
    assert "deletion_date" in _raw(app, key.kid)
    aws.cancel_deletion(key.kid)
    assert "deletion_date" not in _raw(app, key.kid)
    # delete_key_material is destroy under AWS's name: a revoked key only.
    so.revoke_security_object(
        key.kid, v1.RevocationReason(code=v1.RevocationReasonCode.CESSATIONOFOPERATION)
    )
    aws.delete_key_material(key.kid)
    assert so.get_security_object(key.kid).state == v1.KeyObjectState.DESTROYED
    pair = so.generate_security_object(
        v1.SobjectRequest(
            name=unique("pair"),
            obj_type=v1.ObjectType.EC,
            elliptic_curve=v1.EllipticCurve.NISTP256,
            key_ops=[K.SIGN, K.VERIFY, K.APPMANAGEABLE],
        )
    )
    so.delete_private_key(pair.kid)
    left = so.get_security_object(pair.kid)
    assert left.pub_key and K.SIGN not in (left.key_ops or [])


def test_digest_and_check_value(app: App) -> None:
    so = _so(app)
    value = os.urandom(16)
    key = so.import_security_object(
        v1.SobjectRequest(
            name=unique("kcv"),
            obj_type=v1.ObjectType.AES,
            value=bytearray(value),
            key_ops=[K.ENCRYPT, K.EXPORT],
        )
    )
    d = so.get_security_object_digest(
        v1.ObjectDigestRequest(key=v1.SobjectDescriptor(kid=key.kid), alg=v1.DigestAlgorithm.SHA256)
    )
    assert bytes(d.digest) == hashlib.sha256(value).digest()
    # The KCV is hex text, as DSM sends it; the SDK's model calls it bytes (base64),
    # so DSM's SDK cannot decode DSM's own answer: read the raw JSON.
    kcv = raw_json(
        so.get_security_object_kcv_with_http_info(
            v1.SobjectDescriptor(kid=key.kid), _preload_content=False
        )
    )
    e = Cipher(algorithms.AES(value), modes.ECB()).encryptor()
    assert kcv["kcv"].lower() == (e.update(bytes(16)) + e.finalize())[:3].hex()
    # VerifyKcvRequest's value is text: base64, as JSON carries bytes.
    ok = so.verify_kcv(
        v1.VerifyKcvRequest(
            kcv=kcv["kcv"], value=base64.b64encode(value).decode(), obj_type=v1.ObjectType.AES
        )
    )
    assert ok.verified is True
    bad = so.verify_kcv(
        v1.VerifyKcvRequest(
            kcv="000000", value=base64.b64encode(value).decode(), obj_type=v1.ObjectType.AES
        )
    )
    assert bad.verified is False


def test_paths_that_answer_why(dsm: Dsm, app: App) -> None:
    """Served only to say why they cannot act, or refused over HTTP: DSM's status
    and Strongroom's stable code, the message naming what to do instead."""
    so, aws = _so(app), v1.AWSApi(app.client)
    key = so.generate_security_object(
        v1.SobjectRequest(
            name=unique("why"),
            obj_type=v1.ObjectType.AES,
            key_size=128,
            key_ops=[K.ENCRYPT, K.APPMANAGEABLE],
        )
    )
    with pytest.raises(v1.rest.ApiException) as err:
        aws.restore(key.kid)
    assert err.value.status == 409 and '"conflict"' in err.value.body
    # The SDK models revert's body as an SobjectRequest; DSM's API takes the history
    # ids to go back to, and Strongroom keeps no history: 400 without ids, 409 with.
    with pytest.raises(v1.rest.ApiException) as err:
        so.revert_history_item(key.kid, v1.SobjectRequest(description="x"))
    assert err.value.status == 400 and "ids" in err.value.body
    # A transient key would die with its HTTP request: refused, naming the socket.
    with pytest.raises(v1.rest.ApiException) as err:
        so.generate_security_object(
            v1.SobjectRequest(
                name=unique("t"), obj_type=v1.ObjectType.AES, key_size=128, transient=True
            )
        )
    assert err.value.status == 400 and "Unix socket" in err.value.body
    # DSM paths the SDK offers that Strongroom does not serve. key_attestation reads
    # as a kid under /crypto/v1/keys/{kid}, which takes no POST.
    attest = v1.KeyAttestationRequest(key=v1.SobjectDescriptor(kid=key.kid))
    for call, status, code in (
        (v1.AuthenticationApi(app.client).re_auth, 404, "no_such_route"),
        (v1.ApprovalRequestsApi(app.client).get_approval_requests, 404, "no_such_route"),
        (lambda: so.get_key_attestation(attest), 405, "method_not_allowed"),
    ):
        with pytest.raises(v1.rest.ApiException) as err:
            call()
        assert err.value.status == status and f'"{code}"' in err.value.body, err.value.body
    # A key's statistics (administrators only).
    stats = v1.StatsApi(sdk(dsm, dsm.admin_key)).get_security_object_stats(key.kid)
    assert stats.time["buckets"]


def test_descriptor_forms_of_derive_and_stats(app: App) -> None:
    so = _so(app)
    base_value = os.urandom(16)
    base = so.import_security_object(
        v1.SobjectRequest(
            name=unique("base"),
            obj_type=v1.ObjectType.AES,
            value=bytearray(base_value),
            key_ops=[K.DERIVEKEY, K.EXPORT],
        )
    )
    plain = os.urandom(16)
    derived = so.derive_key_ex(
        v1.DeriveKeyRequestEx(
            key=v1.SobjectDescriptor(name=base.name),
            name=unique("dx"),
            key_size=128,
            key_type=v1.ObjectType.AES,
            mechanism=v1.DeriveKeyMechanism(
                encrypt_data=v1.EncryptRequest(
                    alg=v1.ObjectType.AES, mode=v1.CryptMode.ECB, plain=bytearray(plain)
                )
            ),
            key_ops=[K.EXPORT],
        )
    )
    e = Cipher(algorithms.AES(base_value), modes.ECB()).encryptor()
    assert bytes(so.get_security_object_value(derived.kid).value) == e.update(plain)


def test_persist_takes_dsm_transient_key_field(dsm: Dsm, app: App) -> None:
    """DSM's PersistTransientKeyRequest names the key as transient_key (a string);
    it was refused before (field 'key' is required). Transient keys belong to a
    connection, so one is made on the socket and persisted there in DSM's form; over
    HTTP (each request its own connection) the SDK's call gets 404 for any id."""
    conn = Raw(dsm.daemon.socket)
    try:
        conn.login(app.api_key)
        t = conn.call(
            "POST",
            "/crypto/v1/keys",
            {"name": "t", "obj_type": "AES", "key_size": 128, "transient": True,
             "key_ops": ["ENCRYPT", "EXPORT"]},
        )  # fmt: skip
        assert t["status"] == 200, t
        out = conn.call(
            "POST",
            "/crypto/v1/keys/persist",
            {"transient_key": t["body"]["transient_key"], "name": unique("persisted")},
        )
        assert out["status"] == 200, out
        kid = out["body"]["kid"]
    finally:
        conn.close()
    assert _so(app).get_security_object(kid).transient_key is None
    with pytest.raises(v1.rest.ApiException) as err:
        _so(app).persist_security_object(
            v1.PersistTransientKeyRequest(name=unique("p"), transient_key="no-such-transient")
        )
    assert err.value.status == 404 and '"not_found"' in err.value.body, err.value.body


def test_fields_that_would_change_the_key_are_refused_not_dropped(app: App) -> None:
    """SDK fields Strongroom does not implement, which used to be dropped silently
    (the key made or kept would differ from what was asked): refused now."""
    so = _so(app)

    def refused(status: int, code: str, call) -> None:
        with pytest.raises(v1.rest.ApiException) as err:
            call()
        assert err.value.status == status and f'"{code}"' in err.value.body, err.value.body

    refused(
        422,
        "unsupported_algorithm",
        lambda: so.generate_security_object(
            v1.SobjectRequest(
                name=unique("e3"), obj_type=v1.ObjectType.RSA, key_size=2048, pub_exponent=3
            )
        ),
    )
    key = so.generate_security_object(
        v1.SobjectRequest(
            name=unique("e65537"), obj_type=v1.ObjectType.RSA, key_size=2048, pub_exponent=65537
        )
    )
    pub = serialization.load_der_public_key(bytes(key.pub_key))
    assert pub.public_numbers().e == 65537
    policy = v1.RsaOptions(signature_policy=[v1.RsaSignaturePolicy()])
    refused(
        422,
        "unsupported_algorithm",
        lambda: so.generate_security_object(
            v1.SobjectRequest(
                name=unique("pol"), obj_type=v1.ObjectType.RSA, key_size=2048, rsa=policy
            )
        ),
    )
    # Moving a key to another group (DSM's PATCH group_id): refused; its own group is fine.
    other = v1.GroupsApi(app.client).get_groups()  # the app's one group
    assert [g.group_id for g in other] == [app.group_id]
    refused(
        400,
        "invalid_value",
        lambda: so.update_security_object(
            key.kid, v1.SobjectRequest(group_id="00000000-0000-0000-0000-0000000000ff")
        ),
    )
    same = so.update_security_object(
        key.kid, v1.SobjectRequest(group_id=app.group_id, description="kept")
    )
    assert same.group_id == app.group_id and same.description == "kept"


def test_schedule_deletion_takes_dsm_pending_window(app: App) -> None:
    """ScheduleDeletionRequest.pending_window_in_days was dropped: every deletion
    came after the daemon's default (7 days) whatever the SDK asked."""
    so, aws = _so(app), v1.AWSApi(app.client)
    for days in (1, 30):
        key = so.generate_security_object(
            v1.SobjectRequest(
                name=unique("win"),
                obj_type=v1.ObjectType.AES,
                key_size=128,
                key_ops=[K.ENCRYPT, K.APPMANAGEABLE],
            )
        )
        aws.schedule_deletion(key.kid, v1.ScheduleDeletionRequest(pending_window_in_days=days))
        view = _raw(app, key.kid)
        when = dt.datetime.strptime(view["deletion_date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        left = when - dt.datetime.now(dt.UTC)
        assert dt.timedelta(days=days, minutes=-10) < left <= dt.timedelta(days=days), left
