"""Crypto operations: PKCS#11 mechanisms for checked requests.

``*_mechanism`` helpers are pure and run on the event loop; the functions
taking a ``Core`` run on the PKCS#11 thread and do as little as possible.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.constants import DEFAULT
from pkcs11.mechanisms import GCMParams

from strongroomd import keywrap
from strongroomd import mechanisms as mech
from strongroomd._token import keys
from strongroomd._token.core import Core
from strongroomd.errors import BadRequest, BadTag, Unsupported
from strongroomd.keyref import KeyMaterial, KeyRef, NewKey

_SYM = {
    "AES_GCM": Mechanism.AES_GCM,
    "AES_CBC": Mechanism.AES_CBC_PAD,
    "AES_CBCNOPAD": Mechanism.AES_CBC,
    "AES_CTR": Mechanism.AES_CTR,
    "AES_ECB": Mechanism.AES_ECB,
    "DES3_CBC": Mechanism.DES3_CBC_PAD,
    "DES3_CBCNOPAD": Mechanism.DES3_CBC,
    "DES3_ECB": Mechanism.DES3_ECB,
}
_HASH_MECH = {
    "SHA1": Mechanism.SHA_1,
    "SHA256": Mechanism.SHA256,
    "SHA384": Mechanism.SHA384,
    "SHA512": Mechanism.SHA512,
}
_MGF = {"SHA1": MGF.SHA1, "SHA256": MGF.SHA256, "SHA384": MGF.SHA384, "SHA512": MGF.SHA512}
_HMAC_MECH = {
    "SHA1": Mechanism.SHA_1_HMAC,
    "SHA256": Mechanism.SHA256_HMAC,
    "SHA384": Mechanism.SHA384_HMAC,
    "SHA512": Mechanism.SHA512_HMAC,
}
OAEP_SHA1 = (Mechanism.SHA_1, MGF.SHA1, None)
# CK_AES_CTR_PARAMS {CK_ULONG ulCounterBits; CK_BYTE cb[16]}: a 128-bit counter
# over the whole block, as cryptography's CTR mode counts.
_CTR = struct.Struct("@L16s")

#: Failures of a decryption or unwrap that must say nothing specific.
DECRYPT_FAILURES = (
    p11e.GeneralError,
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.FunctionFailed,
)
VERIFY_FAILURES = (p11e.SignatureInvalid, p11e.SignatureLenRange)


def sym_mechanism(spec: mech.CipherSpec) -> tuple[Mechanism, Any]:
    kind = spec.kind
    if kind == "AES_GCM":
        return Mechanism.AES_GCM, GCMParams(spec.iv, spec.ad, spec.tag_bits)
    if kind == "AES_CTR":
        return Mechanism.AES_CTR, _CTR.pack(128, spec.iv)
    return _SYM[kind], spec.iv


def sign_mechanism(spec: mech.SignSpec) -> tuple[Mechanism, Any, bytes]:
    """(mechanism, parameter, bytes to sign) for a checked sign request."""
    if spec.kind == "PKCS1_V15":
        return Mechanism.RSA_PKCS, None, mech.digest_info(spec.hash, spec.message)
    if spec.kind == "PSS":
        hlen = mech.HASHES[spec.hash][1]
        return (
            Mechanism.RSA_PKCS_PSS,
            (_HASH_MECH[spec.hash], _MGF[spec.mgf_hash], hlen),
            spec.message,
        )
    if spec.kind == "ECDSA":
        return Mechanism.ECDSA, None, spec.message
    return Mechanism.EDDSA, None, spec.message


def mac_mechanism(alg: str) -> Mechanism:
    return Mechanism.AES_CMAC if alg == "CMAC" else _HMAC_MECH[alg]


# -- on the PKCS#11 thread ----------------------------------------------------


def encrypt(core: Core, kid: str, mechanism: Mechanism, param: Any, data: bytes) -> bytes:
    return core.hot(kid)._encrypt(data, mechanism, param, len(data) + 32)


def decrypt(core: Core, kid: str, mechanism: Mechanism, param: Any, data: bytes) -> bytes:
    return core.hot(kid)._decrypt(data, mechanism, param, None, len(data) + 32)


def symmetric_many(
    core: Core, kid: str, decrypting: bool, items: list[tuple[Mechanism, Any, bytes]]
) -> list[bytes | Exception]:
    """Many operations with one key in one job; each item's failure is its own."""
    one = decrypt if decrypting else encrypt
    out: list[bytes | Exception] = []
    for mechanism, param, data in items:
        try:
            out.append(one(core, kid, mechanism, param, data))
        except Exception as exc:  # handed back per item
            out.append(exc)
    return out


def public_encrypt(core: Core, kid: str, mechanism: Mechanism, param: Any, data: bytes) -> bytes:
    return core.hot_public(kid)._encrypt(data, mechanism, param, 1024)


def sign(core: Core, kid: str, mechanism: Mechanism, param: Any, data: bytes) -> bytes:
    return core.hot(kid)._sign(data, mechanism, param, None, 1024)


def verify(
    core: Core, kid: str, mechanism: Mechanism, param: Any, data: bytes, signature: bytes
) -> bool:
    try:
        core.hot_public(kid)._verify(data, signature, mechanism, param)
    except VERIFY_FAILURES:
        return False
    return True


def wrap(core: Core, kid: str, public: bool, subject: str, mechanism: Mechanism, param: Any):
    wrapping = core.hot_public(kid) if public else core.hot(kid)
    s = core.entry(subject)
    obj = s.secret if s.secret is not None else s.private
    if obj is None:
        raise BadRequest("the subject has no secret or private part to wrap", code="invalid_value")
    if not obj[Attribute.EXTRACTABLE]:
        raise BadRequest("the subject key is not exportable", code="invalid_value")
    return wrapping.wrap_key(obj, mechanism=mechanism, mechanism_param=param)


def wrap_aes(core: Core, kid: str, subject: KeyRef, pad: bool) -> bytes:
    """RFC 3394/5649 with the key-encryption key's AES-ECB in the token.

    The subject is exportable (the daemon checked EXPORT), so its value is the
    one export returns (an HMAC key's original bytes), but a private key's PKCS#8.
    """
    kek = core.hot(kid)
    value = core.export(subject, pkcs8=True)
    return keywrap.wrap(lambda b: kek.encrypt(b, mechanism=Mechanism.AES_ECB), value, pad=pad)


def unwrap_aes(core: Core, kid: str, new: NewKey, data: bytes, pad: bool) -> KeyMaterial:
    if new.obj_type not in keys.SECRET_TYPES:
        raise Unsupported("only symmetric keys can be unwrapped")
    kek = core.hot(kid)
    value = keywrap.unwrap(lambda b: kek.decrypt(b, mechanism=Mechanism.AES_ECB), data, pad=pad)
    return _store_value(core, new, value)


def wrap_rsa_oaep(core: Core, kid: str, subject: KeyRef, hash_name: str, k: int) -> bytes:
    """RSA-OAEP with a hash SoftHSM's OAEP lacks: raw RSA in the token over OAEP
    padding applied here (as encryption does), around the subject's exported value
    (a private key's PKCS#8, as every wrap gives it, not export's PKCS#1/SEC1)."""
    data = mech.oaep_encode(core.export(subject, pkcs8=True), k, hash_name)
    return core.hot_public(kid)._encrypt(data, Mechanism.RSA_X_509, None, 1024)


def unwrap_rsa_oaep(
    core: Core, kid: str, new: NewKey, data: bytes, hash_name: str, k: int
) -> KeyMaterial:
    """The inverse of :func:`wrap_rsa_oaep`; the padding is checked in constant time."""
    if new.obj_type not in keys.SECRET_TYPES:
        raise Unsupported("only symmetric keys can be unwrapped")
    if len(data) != k:
        raise BadTag()
    try:
        raw = core.hot(kid)._decrypt(data, Mechanism.RSA_X_509, None, None, k)
    except DECRYPT_FAILURES:
        raise BadTag() from None
    return _store_value(core, new, mech.oaep_decode(raw, k, hash_name))


def _secret_size(new: NewKey, n: int) -> int:
    """Check the byte length of an unwrapped/derived secret; returns bits."""
    t = new.obj_type
    ok = {
        "AES": n in (16, 24, 32),
        "DES3": n == 24,
        "DES": n == 8,
        "OPAQUE": n >= 1,
        "HMAC": mech.HMAC_MIN_BYTES <= n <= mech.HMAC_MAX_BYTES,
        "SECRET": n >= 1,
    }.get(t, False)
    if not ok:
        raise BadRequest(f"the key is not a valid {t} key", code="invalid_key_size")
    return {"DES3": 168, "DES": 56}.get(t, n * 8)


def _store_value(core: Core, new: NewKey, value: bytes) -> KeyMaterial:
    """Make the final secret object for an unwrapped or agreed value."""
    entry = core._new_entry(new)
    bits = _secret_size(new, len(value))
    template = keys.secret_template(new)
    template[Attribute.VALUE] = mech.token_value(new.obj_type, value)
    entry.secret = core.session.create_object(template)
    core._commit(entry)
    return KeyMaterial(new.obj_type, bits, None, None, False)


def _take_value(obj: Any) -> bytes:
    """Read and destroy a staging object."""
    try:
        return obj[Attribute.VALUE]
    finally:
        obj.destroy()


def _staging_template(new: NewKey) -> dict:
    """A session object whose value this layer reads once, then destroys.

    The value then passes through this process, as an imported value does;
    that lets short HMAC keys be padded and ECDH secrets be truncated from
    the left (SoftHSM keeps the rightmost bytes of a too-long secret).
    """
    template = keys.secret_template(new)
    template[Attribute.TOKEN] = False
    template[Attribute.SENSITIVE] = False
    template[Attribute.EXTRACTABLE] = True
    return template


def unwrap(
    core: Core, kid: str, new: NewKey, mechanism: Mechanism, param: Any, data: bytes
) -> KeyMaterial:
    if new.obj_type not in keys.SECRET_TYPES:
        raise Unsupported("only symmetric keys can be unwrapped")
    unwrapping = core.hot(kid)
    try:
        obj = unwrapping.unwrap_key(
            ObjectClass.SECRET_KEY,
            keys.SECRET_TYPES[new.obj_type],
            data,
            mechanism=mechanism,
            mechanism_param=param,
            capabilities=0,
            template=_staging_template(new),
        )
    except DECRYPT_FAILURES:
        raise BadTag() from None
    return _store_value(core, new, _take_value(obj))


def agree(core: Core, private: str, public: str, curve: str, new: NewKey) -> KeyMaterial:
    if new.obj_type not in ("AES", "HMAC", "SECRET"):
        raise Unsupported("agreement makes AES, HMAC or SECRET keys")
    peer = core.entry(public)
    if peer.point is None:
        if peer.public is None:
            raise Unsupported("the public key has no public part")
        peer.point = keys.parse_octet_string(peer.public[Attribute.EC_POINT])
    n = mech.check_key_size(new.obj_type, new.key_size) // 8
    size = mech.CURVES[curve].size
    if n > size:
        raise BadRequest(f"this curve agrees on at most {size * 8} bits", code="invalid_key_size")
    staging = NewKey(new.kid, new.name, "SECRET", None, None, True, True)
    obj = core.hot(private).derive_key(
        KeyType.GENERIC_SECRET,
        size * 8,
        capabilities=0,
        mechanism=Mechanism.ECDH1_DERIVE,
        mechanism_param=(KDF.NULL, None, peer.point),
        template=_staging_template(staging),
    )
    return _store_value(core, new, _take_value(obj)[:n])


#: (cipher of the base key, mode) -> the token's derivation by encryption.
_ENCRYPT_DATA = {
    ("AES", "ECB"): Mechanism.AES_ECB_ENCRYPT_DATA,
    ("AES", "CBC"): Mechanism.AES_CBC_ENCRYPT_DATA,
    ("DES3", "ECB"): Mechanism.DES3_ECB_ENCRYPT_DATA,
    ("DES3", "CBC"): Mechanism.DES3_CBC_ENCRYPT_DATA,
}


def derive_encrypt_data(
    core: Core, kid: str, cipher: str, new: NewKey, spec: mech.DeriveSpec
) -> KeyMaterial:
    """C_DeriveKey with *_ECB_ENCRYPT_DATA / *_CBC_ENCRYPT_DATA: the new key's
    value is the first ``spec.length`` bytes of the base key's encryption of
    ``spec.data``, made and kept in the token (it never passes through here).
    SoftHSM sets DES parity bits of a derived DES3 key."""
    m = _ENCRYPT_DATA[(cipher, spec.mode)]
    data = spec.data
    keep = ctypes.create_string_buffer(data, len(data))  # alive until the call returns
    param: Any
    if m == Mechanism.AES_ECB_ENCRYPT_DATA:
        param = data  # python-pkcs11 builds CK_KEY_DERIVATION_STRING_DATA itself
    elif m == Mechanism.AES_CBC_ENCRYPT_DATA:
        param = (spec.iv, data)
    elif m == Mechanism.DES3_ECB_ENCRYPT_DATA:
        # CK_KEY_DERIVATION_STRING_DATA {CK_BYTE_PTR pData; CK_ULONG ulLen}
        param = struct.pack("@PL", ctypes.addressof(keep), len(data))
    else:
        # CK_DES_CBC_ENCRYPT_DATA_PARAMS {CK_BYTE iv[8]; CK_BYTE_PTR pData; CK_ULONG length}
        param = struct.pack("@8sPL", spec.iv, ctypes.addressof(keep), len(data))
    entry = core._new_entry(new)
    template = keys.secret_template(new)
    if new.obj_type == "DES3":
        template[Attribute.VALUE_LEN] = DEFAULT  # SoftHSM refuses a length for DES3
    obj = core.hot(kid).derive_key(
        keys.SECRET_TYPES[new.obj_type],
        spec.length * 8,
        capabilities=0,
        mechanism=m,
        mechanism_param=param,
        template=template,
    )
    del keep
    entry.secret = obj
    core._commit(entry)
    bits = 168 if new.obj_type == "DES3" else spec.length * 8
    return KeyMaterial(new.obj_type, bits, None, None, False)
