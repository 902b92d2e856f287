"""/sys/v1/plugins*: store Lua plugins, invoke them, test unsaved code.

A plugin runs in a sandbox worker; every API call it makes comes back
through :class:`strongroomd.dispatch.Dispatcher` with the plugin as the
principal, so it has exactly its groups' keys and their key_ops, and every
call is audited under the invocation's id.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from strongroomd import _sandbox, outbound
from strongroomd.api import listing
from strongroomd.api.groups import membership
from strongroomd.auth import Principal, require_admin
from strongroomd.context import Owner, Request, Services
from strongroomd.errors import (
    ApiError,
    BadRequest,
    Busy,
    Conflict,
    Forbidden,
    NotFound,
    PluginError,
    TooLarge,
    from_code,
)
from strongroomd.keyspec import check_name
from strongroomd.plugin_audit import granted, shown, with_grant
from strongroomd.router import F, Route
from strongroomd.store import PluginRow, now_stamp

LIMIT_FIELDS = {"memory_bytes": int, "instructions": int, "wall_seconds": (int, float)}
#: DSM's PluginType values. Strongroom runs STANDARD plugins: the plugin acts with
#: its own groups (IMPERSONATING would act as the invoker; CUSTOMALGORITHM plugs
#: into crypto calls); the others are refused rather than run as something else.
PLUGIN_TYPES = ("STANDARD", "IMPERSONATING", "CUSTOMALGORITHM")
#: DSM's Language values.
LANGUAGES = ("LUA",)
MAX_CODE = 512 * 1024
#: What a running plugin may ask of the daemon (the Lua API's paths).
PLUGIN_PATHS = ("/crypto/v1/",)
#: What it may read (GET) besides: its groups and audit records (Group{}, AuditLog.get_all).
PLUGIN_READS = ("/sys/v1/groups", "/sys/v1/logs")


def view(row: PluginRow, *, with_code: bool, viewer: Principal | None = None) -> dict[str, Any]:
    """A plugin as the API shows it; an app sees only the groups it shares with it."""
    groups = list(row.groups)
    if viewer is not None and not viewer.is_admin:
        groups = [g for g in groups if g in viewer.groups]
    out: dict[str, Any] = {
        "plugin_id": row.id,
        "name": row.name,
        "description": row.description,
        "groups": groups,
        "default_group": row.default_group,
        "enabled": row.enabled,
        "plugin_type": "STANDARD",
        "version": row.version,
        "limits": shown(row.limits),
        "audit_read": granted(row.limits),
        "request_allowlist": list(row.request_allowlist),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "lastupdated_at": row.updated_at,  # DSM's name for it
        "legacy_access": False,  # DSM: acting on a plugin needs rights in all its groups
    }
    if with_code:
        out["source"] = {"language": "LUA", "code": row.code}
    return out


def plugin_principal(row: PluginRow) -> Principal:
    return Principal("plugin", row.id, row.name, frozenset(row.groups), row.default_group)


def _pool(s: Services) -> Any:
    return s.sandbox


def _limits(s: Services, overrides: dict[str, Any]) -> Any:
    cfg = s.config
    base = {
        "memory_bytes": cfg.plugin_memory_bytes,
        "instructions": cfg.plugin_instructions,
        "wall_seconds": cfg.plugin_wall_seconds,
    }
    base.update(shown(overrides))
    return _sandbox.Limits(**base)


def _check_limits(limits: dict[str, Any]) -> dict[str, Any]:
    for k, v in limits.items():
        want = LIMIT_FIELDS.get(k)
        if want is None:
            raise BadRequest(f"unknown limit {k!r}", code="invalid_value")
        if isinstance(v, bool) or not isinstance(v, want) or v <= 0:
            raise BadRequest(f"limit {k!r} must be a positive number", code="invalid_value")
    return dict(limits)


def _allowlist(s: Services, value: Any) -> list[str]:
    """request_allowlist: the origins the plugin's request{} may reach (outbound.py)."""
    return outbound.check_allowlist(value, loopback_http=s.config.plugin_request_loopback_http)


def _groups(s: Services, groups: list[str], default: str | None) -> tuple[list[str], str]:
    return membership(s.store, groups, default, "a plugin")


def _plugin_type(body: dict[str, Any]) -> None:
    """DSM's ``plugin_type``: STANDARD is the one Strongroom runs. Any case, as
    DSM's Python SDK sends its enum values (``Standard``), like ``source.language``."""
    kind = body.get("plugin_type", "STANDARD")
    kind = kind.upper() if isinstance(kind, str) else kind
    if kind not in PLUGIN_TYPES:
        raise BadRequest(
            f"plugin_type must be one of {', '.join(PLUGIN_TYPES)}", code="invalid_value"
        )
    if kind != "STANDARD":
        raise BadRequest(
            f"plugin_type {kind} is not supported: Strongroom runs STANDARD plugins only",
            code="invalid_value",
        )


def _code(body: dict[str, Any]) -> str:
    src = body["source"]
    if "repo_url" in src:
        raise BadRequest(
            "plugins from a repository are not supported: give source {language, code}",
            code="invalid_value",
        )
    lang, code = src.get("language", "LUA"), src.get("code")
    if not isinstance(lang, str) or lang.upper() not in LANGUAGES:
        raise BadRequest(
            f"source.language must be one of {', '.join(LANGUAGES)}", code="invalid_value"
        )
    if not isinstance(code, str):
        raise BadRequest("source.code must be a string", code="invalid_field")
    if len(code.encode()) > MAX_CODE:
        raise TooLarge(f"plugin code is limited to {MAX_CODE} bytes")
    return code


def _get(req: Request) -> PluginRow:
    pid = req.params["plugin_id"]
    req.object_id = pid
    row = req.services.store.plugins.get(pid)
    p = req.caller
    if row is None or not (p.is_admin or p.groups & set(row.groups)):
        raise NotFound(f"no plugin {pid}")
    return row


def _unique(s: Services, name: str, but: str | None = None) -> None:
    if any(p.name == name and p.id != but for p in s.store.plugins.values()):
        raise Conflict(f"a plugin named {name!r} exists", code="name_exists")


async def create(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    b, s = req.body, req.services
    name = check_name(b["name"])
    _plugin_type(b)
    if "del_groups" in b or "mod_groups" in b:
        raise BadRequest(
            "a new plugin takes groups and add_groups; del_groups and mod_groups change "
            "an existing plugin's groups (PATCH)",
            code="invalid_field",
        )
    code = _code(b)
    await _pool(s).check_syntax(code, name)
    now = now_stamp()
    async with s.store.catalog:
        _unique(s, name)
        asked = [*b.get("groups", []), *b.get("add_groups", [])]
        groups, default = _groups(s, asked, b.get("default_group"))
        row = PluginRow(
            str(uuid.uuid4()),
            name,
            b.get("description", ""),
            code,
            groups,
            default,
            bool(b.get("enabled", True)),
            1,
            with_grant(_check_limits(b.get("limits", {})), b.get("audit_read"), {}),
            now,
            now,
            request_allowlist=_allowlist(s, b.get("request_allowlist", [])),
        )
        req.object_id = row.id
        await s.store.insert(row)
    return view(row, with_code=True)


async def list_(req: Request) -> list[dict[str, Any]]:
    p = req.caller
    plugins = req.services.store.plugins.values()
    rows = [r for r in plugins if p.is_admin or p.groups & set(r.groups)]
    props = {"plugin_id": lambda r: r.id, "name": lambda r: r.name}
    rows = listing.page(rows, req.body, props, lambda r: r.groups)
    return [view(r, with_code=p.is_admin, viewer=p) for r in rows]


async def get(req: Request) -> dict[str, Any]:
    return view(_get(req), with_code=req.caller.is_admin, viewer=req.caller)


async def update(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    b, s = req.body, req.services
    pid = _get(req).id
    _plugin_type(b)
    both = (set(b.get("add_groups", [])) | set(b.get("groups", []))) & set(b.get("del_groups", []))
    if both:
        raise BadRequest(
            f"group(s) both given and deleted: {', '.join(sorted(both))}", code="invalid_value"
        )
    name = check_name(b["name"]) if "name" in b else None
    code = _code(b) if "source" in b else None
    if code is not None:
        await _pool(s).check_syntax(code, name or s.store.plugins[pid].name)
    limits = _check_limits(b["limits"]) if "limits" in b else None
    allowlist = _allowlist(s, b["request_allowlist"]) if "request_allowlist" in b else None

    def apply(cur: PluginRow) -> PluginRow:
        row = replace(cur)  # the row as it is now; the store bumps its version
        if name is not None:
            _unique(s, name, but=row.id)
            row.name = name
        if "description" in b:
            row.description = b["description"]
        if code is not None:
            row.code = code
        groups = list(b["groups"]) if "groups" in b else list(row.groups)
        groups += [g for g in b.get("add_groups", []) if g not in groups]
        groups = [g for g in groups if g not in b.get("del_groups", [])]
        # DSM's mod_groups (a plugin has no per-group permissions): groups it must be in.
        outside = [g for g in b.get("mod_groups", []) if g not in groups]
        if outside:
            raise BadRequest(
                f"mod_groups: the plugin is not in group(s) {', '.join(outside)}",
                code="invalid_value",
            )
        default = b.get("default_group", row.default_group)
        row.groups, row.default_group = _groups(s, groups, default if default in groups else None)
        if "enabled" in b:
            row.enabled = b["enabled"]
        if limits is not None:
            row.limits = limits
        row.limits = with_grant(row.limits, b.get("audit_read"), cur.limits)
        if allowlist is not None:
            row.request_allowlist = allowlist
        row.updated_at = now_stamp()
        return row

    async with s.store.catalog:
        row = await s.store.change(PluginRow, pid, apply)
    await _pool(s).forget(row.id)  # idle workers hold the old version
    return view(row, with_code=True)


async def delete(req: Request) -> None:
    require_admin(req.caller)
    pid = _get(req).id
    s = req.services
    async with s.store.catalog, s.store.writing(pid):
        row = s.store.plugins.get(pid)
        if row is None:
            raise NotFound(f"no plugin {pid}")
        await s.store.delete(row)
    await _pool(s).forget(pid)


class _Host:
    """What a running plugin may ask of the daemon: requests as the plugin, audit notes."""

    def __init__(
        self, req: Request, row: PluginRow, principal: Principal, inv: str, *, stored: bool
    ) -> None:
        self.dispatcher = req.services.dispatcher
        self.audit = req.services.audit
        self.store = req.services.store
        self.stored = stored  # a stored plugin, not a test run's throwaway row
        self.row = row
        self.principal = principal
        self.owner = Owner(id=inv, principal=principal, invocation_id=inv)
        self.calls = 0
        self.max_calls = req.services.config.plugin_max_api_calls
        self.requests = outbound.Requests(
            req.services.audit,
            loopback_http=req.services.config.plugin_request_loopback_http,
            plugin_id=row.id,
            invocation_id=inv,
        )

    async def request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        # The Lua API needs keys and crypto only. A worker that escaped Lua must not
        # reach management paths, nor invoke plugins (itself included) from a plugin.
        reads = method == "GET" and isinstance(path, str) and path.startswith(PLUGIN_READS)
        if not isinstance(path, str) or not (path.startswith(PLUGIN_PATHS) or reads):
            err: ApiError = Forbidden("plugins may call /crypto/v1/ paths only")
            return err.status, err.body()
        self.calls += 1
        if self.calls > self.max_calls:
            err = Busy(f"more than {self.max_calls} API calls in one invocation")
            return err.status, err.body()
        if (gone := self._refresh()) is not None:
            return gone.status, gone.body()
        return await self.dispatcher.handle(self.owner, method, path, body)

    def _refresh(self) -> ApiError | None:
        """Take the plugin as it is now (its groups, its allowlist): an admin who
        disables it, deletes it or changes it is obeyed by invocations already
        running. The error when it is gone or disabled."""
        if not self.stored:
            return None
        row = self.store.plugins.get(self.row.id)
        if row is None or not row.enabled:
            return Forbidden("the plugin was disabled or deleted during this invocation")
        if row is not self.row:
            self.row, self.principal = row, plugin_principal(row)
            self.owner.principal = self.principal
        return None

    async def http(self, msg: dict[str, Any], timeout: float) -> tuple[int, Any]:
        """request{}: made here, to the origins in the plugin's request_allowlist only."""
        if (gone := self._refresh()) is not None:  # the allowlist as it is now
            return gone.status, gone.body()
        return await self.requests.handle(
            msg,
            allowlist=list(self.row.request_allowlist),
            principal=self.principal,
            timeout=timeout,
        )

    def log(self, message: str, severity: str) -> None:
        self.audit.record(
            "plugin.log",
            actor=self.principal,
            object_id=self.row.id,
            invocation_id=self.owner.invocation_id,
            detail={"message": str(message)[:4096], "severity": severity},
        )


async def _run(
    req: Request, row: PluginRow, input_: Any, invoker: dict[str, Any], *, test: bool = False
) -> Any:
    s = req.services
    inv = str(uuid.uuid4())
    req.invocation_id = inv
    principal = plugin_principal(row)
    host = _Host(req, row, principal, inv, stored=not test)
    code = _sandbox.PluginCode(row.id, row.name, row.version, row.code)
    context = {
        "principal": invoker,
        "this_plugin": {"id": row.id, "name": row.name, "groups": list(row.groups)},
    }
    url = invocation_url(req.path) if not test else {"path": ["sys", "v1", "plugins", row.id]}
    try:
        outcome = await _pool(s).invoke(
            code,
            input_,
            url=url,
            method=req.method,
            context=context,
            host=host,
            limits=_limits(s, row.limits),
            discard=test,  # a test run's worker is never reused
        )
    finally:
        await host.requests.close()
        await s.keyring.drop_owner(host.owner)
    return inv, outcome


def invocation_url(path: str) -> dict[str, Any]:
    """DSM's ``url`` argument: the path's segments as sent (extra ones included) and the
    raw query string, absent when the URL has none."""
    bare, sep, query = path.partition("?")
    url: dict[str, Any] = {"path": bare.strip("/").split("/")}
    if sep:
        url["query"] = query
    return url


async def invoke(req: Request) -> Any:
    row = _get(req)
    if not row.enabled:
        raise Forbidden("the plugin is disabled")
    inv, outcome = await _run(req, row, req.body, req.caller.describe())
    # Printed output may hold secrets: kept in memory for admins, never audited.
    req.services.outputs.add(inv, row.id, now_stamp(), outcome.output)
    if outcome.status >= 400:
        body = dict(outcome.body) if isinstance(outcome.body, dict) else {}
        code = body.get("error", "plugin_error")
        extra = {"invocation_id": inv}
        if req.caller.is_admin and outcome.traceback:
            extra["traceback"] = outcome.traceback
        message = str(body.get("message", "plugin error"))
        if outcome.failure is None:  # the plugin's own Error{status=...}: its status stands
            raise PluginError(message, outcome.status, str(code), **extra)
        raise from_code(outcome.failure, message, **extra)
    return outcome.body if outcome.status != 204 else None


async def output(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    inv = req.params["invocation_id"]
    req.object_id = inv
    kept = req.services.outputs.get(inv)
    if kept is None:
        raise NotFound(f"no output kept for invocation {inv} (none printed, evicted, or restarted)")
    return {
        "invocation_id": kept.invocation_id,
        "plugin_id": kept.plugin_id,
        "at": kept.at,
        "output": kept.output,
        "truncated": kept.truncated,
    }


async def test(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    b, s = req.body, req.services
    code = b["code"]
    if len(code.encode()) > MAX_CODE:
        raise TooLarge(f"plugin code is limited to {MAX_CODE} bytes")
    groups = b.get("groups") or sorted(req.caller.groups)
    groups, default = _groups(s, groups, None)
    await _pool(s).check_syntax(code, "test")
    now = now_stamp()
    row = PluginRow(
        f"test-{uuid.uuid4()}",
        "test",
        "",
        code,
        groups,
        default,
        True,
        0,
        _check_limits(b.get("limits", {})),
        now,
        now,
        request_allowlist=_allowlist(s, b.get("request_allowlist", [])),
    )
    invoker = req.caller.describe()
    if "invoker" in b:
        who = s.store.principals.get(b["invoker"]) or next(
            (p for p in s.store.principals.values() if p.name == b["invoker"]), None
        )
        if who is None:
            raise NotFound(f"no app {b['invoker']!r} to invoke as")
        invoker = {"kind": who.kind, "id": who.id, "name": who.name, "groups": list(who.groups)}
    inv, outcome = await _run(req, row, b.get("input"), invoker, test=True)
    out: dict[str, Any] = {
        "status": outcome.status,
        "output": outcome.output,
        "stats": outcome.stats,
        "invocation_id": inv,
    }
    if outcome.status >= 400:
        out["error"] = outcome.body
        if outcome.traceback:
            out["traceback"] = outcome.traceback
    else:
        out["result"] = outcome.body
    return out


_MANAGE = {
    "audit_read": F(bool),
    "name": F(str),
    "description": F(str),
    "source": F(dict),
    "groups": F(list, items=str),
    "add_groups": F(list, items=str),
    "del_groups": F(list, items=str),
    "default_group": F(str),
    "enabled": F(bool),
    "limits": F(dict),
    "request_allowlist": F(list, items=str),
    "plugin_type": F(str),
    "mod_groups": F((list, dict)),  # DSM: a list of group ids; a map's keys count
}

ROUTES = [
    Route(
        "POST",
        "/sys/v1/plugins/test",
        test,
        {
            "code": F(str, True),
            "input": F(object),
            "groups": F(list, items=str),
            "invoker": F(str),
            "limits": F(dict),
            "request_allowlist": F(list, items=str),
        },
        synopsis="Run unsaved code in the sandbox with mock input (admins).",
    ),
    Route(
        "GET",
        "/sys/v1/plugins/invocations/{invocation_id}/output",
        output,
        {},
        synopsis="What a recent invocation printed; kept in memory, never audited (admins).",
    ),
    Route(
        "POST",
        "/sys/v1/plugins",
        create,
        {**_MANAGE, "name": F(str, True), "source": F(dict, True)},
        synopsis="Store a plugin; its code is compiled first (admins).",
    ),
    Route(
        "GET",
        "/sys/v1/plugins",
        list_,
        listing.FIELDS,
        synopsis="List plugins you can invoke (group_id; sort=plugin_id|name[:desc], start, "
        "offset, limit).",
    ),
    # Before the routes they would otherwise fall into (POST .../{plugin_id} takes
    # extra segments too): DSM's invoke form, by GET (url.path, url.query) or POST.
    Route(
        "GET",
        "/sys/v1/plugins/invoke/{plugin_id}",
        invoke,
        None,
        synopsis="Invoke a plugin by GET; extra path segments and the query reach it as url.",
        raw_url=True,
    ),
    Route(
        "POST",
        "/sys/v1/plugins/invoke/{plugin_id}",
        invoke,
        None,
        synopsis="Invoke a plugin; the body is its input, extra segments and query its url.",
        raw_url=True,
    ),
    Route("GET", "/sys/v1/plugins/{plugin_id}", get, {}, synopsis="Show a plugin."),
    Route(
        "PATCH",
        "/sys/v1/plugins/{plugin_id}",
        update,
        _MANAGE,
        synopsis="Change a plugin; each change bumps its version (admins).",
    ),
    Route("DELETE", "/sys/v1/plugins/{plugin_id}", delete, {}, synopsis="Delete a plugin."),
    Route(
        "POST",
        "/sys/v1/plugins/{plugin_id}",
        invoke,
        None,
        synopsis="Invoke a plugin; the body is its input.",
        raw_url=True,
    ),
]
