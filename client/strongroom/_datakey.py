"""Data keys (KMS GenerateDataKey, Vault transit/datakey) on the daemon's existing paths.

No daemon route makes a data key; the client composes one from the routes an
app already has, so the same permission checks and audit records apply:

1. ``keys/info`` on the KEK, to choose the wrapping (AES ``KW``, RSA
   ``OAEP_MGF1_SHA256``);
2. a transient AES key (``transient: true``, ``key_ops: ["EXPORT"]``: the
   daemon wraps only exportable keys), which lives in the daemon and never in
   the database;
3. ``wrapkey`` under the KEK; ``keys/export`` only when the plaintext form is
   asked for;
4. the transient key deleted again, whatever happened.

Unwrapping reverses it: ``unwrapkey`` into a transient AES key, ``export``,
delete. Each function here is a *flow*: a generator that yields the requests
``(method, path, body, model)`` and receives their results, so the sync and
the async client run the same steps (``Client._run`` / ``AsyncClient._run``),
and a failed step is thrown back in so the transient key is still deleted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Mapping
from typing import Any

from strongroom._exceptions import StrongroomError
from strongroom._models import DataKey, Sobject, WrapResult

__all__ = ["DATAKEY_BITS", "WRAPPING", "Flow", "Step", "generate", "unwrap"]

#: One request of a flow: method, path, body, and the model of its answer.
Step = tuple[str, str, Any, Any]
Flow = Generator[Step, Any, Any]

DATAKEY_BITS = (128, 192, 256)
#: KEK obj_type -> (wrapkey alg, mode).
WRAPPING = {"AES": ("AES", "KW"), "RSA": ("RSA", "OAEP_MGF1_SHA256")}


def _wrapping(kek: Mapping[str, Any]) -> tuple[str, str]:
    try:
        return WRAPPING[kek["obj_type"]]
    except KeyError:
        raise ValueError(
            f"the KEK {kek.get('name')!r} is {kek.get('obj_type')}: a data key is wrapped "
            "under an AES key (AES KW) or an RSA key (RSA-OAEP with SHA-256) that has WRAPKEY"
        ) from None


def _forget(key: Sobject) -> Flow:
    """Delete a transient key; a failure here must not hide the flow's own outcome."""
    with contextlib.suppress(StrongroomError):  # it ends with the connection anyway
        yield ("DELETE", f"/crypto/v1/keys/{key['kid']}", None, None)


def generate(kek: dict[str, Any], bits: int, plaintext: bool) -> Flow:
    """A fresh AES key of ``bits``, wrapped under ``kek`` -> :class:`DataKey`."""
    if bits not in DATAKEY_BITS:
        raise ValueError(f"a data key has 128, 192 or 256 bits, not {bits}")
    info: Sobject = yield ("POST", "/crypto/v1/keys/info", kek, Sobject)
    wrap_alg, wrap_mode = _wrapping(info)
    spec = {"obj_type": "AES", "key_size": bits, "transient": True, "key_ops": ["EXPORT"]}
    dk: Sobject = yield ("POST", "/crypto/v1/keys", {"name": "datakey", **spec}, Sobject)
    try:
        body = {"key": {"kid": info["kid"]}, "subject": dk.descriptor}
        wrapped: WrapResult = yield (
            "POST",
            "/crypto/v1/wrapkey",
            {**body, "alg": wrap_alg, "mode": wrap_mode},
            WrapResult,
        )
        value = None
        if plaintext:
            exported = yield ("POST", "/crypto/v1/keys/export", dk.descriptor, Sobject)
            value = exported["value"]
    except StrongroomError:
        yield from _forget(dk)
        raise
    yield from _forget(dk)
    return DataKey(
        kid=info["kid"],
        obj_type="AES",
        key_size=bits,
        wrap_alg=wrap_alg,
        wrap_mode=wrap_mode,
        wrapped_key=wrapped["wrapped_key"],
        plaintext=value,
    )


def unwrap(
    kek: dict[str, Any], wrapped_key: bytes, wrap_alg: str | None, wrap_mode: str | None
) -> Flow:
    """The plaintext of a wrapped data key (KMS Decrypt of a data key) -> bytes."""
    if wrap_alg is None or wrap_mode is None:
        info: Sobject = yield ("POST", "/crypto/v1/keys/info", kek, Sobject)
        wrap_alg, wrap_mode = _wrapping(info)
        kek = {"kid": info["kid"]}
    body = {
        "key": kek,
        "alg": wrap_alg,
        "mode": wrap_mode,
        "obj_type": "AES",
        "wrapped_key": wrapped_key,
        "name": "datakey",
        "transient": True,
        "key_ops": ["EXPORT"],
    }
    dk: Sobject = yield ("POST", "/crypto/v1/unwrapkey", body, Sobject)
    try:
        exported = yield ("POST", "/crypto/v1/keys/export", dk.descriptor, Sobject)
    except StrongroomError:
        yield from _forget(dk)
        raise
    yield from _forget(dk)
    return exported["value"]
