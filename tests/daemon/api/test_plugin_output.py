"""Printed plugin output: kept in memory for admins, never in the audit chain.

GET /sys/v1/plugins/invocations/{invocation_id}/output (api/plugins.py) and the
bounded store behind it (outputs.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from strongroomd.outputs import Outputs

from tests.daemon.api.helpers import err, ok
from tests.daemon.api.test_plugins import invoke, push

SECRET = "4111111111111111"


def _invocation(admin, plugin_id: str) -> str:
    logs = ok(admin.call("GET", "/sys/v1/logs", {"object_id": plugin_id, "limit": 5}))
    call = next(r for r in logs if r["action"] == "POST /sys/v1/plugins/{plugin_id}")
    return call["invocation_id"]


def test_admin_reads_an_invocations_output_and_the_audit_log_never_holds_it(world) -> None:
    admin, g1, _, a1, _ = world
    p = push(admin, f"function run(input) print('card', '{SECRET}') return 'ok' end", [g1])
    assert ok(invoke(a1.conn, p, {})) == "ok"
    inv = _invocation(admin, p["plugin_id"])

    out = ok(admin.call("GET", f"/sys/v1/plugins/invocations/{inv}/output"))
    assert out["output"] == f"card\t{SECRET}\n"
    assert out["invocation_id"] == inv and out["plugin_id"] == p["plugin_id"]
    assert out["truncated"] is False

    # Not in any audit record: the invocation's own, its nested ones, or the output read.
    everything = ok(admin.call("GET", "/sys/v1/logs", {"limit": 1000}))
    assert everything and SECRET not in json.dumps(everything)


def test_apps_cannot_read_outputs_even_of_their_own_invocations(world) -> None:
    admin, g1, _, a1, _ = world
    p = push(admin, "function run() print('private') return 1 end", [g1])
    assert ok(invoke(a1.conn, p)) == 1
    inv = _invocation(admin, p["plugin_id"])
    e = a1.call("GET", f"/sys/v1/plugins/invocations/{inv}/output")
    assert e["status"] in (403, 404) and "private" not in json.dumps(e["body"])


def test_failed_invocation_output_is_kept_under_the_error_invocation_id(world) -> None:
    admin, g1, *_ = world
    p = push(admin, "function run() print('before') error('boom') end", [g1])
    body = invoke(admin, p)["body"]
    out = ok(admin.call("GET", f"/sys/v1/plugins/invocations/{body['invocation_id']}/output"))
    assert out["output"] == "before\n"


def test_unknown_or_silent_invocation_is_not_found(world) -> None:
    admin, g1, *_ = world
    err(admin.call("GET", "/sys/v1/plugins/invocations/nope/output"), "not_found")
    p = push(admin, "function run() return 1 end", [g1])
    ok(invoke(admin, p))
    inv = _invocation(admin, p["plugin_id"])
    err(admin.call("GET", f"/sys/v1/plugins/invocations/{inv}/output"), "not_found")


def test_store_caps_each_output_and_the_total_oldest_first() -> None:
    kept = Outputs(per_invocation=10, total=25)
    kept.add("a", "p", "t", "0123456789abc")
    assert kept.get("a").output == "0123456789" and kept.get("a").truncated
    kept.add("b", "p", "t", "x" * 10)
    kept.add("c", "p", "t", "y" * 10)  # 30 bytes > 25: "a" goes
    assert kept.get("a") is None and kept.get("b") and kept.get("c")
    assert kept.bytes == 20 and len(kept) == 2
    kept.add("d", "p", "t", "")  # nothing printed, nothing kept
    assert kept.get("d") is None
    kept.add("e", "p", "t", "é" * 6)  # cut on a character boundary, never mid-UTF-8
    assert kept.get("e").output == "é" * 5


def test_cli_plugin_output(daemon, world) -> None:
    admin, g1, *_ = world
    p = push(admin, "function run() print('from the cli') return 1 end", [g1])
    ok(invoke(admin, p))
    inv = _invocation(admin, p["plugin_id"])
    env = {
        **os.environ,
        "STRONGROOM_SOCKET": str(daemon.socket),
        "STRONGROOM_API_KEY": daemon.admin_key,
    }
    cli = Path(sys.executable).with_name("strongroom")
    r = subprocess.run(
        [cli, "plugin", "output", inv], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout == "from the cli\n", r
