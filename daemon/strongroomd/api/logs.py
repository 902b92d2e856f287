"""/sys/v1/logs: read the audit trail, and check that nobody edited it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from strongroomd.audit import verify_file
from strongroomd.auth import require_admin
from strongroomd.context import Request
from strongroomd.errors import BadRequest
from strongroomd.router import F, Route


async def list_(req: Request) -> list[dict[str, Any]]:
    require_admin(req.caller)
    b = req.body
    limit, offset = b.get("limit", 100), b.get("offset", 0)
    if not 0 < limit <= 10000 or offset < 0:
        raise BadRequest("0 < limit <= 10000 and offset >= 0", code="invalid_value")
    where, args = [], []
    for name in ("object_id", "actor_id", "invocation_id"):
        if name in b:
            where.append(f"{name} = ?")
            args.append(b[name])
    await req.services.audit.flush()
    sql = (
        "SELECT seq, time, actor_kind, actor_id, action, object_id, status, code, "
        "invocation_id, detail FROM audit"
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC LIMIT ? OFFSET ?"
    rows = await req.services.store.query(sql, (*args, limit, offset))
    out = []
    for r in rows:
        rec = {k: r[k] for k in r.keys() if r[k] is not None}  # noqa: SIM118
        if "detail" in rec:
            rec["detail"] = json.loads(rec["detail"])
        out.append(rec)
    return out


async def verify(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    audit = req.services.audit
    await audit.flush()
    head = audit.head
    # A connection of its own on a thread: the store's thread keeps writing meanwhile.
    checked, brk = await asyncio.to_thread(verify_file, req.services.config.db_path, head)
    out: dict[str, Any] = {"ok": brk is None, "records": checked, "head": head[0]}
    if brk is not None:
        out["broken_at"] = brk.seq
        out["reason"] = f"record {brk.seq} {brk.reason}"
    return out


ROUTES = [
    Route(
        "GET",
        "/sys/v1/logs/verify",
        verify,
        {},
        synopsis=(
            "Recompute the audit hash chain: {ok, records, head, broken_at?, reason?}; "
            "broken_at names the first edited, deleted or reordered record."
        ),
    ),
    Route(
        "GET",
        "/sys/v1/logs",
        list_,
        {
            "object_id": F(str),
            "actor_id": F(str),
            "invocation_id": F(str),
            "limit": F(int),
            "offset": F(int),
        },
        synopsis="Audit records, newest first.",
    ),
]
