"""DSM's list parameters, shared by the lists of keys, apps and plugins.

DSM's clients page with ``sort=<property>[:asc|desc]`` and ``start`` (the last
value seen: the next page begins just past it), or with ``offset`` and
``limit``, and filter with ``group_id``. Dropping them would answer the first
page again to a client paging with ``start``, forever, and an unfiltered list
to one that asked for one group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from strongroomd.errors import BadRequest
from strongroomd.router import F

T = TypeVar("T")

#: The query fields, to add to a list route's fields.
FIELDS = {
    "group_id": F(str),
    "sort": F(str, doc="<property>[:asc|desc]"),
    "start": F(str, doc="with sort: begin just past this value"),
    "limit": F(int),
    "offset": F(int),
}


def page(
    rows: Iterable[T],
    body: dict[str, Any],
    props: dict[str, Callable[[T], str]],
    groups: Callable[[T], Sequence[str]] | None = None,
    max_limit: int = 10000,
) -> list[T]:
    """``rows`` filtered by ``group_id``, sorted by ``sort`` (one of ``props``),
    past ``start``, then ``offset`` and ``limit`` (when given)."""
    out = list(rows)
    if "group_id" in body and groups is not None:
        out = [r for r in out if body["group_id"] in groups(r)]
    if "sort" in body:
        prop, _, order = body["sort"].partition(":")
        if prop not in props or order not in ("", "asc", "desc"):
            raise BadRequest(
                f"sort is <property>[:asc|desc] with property one of {', '.join(props)}",
                code="invalid_value",
            )
        key, desc = props[prop], order == "desc"
        out.sort(key=key, reverse=desc)
        if "start" in body:
            start = body["start"]
            out = [r for r in out if (key(r) < start if desc else key(r) > start)]
    elif "start" in body:
        raise BadRequest("start is used with sort", code="invalid_field")
    offset = body.get("offset", 0)
    limit = body.get("limit")
    if offset < 0 or (limit is not None and not 0 < limit <= max_limit):
        raise BadRequest(f"offset >= 0 and 0 < limit <= {max_limit}", code="invalid_value")
    return out[offset : None if limit is None else offset + limit]
