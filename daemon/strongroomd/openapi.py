"""OpenAPI 3.1 description of the HTTP/JSON gateway, made from the route table.

Field tables become request schemas (query parameters for GET), synopses
become summaries, binary fields become base64 strings. ``docs/openapi.json``
is this module's output; regenerate it with ``scripts/openapi`` (a test
compares the two).

    python -m strongroomd.openapi [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from strongroomd.router import F, Route

_SIMPLE = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    bytes: {"type": "string", "contentEncoding": "base64"},
    dict: {"type": "object"},
    list: {"type": "array"},
    object: {},
}

ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "stable error code"},
        "message": {"type": "string"},
        "traceback": {"type": "string", "description": "plugin errors, for admins"},
        "invocation_id": {"type": "string"},
    },
}


def _schema(t: type | tuple[type, ...]) -> dict[str, Any]:
    if isinstance(t, tuple):
        return {"oneOf": [_schema(x) for x in t]}
    return dict(_SIMPLE.get(t, {}))


def field_schema(f: F) -> dict[str, Any]:
    out = _schema(f.types)
    if f.items is not None:
        out["items"] = _schema(f.items)
    if f.doc:
        out["description"] = f.doc
    return out


def _body_schema(fields: dict[str, F]) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: field_schema(f) for name, f in fields.items()},
    }
    required = [name for name, f in fields.items() if f.required]
    if required:
        schema["required"] = required
    return schema


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.synopsis,
        "tags": [route.parts[0] + "/" + route.parts[2] if len(route.parts) > 2 else route.path],
    }
    params: list[dict[str, Any]] = [
        {"name": p[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
        for p in route.parts
        if p.startswith("{")
    ]
    if route.method == "GET" and route.fields:
        params += [
            {"name": name, "in": "query", "required": f.required, "schema": field_schema(f)}
            for name, f in route.fields.items()
        ]
    if params:
        op["parameters"] = params
    if route.method != "GET" and route.method != "DELETE":
        if route.fields is None:
            op["requestBody"] = {
                "description": "passed through as it is",
                "content": {"application/json": {"schema": {}}},
            }
        elif route.fields:
            op["requestBody"] = {
                "required": any(f.required for f in route.fields.values()),
                "content": {"application/json": {"schema": _body_schema(route.fields)}},
            }
    op["responses"] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": {}}}},
        "204": {"description": "No content"},
        "default": {"$ref": "#/components/responses/Error"},
    }
    if route.public:
        op["security"] = [{}, {"basic": []}] if route.path.endswith("/session/auth") else [{}]
    return op


def _operation_id(route: Route) -> str:
    words = [p.strip("{}") for p in route.parts if p not in ("sys", "crypto", "v1")]
    return route.method.lower() + "_" + "_".join(words)


def document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    paths["/openapi.json"] = {
        "get": {
            "operationId": "get_openapi",
            "summary": "This document.",
            "security": [{}],
            "responses": {"200": {"description": "OpenAPI 3.1 JSON"}},
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "get_metrics",
            "summary": "Prometheus metrics (text exposition format).",
            "security": [{}],
            "responses": {
                "200": {"description": "metrics", "content": {"text/plain": {}}},
                "404": {"$ref": "#/components/responses/Error"},
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Strongroom HTTP/JSON gateway",
            "version": "v1",
            "description": (
                "The Unix-socket API of strongroomd over HTTP: same paths, bodies, status "
                "codes and permission rules. Binary values are base64 strings. Log in with "
                "POST /sys/v1/session/auth (API key in the body, or as `Authorization: Basic "
                "<api_key>`) and send `Authorization: Bearer <access_token>`."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "the API key, base64(id:secret), on session/auth only",
                },
            },
            "schemas": {"Error": ERROR},
            "responses": {
                "Error": {
                    "description": "error",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
            },
        },
    }


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", "-o", help="file to write (default stdout)")
    args = ap.parse_args(argv)
    from strongroomd.api import ROUTES

    text = dumps(document(ROUTES))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
