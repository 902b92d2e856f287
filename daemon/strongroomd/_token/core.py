"""The token's state on the PKCS#11 thread: session, index, key management.

Only the worker thread touches a ``Core``. It logs in once, indexes every
object by CKA_ID once, and afterwards never searches the token.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11._pkcs11 import SearchIter

from strongroomd import mechanisms as mech
from strongroomd._token import keys
from strongroomd._token.keys import Entry
from strongroomd.errors import ApiError, BadRequest, Internal, NotFound, Unsupported
from strongroomd.keyref import KeyMaterial, KeyRef, NewKey

log = logging.getLogger("strongroomd.token")


def _each_object(session: Any) -> Any:
    """Every object of the session, or None for one whose attributes cannot be read.

    ``Session.get_objects()`` ends the whole search at the first object it cannot
    build, so search one handle at a time and go on past a broken one.
    """
    with SearchIter(session, {}, 1) as search:
        for batch in search:
            try:
                yield from batch
            except p11e.PKCS11Error:
                yield None


# One pkcs11.lib per module path and process: C_Initialize runs once.
_LIBS: dict[str, Any] = {}


def load_lib(module: str) -> Any:
    lib = _LIBS.get(module)
    if lib is None:
        lib = _LIBS[module] = pkcs11.lib(module)
    return lib


def token_error(exc: Exception, what: str) -> ApiError:
    """A PKCS#11 failure as an API error; never echoes key material."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, p11e.MechanismInvalid | p11e.KeyTypeInconsistent):
        return Unsupported(f"the token cannot {what} with this key")
    if isinstance(exc, p11e.KeyNotWrappable):
        return Unsupported(f"this key cannot {what}")
    if isinstance(
        exc,
        p11e.DataLenRange | p11e.DataInvalid | p11e.MechanismParamInvalid | p11e.KeySizeRange,
    ):
        return BadRequest(f"the token refused the input to {what}", code="invalid_value")
    if isinstance(exc, p11e.KeyUnextractable | p11e.AttributeSensitive):
        return BadRequest("the key is not exportable", code="invalid_value")
    log.error("PKCS#11 %s failed: %s", what, type(exc).__name__)
    return Internal(f"token failure during {what}")


class Core:
    def __init__(self, module: str, label: str, pin: str) -> None:
        lib = load_lib(module)
        try:
            token = lib.get_token(token_label=label)
        except p11e.NoSuchToken:
            raise NotFound(f"no PKCS#11 token labelled {label!r}") from None
        self.session = token.open(rw=True, user_pin=pin)
        self.index: dict[str, Entry] = {}
        self._index_token()

    # -- lifecycle -----------------------------------------------------------

    def _index_token(self) -> None:
        unreadable = 0
        for obj in _each_object(self.session):
            if obj is None:
                unreadable += 1
                continue
            try:
                raw = obj[Attribute.ID]
                kid = str(uuid.UUID(raw.decode()))
                cls = obj.object_class
            except (ValueError, UnicodeDecodeError, p11e.PKCS11Error):
                continue  # not one of ours
            entry = self.index.get(kid) or self.index.setdefault(kid, Entry(kid, True))
            self._attach(entry, obj, cls)
        if unreadable:
            # SoftHSM writes an object's file attribute by attribute: a kill during a
            # key creation leaves one it cannot read back. That key was never
            # acknowledged (its row comes after it), so it is skipped, not served.
            log.warning("skipped %d token objects that cannot be read back", unreadable)

    @staticmethod
    def _attach(entry: Entry, obj: Any, cls: ObjectClass) -> None:
        if cls == ObjectClass.SECRET_KEY:
            entry.secret = obj
        elif cls == ObjectClass.PRIVATE_KEY:
            entry.private = obj
        elif cls == ObjectClass.PUBLIC_KEY:
            entry.public = obj
        elif cls == ObjectClass.CERTIFICATE:
            entry.cert = obj

    def close(self) -> None:
        for entry in self.index.values():
            try:
                entry.drop_hot()
                if not entry.token:
                    for obj in entry.objects():
                        obj.destroy()
            except p11e.PKCS11Error:
                pass
        self.index.clear()
        self.session.close()

    def kids(self) -> set[str]:
        return {kid for kid, e in list(self.index.items()) if e.token}

    # -- lookup --------------------------------------------------------------

    def entry(self, kid: str) -> Entry:
        e = self.index.get(kid)
        if e is None:
            raise NotFound("no such key in the token")
        return e

    def hot(self, kid: str) -> Any:
        """The secret/private object to operate with (a session copy if stored)."""
        e = self.index.get(kid)
        if e is None:
            raise NotFound("no such key in the token")
        h = e.hot
        if h is None:
            obj = e.secret if e.secret is not None else e.private
            if obj is None:
                raise Unsupported("this key has no private part")
            h = e.hot = obj.copy({Attribute.TOKEN: False}) if e.token else obj
        return h

    def hot_public(self, kid: str) -> Any:
        e = self.index.get(kid)
        if e is None:
            raise NotFound("no such key in the token")
        h = e.hot_pub
        if h is None:
            if e.public is None:
                raise Unsupported("this key has no public part")
            h = e.hot_pub = e.public.copy({Attribute.TOKEN: False}) if e.token else e.public
        return h

    def _new_entry(self, new: NewKey) -> Entry:
        if new.kid in self.index:
            raise BadRequest("a key with this kid exists in the token", code="invalid_value")
        return Entry(new.kid, not new.transient)

    def _commit(self, entry: Entry) -> None:
        self.index[entry.kid] = entry

    # -- management ----------------------------------------------------------

    def remove(self, kid: str) -> None:
        e = self.index.pop(kid, None)
        if e is None:
            return
        e.drop_hot()
        for obj in e.objects():
            obj.destroy()

    def rename(self, key: KeyRef, name: str) -> None:
        e = self.entry(key.kid)
        e.drop_hot()
        for obj in e.objects():
            obj[Attribute.LABEL] = name

    def restrict(self, kid: str) -> None:
        """Make a key unexportable in the token too, once EXPORT is taken away.

        PKCS#11 lets CKA_EXTRACTABLE change only from true to false and
        CKA_SENSITIVE only from false to true, so this cannot be undone: EXPORT
        is never given back (key_ops can only be narrowed).
        """
        e = self.entry(kid)
        e.drop_hot()  # an extractable session copy must not outlive the change
        for obj in (e.secret, e.private):
            if obj is not None:
                if not obj[Attribute.SENSITIVE]:
                    obj[Attribute.SENSITIVE] = True
                if obj[Attribute.EXTRACTABLE]:
                    obj[Attribute.EXTRACTABLE] = False

    def generate(self, new: NewKey) -> KeyMaterial:
        entry = self._new_entry(new)
        t = new.obj_type
        if t in keys.SECRET_TYPES:
            bits = mech.check_key_size(t, new.key_size)
            template = keys.secret_template(new)
            if t == "HMAC" and bits < mech.HMAC_TOKEN_BYTES * 8:
                value = self.session.generate_random(bits)
                template[Attribute.VALUE] = mech.hmac_token_value(value)
                entry.secret = self.session.create_object(template)
            else:
                mechanism = {
                    "AES": Mechanism.AES_KEY_GEN,
                    "DES3": Mechanism.DES3_KEY_GEN,
                }.get(t, Mechanism.GENERIC_SECRET_KEY_GEN)
                entry.secret = self.session.generate_key(
                    keys.SECRET_TYPES[t],
                    None if t == "DES3" else bits,
                    capabilities=0,
                    mechanism=mechanism,
                    template=template,
                )
            self._commit(entry)
            return keys.material(new, bits, None, False)
        pub_t, priv_t = keys.public_template(new), keys.private_template(new)
        if t == "RSA":
            bits = mech.check_key_size(t, new.key_size)
            pub_t[Attribute.MODULUS_BITS] = bits
            pub_t[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
            key_type, mechanism = KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN
        elif t == "EC":
            curve = mech.curve(new.curve)
            bits = curve.bits
            pub_t[Attribute.EC_PARAMS] = curve.oid_der
            if curve.edwards:
                key_type, mechanism = KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN
            else:
                key_type, mechanism = KeyType.EC, Mechanism.EC_KEY_PAIR_GEN
        else:
            raise BadRequest(f"cannot generate a key of type {t}", code="invalid_value")
        entry.public, entry.private = self.session._generate_keypair(
            key_type,
            bits if t == "RSA" else None,
            capabilities=0,
            mechanism=mechanism,
            public_template=pub_t,
            private_template=priv_t,
        )
        self._commit(entry)
        return keys.material(new, bits, keys.spki(t, new.curve, entry.public), False)

    def import_key(self, new: NewKey, value: bytes) -> KeyMaterial:
        entry = self._new_entry(new)
        t = new.obj_type
        if t in keys.SECRET_TYPES:
            bits = mech.check_value_size(t, value)
            template = keys.secret_template(new)
            template[Attribute.VALUE] = mech.hmac_token_value(value) if t == "HMAC" else value
            entry.secret = self.session.create_object(template)
            self._commit(entry)
            return keys.material(new, bits, None, False)
        if t == "CERTIFICATE":
            cert_der, public, cert_attrs = keys.parse_certificate(value)
            key_t, bits, curve = keys.describe(public)
            as_key = NewKey(new.kid, new.name, key_t, bits, curve, False, new.transient)
            template = keys.public_template(as_key)
            template.update(keys.public_attrs(public, curve))
            entry.public = self.session.create_object(template)
            cert_t = keys.common(new)
            cert_t.update(
                {
                    Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                    Attribute.VALUE: cert_der,
                    Attribute.PRIVATE: False,
                    **cert_attrs,
                }
            )
            try:
                entry.cert = self.session.create_object(cert_t)
            except p11e.PKCS11Error:
                entry.public.destroy()
                raise
            self._commit(entry)
            spki = keys.spki(key_t, curve, entry.public)
            return KeyMaterial("CERTIFICATE", bits, curve, spki, True)
        if t not in ("RSA", "EC"):
            raise BadRequest(f"cannot import a key of type {t}", code="invalid_value")
        key, public_only = keys.parse_asymmetric(t, value)
        key_t, bits, curve = keys.describe(key)
        if key_t != t:
            raise BadRequest(f"value holds an {key_t} key, not {t}", code="invalid_value")
        if new.curve is not None and new.curve != curve:
            raise BadRequest("value is on another curve than elliptic_curve", code="invalid_value")
        new = NewKey(new.kid, new.name, t, bits, curve, new.exportable, new.transient)
        pub = key if public_only else key.public_key()
        template = keys.public_template(new)
        template.update(keys.public_attrs(pub, curve))
        entry.public = self.session.create_object(template)
        if not public_only:
            template = keys.private_template(new)
            template.update(keys.private_attrs(key, curve))
            try:
                entry.private = self.session.create_object(template)
            except p11e.PKCS11Error:
                entry.public.destroy()
                raise
        self._commit(entry)
        return keys.material(new, bits, keys.spki(t, curve, entry.public), public_only)

    def export(self, key: KeyRef) -> bytes:
        e = self.entry(key.kid)
        if e.secret is not None:
            value = e.secret[Attribute.VALUE]
            if key.obj_type == "HMAC" and key.key_size:
                value = value[: key.key_size // 8]
            return value
        if e.cert is not None:
            return e.cert[Attribute.VALUE]
        if e.private is not None and not key.public_only:
            if not e.private[Attribute.EXTRACTABLE] or e.private[Attribute.SENSITIVE]:
                raise BadRequest("the key is not exportable", code="invalid_value")
            return keys.pkcs8(key.obj_type, key.curve, e.private)
        if e.public is not None:
            return keys.spki(key.obj_type, key.curve, e.public)
        raise NotFound("no such key in the token")

    def persist(self, key: KeyRef, new: NewKey) -> KeyMaterial:
        src = self.entry(key.kid)
        if src.token:
            raise BadRequest("the key is already stored", code="invalid_value")
        entry = self._new_entry(new)
        attrs = {
            Attribute.TOKEN: True,
            Attribute.ID: new.kid.encode(),
            Attribute.LABEL: new.name,
        }
        made = []
        try:
            for name in ("secret", "private", "public", "cert"):
                obj = getattr(src, name)
                if obj is not None:
                    copy = obj.copy(attrs)
                    made.append(copy)
                    setattr(entry, name, copy)
        except p11e.PKCS11Error:
            for obj in made:
                obj.destroy()
            raise
        self._commit(entry)
        pub = None
        if entry.public is not None and key.obj_type in ("RSA", "EC"):
            pub = keys.spki(key.obj_type, key.curve, entry.public)
        return KeyMaterial(key.obj_type, key.key_size, key.curve, pub, key.public_only)
