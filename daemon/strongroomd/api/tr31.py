"""TR-31 key blocks (DSM's ``tr31_open`` and ``Tr31Envelope:seal``), computed by
:mod:`strongroomd.tr31` from the values of keys whose key_ops include EXPORT."""

from __future__ import annotations

from typing import Any

from strongroomd import tr31
from strongroomd.context import Request
from strongroomd.errors import BadRequest
from strongroomd.router import KEY, F, Route

KBPK_TYPES = ("AES", "DES3")


def _kbpk(req: Request) -> Any:
    kr = req.services.keyring
    row = kr.use(req.owner, req.caller, req.body["key"], "EXPORT")
    req.object_id = row.kid
    if row.obj_type not in KBPK_TYPES:
        raise BadRequest("a key block protection key is an AES or DES3 key", code="invalid_value")
    return row


async def open_(req: Request) -> dict[str, Any]:
    """The key inside a TR-31 block (its MAC checked) and the block's header."""
    row = _kbpk(req)
    header, key = tr31.open_(await req.services.keyring.export(row), req.body["key_block"])
    return {"kid": row.kid, "key": key, "header": header}


async def seal(req: Request) -> dict[str, Any]:
    """A TR-31 block holding ``subject``'s value under the key block protection key."""
    kr = req.services.keyring
    row = _kbpk(req)
    subject = kr.use(req.owner, req.caller, req.body["subject"], "EXPORT")
    kbpk, value = await kr.export(row), await kr.export(subject)
    return {"kid": row.kid, "key_block": tr31.seal(kbpk, req.body["header"], value)}


ROUTES = [
    Route(
        "POST",
        "/crypto/v1/keys/tr31/open",
        open_,
        {"key": KEY, "key_block": F(str, True)},
        synopsis="Open a TR-31 key block (the protection key needs EXPORT); answers the key.",
    ),
    Route(
        "POST",
        "/crypto/v1/keys/tr31/seal",
        seal,
        {"key": KEY, "subject": KEY, "header": F(dict, True)},
        synopsis="Seal a key (EXPORT) into a TR-31 key block under a protection key (EXPORT).",
    ),
]
