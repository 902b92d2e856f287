"""/sys/v1/logs: read the audit trail."""

from __future__ import annotations

import json
from typing import Any

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


ROUTES = [
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
