"""DSM's Python SDK (sdkms.v1), unmodified, using keys over the HTTPS gateway.

Every result with a cryptographic meaning is checked with ``cryptography`` (or
hashlib/hmac) from the key's exported value or public key, never by asking the
daemon to check its own output.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest
import sdkms.v1 as v1
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from cryptography.hazmat.primitives.padding import PKCS7

from tests.dsm.conftest import App, unique

K = v1.KeyOperations
AES_OPS = [K.ENCRYPT, K.DECRYPT, K.WRAPKEY, K.UNWRAPKEY, K.DERIVEKEY, K.EXPORT, K.APPMANAGEABLE]


def _so(app: App) -> v1.SecurityObjectsApi:
    return v1.SecurityObjectsApi(app.client)


def _ed(app: App) -> v1.EncryptionAndDecryptionApi:
    return v1.EncryptionAndDecryptionApi(app.client)


def _aes(app: App, size: int = 256, ops: list | None = None) -> v1.KeyObject:
    return _so(app).generate_security_object(
        v1.SobjectRequest(
            name=unique("aes"), obj_type=v1.ObjectType.AES, key_size=size, key_ops=ops or AES_OPS
        )
    )


def _value(app: App, kid: str) -> bytes:
    return bytes(_so(app).get_security_object_value(kid).value)


@pytest.fixture(scope="module")
def aes(app: App) -> tuple[v1.KeyObject, bytes]:
    key = _aes(app)
    return key, _value(app, key.kid)


def test_cbc_encrypt_decrypt_checked_with_cryptography(app: App, aes) -> None:
    key, value = aes
    plain = b"sixteen bytes!!! and more"
    enc = _ed(app).encrypt(
        key.kid,
        v1.EncryptRequest(alg=v1.ObjectType.AES, mode=v1.CryptMode.CBC, plain=bytearray(plain)),
    )
    assert enc.kid == key.kid and len(enc.iv) == 16
    d = Cipher(algorithms.AES(value), modes.CBC(bytes(enc.iv))).decryptor()
    unpad = PKCS7(128).unpadder()
    ours = unpad.update(d.update(bytes(enc.cipher)) + d.finalize()) + unpad.finalize()
    assert ours == plain
    back = _ed(app).decrypt(
        key.kid,
        v1.DecryptRequest(
            alg=v1.ObjectType.AES, mode=v1.CryptMode.CBC, cipher=enc.cipher, iv=enc.iv
        ),
    )
    assert bytes(back.plain) == plain


def test_gcm_with_ad_checked_with_cryptography(app: App, aes) -> None:
    key, value = aes
    enc = _ed(app).encrypt(
        key.kid,
        v1.EncryptRequest(
            alg=v1.ObjectType.AES,
            mode=v1.CryptMode.GCM,
            plain=bytearray(b"gcm"),
            ad=bytearray(b"hdr"),
            tag_len=128,
        ),
    )
    assert len(enc.iv) == 12 and len(enc.tag) == 16
    ours = AESGCM(value).decrypt(bytes(enc.iv), bytes(enc.cipher) + bytes(enc.tag), b"hdr")
    assert ours == b"gcm"
    # A ciphertext made here decrypts there.
    iv = os.urandom(12)
    sealed = AESGCM(value).encrypt(iv, b"from outside", b"x")
    back = _ed(app).decrypt(
        key.kid,
        v1.DecryptRequest(
            alg=v1.ObjectType.AES,
            mode=v1.CryptMode.GCM,
            cipher=bytearray(sealed[:-16]),
            iv=bytearray(iv),
            tag=bytearray(sealed[-16:]),
            ad=bytearray(b"x"),
        ),
    )
    assert bytes(back.plain) == b"from outside"
    with pytest.raises(v1.rest.ApiException) as err:
        _ed(app).decrypt(
            key.kid,
            v1.DecryptRequest(
                alg=v1.ObjectType.AES,
                mode=v1.CryptMode.GCM,
                cipher=bytearray(sealed[:-16]),
                iv=bytearray(iv),
                tag=bytearray(bytes(16)),
                ad=bytearray(b"x"),
            ),
        )
    assert err.value.status == 400 and '"bad_tag"' in err.value.body


def test_encrypt_ex_and_decrypt_ex_by_name(app: App, aes) -> None:
    key, value = aes
    enc = _ed(app).encrypt_ex(
        v1.EncryptRequestEx(
            key=v1.SobjectDescriptor(name=key.name),
            alg=v1.ObjectType.AES,
            mode=v1.CryptMode.CTR,
            plain=bytearray(b"counter"),
        )
    )
    d = Cipher(algorithms.AES(value), modes.CTR(bytes(enc.iv))).decryptor()
    assert d.update(bytes(enc.cipher)) + d.finalize() == b"counter"
    back = _ed(app).decrypt_ex(
        v1.DecryptRequestEx(
            key=v1.SobjectDescriptor(kid=key.kid),
            alg=v1.ObjectType.AES,
            mode=v1.CryptMode.CTR,
            cipher=enc.cipher,
            iv=enc.iv,
        )
    )
    assert bytes(back.plain) == b"counter"


def test_multipart_encrypt_and_decrypt(app: App, aes) -> None:
    key, value = aes
    ed = _ed(app)
    init = ed.encrypt_init(
        key.kid, v1.EncryptInitRequest(alg=v1.ObjectType.AES, mode=v1.CryptMode.CBC)
    )
    parts = [b"a" * 20, b"b" * 33]
    cipher, state = b"", init.state
    for part in parts:
        up = ed.encrypt_update(key.kid, v1.EncryptUpdateRequest(plain=bytearray(part), state=state))
        cipher, state = cipher + bytes(up.cipher or b""), up.state
    fin = ed.encrypt_final(key.kid, v1.EncryptFinalRequest(state=state))
    cipher += bytes(fin.cipher or b"")
    d = Cipher(algorithms.AES(value), modes.CBC(bytes(init.iv))).decryptor()
    unpad = PKCS7(128).unpadder()
    assert unpad.update(d.update(cipher) + d.finalize()) + unpad.finalize() == b"".join(parts)
    # Per key, GCM, the tag checked at final.
    iv = os.urandom(12)
    sealed = AESGCM(value).encrypt(iv, b"gcm in two parts", b"ad")
    pinit = ed.decrypt_init(
        key.kid,
        v1.DecryptInitRequest(
            alg=v1.ObjectType.AES, mode=v1.CryptMode.GCM, iv=bytearray(iv), ad=bytearray(b"ad")
        ),
    )
    plain, state = b"", pinit.state
    for piece in (sealed[:7], sealed[7:-16]):
        up = ed.decrypt_update(
            key.kid, v1.DecryptUpdateRequest(cipher=bytearray(piece), state=state)
        )
        plain, state = plain + bytes(up.plain or b""), up.state
    fin = ed.decrypt_final(
        key.kid, v1.DecryptFinalRequest(state=state, tag=bytearray(sealed[-16:]))
    )
    assert plain + bytes(fin.plain or b"") == b"gcm in two parts"
    # The descriptor forms (DSM's *_ex), decrypting what the per-key form made.
    dinit = ed.decrypt_init_ex(
        v1.DecryptInitRequestEx(
            key=v1.SobjectDescriptor(kid=key.kid),
            alg=v1.ObjectType.AES,
            mode=v1.CryptMode.CBC,
            iv=init.iv,
        )
    )
    up = ed.decrypt_update_ex(
        v1.DecryptUpdateRequestEx(
            key=v1.SobjectDescriptor(kid=key.kid), cipher=bytearray(cipher), state=dinit.state
        )
    )
    fin = ed.decrypt_final_ex(
        v1.DecryptFinalRequestEx(key=v1.SobjectDescriptor(kid=key.kid), state=up.state)
    )
    assert bytes(up.plain or b"") + bytes(fin.plain or b"") == b"".join(parts)


def test_batch_encrypt_and_decrypt(app: App, aes) -> None:
    key, value = aes
    batch = v1.BatchEncryptRequest()
    for plain in (b"one", b"two"):
        batch.append(
            v1.BatchEncryptRequestInner(
                kid=key.kid,
                request=v1.EncryptRequest(
                    alg=v1.ObjectType.AES, mode=v1.CryptMode.CBC, plain=bytearray(plain)
                ),
            )
        )
    batch.append(
        v1.BatchEncryptRequestInner(
            kid="00000000-0000-0000-0000-000000000001",
            request=v1.EncryptRequest(alg=v1.ObjectType.AES, plain=bytearray(b"x")),
        )
    )
    out = list(_ed(app).batch_encrypt(batch))
    assert [item.status for item in out] == [200, 200, 404]
    assert out[2].error and out[2].body is None
    dec = v1.BatchDecryptRequest()
    for item in out[:2]:
        d = Cipher(algorithms.AES(value), modes.CBC(bytes(item.body.iv))).decryptor()
        raw = d.update(bytes(item.body.cipher)) + d.finalize()
        assert raw[: -raw[-1]] in (b"one", b"two")
        dec.append(
            v1.BatchDecryptRequestInner(
                kid=key.kid,
                request=v1.DecryptRequest(
                    alg=v1.ObjectType.AES,
                    mode=v1.CryptMode.CBC,
                    cipher=item.body.cipher,
                    iv=item.body.iv,
                ),
            )
        )
    back = list(_ed(app).batch_decrypt(dec))
    assert [bytes(item.body.plain) for item in back] == [b"one", b"two"]


def _rsa(app: App) -> tuple[v1.KeyObject, object]:
    key = _so(app).generate_security_object(
        v1.SobjectRequest(
            name=unique("rsa"),
            obj_type=v1.ObjectType.RSA,
            key_size=2048,
            key_ops=[K.SIGN, K.VERIFY, K.ENCRYPT, K.DECRYPT, K.APPMANAGEABLE],
        )
    )
    return key, serialization.load_der_public_key(bytes(key.pub_key))


def test_rsa_sign_verify_and_encrypt(app: App) -> None:
    key, pub = _rsa(app)
    sv = v1.SignAndVerifyApi(app.client)
    sig = sv.sign(
        key.kid, v1.SignRequest(hash_alg=v1.DigestAlgorithm.SHA256, data=bytearray(b"msg"))
    )
    pub.verify(bytes(sig.signature), b"msg", padding.PKCS1v15(), hashes.SHA256())
    ok = sv.verify(
        key.kid,
        v1.VerifyRequest(
            hash_alg=v1.DigestAlgorithm.SHA256, data=bytearray(b"msg"), signature=sig.signature
        ),
    )
    assert ok.result is True
    bad = sv.verify_ex(
        v1.VerifyRequestEx(
            key=v1.SobjectDescriptor(kid=key.kid),
            hash_alg=v1.DigestAlgorithm.SHA256,
            data=bytearray(b"other"),
            signature=sig.signature,
        )
    )
    assert bad.result is False
    # PSS, by hash (sign_ex), checked outside.
    digest = hashlib.sha256(b"pss").digest()
    pss = sv.sign_ex(
        v1.SignRequestEx(
            key=v1.SobjectDescriptor(name=key.name),
            hash_alg=v1.DigestAlgorithm.SHA256,
            hash=bytearray(digest),
            mode=v1.SignatureMode(
                pss=v1.RsaSignaturePaddingPSS(
                    mgf=v1.Mgf(mgf1=v1.MgfMgf1(hash=v1.DigestAlgorithm.SHA256))
                )
            ),
        )
    )
    pub.verify(
        bytes(pss.signature),
        b"pss",
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO),
        hashes.SHA256(),
    )
    # RSA encryption (OAEP SHA-1 by default), decrypted by the daemon.
    enc = _ed(app).encrypt(
        key.kid, v1.EncryptRequest(alg=v1.ObjectType.RSA, plain=bytearray(b"rsa"))
    )
    back = _ed(app).decrypt(key.kid, v1.DecryptRequest(alg=v1.ObjectType.RSA, cipher=enc.cipher))
    assert bytes(back.plain) == b"rsa"


def test_ec_sign_checked_with_cryptography_and_batch(app: App) -> None:
    key = _so(app).generate_security_object(
        v1.SobjectRequest(
            name=unique("ec"),
            obj_type=v1.ObjectType.EC,
            elliptic_curve=v1.EllipticCurve.NISTP256,
            key_ops=[K.SIGN, K.VERIFY],
        )
    )
    pub = serialization.load_der_public_key(bytes(key.pub_key))
    sv = v1.SignAndVerifyApi(app.client)
    # DSM's batch sign and verify take SignRequestEx / VerifyRequestEx items (the key
    # inside each): refused as not {kid, request} before.
    desc = v1.SobjectDescriptor(kid=key.kid)
    batch = v1.BatchSignRequest()
    for data in (b"first", b"second"):
        batch.append(v1.SignRequestEx(key=desc, hash_alg="SHA256", data=bytearray(data)))
    signed = list(sv.batch_sign(batch))
    assert [s.status for s in signed] == [200, 200]
    for data, item in zip((b"first", b"second"), signed, strict=True):
        pub.verify(bytes(item.body.signature), data, ec.ECDSA(hashes.SHA256()))
    checks = v1.BatchVerifyRequest()
    for data, item in zip((b"first", b"tampered"), signed, strict=True):
        checks.append(
            v1.VerifyRequestEx(
                key=v1.SobjectDescriptor(name=key.name),
                hash_alg="SHA256",
                data=bytearray(data),
                signature=item.body.signature,
            )
        )
    # ... and Strongroom's own {kid, request} items, in the same batch.
    checks.append(
        {
            "kid": key.kid,
            "request": {
                "hash_alg": "SHA256",
                "data": base64.b64encode(b"second").decode(),
                "signature": base64.b64encode(bytes(signed[1].body.signature)).decode(),
            },
        }
    )
    checks.append(
        v1.VerifyRequestEx(
            key=v1.SobjectDescriptor(name="no-such-key"),
            hash_alg="SHA256",
            data=bytearray(b"x"),
            signature=bytearray(b"x"),
        )
    )
    verdicts = list(sv.batch_verify(checks))
    assert [v.body.result for v in verdicts[:3]] == [True, False, True]
    assert verdicts[3].status == 404 and verdicts[3].body is None and verdicts[3].error


def test_hmac_mac_and_macverify_with_digest_or_mac(app: App) -> None:
    key = _so(app).generate_security_object(
        v1.SobjectRequest(
            name=unique("hmac"),
            obj_type=v1.ObjectType.HMAC,
            key_size=256,
            key_ops=[K.MACGENERATE, K.MACVERIFY, K.EXPORT],
        )
    )
    value = _value(app, key.kid)
    dg = v1.DigestApi(app.client)
    made = dg.compute_mac(
        key.kid, v1.MacGenerateRequest(alg=v1.DigestAlgorithm.SHA256, data=bytearray(b"abc"))
    )
    expected = hmac.new(value, b"abc", hashlib.sha256).digest()
    assert bytes(made.digest) == expected
    # DSM's SDK sends the MAC to check as "digest" (MacVerifyRequest's older field):
    # it was refused ("field 'mac' is required") before.
    r = dg.verify_mac(
        key.kid,
        v1.MacVerifyRequest(
            alg=v1.DigestAlgorithm.SHA256, data=bytearray(b"abc"), digest=bytearray(expected)
        ),
    )
    assert r.result is True
    r = dg.verify_mac(
        key.kid,
        v1.MacVerifyRequest(
            alg=v1.DigestAlgorithm.SHA256, data=bytearray(b"abd"), mac=bytearray(expected)
        ),
    )
    assert r.result is False
    r = dg.verify_mac_ex(
        v1.MacVerifyRequestEx(
            key=v1.SobjectDescriptor(kid=key.kid),
            alg=v1.DigestAlgorithm.SHA256,
            data=bytearray(b"abc"),
            digest=bytearray(expected),
        )
    )
    assert r.result is True
    with pytest.raises(v1.rest.ApiException) as err:
        dg.verify_mac(
            key.kid, v1.MacVerifyRequest(alg=v1.DigestAlgorithm.SHA256, data=bytearray(b"abc"))
        )
    assert err.value.status == 400 and '"missing_field"' in err.value.body
    with pytest.raises(v1.rest.ApiException) as err:
        dg.verify_mac(
            key.kid,
            v1.MacVerifyRequest(
                alg=v1.DigestAlgorithm.SHA256,
                data=bytearray(b"abc"),
                digest=bytearray(expected),
                mac=bytearray(bytes(32)),
            ),
        )
    assert err.value.status == 400 and '"invalid_field"' in err.value.body
    ex = dg.compute_mac_ex(
        v1.MacGenerateRequestEx(
            key=v1.SobjectDescriptor(name=key.name),
            alg=v1.DigestAlgorithm.SHA256,
            data=bytearray(b"abc"),
        )
    )
    assert bytes(ex.digest) == expected
    desc = v1.SobjectDescriptor(kid=key.kid)
    batch = v1.BatchMacRequest()
    batch.append(v1.MacGenerateRequestEx(key=desc, alg="SHA256", data=bytearray(b"abc")))
    macs = list(dg.batch_mac(batch))
    assert bytes(macs[0].body.digest) == expected
    verify = v1.BatchMacVerifyRequest()
    for data in (b"abc", b"abd"):
        verify.append(
            v1.MacVerifyRequestEx(
                key=desc, alg="SHA256", data=bytearray(data), digest=macs[0].body.digest
            )
        )
    assert [r.body.result for r in dg.batch_mac_verify(verify)] == [True, False]


def test_digest(app: App) -> None:
    out = v1.DigestApi(app.client).compute_digest(
        v1.DigestRequest(alg=v1.DigestAlgorithm.SHA256, data=bytearray(b"abc"))
    )
    assert bytes(out.digest) == hashlib.sha256(b"abc").digest()


def test_wrap_unwrap_per_key_with_kid_and_ex(app: App, aes) -> None:
    kek, kek_value = aes
    subject = _aes(app, 128, [K.ENCRYPT, K.DECRYPT, K.EXPORT])
    subject_value = _value(app, subject.kid)
    wu = v1.WrappingAndUnwrappingApi(app.client)
    # DSM's WrapKeyRequest names the key to wrap as kid on the per-key path; it
    # was refused ("field 'subject' is required") before.
    w = wu.wrap_key(
        kek.kid, v1.WrapKeyRequest(alg=v1.ObjectType.AES, kid=subject.kid, mode=v1.CryptMode.KW)
    )
    assert aes_key_unwrap(kek_value, bytes(w.wrapped_key)) == subject_value
    w2 = wu.wrap_key_ex(
        v1.WrapKeyRequestEx(
            key=v1.SobjectDescriptor(kid=kek.kid),
            subject=v1.SobjectDescriptor(name=subject.name),
            alg=v1.ObjectType.AES,
            mode=v1.CryptMode.KW,
        )
    )
    assert bytes(w2.wrapped_key) == bytes(w.wrapped_key)  # KW is deterministic
    u = wu.unwrap_key(
        kek.kid,
        v1.UnwrapKeyRequest(
            alg=v1.ObjectType.AES,
            obj_type=v1.ObjectType.AES,
            wrapped_key=w.wrapped_key,
            mode=v1.CryptMode.KW,
            name=unique("unwrapped"),
            key_ops=[K.ENCRYPT, K.EXPORT],
        ),
    )
    assert _value(app, u.kid) == subject_value
    u2 = wu.unwrap_key_ex(
        v1.UnwrapKeyRequestEx(
            key=v1.SobjectDescriptor(kid=kek.kid),
            alg=v1.ObjectType.AES,
            obj_type=v1.ObjectType.AES,
            wrapped_key=w.wrapped_key,
            mode=v1.CryptMode.KW,
            name=unique("unwrapped"),
            key_ops=[K.ENCRYPT, K.EXPORT],
        )
    )
    assert _value(app, u2.kid) == subject_value
    with pytest.raises(v1.rest.ApiException) as err:
        wu.wrap_key(kek.kid, v1.WrapKeyRequest(alg=v1.ObjectType.AES, mode=v1.CryptMode.KW))
    assert err.value.status == 400 and '"missing_field"' in err.value.body


def test_derive_encrypt_data_checked_with_cryptography(app: App, aes) -> None:
    base, value = aes
    plain, iv = os.urandom(16), os.urandom(16)
    derived = _so(app).derive_key(
        base.kid,
        v1.DeriveKeyRequest(
            name=unique("derived"),
            key_size=128,
            key_type=v1.ObjectType.AES,
            mechanism=v1.DeriveKeyMechanism(
                encrypt_data=v1.EncryptRequest(
                    alg=v1.ObjectType.AES,
                    mode=v1.CryptMode.CBC,
                    plain=bytearray(plain),
                    iv=bytearray(iv),
                )
            ),
            key_ops=[K.ENCRYPT, K.EXPORT],
        ),
    )
    e = Cipher(algorithms.AES(value), modes.CBC(iv)).encryptor()
    assert _value(app, derived.kid) == e.update(plain) + e.finalize()


def test_agree_ecdh_checked_with_cryptography(app: App) -> None:
    so = _so(app)
    ops = [K.AGREEKEY, K.EXPORT]
    mine = so.generate_security_object(
        v1.SobjectRequest(
            name=unique("ecdh"),
            obj_type=v1.ObjectType.EC,
            elliptic_curve=v1.EllipticCurve.NISTP256,
            key_ops=ops,
        )
    )
    theirs = ec.generate_private_key(ec.SECP256R1())
    der = theirs.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    peer = so.import_security_object(
        v1.SobjectRequest(
            name=unique("peer"),
            obj_type=v1.ObjectType.EC,
            elliptic_curve=v1.EllipticCurve.NISTP256,
            value=bytearray(der),
            key_ops=[K.VERIFY],
        )
    )
    agreed = so.agree_key(
        v1.AgreeKeyRequest(
            private_key=v1.SobjectDescriptor(kid=mine.kid),
            public_key=v1.SobjectDescriptor(kid=peer.kid),
            name=unique("agreed"),
            key_size=256,
            key_type=v1.ObjectType.SECRET,
            mechanism=v1.AgreeKeyMechanism.HELLMAN,
            key_ops=[K.EXPORT],
        )
    )
    shared = theirs.exchange(ec.ECDH(), serialization.load_der_public_key(bytes(mine.pub_key)))
    assert _value(app, agreed.kid) == shared


@pytest.mark.parametrize("mode", ["OAEP_MGF1_SHA1", "OAEP_MGF1_SHA256", "OAEP_MGF1_SHA384",
                                  "OAEP_MGF1_SHA512", "PKCS1_V15"])  # fmt: skip
def test_rsa_encryption_modes_checked_with_cryptography(app: App, mode: str) -> None:
    """Every RSA padding in DSM's CryptMode: OAEP_MGF1_SHA384/512 were refused."""
    key = _so(app).generate_security_object(
        v1.SobjectRequest(
            name=unique("rsa-enc"), obj_type=v1.ObjectType.RSA, key_size=2048,
            key_ops=[K.ENCRYPT, K.DECRYPT, K.EXPORT],
        )
    )  # fmt: skip
    priv = serialization.load_der_private_key(_value(app, key.kid), None)
    if mode == "PKCS1_V15":
        pad = padding.PKCS1v15()
    else:
        h = {"SHA1": hashes.SHA1, "SHA256": hashes.SHA256, "SHA384": hashes.SHA384,
             "SHA512": hashes.SHA512}[mode.rsplit("_", 1)[1]]()  # fmt: skip
        pad = padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)
    enc = _ed(app).encrypt(
        key.kid,
        v1.EncryptRequest(alg=v1.ObjectType.RSA, mode=v1.CryptMode(mode), plain=bytearray(b"m")),
    )
    assert priv.decrypt(bytes(enc.cipher), pad) == b"m"
    outside = priv.public_key().encrypt(b"from outside", pad)
    back = _ed(app).decrypt(
        key.kid,
        v1.DecryptRequest(
            alg=v1.ObjectType.RSA, mode=v1.CryptMode(mode), cipher=bytearray(outside)
        ),
    )
    assert bytes(back.plain) == b"from outside"


def test_masked_decryption_is_refused_not_dropped(app: App, aes) -> None:
    """DecryptRequest.masked asks for a masked plaintext (MASKDECRYPT); dropped, the
    answer was the whole plaintext. Refused now; masked=False decrypts as usual."""
    key, _ = aes
    enc = _ed(app).encrypt(
        key.kid,
        v1.EncryptRequest(alg=v1.ObjectType.AES, mode=v1.CryptMode.CBC, plain=bytearray(b"m")),
    )
    with pytest.raises(v1.rest.ApiException) as err:
        _ed(app).decrypt(
            key.kid,
            v1.DecryptRequest(
                alg=v1.ObjectType.AES, mode=v1.CryptMode.CBC, cipher=enc.cipher, iv=enc.iv,
                masked=True,
            ),
        )  # fmt: skip
    assert err.value.status == 422 and "masked" in err.value.body
    back = _ed(app).decrypt(
        key.kid,
        v1.DecryptRequest(
            alg=v1.ObjectType.AES, mode=v1.CryptMode.CBC, cipher=enc.cipher, iv=enc.iv,
            masked=False,
        ),
    )  # fmt: skip
    assert bytes(back.plain) == b"m"
