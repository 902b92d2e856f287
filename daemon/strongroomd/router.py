"""Route table: match a path, check the body against the route's fields.

Fields are checked before a handler runs (types, required, sizes), so a
handler sees only well-typed values and checks meaning alone. Fields a route
does not declare are dropped before the handler, as DSM's server ignores
unknown JSON fields (see docs/protocol.md).
A path that exists under another method is a 405, not a 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strongroomd.errors import BadRequest, MethodNotAllowed, NotFound

if TYPE_CHECKING:
    from strongroomd.context import Request

Handler = Callable[["Request"], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class F:
    """One body field: accepted types, whether required, and a description."""

    types: type | tuple[type, ...]
    required: bool = False
    doc: str = ""
    items: type | None = None  # element type of a list


KEY = F(dict, True, "key descriptor: {kid} | {name} | {transient_key}")


@dataclass(slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    fields: dict[str, F] | None = None  # None: the body is passed through untouched
    public: bool = False  # reachable without authentication
    synopsis: str = ""
    #: The handler reads the URL itself (a plugin invocation's url.path and url.query):
    #: more path segments may follow the template's, and a query string may come too.
    raw_url: bool = False
    parts: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.parts = tuple(self.path.strip("/").split("/"))

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.parts) and not (self.raw_url and len(parts) > len(self.parts)):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.parts, parts[: len(self.parts)], strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {
        str: "string",
        int: "integer",
        bool: "boolean",
        bytes: "binary",
        dict: "map",
        list: "array",
        float: "number",
    }.get(t, t.__name__)


def _is(value: Any, types: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool) and not (
        types is bool or (isinstance(types, tuple) and bool in types)
    ):
        return False
    return isinstance(value, types)


def misspelt(name: str, declared: dict[str, Any]) -> str | None:
    """The declared field an unknown one is a slip of, if any.

    Ignoring unknown fields (DSM's rule) turns ``keyops`` into "no change" and
    ``transiant`` into a stored key. A slip is the same name up to case,
    ``_`` and ``-``, or one letter wrong (or two swapped) in a declared name of
    six letters or more. Not a letter more or less: DSM's own distinct fields
    differ that way (``enable``/``enabled``, ``group``/``groups``).
    """
    if not isinstance(name, str):
        return None
    bare = _bare(name)
    for known in declared:
        kb = _bare(known)
        if bare == kb or (len(kb) >= 6 and _one_edit(bare, kb)):
            return known
    return None


def _bare(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` is ``b`` with one letter replaced or two neighbours swapped."""
    if len(a) != len(b):
        return False
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    if len(diff) == 1:
        return True
    i = diff[0] if len(diff) == 2 else -1
    return diff == [i, i + 1] and a[i] == b[i + 1] and a[i + 1] == b[i]


def check_body(route: Route, body: Any) -> Any:
    if route.fields is None:
        return body
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a map", code="invalid_field")
    spec = route.fields
    for name, value in body.items():
        f = spec.get(name)
        if f is None:
            if (near := misspelt(name, spec)) is not None:
                raise BadRequest(
                    f"unknown field {name!r}: did you mean {near!r}? (fields a route does "
                    "not know are ignored, so a misspelt one would silently do nothing)",
                    code="unknown_field",
                )
            continue  # as DSM (serde's default): a field a route does not know is ignored
        if value is None and not f.required:
            continue
        if not _is(value, f.types):
            raise BadRequest(f"field {name!r} must be {_type_name(f.types)}", code="invalid_field")
        if f.items is not None and not all(_is(v, f.items) for v in value):
            raise BadRequest(
                f"field {name!r} must be an array of {_type_name(f.items)}", code="invalid_field"
            )
    for name, f in spec.items():
        if f.required and body.get(name) is None:
            raise BadRequest(f"field {name!r} is required", code="missing_field")
    # Handlers see only the fields their route declares.
    return {k: v for k, v in body.items() if v is not None and k in spec}


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self._static: dict[tuple[str, str], Route] = {
            (r.method, "/" + "/".join(r.parts)): r for r in routes if "{" not in r.path
        }
        self._dynamic = [r for r in routes if "{" in r.path]

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        route = self._static.get((method, path))
        if route is not None:
            return route, {}
        # Routes are tried in order: a raw_url route comes after any longer route it
        # would otherwise take (see api/plugins.py's invoke routes).
        parts = path.strip("/").split("/")
        allowed = False
        for r in self.routes:
            params = r.match(parts)
            if params is None:
                continue
            if r.method == method:
                return r, params
            allowed = True
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {path}")
        raise NotFound(f"no route for {path}", code="no_such_route")
