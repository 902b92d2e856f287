"""The namespaces of both clients, mirroring the API's paths; no I/O here.

Each method builds a path and a body and hands them to the client's
``_call``, which returns the result (``Client``) or an awaitable of it
(``AsyncClient``). Return annotations are the synchronous client's; the
asynchronous client's (the same, awaited) are in ``_async_resources.pyi``,
generated from this file: after adding or changing a public method here, run
``.venv/bin/python -m tests.client.async_stub`` (tests/client/test_typing.py
fails until then).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from strongroom._models import (
    App,
    AuditRecord,
    ChainCheck,
    DecryptResult,
    DigestResult,
    EncryptResult,
    Group,
    Invocation,
    MacResult,
    Plugin,
    PluginTestResult,
    Record,
    SessionToken,
    SignResult,
    Sobject,
    StreamFinal,
    StreamStart,
    StreamStep,
    VerifyResult,
    WrapResult,
)
from strongroom._pubkey import public_key
from strongroom._types import AppGroups, IdLike, KeyLike, Mode

if TYPE_CHECKING:
    from strongroom._client import BaseClient

__all__ = ["AUTH_PATH", "TERMINATE_PATH", "key_descriptor"]

AUTH_PATH = "/sys/v1/session/auth"
TERMINATE_PATH = "/sys/v1/session/terminate"


def _fields(**fields: Any) -> dict[str, Any]:
    """A request body from keyword arguments; None means "not sent"."""
    return {k: v for k, v in fields.items() if v is not None}


def _ident(value: IdLike | None, field: str) -> str:
    """One path segment: an id string, or a record that holds ``field`` (or ``id``)."""
    v: object = value
    if isinstance(value, Mapping):
        v = value.get(field) or value.get("id")
    if not isinstance(v, str) or not v or v in (".", ".."):
        raise ValueError(f"not a valid {field}: {v!r}")
    if any(c in v for c in "/?#") or not v.isprintable():
        raise ValueError(f"not a valid {field}: {v!r}")
    return v


def _app_groups(value: AppGroups | None) -> list[str] | dict[str, list[str]] | None:
    # A Group record is a Mapping too: only a map without group_id is DSM's map form.
    if isinstance(value, Mapping) and "group_id" not in value:
        return {_ident(g, "group_id"): [str(p).upper() for p in ps] for g, ps in value.items()}
    return _idents(value, "group_id")  # type: ignore[arg-type]


def _idents(values: Sequence[IdLike] | None, field: str) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str | Mapping):
        values = [values]
    return [_ident(v, field) for v in values]


def key_descriptor(
    key: KeyLike | None = None, *, kid: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """The descriptor map for exactly one of ``key`` (map or Sobject), ``kid``, ``name``."""
    if sum(x is not None for x in (key, kid, name)) != 1:
        raise TypeError("name the key with exactly one of key=, kid= or name=")
    if isinstance(key, Sobject):
        return key.descriptor
    if isinstance(key, Mapping):
        return dict(key)
    if key is not None:
        raise TypeError("key= takes a descriptor map or an Sobject; use kid= or name= for strings")
    return {"kid": kid} if kid is not None else {"name": name}


def _by_name(records: Sequence[Mapping[str, Any]], name: str, field: str, what: str) -> str:
    named = [r[field] for r in records if r.get("name") == name]
    if len(named) != 1:
        found = "several" if named else "no"
        raise ValueError(f"{found} {what}s named {name!r}" + (": use the id" if named else ""))
    return named[0]


class _Namespace:
    def __init__(self, client: BaseClient) -> None:
        self._c = client


class Session(_Namespace):
    """``/sys/v1/session``. The client authenticates by itself; these are for explicit use."""

    def auth(
        self, api_key: str | None = None, *, app_id: str | None = None, secret: str | None = None
    ) -> SessionToken:
        """Authenticate this connection -> SessionToken(token_type, access_token,
        expires_in, entity_id). Without arguments, uses the client's own API key.
        """
        if api_key is None and app_id is None:
            api_key = self._c._api_key
            if api_key is None:
                raise ValueError("no API key: pass one, or set STRONGROOM_API_KEY")
        return self._c._call(
            "POST", AUTH_PATH, _fields(api_key=api_key, app_id=app_id, secret=secret), SessionToken
        )

    def terminate(self) -> None:
        """End this connection's session -> None."""
        return self._c._call("POST", TERMINATE_PATH, {})


class Groups(_Namespace):
    """``/sys/v1/groups``: results are :class:`Group`; ``delete`` returns None."""

    def create(self, name: str, *, description: str | None = None, **extra: Any) -> Group:
        body = _fields(name=name, description=description, **extra)
        return self._c._call("POST", "/sys/v1/groups", body, Group)

    def list(self) -> list[Group]:
        return self._c._call("GET", "/sys/v1/groups", None, Group)

    def get(self, group_id: IdLike) -> Group:
        return self._c._call("GET", f"/sys/v1/groups/{_ident(group_id, 'group_id')}", None, Group)

    def update(self, group_id: IdLike, **fields: Any) -> Group:
        path = f"/sys/v1/groups/{_ident(group_id, 'group_id')}"
        return self._c._call("PATCH", path, _fields(**fields), Group)

    def delete(self, group_id: IdLike | None = None, *, name: str | None = None) -> None:
        """Delete a group (it must hold no keys) by id or by ``name=`` -> None."""
        if (group_id is None) == (name is None):
            raise TypeError("name the group with exactly one of group_id or name=")
        if name is None:
            return self._c._call("DELETE", f"/sys/v1/groups/{_ident(group_id, 'group_id')}")
        return self._c._chain(
            self.list,
            lambda groups: self.delete(_by_name(groups, name, "group_id", "group")),
        )


class Apps(_Namespace):
    """``/sys/v1/apps``. ``create`` and ``reset_secret`` return ``credential.api_key`` once.

    ``groups`` (and ``add_groups`` / ``mod_groups`` of ``update``) take DSM's
    AppGroups: a list of groups, where the app gets every permission, or a map
    of group id to DSM permissions (``{"<gid>": ["ENCRYPT", "DECRYPT"]}``).
    """

    def create(
        self,
        name: str,
        *,
        groups: AppGroups,
        default_group: IdLike | None = None,
        description: str | None = None,
        **extra: Any,
    ) -> App:
        asked = _app_groups(groups)
        more = _app_groups(extra.pop("add_groups", None))  # besides a list in groups
        if isinstance(asked, dict) and more:
            raise ValueError("give a permission map in groups or in add_groups, not both")
        body = _fields(
            name=name,
            # a list goes as ``groups`` (what every Strongroom version takes), a map
            # as DSM's ``add_groups``
            groups=asked if isinstance(asked, list) else None,
            add_groups=asked if isinstance(asked, dict) else more,
            default_group=None if default_group is None else _ident(default_group, "group_id"),
            description=description,
            **extra,
        )
        return self._c._call("POST", "/sys/v1/apps", body, App)

    def list(self) -> list[App]:
        return self._c._call("GET", "/sys/v1/apps", None, App)

    def get(self, app_id: IdLike) -> App:
        return self._c._call("GET", f"/sys/v1/apps/{_ident(app_id, 'app_id')}", None, App)

    def update(
        self,
        app_id: IdLike,
        *,
        add_groups: AppGroups | None = None,
        mod_groups: AppGroups | None = None,
        del_groups: Sequence[IdLike] | None = None,
        **fields: Any,
    ) -> App:
        """PATCH: ``add_groups`` / ``mod_groups`` as DSM's AppGroups, ``del_groups``
        group ids; other fields (name, description, default_group, enabled) as given."""
        body = _fields(
            add_groups=_app_groups(add_groups),
            mod_groups=_app_groups(mod_groups),
            del_groups=_idents(del_groups, "group_id"),
            **fields,
        )
        path = f"/sys/v1/apps/{_ident(app_id, 'app_id')}"
        return self._c._call("PATCH", path, body, App)

    def delete(self, app_id: IdLike) -> None:
        return self._c._call("DELETE", f"/sys/v1/apps/{_ident(app_id, 'app_id')}")

    def reset_secret(self, app_id: IdLike) -> App:
        path = f"/sys/v1/apps/{_ident(app_id, 'app_id')}/reset_secret"
        return self._c._call("POST", path, {}, App)


class Keys(_Namespace):
    """``/crypto/v1/keys``: results are :class:`Sobject`; ``delete`` returns None.

    ``kid`` arguments take a kid string or an Sobject; operations that take a
    descriptor take ``key=`` (map or Sobject), ``kid=`` or ``name=``.
    """

    def create(
        self,
        name: str,
        obj_type: str,
        *,
        key_size: int | None = None,
        elliptic_curve: str | None = None,
        key_ops: Sequence[str] | None = None,
        group_id: IdLike | None = None,
        description: str | None = None,
        custom_metadata: Mapping[str, str] | None = None,
        transient: bool | None = None,
        enabled: bool | None = None,
        **extra: Any,
    ) -> Sobject:
        body = _fields(
            name=name,
            obj_type=obj_type,
            key_size=key_size,
            elliptic_curve=elliptic_curve,
            key_ops=None if key_ops is None else list(key_ops),
            group_id=None if group_id is None else _ident(group_id, "group_id"),
            description=description,
            custom_metadata=None if custom_metadata is None else dict(custom_metadata),
            transient=transient,
            enabled=enabled,
            **extra,
        )
        return self._c._call("POST", "/crypto/v1/keys", body, Sobject)

    def import_key(self, name: str, obj_type: str, value: bytes, **fields: Any) -> Sobject:
        """Import ``value`` (raw bytes, or DER/PEM); other fields as for :meth:`create`."""
        if "group_id" in fields and fields["group_id"] is not None:
            fields["group_id"] = _ident(fields["group_id"], "group_id")
        body = _fields(name=name, obj_type=obj_type, value=value, **fields)
        return self._c._call("PUT", "/crypto/v1/keys", body, Sobject)

    def list(
        self,
        *,
        group_id: IdLike | None = None,
        name: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[Sobject]:
        gid = None if group_id is None else _ident(group_id, "group_id")
        body = _fields(group_id=gid, name=name, limit=limit, offset=offset)
        return self._c._call("GET", "/crypto/v1/keys", body or None, Sobject)

    def get(self, kid: IdLike) -> Sobject:
        return self._c._call("GET", f"/crypto/v1/keys/{_ident(kid, 'kid')}", None, Sobject)

    def info(
        self, key: KeyLike | None = None, *, kid: str | None = None, name: str | None = None
    ) -> Sobject:
        body = key_descriptor(key, kid=kid, name=name)
        return self._c._call("POST", "/crypto/v1/keys/info", body, Sobject)

    def update(self, kid: IdLike, **fields: Any) -> Sobject:
        """Change name, description, custom_metadata, enabled, or narrow key_ops."""
        path = f"/crypto/v1/keys/{_ident(kid, 'kid')}"
        return self._c._call("PATCH", path, _fields(**fields), Sobject)

    def delete(self, kid: IdLike | None = None, *, name: str | None = None) -> None:
        """Delete a key for good, by kid (or Sobject) or by ``name=`` -> None."""
        if (kid is None) == (name is None):
            raise TypeError("name the key with exactly one of kid or name=")
        if name is None:
            return self._c._call("DELETE", f"/crypto/v1/keys/{_ident(kid, 'kid')}")
        return self._c._chain(lambda: self.info(name=name), lambda info: self.delete(info["kid"]))

    @overload
    def public(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        format: Literal["PEM", "pem", "OpenSSH", "OPENSSH", "openssh"] = "PEM",
    ) -> str: ...

    @overload
    def public(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        format: Literal["DER", "der"],
    ) -> bytes: ...

    @overload
    def public(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        format: Literal["JWK", "jwk"],
    ) -> dict[str, Any]: ...

    @overload
    def public(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        format: str,
    ) -> str | bytes | dict[str, Any]: ...

    def public(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        format: str = "PEM",
    ) -> str | bytes | dict[str, Any]:
        """The key's public half: PEM (str, default), DER (bytes), JWK (dict) or OpenSSH (str).

        Computed here from the key info's ``pub_key`` (a SubjectPublicKeyInfo);
        needs no EXPORT permission. Raises ValueError for a key without one.
        """
        body = key_descriptor(key, kid=kid, name=name)
        fmt = format.upper()
        if fmt not in ("PEM", "DER", "JWK", "OPENSSH"):
            raise ValueError(f"unknown format {format!r}: one of PEM, DER, JWK, OpenSSH")
        return self._c._call(
            "POST", "/crypto/v1/keys/info", body, lambda info: public_key(Sobject(info), fmt)
        )

    def export(
        self, key: KeyLike | None = None, *, kid: str | None = None, name: str | None = None
    ) -> Sobject:
        """The sobject with its ``value`` (keys with EXPORT in key_ops only)."""
        body = key_descriptor(key, kid=kid, name=name)
        return self._c._call("POST", "/crypto/v1/keys/export", body, Sobject)


class Crypto(_Namespace):
    """``/crypto/v1/*`` operations; each returns the answer as its :class:`Record` type.

    The key is named by ``key=`` (descriptor map or Sobject), ``kid=`` or
    ``name=``. Binary fields are ``bytes``. Fields left None are not sent;
    ``**extra`` passes further body fields through unchanged. ``mode`` is a
    name (``"GCM"``, ``"OAEP_MGF1_SHA256"``...) or DSM's map form.
    """

    def _op(self, op: str, key: Any, kid: Any, name: Any, model: type = Record, **f: Any) -> Any:
        body = _fields(key=key_descriptor(key, kid=kid, name=name), **f)
        return self._c._call("POST", f"/crypto/v1/{op}", body, model)

    def _op_alg(
        self, op: str, key: Any, kid: Any, name: Any, alg: str | None, model: type, **f: Any
    ) -> Any:
        """``_op`` with ``alg`` defaulting to the key's type, as the CLI does.

        An Sobject carries its type; a kid seen before is remembered; otherwise
        the key's info is fetched first (one more round trip).
        """
        desc = key_descriptor(key, kid=kid, name=name)
        if alg is None and isinstance(key, Sobject):
            alg = key.get("obj_type")
        if alg is None and "kid" in desc:
            alg = self._c._key_types.get(desc["kid"])
        if alg is not None:
            return self._op(op, desc, None, None, model, alg=alg, **f)

        def then(info: Any) -> Any:
            self._c._key_types[info["kid"]] = info["obj_type"]
            return self._op(op, desc, None, None, model, alg=info["obj_type"], **f)

        return self._c._chain(lambda: self._c.keys.info(desc), then)

    def encrypt(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        plain: bytes,
        alg: str | None = None,
        mode: Mode | None = None,
        iv: bytes | None = None,
        ad: bytes | None = None,
        tag_len: int | None = None,
        **extra: Any,
    ) -> EncryptResult:
        """-> EncryptResult(kid, cipher, iv?, tag?). ``alg`` defaults to the key's
        obj_type; ``tag_len`` is in bits."""
        return self._op_alg(
            "encrypt",
            key,
            kid,
            name,
            alg,
            EncryptResult,
            plain=plain,
            mode=mode,
            iv=iv,
            ad=ad,
            tag_len=tag_len,
            **extra,
        )

    def decrypt(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        cipher: bytes,
        alg: str | None = None,
        mode: Mode | None = None,
        iv: bytes | None = None,
        ad: bytes | None = None,
        tag: bytes | None = None,
        **extra: Any,
    ) -> DecryptResult:
        """-> DecryptResult(kid, plain). ``alg`` defaults to the key's obj_type; a
        wrong tag raises :class:`BadTag`."""
        return self._op_alg(
            "decrypt",
            key,
            kid,
            name,
            alg,
            DecryptResult,
            cipher=cipher,
            mode=mode,
            iv=iv,
            ad=ad,
            tag=tag,
            **extra,
        )

    # -- multi-part (DSM's encrypt|decrypt/init|update|final) ------------------

    def _stream(self, path: str, body: dict[str, Any], model: type) -> Any:
        return self._c._call("POST", path, body, model)

    def encrypt_init(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        alg: str | None = None,
        mode: Mode | None = None,
        iv: bytes | None = None,
        ad: bytes | None = None,
    ) -> StreamStart:
        """Start a multi-part encryption: -> StreamStart(kid, iv, state). Then
        :meth:`encrypt_update` per piece and :meth:`encrypt_final` (GCM's tag)."""
        body = _fields(
            key=key_descriptor(key, kid=kid, name=name), alg=alg, mode=mode, iv=iv, ad=ad
        )
        return self._stream("/crypto/v1/encrypt/init", body, StreamStart)

    def encrypt_update(self, state: bytes, plain: bytes) -> StreamStep:
        """-> StreamStep(state, cipher): send the returned state with the next call."""
        body = {"state": state, "plain": plain}
        return self._stream("/crypto/v1/encrypt/update", body, StreamStep)

    def encrypt_final(self, state: bytes, tag_len: int | None = None) -> StreamFinal:
        """-> StreamFinal(cipher, tag?)."""
        body = _fields(state=state, tag_len=tag_len)
        return self._stream("/crypto/v1/encrypt/final", body, StreamFinal)

    def decrypt_init(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        alg: str | None = None,
        mode: Mode | None = None,
        iv: bytes | None = None,
        ad: bytes | None = None,
    ) -> StreamStart:
        """Start a multi-part decryption: -> StreamStart(kid, state). For GCM the
        plaintext of each update is unauthenticated until :meth:`decrypt_final`
        (given the tag) succeeds: do not act on it before."""
        body = _fields(
            key=key_descriptor(key, kid=kid, name=name), alg=alg, mode=mode, iv=iv, ad=ad
        )
        return self._stream("/crypto/v1/decrypt/init", body, StreamStart)

    def decrypt_update(self, state: bytes, cipher: bytes) -> StreamStep:
        """-> StreamStep(state, plain)."""
        body = {"state": state, "cipher": cipher}
        return self._stream("/crypto/v1/decrypt/update", body, StreamStep)

    def decrypt_final(self, state: bytes, tag: bytes | None = None) -> StreamFinal:
        """-> StreamFinal(plain); a wrong tag (or CBC padding) raises :class:`BadTag`."""
        body = _fields(state=state, tag=tag)
        return self._stream("/crypto/v1/decrypt/final", body, StreamFinal)

    def sign(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        data: bytes | None = None,
        hash: bytes | None = None,
        hash_alg: str | None = None,
        mode: Mode | None = None,
        **extra: Any,
    ) -> SignResult:
        """-> SignResult(kid, signature). Give ``data``, or ``hash`` already made with hash_alg."""
        return self._op(
            "sign",
            key,
            kid,
            name,
            SignResult,
            data=data,
            hash=hash,
            hash_alg=hash_alg,
            mode=mode,
            **extra,
        )

    def verify(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        signature: bytes,
        data: bytes | None = None,
        hash: bytes | None = None,
        hash_alg: str | None = None,
        mode: Mode | None = None,
        **extra: Any,
    ) -> VerifyResult:
        """-> VerifyResult(kid, result: bool)."""
        return self._op(
            "verify",
            key,
            kid,
            name,
            VerifyResult,
            signature=signature,
            data=data,
            hash=hash,
            hash_alg=hash_alg,
            mode=mode,
            **extra,
        )

    def mac(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        data: bytes,
        alg: str | None = None,
        **extra: Any,
    ) -> MacResult:
        """-> MacResult(kid, mac). ``alg`` is the hash (SHA256...) or CMAC."""
        return self._op("mac", key, kid, name, MacResult, alg=alg, data=data, **extra)

    def macverify(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        data: bytes,
        mac: bytes,
        alg: str | None = None,
        **extra: Any,
    ) -> VerifyResult:
        """-> VerifyResult(kid, result: bool)."""
        return self._op(
            "macverify", key, kid, name, VerifyResult, alg=alg, data=data, mac=mac, **extra
        )

    def digest(self, data: bytes, *, alg: str = "SHA256", **extra: Any) -> DigestResult:
        """-> DigestResult(digest). No key involved."""
        body = _fields(alg=alg, data=data, **extra)
        return self._c._call("POST", "/crypto/v1/digest", body, DigestResult)

    def wrapkey(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        subject: KeyLike,
        alg: str,
        mode: Mode | None = None,
        **extra: Any,
    ) -> WrapResult:
        """Wrap ``subject`` (descriptor or Sobject; it needs EXPORT) under the key
        -> WrapResult(wrapped_key, iv?)."""
        return self._op(
            "wrapkey",
            key,
            kid,
            name,
            WrapResult,
            subject=key_descriptor(subject),
            alg=alg,
            mode=mode,
            **extra,
        )

    def unwrapkey(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        wrapped_key: bytes,
        alg: str,
        obj_type: str,
        mode: Mode | None = None,
        name: str | None = None,
        key_ops: Sequence[str] | None = None,
        group_id: IdLike | None = None,
        transient: bool | None = None,
        **extra: Any,
    ) -> Sobject:
        """Unwrap into a new key -> Sobject. Here ``name`` names the NEW key."""
        body = _fields(
            key=key_descriptor(key, kid=kid),
            alg=alg,
            obj_type=obj_type,
            wrapped_key=wrapped_key,
            mode=mode,
            name=name,
            key_ops=None if key_ops is None else list(key_ops),
            group_id=None if group_id is None else _ident(group_id, "group_id"),
            transient=transient,
            **extra,
        )
        return self._c._call("POST", "/crypto/v1/unwrapkey", body, Sobject)

    def agree(
        self,
        private_key: KeyLike,
        public_key: KeyLike,
        *,
        key_type: str,
        key_size: int,
        mechanism: str = "diffie_hellman",
        name: str | None = None,
        transient: bool | None = None,
        **extra: Any,
    ) -> Sobject:
        """Derive a shared key (ECDH) -> Sobject."""
        body = _fields(
            private_key=key_descriptor(private_key),
            public_key=key_descriptor(public_key),
            mechanism=mechanism,
            key_type=key_type,
            key_size=key_size,
            name=name,
            transient=transient,
            **extra,
        )
        return self._c._call("POST", "/crypto/v1/agree", body, Sobject)

    def derive(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        key_type: str,
        mechanism: Mapping[str, Any],
        key_size: int | None = None,
        name: str | None = None,
        key_ops: Sequence[str] | None = None,
        group_id: IdLike | None = None,
        transient: bool | None = None,
        **extra: Any,
    ) -> Sobject:
        """Derive a new key from the key (it needs DERIVEKEY) -> Sobject. Here ``name``
        names the NEW key. ``mechanism`` is DSM's: ``{"encrypt_data": {"alg", "mode",
        "plain", "iv"}}`` (in the token) or ``{"hkdf": {"hash_alg", "salt", "info"}}``
        (from a key with EXPORT)."""
        body = _fields(
            key=key_descriptor(key, kid=kid),
            key_type=key_type,
            key_size=key_size,
            mechanism=dict(mechanism),
            name=name,
            key_ops=None if key_ops is None else list(key_ops),
            group_id=None if group_id is None else _ident(group_id, "group_id"),
            transient=transient,
            **extra,
        )
        return self._c._call("POST", "/crypto/v1/derive", body, Sobject)


class Logs(_Namespace):
    """``/sys/v1/logs``: audit records, as a list of :class:`AuditRecord`."""

    def list(
        self,
        *,
        object_id: str | None = None,
        actor_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        **filters: Any,
    ) -> list[AuditRecord]:
        """Newest first; ``**filters`` passes further filters (e.g. ``invocation_id``)."""
        body = _fields(
            object_id=object_id, actor_id=actor_id, limit=limit, offset=offset, **filters
        )
        return self._c._call("GET", "/sys/v1/logs", body or None, AuditRecord)

    def verify(self) -> ChainCheck:
        """Recompute the hash chain: ``{ok, records, head, broken_at?, reason?}`` (admin)."""
        return self._c._call("GET", "/sys/v1/logs/verify", None, ChainCheck)

    def stats(
        self,
        of: str = "apps",
        id: IdLike | None = None,
        *,
        num_points: int | None = None,
        top_count: int | None = None,
        range_from: int | None = None,
        range_to: int | None = None,
    ) -> dict[str, Any]:
        """DSM's transaction statistics, counted from this log (admin): ``of`` is
        ``"apps"`` or ``"groups"`` (the busiest), or ``"app"``, ``"group"`` or
        ``"key"`` with that one's ``id``. Times are Unix seconds."""
        if of in ("apps", "groups"):
            if id is not None:
                raise ValueError(f"stats of {of} take no id")
            path = f"/sys/v1/stats/{of}"
        elif of in ("app", "group", "key"):
            field = {"app": "app_id", "group": "group_id", "key": "kid"}[of]
            path = f"/sys/v1/stats/{_ident(id, field)}/{of}"
        else:
            raise ValueError("of is apps, groups, app, group or key")
        body = _fields(
            num_points=num_points, top_count=top_count, range_from=range_from, range_to=range_to
        )
        return self._c._call("GET", path, body or None)


class Plugins(_Namespace):
    """``/sys/v1/plugins``. ``invoke`` returns whatever the plugin's ``run`` returned."""

    def create(
        self,
        name: str,
        code: str,
        *,
        groups: Sequence[IdLike],
        default_group: IdLike | None = None,
        description: str | None = None,
        enabled: bool | None = None,
        language: str = "LUA",
        plugin_type: str | None = None,
        **extra: Any,
    ) -> Plugin:
        """``plugin_type`` is DSM's (Strongroom runs ``STANDARD``, the default)."""
        body = _fields(
            name=name,
            source={"language": language, "code": code},
            plugin_type=plugin_type,
            groups=_idents(groups, "group_id"),
            default_group=None if default_group is None else _ident(default_group, "group_id"),
            description=description,
            enabled=enabled,
            **extra,
        )
        return self._c._call("POST", "/sys/v1/plugins", body, Plugin)

    def list(self) -> list[Plugin]:
        return self._c._call("GET", "/sys/v1/plugins", None, Plugin)

    def get(self, plugin_id: IdLike) -> Plugin:
        path = f"/sys/v1/plugins/{_ident(plugin_id, 'plugin_id')}"
        return self._c._call("GET", path, None, Plugin)

    def update(
        self, plugin_id: IdLike, *, code: str | None = None, language: str = "LUA", **fields: Any
    ) -> Plugin:
        """PATCH fields; ``code=`` is sent as ``source: {language, code}``."""
        if code is not None:
            fields["source"] = {"language": language, "code": code}
        path = f"/sys/v1/plugins/{_ident(plugin_id, 'plugin_id')}"
        return self._c._call("PATCH", path, _fields(**fields), Plugin)

    def delete(self, plugin_id: IdLike) -> None:
        return self._c._call("DELETE", f"/sys/v1/plugins/{_ident(plugin_id, 'plugin_id')}")

    def invoke(
        self, plugin_id: IdLike | None = None, input: Any = None, *, name: str | None = None
    ) -> Any:
        """Run the plugin (by id, or by ``name=``) on ``input`` -> its result (None for 204).

        A failing plugin raises :class:`PluginError`; ``exc.invocation_id`` finds
        its audit records (``logs.list(invocation_id=...)``).
        """
        if (plugin_id is None) == (name is None):
            raise TypeError("name the plugin with exactly one of plugin_id or name=")
        if name is not None:
            return self._c._chain(
                self.list,
                lambda plugins: self.invoke(_by_name(plugins, name, "plugin_id", "plugin"), input),
            )
        return self._c._call("POST", f"/sys/v1/plugins/{_ident(plugin_id, 'plugin_id')}", input)

    def test(
        self,
        code: str,
        input: Any = None,
        *,
        groups: Sequence[IdLike] | None = None,
        invoker: Any = None,
        **extra: Any,
    ) -> PluginTestResult:
        """Run unsaved code -> PluginTestResult: the result (or error and traceback), output."""
        body = _fields(
            code=code, input=input, groups=_idents(groups, "group_id"), invoker=invoker, **extra
        )
        if "input" not in body:
            body["input"] = None
        return self._c._call("POST", "/sys/v1/plugins/test", body, PluginTestResult)

    def output(self, invocation_id: str) -> Invocation:
        """What a recent invocation printed -> Invocation ``{invocation_id, plugin_id, at,
        output, truncated}`` (admin). Kept in memory only; NotFound once evicted."""
        path = f"/sys/v1/plugins/invocations/{invocation_id}/output"
        return self._c._call("GET", path, None, Invocation)
