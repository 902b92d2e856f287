"""Key objects: templates, the handle index, and key material in and out.

Everything here runs on the PKCS#11 thread. ``cryptography`` only parses
and builds encodings (PKCS#8, SubjectPublicKeyInfo, X.509); it never does
an operation with a key.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, ObjectClass

from strongroomd import mechanisms as mech
from strongroomd.errors import BadRequest
from strongroomd.keyref import KeyMaterial, NewKey

SECRET_TYPES = {
    "AES": KeyType.AES,
    "DES3": KeyType.DES3,
    "DES": KeyType.DES3,  # K||K||K: single DES (mechanisms.des_token_value)
    "OPAQUE": KeyType.GENERIC_SECRET,  # stored and exported, never used
    "HMAC": KeyType.GENERIC_SECRET,
    "SECRET": KeyType.GENERIC_SECRET,
}

_SECRET_CAPS = {
    "AES": (
        Attribute.ENCRYPT,
        Attribute.DECRYPT,
        Attribute.SIGN,
        Attribute.VERIFY,
        Attribute.WRAP,
        Attribute.UNWRAP,
        Attribute.DERIVE,
    ),
    "DES3": (
        Attribute.ENCRYPT,
        Attribute.DECRYPT,
        Attribute.SIGN,
        Attribute.VERIFY,
        Attribute.WRAP,
        Attribute.UNWRAP,
        Attribute.DERIVE,
    ),
    "HMAC": (Attribute.SIGN, Attribute.VERIFY, Attribute.DERIVE),
    "SECRET": (Attribute.SIGN, Attribute.VERIFY, Attribute.DERIVE),
    "OPAQUE": (),
}
_SECRET_CAPS["DES"] = _SECRET_CAPS["DES3"]
_PRIVATE_CAPS = {
    "RSA": (Attribute.DECRYPT, Attribute.SIGN, Attribute.UNWRAP),
    "EC": (Attribute.SIGN, Attribute.DERIVE),
    "Ed25519": (Attribute.SIGN,),
}
_PUBLIC_CAPS = {
    "RSA": (Attribute.ENCRYPT, Attribute.VERIFY, Attribute.WRAP),
    "EC": (Attribute.VERIFY,),
    "Ed25519": (Attribute.VERIFY,),
}


class Entry:
    """What the index holds for one kid: handles, and hot session copies."""

    __slots__ = ("cert", "hot", "hot_pub", "kid", "point", "private", "public", "secret", "token")

    def __init__(self, kid: str, token: bool) -> None:
        self.kid = kid
        self.token = token  # persistent (token object) or session object
        self.secret: Any = None
        self.private: Any = None
        self.public: Any = None
        self.cert: Any = None
        self.hot: Any = None  # session copy of secret/private (token keys only)
        self.hot_pub: Any = None  # session copy of public
        self.point: bytes | None = None  # raw EC point, for ECDH

    def objects(self) -> list[Any]:
        return [o for o in (self.secret, self.private, self.public, self.cert) if o is not None]

    def drop_hot(self) -> None:
        """Forget the session copies (destroying them for token keys)."""
        hot, hot_pub = self.hot, self.hot_pub
        self.hot = self.hot_pub = None
        if self.token:
            for obj in (hot, hot_pub):
                if obj is not None:
                    obj.destroy()


def _key_class(new: NewKey) -> str:
    return "Ed25519" if new.obj_type == "EC" and new.curve == "Ed25519" else new.obj_type


def common(new: NewKey) -> dict:
    return {
        Attribute.TOKEN: not new.transient,
        Attribute.ID: new.kid.encode(),
        Attribute.LABEL: new.name,
        Attribute.MODIFIABLE: True,
        Attribute.COPYABLE: True,
    }


def secret_template(new: NewKey) -> dict:
    t = common(new)
    t[Attribute.CLASS] = ObjectClass.SECRET_KEY
    t[Attribute.KEY_TYPE] = SECRET_TYPES[new.obj_type]
    t[Attribute.PRIVATE] = True
    t[Attribute.SENSITIVE] = not new.exportable
    t[Attribute.EXTRACTABLE] = new.exportable
    for attr in _SECRET_CAPS[new.obj_type]:
        t[attr] = True
    return t


def private_template(new: NewKey) -> dict:
    kc = _key_class(new)
    t = common(new)
    t[Attribute.CLASS] = ObjectClass.PRIVATE_KEY
    t[Attribute.KEY_TYPE] = key_type(kc)
    t[Attribute.PRIVATE] = True
    t[Attribute.SENSITIVE] = not new.exportable
    t[Attribute.EXTRACTABLE] = new.exportable
    for attr in _PRIVATE_CAPS[kc]:
        t[attr] = True
    return t


def public_template(new: NewKey) -> dict:
    kc = _key_class(new)
    t = common(new)
    t[Attribute.CLASS] = ObjectClass.PUBLIC_KEY
    t[Attribute.KEY_TYPE] = key_type(kc)
    t[Attribute.PRIVATE] = False
    for attr in _PUBLIC_CAPS[kc]:
        t[attr] = True
    return t


def key_type(kc: str) -> KeyType:
    return {"RSA": KeyType.RSA, "EC": KeyType.EC, "Ed25519": KeyType.EC_EDWARDS}[kc]


# -- DER helpers --------------------------------------------------------------


def der_octet_string(value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return b"\x04" + bytes([n]) + value
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x04" + bytes([0x80 | len(length)]) + length + value


def parse_octet_string(der: bytes) -> bytes:
    """The content of a DER OCTET STRING (CKA_EC_POINT as SoftHSM gives it)."""
    if len(der) < 2 or der[0] != 0x04:
        raise ValueError("not an OCTET STRING")
    n = der[1]
    pos = 2
    if n & 0x80:
        width = n & 0x7F
        n = int.from_bytes(der[2 : 2 + width], "big")
        pos = 2 + width
    if pos + n != len(der):
        raise ValueError("bad OCTET STRING length")
    return der[pos:]


def _int_bytes(value: int, size: int | None = None) -> bytes:
    return value.to_bytes(size or max(1, (value.bit_length() + 7) // 8), "big")


_CRYPTO_CURVES = {
    "NistP256": ec.SECP256R1,
    "NistP384": ec.SECP384R1,
    "NistP521": ec.SECP521R1,
    "SecP256K1": ec.SECP256K1,
}
_CURVE_NAMES = {cls.name: name for name, cls in _CRYPTO_CURVES.items()}


# -- public keys out of the token -------------------------------------------


def public_point(public: Any, curve: mech.Curve) -> bytes:
    """The raw public point (EC: uncompressed; Ed25519: 32 bytes)."""
    return parse_octet_string(public[Attribute.EC_POINT])


def spki(obj_type: str, curve_name: str | None, public: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a token public key."""
    if obj_type == "RSA":
        attrs = public.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
        key = rsa.RSAPublicNumbers(
            int.from_bytes(attrs[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(attrs[Attribute.MODULUS], "big"),
        ).public_key()
    elif curve_name == "Ed25519":
        key = ed25519.Ed25519PublicKey.from_public_bytes(
            public_point(public, mech.CURVES[curve_name])
        )
    else:
        key = ec.EllipticCurvePublicKey.from_encoded_point(
            _CRYPTO_CURVES[curve_name](), public_point(public, mech.CURVES[curve_name])
        )
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- values coming in ---------------------------------------------------------


def _load(value: bytes, pem_fn: Any, der_fn: Any) -> Any:
    if value.lstrip().startswith(b"-----BEGIN"):
        return pem_fn(value)
    return der_fn(value)


def parse_asymmetric(obj_type: str, value: bytes) -> tuple[Any, bool]:
    """(cryptography key, public_only) from PKCS#8 or SPKI, DER or PEM."""
    try:
        key = _load(
            value,
            lambda v: serialization.load_pem_private_key(v, password=None),
            lambda v: serialization.load_der_private_key(v, password=None),
        )
        public_only = False
    except (ValueError, TypeError):
        try:
            key = _load(value, serialization.load_pem_public_key, serialization.load_der_public_key)
        except (ValueError, TypeError):
            raise BadRequest(
                f"value is not a PKCS#8 private key or SubjectPublicKeyInfo for {obj_type}",
                code="invalid_value",
            ) from None
        public_only = True
    return key, public_only


def parse_certificate(value: bytes) -> tuple[bytes, Any, dict]:
    """(DER certificate, its public key, the CKO_CERTIFICATE attributes)."""
    try:
        cert = _load(value, x509.load_pem_x509_certificate, x509.load_der_x509_certificate)
        attrs = {
            Attribute.SUBJECT: cert.subject.public_bytes(),
            Attribute.ISSUER: cert.issuer.public_bytes(),
            Attribute.SERIAL_NUMBER: _der_integer(cert.serial_number),
        }
        return cert.public_bytes(serialization.Encoding.DER), cert.public_key(), attrs
    except ValueError:
        raise BadRequest("value is not an X.509 certificate", code="invalid_value") from None


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
    return b"\x02" + der_octet_string(body)[1:]


def describe(key: Any) -> tuple[str, int | None, str | None]:
    """(obj_type, key_size, curve) of a cryptography key; refuses other kinds."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        size = key.key_size
        if size not in (2048, 3072, 4096):
            raise BadRequest("RSA keys are 2048, 3072 or 4096 bits", code="invalid_key_size")
        return "RSA", size, None
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        name = _CURVE_NAMES.get(key.curve.name)
        if name is None:
            raise BadRequest("unsupported elliptic curve", code="invalid_value")
        return "EC", mech.CURVES[name].bits, name
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EC", 256, "Ed25519"
    raise BadRequest("unsupported key type", code="invalid_value")


def public_attrs(key: Any, curve_name: str | None) -> dict:
    if isinstance(key, rsa.RSAPublicKey):
        n = key.public_numbers()
        return {Attribute.MODULUS: _int_bytes(n.n), Attribute.PUBLIC_EXPONENT: _int_bytes(n.e)}
    c = mech.CURVES[curve_name]
    if c.edwards:
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return {Attribute.EC_PARAMS: c.oid_der, Attribute.EC_POINT: der_octet_string(raw)}


def private_attrs(key: Any, curve_name: str | None) -> dict:
    if isinstance(key, rsa.RSAPrivateKey):
        p = key.private_numbers()
        return {
            Attribute.MODULUS: _int_bytes(p.public_numbers.n),
            Attribute.PUBLIC_EXPONENT: _int_bytes(p.public_numbers.e),
            Attribute.PRIVATE_EXPONENT: _int_bytes(p.d),
            Attribute.PRIME_1: _int_bytes(p.p),
            Attribute.PRIME_2: _int_bytes(p.q),
            Attribute.EXPONENT_1: _int_bytes(p.dmp1),
            Attribute.EXPONENT_2: _int_bytes(p.dmq1),
            Attribute.COEFFICIENT: _int_bytes(p.iqmp),
        }
    c = mech.CURVES[curve_name]
    if c.edwards:
        value = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    else:
        value = _int_bytes(key.private_numbers().private_value, c.size)
    return {Attribute.EC_PARAMS: c.oid_der, Attribute.VALUE: value}


# -- values going out ---------------------------------------------------------


def private_der(obj_type: str, curve_name: str | None, private: Any, *, pkcs8: bool) -> bytes:
    """DER of an extractable, non-sensitive private key object: PKCS#8 with
    ``pkcs8``, else DSM's export form: PKCS#1 RSAPrivateKey for RSA, SEC1
    ECPrivateKey for EC (what DSM's own CLI labels ``RSA``/``EC PRIVATE KEY``);
    Ed25519 has no other form than PKCS#8."""
    if obj_type == "RSA":
        a = private.get_attributes(
            [
                Attribute.MODULUS,
                Attribute.PUBLIC_EXPONENT,
                Attribute.PRIVATE_EXPONENT,
                Attribute.PRIME_1,
                Attribute.PRIME_2,
                Attribute.EXPONENT_1,
                Attribute.EXPONENT_2,
                Attribute.COEFFICIENT,
            ]
        )

        def i(attr: Attribute) -> int:
            return int.from_bytes(a[attr], "big")

        key: Any = rsa.RSAPrivateNumbers(
            i(Attribute.PRIME_1),
            i(Attribute.PRIME_2),
            i(Attribute.PRIVATE_EXPONENT),
            i(Attribute.EXPONENT_1),
            i(Attribute.EXPONENT_2),
            i(Attribute.COEFFICIENT),
            rsa.RSAPublicNumbers(i(Attribute.PUBLIC_EXPONENT), i(Attribute.MODULUS)),
        ).private_key()
    elif curve_name == "Ed25519":
        key = ed25519.Ed25519PrivateKey.from_private_bytes(private[Attribute.VALUE])
    else:
        value = int.from_bytes(private[Attribute.VALUE], "big")
        key = ec.derive_private_key(value, _CRYPTO_CURVES[curve_name]())
    traditional = not pkcs8 and obj_type in ("RSA", "EC") and curve_name != "Ed25519"
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL
        if traditional
        else serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def material(new: NewKey, key_size: int | None, pub_key: bytes | None, public_only: bool):
    return KeyMaterial(new.obj_type, key_size, new.curve, pub_key, public_only)
