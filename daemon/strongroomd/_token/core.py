"""The token's state on the PKCS#11 thread: session, index, key management.

Only the worker thread touches a ``Core``. It logs in once, indexes every
object by CKA_ID once, and afterwards never searches the token.

One failed call must not break later ones. SoftHSM 2.6.1 (file backend)
breaks itself when it cannot open a file: ``Generation::wasUpdated()``
answers "changed" when it cannot open the token's ``generation`` file, so
``OSToken::index()`` re-reads the token directory, ``opendir`` fails
(EMFILE), and the token is marked invalid (``OSToken::valid = false``) for
good: ``index()`` returns early once invalid and ``createObject()`` refuses,
so every later token-object creation fails with CKR_GENERAL_ERROR, on every
session, until C_Finalize. Any call that reaches a token object's files can
trigger it (create, destroy, set attribute, a copy from a token object).
Hence :meth:`Core.enter`: such calls first check that descriptors are free
(and are refused with 503 ``unavailable`` without entering the module otherwise),
and :meth:`Core.failed` / :meth:`Core._reopen`: if a call fails anyway and
C_GetTokenInfo shows the token lost, the library is re-initialised, logged
in again and re-indexed. Closing or replacing a session would not help (the
broken state is the library's, shared by all sessions) and would destroy the
session objects it created.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11._pkcs11 import SearchIter

from strongroomd import mechanisms as mech
from strongroomd._token import keys
from strongroomd._token.keys import Entry
from strongroomd.errors import (
    ApiError,
    BadRequest,
    Internal,
    NotFound,
    Unavailable,
    Unsupported,
)
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


#: Descriptors that must be free before a call that may open token files enters
#: the module. SoftHSM holds up to about five at once during a write (generation,
#: directory, object, lock, transaction lock); the rest is margin for the event
#: loop thread, which may accept connections meanwhile.
FD_HEADROOM = 16


def fds_free(n: int) -> bool:
    """Whether ``n`` more descriptors can be opened now (opens and closes them)."""
    opened: list[int] = []
    try:
        for _ in range(n):
            opened.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        return False
    finally:
        for fd in opened:
            os.close(fd)
    return True


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
        self._lib, self._label, self._pin = lib, label, pin
        self._slot = token.slot
        self.session = token.open(rw=True, user_pin=pin)
        self.index: dict[str, Entry] = {}
        #: A token-file call failed and the token's health is not known yet.
        self.suspect = False
        #: Times the library was re-initialised after the token was lost.
        self.reopened = 0
        #: Transient keys destroyed by a re-initialisation (for a clear 404).
        self.lost: set[str] = set()
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

    # -- health --------------------------------------------------------------

    def enter(self) -> None:
        """Before a call that may open token files: refuse it when descriptors are
        short (SoftHSM would break its token for good), and first recover a token
        that an earlier failed call broke."""
        if not fds_free(FD_HEADROOM):
            log.warning("token call refused: fewer than %d descriptors free", FD_HEADROOM)
            raise Unavailable("the daemon is short of file descriptors; retry shortly")
        if self.suspect:
            self._check()

    def failed(self) -> None:
        """After a token-file call failed: find out now (or at the next
        :meth:`enter`, if descriptors are short) whether it broke the token."""
        self.suspect = True
        if fds_free(FD_HEADROOM):
            try:
                self._check()
            except Exception:
                log.exception("token recovery failed; retried on the next write")

    def _check(self) -> None:
        try:
            self._slot.get_token()  # C_GetTokenInfo: fails once SoftHSM's token is invalid
        except p11e.PKCS11Error:
            self._reopen()
        self.suspect = False

    def _reopen(self) -> None:
        """Re-initialise the library, log in again, and re-index the token.

        Every session and handle of the old initialisation is gone: session
        objects (transient keys, hot copies) with them. Token keys come back
        from the index (hot copies are remade on first use); transient keys are
        lost, and later uses of them answer 404.
        """
        transient = [kid for kid, e in self.index.items() if not e.token]
        log.error(
            "the token's state was lost after a failed call; re-initialising the "
            "PKCS#11 library (%d transient keys are lost)",
            len(transient),
        )
        self.lost.update(transient)
        self.index.clear()
        self._lib.reinitialize()
        token = self._lib.get_token(token_label=self._label)
        self._slot = token.slot
        self.session = token.open(rw=True, user_pin=self._pin)
        self._index_token()
        self.reopened += 1

    # -- lookup --------------------------------------------------------------

    def entry(self, kid: str) -> Entry:
        e = self.index.get(kid) or self.learn(kid)
        if e is None:
            raise self._missing(kid)
        return e

    def learn(self, kid: str) -> Entry | None:
        """Find a token object made by another process (another node on the same
        token) by its CKA_ID, and index it; None if the token has none.

        One C_FindObjects on the ID, never a walk over the whole token; SoftHSM
        and network HSMs alike answer it from their own index.
        """
        if kid in self.index:
            return self.index[kid]
        found = None
        try:
            for obj in self.session.get_objects({Attribute.ID: kid.encode()}):
                if found is None:
                    found = Entry(kid, True)
                self._attach(found, obj, obj.object_class)
        except p11e.PKCS11Error as exc:
            log.warning("looking up token object %s failed: %s", kid, type(exc).__name__)
            return None
        if found is not None:
            self.index[kid] = found
        return found

    def forget(self, kid: str) -> None:
        """Drop a token key from the index (another node deleted it): its session
        copies go, its token objects are the deleter's to destroy."""
        e = self.index.get(kid)
        if e is not None and e.token:
            del self.index[kid]
            e.drop_hot()

    def _missing(self, kid: str) -> NotFound:
        if kid in self.lost:
            return NotFound("this transient key was lost when the token was re-initialised")
        return NotFound("no such key in the token")

    def hot(self, kid: str) -> Any:
        """The secret/private object to operate with (a session copy if stored)."""
        e = self.index.get(kid) or self.learn(kid)
        if e is None:
            raise self._missing(kid)
        h = e.hot
        if h is None:
            obj = e.secret if e.secret is not None else e.private
            if obj is None:
                raise Unsupported("this key has no private part")
            h = e.hot = self._copy(obj) if e.token else obj
        return h

    def _copy(self, obj: Any) -> Any:
        """A session copy of a token object (this reads the object's file)."""
        self.enter()
        try:
            return obj.copy({Attribute.TOKEN: False})
        except p11e.PKCS11Error:
            self.failed()
            raise

    def hot_public(self, kid: str) -> Any:
        e = self.index.get(kid) or self.learn(kid)
        if e is None:
            raise self._missing(kid)
        h = e.hot_pub
        if h is None:
            if e.public is None:
                raise Unsupported("this key has no public part")
            h = e.hot_pub = self._copy(e.public) if e.token else e.public
        return h

    def _new_entry(self, new: NewKey) -> Entry:
        if new.kid in self.index:
            raise BadRequest("a key with this kid exists in the token", code="invalid_value")
        return Entry(new.kid, not new.transient)

    def _commit(self, entry: Entry) -> None:
        self.index[entry.kid] = entry

    # -- management ----------------------------------------------------------

    def remove(self, kid: str) -> None:
        e = self.index.get(kid) or self.learn(kid)  # made by another node: found by CKA_ID
        self.index.pop(kid, None)
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

    def remove_private(self, kid: str) -> bool:
        """Destroy a key pair's private object; whether there was one."""
        e = self.index.get(kid)
        if e is None or e.private is None:
            return False
        e.drop_hot()
        e.private.destroy()
        e.private = None
        return True

    def has_private(self, kid: str) -> bool:
        e = self.index.get(kid)
        return e is not None and e.private is not None

    def restrict_many(self, kids: list[str]) -> int:
        """:meth:`restrict` each key that is still exportable; how many were."""
        changed = 0
        for kid in kids:
            e = self.index.get(kid)
            objs = [o for o in (e.secret, e.private) if o is not None] if e else []
            if any(o[Attribute.EXTRACTABLE] or not o[Attribute.SENSITIVE] for o in objs):
                self.restrict(kid)
                changed += 1
        return changed

    def generate(self, new: NewKey) -> KeyMaterial:
        entry = self._new_entry(new)
        t = new.obj_type
        if t in keys.SECRET_TYPES:
            bits = mech.check_key_size(t, new.key_size)
            template = keys.secret_template(new)
            if (t == "HMAC" and bits < mech.HMAC_TOKEN_BYTES * 8) or t == "DES":
                value = self.session.generate_random(64 if t == "DES" else bits)
                if t == "DES":
                    value = mech.des_odd_parity(value)
                template[Attribute.VALUE] = mech.token_value(t, value)
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
            template[Attribute.VALUE] = mech.token_value(t, value)
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

    def export(self, key: KeyRef, *, pkcs8: bool = False) -> bytes:
        """A key's value: raw bytes of a secret key, a certificate's DER, a public
        key's SPKI, a private key in DSM's export form (or PKCS#8, for wrapping)."""
        e = self.entry(key.kid)
        if e.secret is not None:
            value = e.secret[Attribute.VALUE]
            if key.obj_type == "HMAC" and key.key_size:
                value = value[: key.key_size // 8]
            elif key.obj_type == "DES":
                value = value[:8]  # the token holds K||K||K
            return value
        if e.cert is not None:
            return e.cert[Attribute.VALUE]
        if e.private is not None and not key.public_only:
            if not e.private[Attribute.EXTRACTABLE] or e.private[Attribute.SENSITIVE]:
                raise BadRequest("the key is not exportable", code="invalid_value")
            return keys.private_der(key.obj_type, key.curve, e.private, pkcs8=pkcs8)
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
                    if not new.exportable and name in ("secret", "private"):
                        # The stored copy is as unexportable as its key_ops say (SoftHSM
                        # refuses these in the copy's template, not as a change after).
                        if not copy[Attribute.SENSITIVE]:
                            copy[Attribute.SENSITIVE] = True
                        if copy[Attribute.EXTRACTABLE]:
                            copy[Attribute.EXTRACTABLE] = False
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
