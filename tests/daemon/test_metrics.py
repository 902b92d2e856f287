"""Prometheus metrics: the series exist and count what happened."""

from __future__ import annotations

import re
import time
import urllib.request

from tests.conftest import Daemon, Raw, start_daemon
from tests.daemon.api.helpers import err, new_group, ok

CONFIG = """
http_enabled = true
http_port = 0
plugin_instructions = 200000
plugin_memory_bytes = 8388608
"""


def gateway_url(d: Daemon, timeout: float = 10.0) -> str:
    path = d.state_dir / "http.url"  # written once the gateway listens
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, d.log.read_text()[-3000:]
        time.sleep(0.02)
    return path.read_text().strip()


def _value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"no {series} in:\n{text}"
    return float(m.group(1))


def test_metrics_after_some_requests(tmp_path) -> None:
    d = start_daemon(tmp_path, config=CONFIG)
    try:
        r = Raw(d.socket)
        r.login(d.admin_key)
        g = new_group(r)
        kids = [
            ok(r.call("POST", "/crypto/v1/keys", {"name": f"m{i}", "obj_type": "AES"}))["kid"]
            for i in range(3)
        ]
        for kid in kids:
            ok(r.call("GET", f"/crypto/v1/keys/{kid}"))
        err(r.call("GET", "/no/such/path"), "no_such_route")
        err(r.call("GET", "/crypto/v1/keys/not-a-kid"), "not_found")
        run = {"groups": [g], "input": {}}
        ok(r.call("POST", "/sys/v1/plugins/test", {**run, "code": "function run() return 1 end"}))
        loop = "function run() while true do end end"
        assert ok(r.call("POST", "/sys/v1/plugins/test", {**run, "code": loop}))["status"] == 504
        hog = "function run() return #string.rep('x', 32 * 1024 * 1024) end"
        assert ok(r.call("POST", "/sys/v1/plugins/test", {**run, "code": hog}))["status"] == 413

        with urllib.request.urlopen(gateway_url(d) + "/metrics", timeout=30) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
    finally:
        r.close()
        assert d.stop() == 0

    create = 'strongroom_requests_total{method="POST",route="/crypto/v1/keys",status="200"}'
    assert _value(text, create) == 3
    get = 'strongroom_requests_total{method="GET",route="/crypto/v1/keys/{kid}",status="200"}'
    assert _value(text, get) == 3
    for kid in kids:  # templates, never raw paths
        assert kid not in text
    assert _value(text, 'strongroom_requests_total{method="GET",route="unmatched",status="404"}')
    assert (
        _value(
            text,
            'strongroom_request_errors_total{code="not_found",method="GET",'
            'route="/crypto/v1/keys/{kid}",status="404"}',
        )
        == 1
    )
    buckets = 'strongroom_request_duration_seconds_count{method="POST",route="/crypto/v1/keys"}'
    assert _value(text, buckets) == 3
    # Not stored in the audit log, counted here (its path is in neither).
    assert _value(text, 'strongroom_unaudited_requests_total{reason="unmatched"}') == 1
    assert _value(text, "strongroom_audit_failing") == 0
    assert _value(text, "strongroom_audit_max_pending_records") == 100000
    assert _value(text, "strongroom_requests_in_flight") >= 0
    assert _value(text, "strongroom_connections") >= 1
    assert _value(text, "strongroom_plugin_invocations_total") >= 3
    assert _value(text, 'strongroom_plugin_limit_breaches_total{limit="time"}') >= 1
    assert _value(text, 'strongroom_plugin_limit_breaches_total{limit="memory"}') >= 1
    assert _value(text, "strongroom_sandbox_worker_restarts_total") >= 1
    assert "strongroom_sandbox_workers{" in text


def test_render_in_process() -> None:
    from strongroomd import metrics

    metrics.observe("GET", "/x/{id}", 200, 0.001, None)
    metrics.observe("GET", None, 404, 0.001, {"error": "not_found"})
    body, content_type = metrics.render()
    text = body.decode()
    assert content_type.startswith("text/plain; version=")
    assert 'strongroom_requests_total{method="GET",route="/x/{id}",status="200"} 1.0' in text
    assert 'route="unmatched",status="404"' in text
