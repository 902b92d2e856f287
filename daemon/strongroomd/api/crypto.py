"""/crypto/v1/{encrypt,decrypt,sign,verify,mac,macverify,digest,wrapkey,unwrapkey,agree}.

Each handler finds the key, checks the caller's group and the key's
key_ops, and hands the remaining fields to the token layer, which owns the
meaning of algorithms and modes.
"""

from __future__ import annotations

from typing import Any

from strongroomd import mechanisms
from strongroomd.auth import Principal
from strongroomd.context import Request
from strongroomd.errors import BadRequest
from strongroomd.keyring import DEFAULT_SIZE, Keyring, choose_ops, ref_of, sobject
from strongroomd.router import KEY, F, Route
from strongroomd.store import KeyRow


def _keyring(req: Request) -> Keyring:
    return req.services.keyring


def _use(req: Request, op: str, field: str = "key") -> KeyRow:
    row = _keyring(req).use(req.owner, req.caller, req.body[field], op)
    if field == "key":
        req.object_id = row.kid
    return row


def _rest(body: dict[str, Any], *drop: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "key" and k not in drop}


def _simple(op: str, method: str):
    async def handler(req: Request) -> dict[str, Any]:
        row = _use(req, op)
        out = await getattr(req.services.token, method)(ref_of(row), _rest(req.body))
        return {"kid": row.kid, **out}

    handler.__name__ = method
    return handler


async def digest(req: Request) -> dict[str, Any]:
    return mechanisms.digest(req.body)


async def wrapkey(req: Request) -> dict[str, Any]:
    row = _use(req, "WRAPKEY")
    subject = _use(req, "EXPORT", "subject")
    return await req.services.token.wrap(ref_of(row), ref_of(subject), _rest(req.body, "subject"))


def _new_key_body(req: Request, p: Principal, obj_type: str, key_size: int | None):
    b = req.body
    if obj_type not in ("AES", "DES3", "HMAC", "SECRET", "RSA", "EC"):
        raise BadRequest(f"cannot make a key of type {obj_type}", code="invalid_value")
    ops = choose_ops(obj_type, b.get("key_ops"), imported=False)
    kr = _keyring(req)
    group = kr.target_group(p, b.get("group_id"))
    new = kr.new_key(
        req.owner, p, b, obj_type, b.get("elliptic_curve"), key_size, exportable="EXPORT" in ops
    )
    return kr, new, ops, group


async def unwrapkey(req: Request) -> dict[str, Any]:
    b, p = req.body, req.caller
    row = _use(req, "UNWRAPKEY")
    obj_type = b["obj_type"].upper()
    kr, new, ops, group = _new_key_body(req, p, obj_type, None)
    mat = await req.services.token.unwrap(ref_of(row), new, _rest(b, *_NEW))
    return sobject(await kr.register(req.owner, p, new, mat, b, ops, group))


async def agree(req: Request) -> dict[str, Any]:
    b, p = req.body, req.caller
    if b["mechanism"].lower() != "diffie_hellman":
        raise BadRequest("mechanism must be diffie_hellman", code="unsupported_algorithm")
    private = _keyring(req).use(req.owner, p, b["private_key"], "AGREEKEY")
    req.object_id = private.kid
    public = _keyring(req).find(req.owner, b["public_key"])
    if not (p.is_admin or public.group_id in p.groups or public.transient):
        raise BadRequest("the public key is not in any of your groups", code="invalid_value")
    obj_type = b["key_type"].upper()
    kr, new, ops, group = _new_key_body(
        req, p, obj_type, b.get("key_size", DEFAULT_SIZE.get(obj_type))
    )
    mat = await req.services.token.agree(ref_of(private), ref_of(public), new)
    return sobject(await kr.register(req.owner, p, new, mat, b, ops, group))


_NEW = (
    "obj_type",
    "name",
    "key_ops",
    "group_id",
    "transient",
    "description",
    "custom_metadata",
    "enabled",
    "elliptic_curve",
    "key_size",
)
_NEW_FIELDS = {
    "name": F(str),
    "key_ops": F(list, items=str),
    "group_id": F(str),
    "transient": F(bool),
    "description": F(str),
    "custom_metadata": F(dict),
    "enabled": F(bool),
}
_MODE = (str, dict)
_ENC = {
    "key": KEY,
    "alg": F(str, True),
    "mode": F(_MODE),
    "iv": F(bytes),
    "ad": F(bytes),
    "tag_len": F(int),
}
_SIGN = {
    "key": KEY,
    "hash_alg": F(str),
    "data": F(bytes),
    "hash": F(bytes),
    "mode": F(_MODE),
    "deterministic_signature": F(bool),
}
_MAC = {"key": KEY, "alg": F(str), "data": F(bytes, True)}

ROUTES = [
    Route(
        "POST",
        "/crypto/v1/encrypt",
        _simple("ENCRYPT", "encrypt"),
        {**_ENC, "plain": F(bytes, True)},
        synopsis="Encrypt with a key.",
    ),
    Route(
        "POST",
        "/crypto/v1/decrypt",
        _simple("DECRYPT", "decrypt"),
        {**_ENC, "cipher": F(bytes, True), "tag": F(bytes)},
        synopsis="Decrypt with a key.",
    ),
    Route("POST", "/crypto/v1/sign", _simple("SIGN", "sign"), _SIGN, synopsis="Sign."),
    Route(
        "POST",
        "/crypto/v1/verify",
        _simple("VERIFY", "verify"),
        {**_SIGN, "signature": F(bytes, True)},
        synopsis="Verify a signature.",
    ),
    Route("POST", "/crypto/v1/mac", _simple("MACGENERATE", "mac"), _MAC, synopsis="Make a MAC."),
    Route(
        "POST",
        "/crypto/v1/macverify",
        _simple("MACVERIFY", "macverify"),
        {**_MAC, "mac": F(bytes, True)},
        synopsis="Check a MAC.",
    ),
    Route(
        "POST",
        "/crypto/v1/digest",
        digest,
        {"alg": F(str, True), "data": F(bytes, True)},
        synopsis="Hash data.",
    ),
    Route(
        "POST",
        "/crypto/v1/wrapkey",
        wrapkey,
        {
            "key": KEY,
            "subject": F(dict, True),
            "alg": F(str, True),
            "mode": F(_MODE),
            "iv": F(bytes),
        },
        synopsis="Wrap an exportable key under another key.",
    ),
    Route(
        "POST",
        "/crypto/v1/unwrapkey",
        unwrapkey,
        {
            "key": KEY,
            "alg": F(str, True),
            "obj_type": F(str, True),
            "wrapped_key": F(bytes, True),
            "mode": F(_MODE),
            "iv": F(bytes),
            "elliptic_curve": F(str),
            "key_size": F(int),
            **_NEW_FIELDS,
        },
        synopsis="Unwrap a key into the token.",
    ),
    Route(
        "POST",
        "/crypto/v1/agree",
        agree,
        {
            "private_key": F(dict, True),
            "public_key": F(dict, True),
            "mechanism": F(str, True),
            "key_type": F(str, True),
            "key_size": F(int),
            **_NEW_FIELDS,
        },
        synopsis="ECDH: derive a new key.",
    ),
]
