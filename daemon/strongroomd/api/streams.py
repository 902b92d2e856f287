"""Multi-part encryption and decryption: DSM's ``/crypto/v1/{encrypt,decrypt}/{init,update,final}``
and the per-key forms ``/crypto/v1/keys/{kid}/{encrypt,decrypt}/{init,update,final}``.

The operation's state stays in the daemon (the token's sessions, see
``strongroomd._token.streams``); the ``state`` DSM hands back is an opaque
handle: 16 random bytes naming the stream and 16 more that change at every
step, so a stale or replayed ``state`` is refused instead of corrupting the
output. A stream belongs to the principal that started it (anyone else gets
the same 404 as for a stream that does not exist), and is bounded per
principal (``stream_max_per_principal``) and in all (``stream_max_total``);
one idle for ``stream_idle_timeout`` seconds is ended and its sessions closed.

init checks the key's ENCRYPT/DECRYPT like a single-part call; every update
and final checks it again (a key disabled, revoked for encryption or deleted
meanwhile ends the stream) and that the state is the caller's.

GCM decryption releases plaintext at update, as DSM does: DSM's shape gives
the tag only at final and a stream exists for data larger than one frame, so
holding the plaintext back would cap it at a frame. final checks the tag in
the token-side computation and answers ``400 bad_tag`` on a mismatch; until
then the plaintext is unauthenticated and the caller must not act on it (the
CLI writes it to a temporary file it renames only after final succeeds).
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from strongroomd import mechanisms as mech
from strongroomd._token import streams as tstreams
from strongroomd.context import Request
from strongroomd.errors import BadRequest, Busy, Conflict, NotFound, Unsupported
from strongroomd.keyspec import key_alg, ref_of
from strongroomd.router import KEY, F, Route
from strongroomd.store import KeyRow

_ID = 16


@dataclass(eq=False)
class Stream:
    id: bytes
    step: bytes
    who: tuple[str, str]
    kid: str
    op_name: str  # ENCRYPT | DECRYPT
    op: tstreams.Op
    gcm: bool
    last_used: float
    busy: bool = False


@dataclass
class Streams:
    """The streams of one daemon (one per Token)."""

    by_id: dict[bytes, Stream] = field(default_factory=dict)
    per: dict[tuple[str, str], int] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def add(self, s: Stream) -> None:
        self.by_id[s.id] = s
        self.per[s.who] = self.per.get(s.who, 0) + 1

    def remove(self, s: Stream) -> None:
        if self.by_id.pop(s.id, None) is not None:
            left = self.per[s.who] - 1
            if left:
                self.per[s.who] = left
            else:
                del self.per[s.who]


_registry: weakref.WeakKeyDictionary[Any, Streams] = weakref.WeakKeyDictionary()


def _streams(req: Request) -> Streams:
    token = req.services.token
    s = _registry.get(token)
    if s is None:
        s = _registry[token] = Streams()
    return s


def _who(req: Request) -> tuple[str, str]:
    return (req.caller.kind, req.caller.id)


def _end(req: Request, reg: Streams, s: Stream) -> None:
    """Forget a stream and close its sessions in the background (safe when the
    request is being cancelled; closing an ended stream is a no-op)."""
    reg.remove(s)
    _abort(req, reg, [s.op])


def _abort(req: Request, reg: Streams, ops: list[tstreams.Op]) -> None:
    task = asyncio.ensure_future(req.services.token.stream_abort(ops))
    reg.tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        reg.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            pass  # the token closed first: its close ended every stream

    task.add_done_callback(done)


def _sweep(req: Request, reg: Streams) -> None:
    """End the streams idle too long; arm a timer while any remain."""
    cfg = req.services.config
    idle = cfg.stream_idle_timeout
    now = time.monotonic()
    stale = [s for s in reg.by_id.values() if not s.busy and now - s.last_used > idle]
    for s in stale:
        reg.remove(s)
    if stale:
        _abort(req, reg, [s.op for s in stale])
    if reg.timer is None and reg.by_id:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            reg.timer = None
            _sweep(req, reg)

        reg.timer = loop.call_later(idle / 2, fire)


def _key(req: Request) -> Any:
    if "kid" in req.params:
        if "key" in req.body:
            raise BadRequest("the key is in the path", code="invalid_field")
        return {"kid": req.params["kid"]}
    return req.body.get("key")


async def _init(req: Request, op_name: str) -> dict[str, Any]:
    b = req.body
    descriptor = _key(req)
    if descriptor is None:
        raise BadRequest("field 'key' is required", code="missing_field")
    row: KeyRow = req.services.keyring.use(req.owner, req.caller, descriptor, op_name)
    req.object_id = row.kid
    decrypting = op_name == "DECRYPT"
    obj_type = "DES3" if row.obj_type == "DES" else row.obj_type
    if obj_type not in ("AES", "DES3"):
        raise Unsupported("multi-part encryption is for AES, DES and DES3 keys")
    alg = b.get("alg") or key_alg(row)
    if alg == "DES" and row.obj_type == "DES":
        alg = "DES3"
    # The mode/iv/ad checks of a single-part call, on one block of stand-in data
    # (and a stand-in tag: a stream's tag comes at final).
    probe = {"alg": alg, **{k: b[k] for k in ("mode", "iv", "ad") if k in b}}
    probe["cipher" if decrypting else "plain"] = bytes(16)
    if decrypting and alg == obj_type and mech._symmetric_mode(obj_type, b.get("mode")) == "GCM":
        probe["tag"] = bytes(16)
    spec = mech.cipher_spec(obj_type, probe, decrypt=decrypting)
    if spec.kind not in tstreams.KINDS:
        raise Unsupported(f"{spec.kind} cannot be streamed (CBC, CBCNOPAD, CTR, GCM)")
    cfg = req.services.config
    reg = _streams(req)
    _sweep(req, reg)
    who = _who(req)
    if reg.per.get(who, 0) >= cfg.stream_max_per_principal:
        raise Busy(f"at most {cfg.stream_max_per_principal} streams at once per caller")
    if len(reg.by_id) >= cfg.stream_max_total:
        raise Busy("too many streams at once; retry later")
    # Reserve the slot before the first await, so concurrent inits cannot exceed it.
    s = Stream(
        secrets.token_bytes(_ID),
        secrets.token_bytes(_ID),
        who,
        row.kid,
        op_name,
        tstreams.Op(spec.kind, decrypting),
        spec.kind == "AES_GCM",
        time.monotonic(),
        busy=True,
    )
    reg.add(s)
    try:
        await req.services.token.stream_start(ref_of(row), s.op, spec.iv, spec.ad)
    except BaseException:
        _end(req, reg, s)
        raise
    s.busy = False
    s.last_used = time.monotonic()
    _sweep(req, reg)
    out: dict[str, Any] = {"kid": row.kid, "state": s.id + s.step}
    if not decrypting:
        out["iv"] = spec.iv
    return out


async def _take(req: Request, reg: Streams, op_name: str) -> Stream:
    """The caller's stream that ``state`` names, its key still usable for ``op_name``."""
    state = req.body["state"]
    s = reg.by_id.get(state[:_ID]) if len(state) == 2 * _ID else None
    if s is None or s.who != _who(req) or s.op_name != op_name:
        raise NotFound("no such stream (it ended, expired, or is not yours)")
    if s.busy:
        raise Conflict("the stream is busy with another request")
    if not hmac.compare_digest(s.step, state[_ID:]):
        raise Conflict("stale state: send the state of the stream's last answer")
    req.object_id = s.kid
    descriptor = _key(req)
    if descriptor is not None:
        named = req.services.keyring.find(req.owner, req.caller, descriptor)
        if named.kid != s.kid:
            raise BadRequest("the state belongs to another key", code="invalid_value")
    try:
        req.services.keyring.use(req.owner, req.caller, {"kid": s.kid}, op_name)
    except Exception:
        # The key may no longer be used (disabled, revoked, deleted): the stream ends.
        _end(req, reg, s)
        raise
    return s


async def _step(req: Request, op_name: str, data_field: str, out_field: str) -> dict[str, Any]:
    reg = _streams(req)
    _sweep(req, reg)
    s = await _take(req, reg, op_name)
    s.busy = True
    try:
        out = await req.services.token.stream_update(s.op, req.body[data_field])
    except BaseException:
        _end(req, reg, s)  # also when the caller went away mid-update
        raise
    finally:
        s.busy = False
        s.last_used = time.monotonic()
    s.step = secrets.token_bytes(_ID)
    return {"state": s.id + s.step, out_field: out}


async def _final(req: Request, op_name: str) -> dict[str, Any]:
    b = req.body
    reg = _streams(req)
    _sweep(req, reg)
    s = await _take(req, reg, op_name)
    tag = None
    if s.gcm and op_name == "DECRYPT":
        tag = b.get("tag")
        if tag is None:
            raise BadRequest("GCM decryption needs the tag at final", code="missing_field")
        if len(tag) * 8 not in mech.GCM_TAG_BITS:
            raise BadRequest("tag must be 12 to 16 bytes", code="invalid_value")
    elif "tag" in b:
        raise BadRequest("tag is only given to a GCM decryption's final", code="invalid_field")
    tag_len = b.get("tag_len")
    if tag_len is not None and not (s.gcm and op_name == "ENCRYPT"):
        raise BadRequest("tag_len is only given to a GCM encryption's final", code="invalid_field")
    if tag_len is not None and tag_len not in mech.GCM_TAG_BITS:
        raise BadRequest("tag_len is in bits: 96, 104, 112, 120 or 128", code="invalid_value")
    s.busy = True
    reg.remove(s)  # final ends the stream, whatever it answers (token side: streams.final)
    try:
        last, full_tag = await req.services.token.stream_final(s.op, tag)
    except BaseException:
        _end(req, reg, s)  # a no-op unless the call never ran (caller gone)
        raise
    if op_name == "DECRYPT":
        return {"plain": last}
    out: dict[str, Any] = {"cipher": last}
    if full_tag is not None:
        out["tag"] = full_tag[: (tag_len or 128) // 8]
    return out


def _handlers(op_name: str) -> tuple[Any, Any, Any]:
    data, out = ("cipher", "plain") if op_name == "DECRYPT" else ("plain", "cipher")

    async def init(req: Request) -> dict[str, Any]:
        return await _init(req, op_name)

    async def update(req: Request) -> dict[str, Any]:
        return await _step(req, op_name, data, out)

    async def final(req: Request) -> dict[str, Any]:
        return await _final(req, op_name)

    return init, update, final


_MODE = (str, dict)
_INIT = {
    "key": F(dict, False, KEY.doc),
    "alg": F(str),
    "mode": F(_MODE),
    "iv": F(bytes),
    "ad": F(bytes),
}
_STATE = F(bytes, True, "the state of the stream's last answer (opaque)")


def _routes() -> list[Route]:
    routes: list[Route] = []
    for name, op_name in (("encrypt", "ENCRYPT"), ("decrypt", "DECRYPT")):
        data = "cipher" if op_name == "DECRYPT" else "plain"
        init, update, final = _handlers(op_name)
        fin: dict[str, F] = {"key": F(dict, False, KEY.doc), "state": _STATE}
        fin.update({"tag": F(bytes)} if op_name == "DECRYPT" else {"tag_len": F(int)})
        table = [
            ("init", init, _INIT, f"Start a multi-part {name}ion; answers an opaque state."),
            (
                "update",
                update,
                {"key": F(dict, False, KEY.doc), "state": _STATE, data: F(bytes, True)},
                f"Continue a multi-part {name}ion with the next piece.",
            ),
            ("final", final, fin, f"Finish a multi-part {name}ion."),
        ]
        for step, handler, fields, doc in table:
            routes.append(Route("POST", f"/crypto/v1/{name}/{step}", handler, fields, synopsis=doc))
            per_key = {k: v for k, v in fields.items() if k != "key"}
            routes.append(
                Route(
                    "POST", f"/crypto/v1/keys/{{kid}}/{name}/{step}", handler, per_key, synopsis=doc
                )
            )
    return routes


ROUTES = _routes()
