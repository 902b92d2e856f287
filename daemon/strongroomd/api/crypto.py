"""/crypto/v1/{encrypt,decrypt,sign,verify,mac,macverify,digest,wrapkey,unwrapkey,agree}.

Each handler finds the key, checks the caller's group and the key's
key_ops, and hands the remaining fields to the token layer, which owns the
meaning of algorithms and modes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from strongroomd import mechanisms
from strongroomd.context import Request
from strongroomd.errors import ApiError, BadRequest, TooLarge, Unsupported
from strongroomd.keyspec import DEFAULT_SIZE, KeySpec, key_spec, sobject
from strongroomd.router import KEY, F, Route, check_body
from strongroomd.store import KeyRow


def _rest(body: dict[str, Any], *drop: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "key" and k not in drop}


def _use(req: Request, op: str, field: str = "key") -> KeyRow:
    row = req.services.keyring.use(req.owner, req.caller, req.body[field], op)
    if field == "key":
        req.object_id = row.kid
    return row


def _mac_field(body: dict[str, Any]) -> dict[str, Any]:
    """macverify's MAC as ``mac`` or, as DSM's SDKs send it, ``digest`` (its older name)."""
    if "digest" in body:
        if "mac" in body and body["mac"] != body["digest"]:
            raise BadRequest(
                "give the MAC as mac or digest (its older name), not both", code="invalid_field"
            )
        body = {**{k: v for k, v in body.items() if k != "digest"}, "mac": body["digest"]}
    if "mac" not in body:
        raise BadRequest("field 'mac' is required", code="missing_field")
    return body


def _unmasked(body: dict[str, Any]) -> dict[str, Any]:
    """DSM's ``masked`` decryption (MASKDECRYPT: the plaintext comes back masked) is
    not offered: refused, never dropped, which would return it unmasked."""
    if body.get("masked"):
        raise Unsupported("masked decryption is not supported")
    return {k: v for k, v in body.items() if k != "masked"}


#: Request shapes DSM's clients send that a method reads under another name (or
#: must refuse rather than drop).
_ALIASES = {"macverify": _mac_field, "decrypt": _unmasked}


def _simple(op: str, method: str):
    alias = _ALIASES.get(method, lambda body: body)

    async def handler(req: Request) -> dict[str, Any]:
        row = _use(req, op)
        body = alias(_rest(req.body))
        return {"kid": row.kid, **await req.services.keyring.operate(row, method, body)}

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


async def derive(req: Request) -> dict[str, Any]:
    """DSM's DeriveKeyRequest: ``key_type``, ``key_size``, ``mechanism`` and the new
    key's fields; the answer is the new key (an Sobject)."""
    b = req.body
    if str(next(iter(b["mechanism"]), "")).startswith("bip32_"):
        from strongroomd.api import bip32  # BIP32 keys: computed in strongroomd.bip32

        return await bip32.derive(req)
    obj_type = b["key_type"].upper()
    spec = key_spec(b, obj_type, key_size=b.get("key_size"))
    kr = req.services.keyring
    # The audit record names the new key and the key it came from.
    base = kr.find(req.owner, req.caller, b["key"]).kid
    row = await kr.derive(req.owner, req.caller, b["key"], spec, b["mechanism"])
    req.object_id = row.kid
    req.audit_detail = {"base_kid": base, "mechanism": next(iter(b["mechanism"]))}
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
#: ``alg`` may be left out: the key's type fixes it (as in DSM).
_ENC = {
    "key": KEY,
    "alg": F(str),
    "mode": F(_MODE),
    "iv": F(bytes),
    "ad": F(bytes),
    "tag_len": F(int),
    # DSM's OAEP label: declared so that it is refused rather than ignored.
    "label": F(bytes),
    # Not DSM's (its field is ad), but a common name for it: declared so that it is
    # refused, never dropped (the ciphertext would silently bind no associated data).
    "aad": F(bytes),
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
_WRAP = {
    "key": KEY,
    "subject": F(dict, True),
    "alg": F(str),
    "mode": F(_MODE),
    "iv": F(bytes),
    "key_format": F(str, doc="Default | Pkcs8 (RSA and EC private keys)"),
}
_UNWRAP = {
    "key": KEY,
    "alg": F(str),
    "obj_type": F(str, True),
    "wrapped_key": F(bytes, True),
    "mode": F(_MODE),
    "iv": F(bytes),
    "elliptic_curve": F(str),
    "key_size": F(int),
    **_NEW_FIELDS,
}

#: The operations that take one key: (name, key_op, token method, fields, synopsis).
_OPS = [
    ("encrypt", "ENCRYPT", "encrypt", {**_ENC, "plain": F(bytes, True)}, "Encrypt with a key."),
    (
        "decrypt",
        "DECRYPT",
        "decrypt",
        {**_ENC, "cipher": F(bytes, True), "tag": F(bytes), "masked": F(bool)},
        "Decrypt with a key.",
    ),
    ("sign", "SIGN", "sign", _SIGN, "Sign."),
    ("verify", "VERIFY", "verify", {**_SIGN, "signature": F(bytes, True)}, "Verify a signature."),
    ("mac", "MACGENERATE", "mac", _MAC, "Make a MAC (returned as mac and as digest)."),
    (
        "macverify",
        "MACVERIFY",
        "macverify",
        {**_MAC, "mac": F(bytes, doc="required (or digest)"), "digest": F(bytes)},
        "Check a MAC (given as mac, or as digest as DSM's SDKs send it).",
    ),
]
_BY_NAME = {
    name: Route("POST", f"/crypto/v1/{name}", _simple(op, method), fields, synopsis=doc)
    for name, op, method, fields, doc in _OPS
}
_BY_NAME["wrapkey"] = Route(
    "POST",
    "/crypto/v1/wrapkey",
    wrapkey,
    _WRAP,
    synopsis="Wrap an exportable key under another key.",
)
_BY_NAME["unwrapkey"] = Route(
    "POST", "/crypto/v1/unwrapkey", unwrapkey, _UNWRAP, synopsis="Unwrap a key into the token."
)

#: Items in one batch request (a 4 MiB frame holds about this many small items).
MAX_BATCH = 4096


def _per_key(route: Route) -> Route:
    """``/crypto/v1/keys/{kid}/<op>``: the same operation, the key in the path."""
    inner = route.handler

    name = route.path.rsplit("/", 1)[1]
    fields = {k: v for k, v in (route.fields or {}).items() if k != "key"}
    if name == "wrapkey":
        # DSM's WrapKeyRequest on this path names the key to wrap as kid (the
        # wrapping key is the path's); /crypto/v1/wrapkey takes it as subject.
        fields = {
            **fields,
            "subject": F(dict, doc="the key to wrap (or kid)"),
            "kid": F(str, doc="the key to wrap, as DSM's WrapKeyRequest"),
        }

    async def handler(req: Request) -> Any:
        body = dict(req.body)
        if name == "wrapkey":
            if "kid" in body and "subject" in body:
                raise BadRequest(
                    "name the key to wrap by kid or subject, not both", code="invalid_field"
                )
            if "kid" in body:
                body["subject"] = {"kid": body.pop("kid")}
            if "subject" not in body:
                raise BadRequest("field 'kid' (the key to wrap) is required", code="missing_field")
        req.body = {**body, "key": {"kid": req.params["kid"]}}
        return await inner(req)

    return Route(
        "POST", f"/crypto/v1/keys/{{kid}}/{name}", handler, fields, synopsis=route.synopsis
    )


def _binary(single: Route, request: dict[str, Any]) -> dict[str, Any]:
    """A batch item's binary fields given as base64 text (how JSON carries them,
    over HTTP or from a DSM client) as bytes; bytes stay bytes."""
    out = dict(request)
    for name, f in (single.fields or {}).items():
        if f.types is bytes and isinstance(out.get(name), str):
            try:
                out[name] = base64.b64decode(out[name], validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(f"{name} must be binary or base64", code="invalid_field") from None
    return out


def _item(item: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A batch item's request and key descriptor. Two forms, as DSM's own: ``{kid,
    request}`` (DSM's batch encrypt and decrypt), or the descriptor form's request
    itself, the key inside as ``key`` (DSM's batch sign, verify, mac and macverify
    take SignRequestEx, VerifyRequestEx, ... items, and its SDK and CLI send them)."""
    if not isinstance(item, dict):
        raise BadRequest("a batch item is a map", code="invalid_field")
    if "request" not in item and isinstance(item.get("key"), dict):
        return {k: v for k, v in item.items() if k != "key"}, item["key"]
    kid = item.get("kid")
    if not isinstance(kid, str) or not isinstance(item.get("request"), dict):
        raise BadRequest(
            "an item is {kid, request}, or a request naming its key", code="invalid_field"
        )
    if "key" in item["request"]:
        raise BadRequest("an item is {kid, request} (the key goes in kid)", code="invalid_field")
    return item["request"], {"kid": kid}


def _batch(name: str, op: str, method: str) -> Route:
    """``/crypto/v1/keys/batch/<op>``: DSM's items ``{kid, request}`` in, one
    ``{status, body}`` or ``{status, error}`` out per item, in order. One
    item's failure does not fail the others; all items go to the token
    together, so the token thread takes them in batches."""
    single = _BY_NAME[name]

    async def handler(req: Request) -> list[dict[str, Any]]:
        items = req.body
        if not isinstance(items, list):
            raise BadRequest("a batch is a list of {kid, request} items", code="invalid_field")
        if len(items) > MAX_BATCH:
            raise TooLarge(f"a batch holds at most {MAX_BATCH} items")
        kr = req.services.keyring
        results: list[dict[str, Any]] = [{}] * len(items)
        # One audit record for the batch, naming every key with its items'
        # outcomes: a record per item cost as much as the items themselves.
        tally: dict[str, dict[str, int]] = {}

        def answer(i: int, kid: Any, out: dict[str, Any] | ApiError) -> None:
            outcome = "ok" if isinstance(out, dict) else out.code
            per_key = tally.setdefault(kid if isinstance(kid, str) else "(none)", {})
            per_key[outcome] = per_key.get(outcome, 0) + 1
            if isinstance(out, ApiError):
                results[i] = {"status": out.status, "error": out.message, "code": out.code}
            else:
                results[i] = {"status": 200, "body": {"kid": kid, **out}}

        # Check every item first; symmetric encrypts and decrypts then go to the
        # token as one job per key instead of one job per item.
        grouped: dict[str, tuple[Any, list[int], list[dict[str, Any]]]] = {}
        singles: list[tuple[int, Any, dict[str, Any]]] = []
        for i, item in enumerate(items):
            kid = item.get("kid") if isinstance(item, dict) else None
            try:
                request, key = _item(item)
                if isinstance(key.get("kid"), str):
                    kid = key["kid"]
                request = _binary(single, request)
                body = check_body(single, {**request, "key": key})
                body = _ALIASES.get(method, lambda b: b)(body)
                row = kr.use(req.owner, req.caller, body["key"], op)
                kid = row.kid
            except ApiError as exc:
                answer(i, kid, exc)
                continue
            if method in ("encrypt", "decrypt") and row.obj_type in ("AES", "DES3", "DES"):
                entry = grouped.setdefault(row.kid, (row, [], []))
                entry[1].append(i)
                entry[2].append(_rest(body))
            else:
                singles.append((i, row, _rest(body)))

        async def one(i: int, row: Any, body: dict[str, Any]) -> None:
            try:
                answer(i, row.kid, await kr.operate(row, method, body))
            except ApiError as exc:
                answer(i, row.kid, exc)

        async def many(row: Any, where: list[int], bodies: list[dict[str, Any]]) -> None:
            for i, out in zip(where, await kr.operate_many(row, method, bodies), strict=True):
                answer(i, row.kid, out)

        await asyncio.gather(
            *(many(*entry) for entry in grouped.values()),
            *(one(*single_) for single_ in singles),
        )
        req.audit_detail = {"items": len(results), "keys": tally}
        if len(tally) == 1:
            req.object_id = next(iter(tally))
        return results

    return Route(
        "POST",
        f"/crypto/v1/keys/batch/{name}",
        handler,
        None,
        synopsis=f"Batch {name}: a list of {{kid, request}}; one result per item, in order.",
    )


_BY_NAME["derive"] = Route(
    "POST",
    "/crypto/v1/derive",
    derive,
    {
        "key": KEY,
        "key_type": F(str, True),
        "key_size": F(int),
        "mechanism": F(
            dict, True, "{encrypt_data: {alg, mode, plain, iv}} | {hkdf: {hash_alg, salt, info}}"
        ),
        "activation_date": F(str),
        "deactivation_date": F(str),
        **_NEW_FIELDS,
    },
    synopsis="Derive a new key from a key (encrypt_data in the token; hkdf from an "
    "exportable key).",
)

ROUTES = [
    *_BY_NAME.values(),
    Route(
        "POST",
        "/crypto/v1/digest",
        digest,
        {"alg": F(str, True), "data": F(bytes, True)},
        synopsis="Hash data.",
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
    # Batch before per-key: /keys/batch/x would otherwise match /keys/{kid}/x.
    *(_batch(name, op, method) for name, op, method, _f, _d in _OPS),
    *(_per_key(route) for route in _BY_NAME.values()),
]
