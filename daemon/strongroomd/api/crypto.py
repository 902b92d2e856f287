"""/crypto/v1/{encrypt,decrypt,sign,verify,mac,macverify,digest,wrapkey,unwrapkey,agree}.

Each handler finds the key, checks the caller's group and the key's
key_ops, and hands the remaining fields to the token layer, which owns the
meaning of algorithms and modes.
"""

from __future__ import annotations

from typing import Any

from strongroomd import mechanisms
from strongroomd.context import Request
from strongroomd.errors import BadRequest, Unsupported
from strongroomd.keyring import DEFAULT_SIZE, KeySpec, key_spec, sobject
from strongroomd.router import KEY, F, Route
from strongroomd.store import KeyRow


def _rest(body: dict[str, Any], *drop: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "key" and k not in drop}


def _use(req: Request, op: str, field: str = "key") -> KeyRow:
    row = req.services.keyring.use(req.owner, req.caller, req.body[field], op)
    if field == "key":
        req.object_id = row.kid
    return row


def _simple(op: str, method: str):
    async def handler(req: Request) -> dict[str, Any]:
        row = _use(req, op)
        return {"kid": row.kid, **await req.services.keyring.operate(row, method, _rest(req.body))}

    handler.__name__ = method
    return handler


async def digest(req: Request) -> dict[str, Any]:
    return mechanisms.digest(req.body)


async def wrapkey(req: Request) -> dict[str, Any]:
    row = _use(req, "WRAPKEY")
    subject = _use(req, "EXPORT", "subject")
    return await req.services.keyring.wrap(row, subject, _rest(req.body, "subject"))


def _new_key(req: Request, obj_type: str, key_size: int | None) -> KeySpec:
    if obj_type not in ("AES", "DES3", "HMAC", "SECRET", "RSA", "EC"):
        raise BadRequest(f"cannot make a key of type {obj_type}", code="invalid_value")
    return key_spec(req.body, obj_type, key_size=key_size)


async def unwrapkey(req: Request) -> dict[str, Any]:
    b = req.body
    spec = _new_key(req, b["obj_type"].upper(), None)
    row = await req.services.keyring.unwrap(req.owner, req.caller, b["key"], spec, _rest(b, *_NEW))
    req.object_id = row.kid
    return sobject(row)


async def agree(req: Request) -> dict[str, Any]:
    b = req.body
    if b["mechanism"].lower() != "diffie_hellman":
        raise Unsupported("mechanism must be diffie_hellman")
    obj_type = b["key_type"].upper()
    spec = _new_key(req, obj_type, b.get("key_size", DEFAULT_SIZE.get(obj_type)))
    row = await req.services.keyring.agree(
        req.owner, req.caller, b["private_key"], b["public_key"], spec
    )
    req.object_id = row.kid
    return sobject(row)


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
