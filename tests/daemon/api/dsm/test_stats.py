"""GET /sys/v1/stats/*: DSM's transaction histograms, counted from the audit log."""

from __future__ import annotations

import time

from tests.conftest import unique
from tests.daemon.api.dsm.conftest import Dual, connect
from tests.daemon.api.helpers import err, ok


def _window() -> dict[str, int]:
    now = int(time.time())
    return {"range_from": now - 600, "range_to": now + 600, "num_points": 1, "top_count": 1000}


def test_counts_per_app_group_and_key_and_admin_only(admin: Dual, http_daemon) -> None:
    g = ok(admin.call("POST", "/sys/v1/groups", {"name": unique("g")}))["group_id"]
    made = ok(admin.call("POST", "/sys/v1/apps", {"name": unique("a"), "groups": [g]}))
    app_id = made["app_id"]
    a = connect(http_daemon, admin.kind, made["credential"]["api_key"])
    try:
        k1 = ok(a.call("POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES"}))
        k2 = ok(a.call("POST", "/crypto/v1/keys", {"name": unique("k"), "obj_type": "AES"}))
        for _ in range(3):
            ok(a.call("POST", f"/crypto/v1/keys/{k1['kid']}/encrypt", {"plain": b"x"}))
        ok(a.call("POST", "/crypto/v1/encrypt", {"key": {"kid": k2["kid"]}, "plain": b"y"}))
        items = [{"kid": k2["kid"], "request": {"plain": b"z"}}] * 5
        ok(a.call("POST", "/crypto/v1/keys/batch/encrypt", items))
        # A failed use is not a transaction.
        bad = a.call("POST", f"/crypto/v1/keys/{k1['kid']}/decrypt", {"cipher": b"q" * 16})
        assert bad["status"] == 400
        # Denied: stats describe every app and group, so they are for administrators.
        for path in (
            "/sys/v1/stats/apps",
            "/sys/v1/stats/groups",
            f"/sys/v1/stats/{app_id}/app",
            f"/sys/v1/stats/{g}/group",
            f"/sys/v1/stats/{k1['kid']}/key",
        ):
            err(a.get(path, _window()), "forbidden")
    finally:
        a.close()

    def one(path: str) -> dict:
        body = ok(admin.get(path, _window()))
        (bucket,) = body["time"]["buckets"]
        assert set(bucket) == {"key", "key_as_string", "doc_count", "total_txn"}
        assert isinstance(bucket["key"], int) and bucket["key_as_string"].endswith("Z")
        return bucket

    mine = one(f"/sys/v1/stats/{app_id}/app")
    assert mine["doc_count"] == 9  # 3 + 1 + 5 batch items
    per_key = {b["key"]: b for b in mine["total_txn"]["buckets"]}
    assert per_key[k1["kid"]]["doc_count"] == 3 and per_key[k2["kid"]]["doc_count"] == 6
    assert per_key[k2["kid"]]["unique_operations_count"]["value"] == 2  # encrypt, batch

    key1 = one(f"/sys/v1/stats/{k1['kid']}/key")
    assert key1["doc_count"] == 3
    assert [(b["key"], b["doc_count"]) for b in key1["total_txn"]["buckets"]] == [(app_id, 3)]

    grp = one(f"/sys/v1/stats/{g}/group")
    assert grp["doc_count"] == 9
    (only,) = grp["total_txn"]["buckets"]
    assert only["key"] == app_id and only["unique_active_sobj_count"]["value"] == 2

    apps = {b["key"]: b for b in one("/sys/v1/stats/apps")["total_txn"]["buckets"]}
    assert apps[app_id]["doc_count"] == 9
    groups = {b["key"]: b for b in one("/sys/v1/stats/groups")["total_txn"]["buckets"]}
    assert groups[g]["doc_count"] == 9 and groups[g]["unique_active_app_count"]["value"] == 1

    # Slices: num_points equal slices of the range, empty ones included.
    now = int(time.time())
    body = ok(
        admin.get(
            f"/sys/v1/stats/{app_id}/app",
            {"range_from": now - 3600, "range_to": now + 3600, "num_points": 4},
        )
    )
    buckets = body["time"]["buckets"]
    assert [b["key"] for b in buckets] == [(now - 3600 + i * 1800) * 1000 for i in range(4)]
    assert sum(b["doc_count"] for b in buckets) == 9 and buckets[0]["doc_count"] == 0

    err(admin.get("/sys/v1/stats/apps", {"range_from": 10, "range_to": 5}), "invalid_value")
    err(admin.get("/sys/v1/stats/apps", {"num_points": 0}), "invalid_value")
    err(admin.get(f"/sys/v1/stats/{g}/app", {}), "not_found")
    err(admin.get(f"/sys/v1/stats/{app_id}/group", {}), "not_found")
