"""Prometheus metrics on a registry of our own; :func:`render` gives the exposition.

Per request (counted in ONE place, :meth:`strongroomd.dispatch.Dispatcher.handle`,
for every front end including plugin calls): a counter and a latency histogram
labelled by method and route *template* (``/crypto/v1/keys/{kid}``, never the
raw path; unmatched paths are ``route="unmatched"``), and an error counter by
status and error code. The label children are cached per (method, route,
status) as plain numbers turned into metric families only when scraped, so
the hot path costs a dict look-up, a bisect and three additions (~0.5 us).

Requests with no authenticated caller (unmatched paths, no or a bad
session, failed logins) are not stored in the audit log, so a flood cannot
fill the disk; :func:`unaudited` counts them here instead.

Everything else is read when scraped, not counted as it happens: in-flight
requests, open connections, the sandbox pool's counters (invocations, limit
breaches, worker restarts, crashes, live workers) from ``Pool.stats``, and the
audit log's state (failing, queued records, refusals) from ``Audit.stats``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from strongroomd.audit import Audit

REGISTRY = CollectorRegistry(auto_describe=True)
UNMATCHED = "unmatched"
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

_started = Gauge(
    "strongroom_start_time_seconds", "When this daemon started (Unix time).", registry=REGISTRY
)
_started.set(time.time())


class _State:
    """What the collectors read at scrape time; the daemon fills it in via :func:`bind`."""

    inflight = 0
    connections: Callable[[], int] = staticmethod(lambda: 0)
    sandbox: Callable[[], dict[str, Any]] | None = None
    audit: Audit | None = None


state = _State()
Gauge(
    "strongroom_requests_in_flight",
    "Requests being handled now (plugin calls included).",
    registry=REGISTRY,
).set_function(lambda: state.inflight)
Gauge(
    "strongroom_connections", "Open client connections (Unix socket).", registry=REGISTRY
).set_function(lambda: state.connections())

# (method, route, status) -> [count, sum of seconds, per-bucket counts (last: +Inf)].
# Plain Python numbers, bumped on the event loop only: no lock, no label look-up.
_requests: dict[tuple[str, str, int], list[Any]] = {}
_errors: dict[tuple[str, str, int, str], int] = {}
_unaudited = {"unmatched": 0, "unauthenticated": 0}


def unaudited(unmatched: bool) -> None:
    """Count one request that is not stored in the audit log (no authenticated caller)."""
    _unaudited["unmatched" if unmatched else "unauthenticated"] += 1


def observe(method: str, route: str | None, status: int, seconds: float, body: Any) -> None:
    """Count one answered request. ``route``: the matched template, or None."""
    key = (method, route or UNMATCHED, status)
    rec = _requests.get(key)
    if rec is None:
        rec = _requests[key] = [0, 0.0, [0] * (len(BUCKETS) + 1)]
    rec[0] += 1
    rec[1] += seconds
    rec[2][bisect_left(BUCKETS, seconds)] += 1
    if status >= 400:
        code = body.get("error") if isinstance(body, dict) else None
        ekey = (*key, str(code or ""))
        _errors[ekey] = _errors.get(ekey, 0) + 1


class _RequestCollector:
    def collect(self) -> Iterator[Any]:
        counts = CounterMetricFamily(
            "strongroom_requests",
            "Requests answered, by method, route template and status.",
            labels=["method", "route", "status"],
        )
        latency: dict[tuple[str, str], list[Any]] = {}
        for (method, route, status), (n, total, buckets) in list(_requests.items()):
            counts.add_metric([method, route, str(status)], n)
            agg = latency.setdefault((method, route), [0.0, [0] * len(buckets)])
            agg[0] += total
            agg[1] = [a + b for a, b in zip(agg[1], buckets, strict=True)]
        yield counts
        hist = HistogramMetricFamily(
            "strongroom_request_duration_seconds",
            "Time from dispatch to answer, by method and route template.",
            labels=["method", "route"],
        )
        for (method, route), (total, buckets) in latency.items():
            cumulative, running = [], 0
            for le, n in zip((*map(str, BUCKETS), "+Inf"), buckets, strict=True):
                running += n
                cumulative.append((le, running))
            hist.add_metric([method, route], cumulative, total)
        yield hist
        errors = CounterMetricFamily(
            "strongroom_request_errors",
            "Requests answered with an error (status >= 400), by route, status and error code.",
            labels=["method", "route", "status", "code"],
        )
        for (method, route, status, code), n in list(_errors.items()):
            errors.add_metric([method, route, str(status), code], n)
        yield errors

    def describe(self) -> list[Any]:
        return []


REGISTRY.register(_RequestCollector())  # type: ignore[arg-type]


def bind(
    *,
    connections: Callable[[], int] | None = None,
    sandbox: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Tell the scrape-time collectors where to read connections and pool stats."""
    if connections is not None:
        state.connections = connections
    state.sandbox = sandbox


class _SandboxCollector:
    _COUNTERS = (
        ("invocations", "strongroom_plugin_invocations", "Plugin invocations (test runs too)."),
        ("restarts", "strongroom_sandbox_worker_restarts", "Workers replaced after a failure."),
        ("crashes", "strongroom_sandbox_worker_crashes", "Workers that died or broke protocol."),
        ("spawned", "strongroom_sandbox_workers_spawned", "Worker processes started."),
    )

    def collect(self) -> Iterator[Any]:
        stats = state.sandbox() if state.sandbox is not None else {}
        for key, name, doc in self._COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
        breaches = CounterMetricFamily(
            "strongroom_plugin_limit_breaches",
            "Invocations stopped by a limit: time (deadline, instructions, CPU) or memory.",
            labels=["limit"],
        )
        breaches.add_metric(["time"], stats.get("time_limit", 0))
        breaches.add_metric(["memory"], stats.get("memory_limit", 0))
        yield breaches
        workers = GaugeMetricFamily(
            "strongroom_sandbox_workers", "Live worker processes, by state.", labels=["state"]
        )
        for s in ("blank", "idle"):
            workers.add_metric([s], stats.get(s, 0))
        busy = stats.get("workers", 0) - stats.get("blank", 0) - stats.get("idle", 0)
        workers.add_metric(["busy"], max(busy, 0))
        yield workers

    def describe(self) -> list[Any]:
        return []


REGISTRY.register(_SandboxCollector())  # type: ignore[arg-type]


def bind_audit(audit: Audit) -> None:
    """Tell the scrape-time collector which audit log to report on."""
    state.audit = audit


class _AuditCollector:
    def collect(self) -> Iterator[Any]:
        unaudited = CounterMetricFamily(
            "strongroom_unaudited_requests",
            "Requests not stored in the audit log (no authenticated caller), by reason.",
            labels=["reason"],
        )
        for reason, n in _unaudited.items():
            unaudited.add_metric([reason], n)
        yield unaudited
        audit = state.audit
        if audit is None:
            return
        st = audit.stats
        yield GaugeMetricFamily(
            "strongroom_audit_failing",
            "1 while the audit log cannot be written (key use and changes get 503).",
            value=int(st.failing),
        )
        yield GaugeMetricFamily(
            "strongroom_audit_pending_records",
            "Audit records queued and not yet written.",
            value=audit.pending,
        )
        yield GaugeMetricFamily(
            "strongroom_audit_max_pending_records",
            "Bound of the audit queue (audit_max_pending).",
            value=audit.max_pending,
        )
        yield CounterMetricFamily(
            "strongroom_audit_write_failures",
            "Tries to write queued audit records that failed (retried with back-off).",
            value=st.flush_failures,
        )
        refused = CounterMetricFamily(
            "strongroom_audit_refused_requests",
            "Requests refused with 503 because their record could not be kept, by reason.",
            labels=["reason"],
        )
        refused.add_metric(["failing"], st.refused_failing)
        refused.add_metric(["queue_full"], st.refused_full)
        yield refused
        yield CounterMetricFamily(
            "strongroom_failed_logins",
            "Failed logins (audited as one record per source and minute, with a count).",
            value=st.failed_logins,
        )

    def describe(self) -> list[Any]:
        return []


REGISTRY.register(_AuditCollector())  # type: ignore[arg-type]


def render() -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type (for GET /metrics)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
