"""docs/openapi.json is what the route table says, and the gateway serves the same."""

from __future__ import annotations

import json

from strongroomd import openapi
from strongroomd.api import ROUTES

from tests.daemon.gateway.conftest import ROOT, Http

COMMITTED = ROOT / "docs" / "openapi.json"


def test_committed_document_is_current() -> None:
    fresh = openapi.dumps(openapi.document(ROUTES))
    assert COMMITTED.read_text() == fresh, "docs/openapi.json is stale: run scripts/openapi"


def test_every_route_appears_with_its_fields() -> None:
    doc = json.loads(COMMITTED.read_text())
    assert doc["openapi"].startswith("3.1")
    ids = set()
    for r in ROUTES:
        op = doc["paths"][r.path][r.method.lower()]
        assert op["summary"] == r.synopsis
        ids.add(op["operationId"])
        if r.method == "GET":
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
            assert names == set(r.fields or {}), r.path
        elif r.fields:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            assert set(schema["properties"]) == set(r.fields)
            assert set(schema.get("required", [])) == {n for n, f in r.fields.items() if f.required}
            for name, f in r.fields.items():
                if f.types is bytes:
                    assert schema["properties"][name]["contentEncoding"] == "base64"
        if r.public:
            assert {} in op["security"]
    assert len(ids) == len(ROUTES)  # operation ids are unique


def test_gateway_serves_it(http: Http) -> None:
    status, hdrs, body = http.request("GET", "/openapi.json")
    assert status == 200 and hdrs["content-type"].startswith("application/json")
    assert json.loads(body) == json.loads(COMMITTED.read_text())
