"""One request, from any front end, through the route table.

The Unix-socket protocol, the plugin sandbox and the HTTP gateway all call
:meth:`Dispatcher.handle`, so there is one authentication step, one
permission engine and one audit path whatever the transport.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import Any

from strongroomd import metrics
from strongroomd._token.fair import caller as token_caller
from strongroomd.audit import AuditFailing, Kind, kind_of
from strongroomd.auth import OPERATION, Principal
from strongroomd.context import Owner, Request, Services
from strongroomd.errors import ApiError, BadRequest, Internal, Unauthenticated
from strongroomd.router import Router, check_body
from strongroomd.store import unconfirmed

log = logging.getLogger("strongroomd.dispatch")
mstate = metrics.state


_TRANSIENT = {"transient": True}


class Dispatcher:
    def __init__(self, services: Services, router: Router) -> None:
        self.services = services
        self.router = router
        #: Several nodes on a shared database (docs/architecture.md, "Several nodes").
        self.shared = services.store.shared
        #: Audit kinds of routes whose body cannot change it, by "METHOD /template".
        self._kinds: dict[str, Kind] = {}

    async def _handle_shared(self, route: Any, req: Request) -> Any:
        """Several nodes: the handler, then its sessions ended on every node, and the
        nodes that did not confirm its changes named in the answer."""
        sink: list[str] = []
        unconfirmed.set(sink)
        result = await route.handler(req)
        await self.services.auth.settle()
        if sink:
            result = {} if result is None else result
            if isinstance(result, dict):
                result["unconfirmed_nodes"] = sorted(set(sink))
        return result

    def authenticate(self, owner: Owner, auth: str | None) -> Principal | None:
        if auth is not None:
            return self.services.auth.resolve(auth)
        if owner.token is not None:
            return self.services.auth.resolve(owner.token)
        return owner.principal  # a plugin invocation's fixed principal

    async def handle(
        self, owner: Owner, method: str, path: str, body: Any, auth: str | None = None
    ) -> tuple[int, Any]:
        """Answer one request; every front end comes through here (metrics too)."""
        t0 = perf_counter()
        mstate.inflight += 1
        matched: list[str] = []  # the route template, once matched
        try:
            status, result = await self._handle(owner, method, path, body, auth, matched)
        finally:
            mstate.inflight -= 1
        metrics.observe(
            method, matched[0] if matched else None, status, perf_counter() - t0, result
        )
        return status, result

    async def _handle(
        self,
        owner: Owner,
        method: str,
        path: str,
        body: Any,
        auth: str | None,
        matched: list[str],
    ) -> tuple[int, Any]:
        principal: Principal | None = None
        req: Request | None = None
        action = f"{method} {path}"
        bucket = operation = None
        try:
            bare, query, _ = path.partition("?")  # a query: plugin invocations only (url.query)
            route, params = self.router.match(method, bare)
            if query and not route.raw_url:
                raise BadRequest(
                    "a query string is read only where a plugin is invoked", code="invalid_field"
                )
            matched.append(route.path)
            action = f"{method} {route.path}"
            operation = OPERATION.set(action)  # what auth.PERMISSIONS looks up for an app
            if not route.public:
                if self.shared:  # a session another node issued
                    await self.services.auth.prefetch(auth or owner.token)
                principal = self.authenticate(owner, auth)
                if principal is None:
                    raise Unauthenticated("authenticate first (POST /sys/v1/session/auth)")
                # The token thread's fair-queueing bucket, for this request only (a
                # plugin's calls run inside the invoking request's task).
                bucket = token_caller.set(principal.id)
            req = Request(
                self.services, owner, principal, method, path, params, check_body(route, body)
            )
            kind = self._kinds.get(action)
            if kind is None:
                kind = kind_of(method, route.path, req.body)
                if kind_of(method, route.path) is kind_of(method, route.path, _TRANSIENT):
                    self._kinds[action] = kind  # the body cannot change it: keep it
            self.services.audit.admit(kind)  # fails closed: 503 when it cannot be recorded
            if self.shared:
                result = await self._handle_shared(route, req)
            else:
                result = await route.handler(req)
            status = 204 if result is None else 200
            seq = self._audit(action, req.principal, req, owner, status, None)
            if kind is Kind.CHANGE and seq is not None:
                try:  # a change is answered once its record is on disk
                    await self.services.audit.flush(seq)
                except AuditFailing as exc:
                    exc.message = "done, but its audit record is not written yet (it is queued)"
                    raise
            return status, result
        except AuditFailing as exc:  # not recorded: the audit log cannot take it (metrics count)
            return exc.status, exc.body()
        except ApiError as exc:
            self._audit(
                action,
                principal if req is None else req.principal,
                req,
                owner,
                exc.status,
                exc.code,
            )
            return exc.status, exc.body()
        except Exception:
            log.exception("internal error on %s", action)
            exc2 = Internal("internal error")
            self._audit(action, principal, req, owner, exc2.status, exc2.code)
            return exc2.status, exc2.body()
        finally:
            if bucket is not None:
                token_caller.reset(bucket)
            if operation is not None:
                OPERATION.reset(operation)

    def _audit(
        self,
        action: str,
        principal: Principal | None,
        req: Request | None,
        owner: Owner,
        status: int,
        code: str | None,
    ) -> int | None:
        if principal is None:
            # Nobody authenticated (no route, no session, failed login): counted, never
            # stored, so a flood cannot fill the disk; api/session.py aggregates logins.
            metrics.unaudited(code in ("no_such_route", "method_not_allowed"))
            return None
        return self.services.audit.record(
            action,
            actor=principal,
            object_id=req.object_id if req is not None else None,
            status=status,
            code=code,
            invocation_id=(req and req.invocation_id) or owner.invocation_id,
            detail=req.audit_detail if req is not None else None,
        )
