"""/sys/v1/logs: read the audit trail, and check that nobody edited it.

What verify can know: the chain on disk is whole (no record edited, removed or
reordered; the newest ones too, while the daemon runs), and every record this
daemon has queued is written -- while the log cannot be written, verify says
``ok: false`` and how many are waiting. What it cannot know: records that were
never written because the process died (``kill -9``, power loss) inside the
50 ms group-commit window of key use. Start-up notes each such stop as a
``daemon.unclean_stop`` record, and verify lists them (``unclean_stops``).
Changes are never in that window: they are answered after their record is written.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from strongroomd.audit import AuditFailing
from strongroomd.auth import require_admin
from strongroomd.context import Request
from strongroomd.errors import BadRequest
from strongroomd.plugin_audit import OWN_RECORDS, granted
from strongroomd.router import F, Route


async def list_(req: Request) -> list[dict[str, Any]]:
    p = req.caller
    if p.kind != "plugin":
        require_admin(p)
    b = req.body
    # DSM's clients page with size and from (the SDK's get_audit_logs, sdkms-cli).
    limit, offset = b.get("limit", b.get("size", 100)), b.get("offset", b.get("from", 0))
    if not 0 < limit <= 10000 or offset < 0:
        raise BadRequest("0 < limit <= 10000 and offset >= 0", code="invalid_value")
    where, args = [], []
    for name in ("object_id", "actor_id", "invocation_id"):
        if name in b:
            where.append(f"{name} = ?")
            args.append(b[name])
    # DSM's filters: a time range in epoch seconds, and the actor's type. range_to
    # takes its whole second (records have milliseconds): windows [a, b] and
    # [b + 1, c] leave no record out between them.
    if "range_from" in b:
        where.append("time >= ?")
        args.append(_iso(b["range_from"]))
    if "range_to" in b:
        where.append("time < ?")
        args.append(_iso(b["range_to"], 1))
    if "actor_type" in b:
        kind = _ACTOR_TYPES.get(b["actor_type"].lower())
        if kind is None:
            raise BadRequest("actor_type is App, User or Plugin", code="invalid_value")
        where.append("actor_kind = ?")
        args.append(kind)
    for name in ("action_type", "severity"):  # refused: dropped, the list would be unfiltered
        if name in b:
            raise BadRequest(
                f"Strongroom's audit records have no {name}; filter by object_id, actor_id, "
                "actor_type, invocation_id, range_from or range_to",
                code="invalid_field",
            )
    if p.kind == "plugin":  # Lua's AuditLog.get_all (plugin_audit.py says what it may read)
        row = req.services.store.plugins.get(p.id)
        if row is None or not granted(row.limits):
            where.append(OWN_RECORDS)
            args += [p.id, p.id]
    # Every record of every answered request, unless the log cannot be written now:
    # then what is on disk (verify says how many are still queued).
    with contextlib.suppress(AuditFailing):
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


#: DSM's actor_type values and the actor_kind they name (an administrator is DSM's user).
_ACTOR_TYPES = {"app": "app", "user": "admin", "plugin": "plugin"}


def _iso(epoch: int, plus: int = 0) -> str:
    """Epoch seconds (+ ``plus``) as the records' time text (ISO 8601 UTC), which
    sorts by time."""
    if not 0 <= epoch < 253402300799:  # year 10000, less the second added
        raise BadRequest("range_from and range_to are epoch seconds", code="invalid_value")
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch + plus))


async def verify(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    audit = req.services.audit
    try:
        await audit.flush()
        unwritten = 0
    except AuditFailing:
        unwritten = audit.pending  # answered (some of them) and not on disk: not ok
    head = audit.head
    # A connection of its own on a thread: the store's thread keeps writing meanwhile.
    # With a shared database, every node's records: the chain is one.
    checked, brk, stops = await req.services.store.verify_audit(head)
    out: dict[str, Any] = {
        "ok": brk is None and unwritten == 0,
        "records": checked,
        "head": head[0],
        "unwritten": unwritten,
        "unclean_stops": stops,
    }
    if brk is not None:
        out["broken_at"] = brk.seq
        out["reason"] = f"record {brk.seq} {brk.reason}"
    elif unwritten:
        out["reason"] = (
            f"{unwritten} records from {head[0] + 1} on are not written yet: "
            "the audit log cannot be written now"
        )
    return out


ROUTES = [
    Route(
        "GET",
        "/sys/v1/logs/verify",
        verify,
        {},
        synopsis=(
            "Recompute the audit hash chain: {ok, records, head, unwritten, unclean_stops, "
            "broken_at?, reason?}; broken_at names the first edited, deleted or reordered "
            "record; ok is false too while queued records cannot be written (unwritten); "
            "unclean_stops: where a kill -9 may have lost the last 50 ms of key-use records."
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
            "size": F(int, doc="DSM's name for limit"),
            "from": F(int, doc="DSM's name for offset"),
            "range_from": F(int, doc="epoch seconds"),
            "range_to": F(int, doc="epoch seconds"),
            "actor_type": F(str, doc="App | User | Plugin"),
            "action_type": F(str, doc="refused: records have none"),
            "severity": F(str, doc="refused: records have none"),
        },
        synopsis="Audit records, newest first.",
    ),
]
