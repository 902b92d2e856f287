"""/sys/v1/stats/*: DSM's transaction statistics, counted from the audit log.

A transaction is what the audit log records as a key *use* (see
``strongroomd.audit.kind_of``: crypto operations, per-key and batch forms,
plugin invocations) that succeeded; a batch counts once per item. Nothing is
counted twice: the audit trail is the only counter, so these figures agree with
``GET /sys/v1/logs``. Records are group-committed every 50 ms, so the newest
uses may be missing after a ``kill -9``, as they are from the log.

DSM's answer (``EsStatsCountQueryResponse``) is an Elasticsearch date
histogram: ``time.buckets`` are ``num_points`` equal slices of
[``range_from``, ``range_to``) (Unix seconds; the last 24 hours by default),
each with its ``doc_count`` and, under ``total_txn.buckets``, the
``top_count`` busiest entities of the slice: apps for ``stats/apps``, groups for
``stats/groups``, the keys an app used for ``stats/{app_id}/app``, the apps
that used a group's keys for ``stats/{group_id}/group`` or one key for
``stats/{key_id}/key``. A key's group is the group it is in now; keys that are
gone, transient keys and batches over several keys count for their app only.

Administrators only: the figures describe every app and group. Each query
runs in a thread on a read-only connection of its own, one at a time, so the
event loop and the store's writer keep serving: 30 days over a million
records takes a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from strongroomd.audit import KEY_MAKERS, AuditFailing, Kind, kind_of
from strongroomd.auth import require_admin
from strongroomd.context import Request
from strongroomd.errors import BadRequest, NotFound
from strongroomd.router import F, Route
from strongroomd.store import Store

DAY = 86400
#: Widest range one request may ask about, and most slices.
MAX_RANGE = 366 * DAY
MAX_POINTS = 1000
MAX_TOP = 1000
#: One statistics query at a time (each may read the whole range of the log).
_ONE = asyncio.Semaphore(1)


def _stamp(t: float) -> str:
    """The audit log's time format (sortable as text)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z"


def _params(b: dict[str, Any]) -> tuple[int, int, int, int]:
    now = int(time.time())
    to = b.get("range_to", now + 1)
    frm = b.get("range_from", to - DAY)
    points = b.get("num_points", 24)
    top = b.get("top_count", 10)
    if not 0 <= frm < to or to - frm > MAX_RANGE:
        raise BadRequest(
            "range_from < range_to (Unix seconds), at most 366 days apart", code="invalid_value"
        )
    if not 0 < points <= MAX_POINTS or not 0 <= top <= MAX_TOP:
        raise BadRequest(
            f"0 < num_points <= {MAX_POINTS} and 0 <= top_count <= {MAX_TOP}",
            code="invalid_value",
        )
    return frm, to, points, top


#: One aggregated row: slice, actor kind, actor id, key id, action, transactions;
#: in each database's SQL (the store's ``dialect``), over the audit log's time index.
_SQL = {
    "sqlite": """
SELECT CAST((CAST(strftime('%s', substr(time, 1, 19)) AS INTEGER) - :frm) / :width AS INTEGER),
       actor_kind, actor_id, object_id, action,
       sum(CASE WHEN action LIKE '%/batch/%'
                THEN coalesce(json_extract(detail, '$.items'), 1) ELSE 1 END)
FROM audit
WHERE time >= :lo AND time < :hi AND status IN (200, 204) AND action LIKE 'POST %'
GROUP BY 1, 2, 3, 4, 5
""",
    "postgresql": """
SELECT ((extract(epoch FROM substr(time, 1, 19)::timestamp)::bigint - %(frm)s)
            / %(width)s)::integer,
       actor_kind, actor_id, object_id, action,
       sum(CASE WHEN action LIKE '%%/batch/%%'
                THEN coalesce((detail::json ->> 'items')::bigint, 1) ELSE 1 END)::bigint
FROM audit
WHERE time >= %(lo)s AND time < %(hi)s AND status IN (200, 204) AND action LIKE 'POST %%'
GROUP BY 1, 2, 3, 4, 5
""",
}


def _uses(store: Store, frm: int, to: int, width: int) -> list[tuple[Any, ...]]:
    """(slice, actor kind, actor id, key id, action, count) for every successful use,
    read on a read-only connection of its own, off the event loop and the store's
    thread, which keep serving meanwhile."""
    params = {"frm": frm, "width": width, "lo": _stamp(frm), "hi": _stamp(to)}
    with store.reader() as db:
        rows = db.execute(_SQL[store.dialect], params).fetchall()
    out = []
    for r in rows:
        method, _, route = r[4].partition(" ")
        if kind_of(method, route) is Kind.USE or route in KEY_MAKERS:
            out.append(tuple(r))
    return out


def _histogram(
    rows: list[tuple[Any, ...]],
    frm: int,
    width: int,
    points: int,
    top: int,
    entity: Callable[[tuple[Any, ...]], str | None],
    keep: Callable[[tuple[Any, ...]], bool],
) -> dict[str, Any]:
    """DSM's EsStatsCountQueryResponse from the aggregated rows."""
    count = [0] * points
    per: list[dict[str, dict[str, Any]]] = [defaultdict(dict) for _ in range(points)]
    for row in rows:
        i, _kind, actor, kid, action, n = row
        if not 0 <= i < points or not keep(row):
            continue
        count[i] += n
        who = entity(row)
        if who is None:
            continue
        e = per[i][who]
        e["n"] = e.get("n", 0) + n
        e.setdefault("ops", set()).add(action)
        if kid:
            e.setdefault("keys", set()).add(kid)
        if actor:
            e.setdefault("apps", set()).add(actor)
    buckets = []
    for i in range(points):
        start = frm + i * width
        inner = sorted(per[i].items(), key=lambda kv: (-kv[1]["n"], kv[0]))[:top]
        buckets.append(
            {
                "key": start * 1000,
                "key_as_string": _stamp(start),
                "doc_count": count[i],
                "total_txn": {
                    "buckets": [
                        {
                            "key": who,
                            "doc_count": e["n"],
                            "unique_operations_count": {"value": len(e["ops"])},
                            "unique_active_sobj_count": {"value": len(e.get("keys", ()))},
                            "unique_active_app_count": {"value": len(e.get("apps", ()))},
                        }
                        for who, e in inner
                    ]
                },
            }
        )
    return {"time": {"buckets": buckets}}


async def _stats(
    req: Request,
    entity: Callable[[tuple[Any, ...]], str | None],
    keep: Callable[[tuple[Any, ...]], bool] = lambda _r: True,
) -> dict[str, Any]:
    require_admin(req.caller)
    frm, to, points, top = _params(req.body)
    width = max(1, math.ceil((to - frm) / points))
    with contextlib.suppress(AuditFailing):  # while failing: what is on disk
        await req.services.audit.flush()
    store = req.services.store

    def compute() -> dict[str, Any]:
        rows = _uses(store, frm, to, width)
        return _histogram(rows, frm, width, points, top, entity, keep)

    # A year over millions of records takes seconds of CPU: one such query at a
    # time, in a thread (``entity``/``keep`` read only what they were given).
    async with _ONE:
        return await asyncio.to_thread(compute)


def _app(row: tuple[Any, ...]) -> str | None:
    return row[2] if row[1] == "app" else None


def _key_group(req: Request) -> Callable[[tuple[Any, ...]], str | None]:
    """Each key's group now, copied on the event loop (the computation runs in a
    thread and must not read the store's live maps)."""
    groups = {kid: row.group_id for kid, row in req.services.store.keys.items()}

    def group(row: tuple[Any, ...]) -> str | None:
        return groups.get(row[3]) if row[3] else None

    return group


async def apps(req: Request) -> dict[str, Any]:
    """Transactions per app."""
    return await _stats(req, _app, lambda r: r[1] == "app")


async def groups(req: Request) -> dict[str, Any]:
    """Transactions per group of the key used."""
    return await _stats(req, _key_group(req))


async def app(req: Request) -> dict[str, Any]:
    """One app's transactions, per key it used."""
    require_admin(req.caller)
    app_id = req.params["app_id"]
    p = req.services.store.principals.get(app_id)
    if p is None or p.kind != "app":
        raise NotFound(f"no app {app_id}")
    req.object_id = app_id
    return await _stats(req, lambda r: r[3], lambda r: r[1] == "app" and r[2] == app_id)


async def group(req: Request) -> dict[str, Any]:
    """Transactions with one group's keys, per app."""
    require_admin(req.caller)
    gid = req.params["group_id"]
    if gid not in req.services.store.groups:
        raise NotFound(f"no group {gid}")
    req.object_id = gid
    of = _key_group(req)
    return await _stats(req, _app, lambda r: of(r) == gid)


async def key(req: Request) -> dict[str, Any]:
    """Transactions with one key, per app."""
    require_admin(req.caller)
    kid = req.params["key_id"]
    if kid not in req.services.store.keys:
        raise NotFound("no such key")
    req.object_id = kid
    return await _stats(req, _app, lambda r: r[3] == kid)


_PARAMS = {
    "num_points": F(int, doc="slices of the range (default 24)"),
    "top_count": F(int, doc="entities listed per slice (default 10)"),
    "range_from": F(int, doc="Unix seconds (default: range_to - 1 day)"),
    "range_to": F(int, doc="Unix seconds (default: now)"),
}

ROUTES = [
    Route("GET", "/sys/v1/stats/apps", apps, _PARAMS, synopsis="Transactions per app (admin)."),
    Route(
        "GET", "/sys/v1/stats/groups", groups, _PARAMS, synopsis="Transactions per group (admin)."
    ),
    Route(
        "GET",
        "/sys/v1/stats/{app_id}/app",
        app,
        _PARAMS,
        synopsis="One app's transactions, per key (admin).",
    ),
    Route(
        "GET",
        "/sys/v1/stats/{group_id}/group",
        group,
        _PARAMS,
        synopsis="Transactions with a group's keys, per app (admin).",
    ),
    Route(
        "GET",
        "/sys/v1/stats/{key_id}/key",
        key,
        _PARAMS,
        synopsis="Transactions with one key, per app (admin).",
    ),
]
