"""HTTP/JSON gateway: the socket's API over loopback HTTP, plus the web console.

Served by the daemon on its own event loop (aiohttp), started and stopped by
:class:`strongroomd.server.Server`. Every API request goes through
:meth:`strongroomd.dispatch.Dispatcher.handle`, so authentication, the
permission rules and the audit trail are the socket's own.

- Same paths, bodies and status codes as the socket, in JSON (except
  ``CREATED``: a new plugin is ``201``, as DSM answers it). Binary values
  are base64 strings: fields a route declares as bytes are decoded on the way
  in, every bytes value is encoded on the way out. On GET, query parameters
  become body fields (``?limit=10`` is the integer 10), except where a plugin
  is invoked: there the path as sent and the raw query string reach the plugin
  as ``url.path`` and ``url.query`` (any method).
- ``Authorization: Bearer <access_token>`` authenticates a request. The API
  key itself is accepted as ``Authorization: Basic <api_key>`` (it already is
  base64("id:secret")) on ``POST /sys/v1/session/auth`` only, so a slow
  scrypt check runs once per login, never per request.
- Each request is its own connection (``Owner``): ``transient: true`` is a 400
  here, since such a key would vanish with the request that made it.
- Request bodies are bounded by ``max_frame`` (413 ``too_large``), strings in
  them by ``max_field``; without a valid bearer token by ``max_unauth_bytes``.
  A body must arrive within ``frame_timeout``; its bytes count against the
  daemon's in-flight budget, and a request that finds it spent gets ``429
  busy`` (the socket's connections wait instead: an HTTP request cannot be
  held without holding its body). At most ``http_max_connections`` at once
  (beyond: 429 and closed); an idle connection is closed after
  ``auth_timeout``. JSON has no NaN or Infinity: such numbers are refused in
  requests (400 ``malformed_frame``) and sent as ``null`` in responses.
  Responses carry a strict CSP and no CORS headers;
  the Host header must name the loopback address (DNS rebinding).
- HTTPS: with ``http_tls_cert_file`` and ``http_tls_key_file`` the gateway
  serves TLS itself (1.2 minimum, the ssl module's server defaults: forward
  secrecy, no compression or renegotiation), answers with
  ``Strict-Transport-Security``, and ``http.url`` says https://. DSM's own
  clients (``sdkms-cli``) refuse plain http.
- ``GET /openapi.json``: the gateway's OpenAPI 3.1 document;
  ``GET /metrics``: Prometheus text from :mod:`strongroomd.metrics` when that
  module exists (404 otherwise); ``/console/``: the web console's files.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib
import json
import logging
import math
import socket
import ssl
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from strongroomd import _console, metrics, openapi
from strongroomd.config import ConfigError, check_tls_key
from strongroomd.context import Owner
from strongroomd.errors import ApiError, BadRequest, Busy, TooLarge, Unauthenticated
from strongroomd.protocol import MAX_PATH, METHODS, Admission, Budget, Listener
from strongroomd.router import Route

if TYPE_CHECKING:
    from strongroomd.config import Config
    from strongroomd.dispatch import Dispatcher
    from strongroomd.keyring import Keyring

log = logging.getLogger("strongroomd.gateway")

AUTH_PATH = "/sys/v1/session/auth"
#: Answered ``201 Created`` over HTTP, as DSM does: DSM's sdkms-cli accepts
#: nothing else for a new plugin. (The socket answers 200, which its clients,
#: tests and plugins have always read; the body is the same.)
CREATED = frozenset({("POST", "/sys/v1/plugins")})
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class Gateway:
    def __init__(
        self,
        config: Config,
        dispatcher: Dispatcher,
        keyring: Keyring,
        *,
        budget: Budget | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.keyring = keyring
        #: Shared with the socket (``Server.budget``), so the two front ends together
        #: stay under ``max_inflight_bytes``.
        self.budget = budget or Budget(config.max_inflight_bytes)
        self.admission = Admission("HTTP", max_connections or config.http_max_connections)
        self._listener: Listener | None = None
        self.console_dir = config.http_console_dir or _console.default_dir()
        self.url = ""
        self._hosts: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._openapi: bytes | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> str:
        tls = tls_context(self.config) if self.config.http_tls else None
        app = web.Application(client_max_size=self.config.max_frame)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(_headers)
        if tls is not None:
            app.on_response_prepare.append(_hsts)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.config.shutdown_grace,
            # from connection start and between requests (a partial header included)
            keepalive_timeout=self.config.auth_timeout,
            # after an early answer (413, a late body), unread body bytes are drained
            # for this long before the connection closes
            lingering_time=self.config.frame_timeout,
        )
        await runner.setup()
        host, port = self.config.http_host, self.config.http_port
        server = runner.server
        assert server is not None
        try:
            sock = _listen_tcp(host, port)
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._listener = Listener(
            sock,
            server,
            self.admission,
            lambda: len(server.connections),
            _BUSY,
            tls=tls,
            handshake_timeout=self.config.auth_timeout,
        )
        self._runner = runner
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls is not None else 'http'}://{shown}:{bound}"
        self._hosts = {f"{h}:{bound}" for h in (shown, "127.0.0.1", "localhost", "[::1]")}
        return self.url

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()  # stops listening, lets requests finish
            self._runner = None

    # -- requests --------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self.config.http_allow_remote and request.host not in self._hosts:
            return _error(403, "forbidden", f"unexpected Host {request.host!r}")
        path = request.path
        if path.startswith(("/sys/", "/crypto/")):
            return await self._api(request)
        if request.method not in ("GET", "HEAD"):
            return _error(405, "method_not_allowed", f"{request.method} is not allowed here")
        if path in ("/", "/console"):
            raise web.HTTPFound("/console/")
        if path.startswith("/console/"):
            return self._console(path.removeprefix("/console/"))
        if path == "/openapi.json":
            return self._openapi_doc()
        if path == "/metrics":
            return _metrics()
        return _error(404, "no_such_route", f"no route for {path}")

    async def _api(self, request: web.Request) -> web.Response:
        method, path = request.method, request.path
        if method not in METHODS:
            return _error(405, "method_not_allowed", f"{method} is not allowed")
        if len(path) > MAX_PATH:
            return _error(400, "malformed_frame", "path too long")
        route = self._route(method, path)
        if route is not None and route.raw_url:
            # A plugin invocation: its url.path segments as sent and url.query, raw.
            path = request.raw_path
            if len(path) > MAX_PATH:
                return _error(400, "malformed_frame", "path too long")
        owner = Owner(id=f"http-{uuid.uuid4()}")
        charged = [0]  # bytes taken from the in-flight budget, given back at the end
        close = False
        try:
            try:
                body = await self._body(request, route, charged)
            except TimeoutError:
                close = True  # the rest of the body may still come: drop the connection
                raise BadRequest(
                    f"the body did not arrive within {self.config.frame_timeout:g} s",
                    code="malformed_frame",
                ) from None
            body = self._authorization(request, route, owner, body)
            if isinstance(body, dict) and route is not None and route.fields is not None:
                body = self._decode_binary(route, body)
            status, out = await self.dispatcher.handle(owner, method, path, body)
        except ApiError as exc:
            status, out = exc.status, exc.body()
            close = close or exc.code == "too_large"  # an unread body follows
            metrics.observe(method, route.path if route else None, status, 0.0, out)
        finally:
            self.budget.give(charged[0])
            if owner.transient:
                await self.keyring.drop_owner(owner)
        if status == 204:
            return web.Response(status=204, headers={"Cache-Control": "no-store"})
        if status == 200 and route is not None and (method, route.path) in CREATED:
            status = 201
        resp = _json(status, out)
        if close:
            resp.force_close()
        if status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="strongroom"'
        return resp

    def _route(self, method: str, path: str) -> Route | None:
        try:
            return self.dispatcher.router.match(method, path)[0]
        except ApiError:
            return None  # the dispatcher answers 404/405 and audits it

    def _limit(self, request: web.Request, route: Route | None) -> int:
        """The body limit: ``max_frame`` with a valid bearer token, else ``max_unauth_bytes``.

        Checking the token ends it if it expired, so a token that fails here fails
        the request here, with the dispatcher's own answer (``token_expired``).
        """
        scheme, _, cred = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and cred.strip() and route is not None and not route.public:
            self.dispatcher.services.auth.resolve(cred.strip())
            return self.config.max_frame
        return min(self.config.max_unauth_bytes, self.config.max_frame)

    async def _body(self, request: web.Request, route: Route | None, charged: list[int]) -> Any:
        services = self.dispatcher.services
        if services.store.shared:  # a bearer token another node issued
            scheme, _, cred = request.headers.get("Authorization", "").strip().partition(" ")
            if scheme.lower() == "bearer" and cred.strip():
                await services.auth.prefetch(cred.strip())
        limit = self._limit(request, route)
        declared = request.content_length
        if declared is not None and declared > limit:
            raise TooLarge(f"the body is over {limit} bytes")
        raw = b""
        if request.body_exists:
            reserve = declared if declared is not None else limit
            if not self.budget.try_take(reserve):
                raise Busy("the daemon has too many request bytes in flight; retry shortly")
            charged[0] = reserve
            async with asyncio.timeout(self.config.frame_timeout):
                raw = await _read(request, limit)
            self.budget.give(reserve - len(raw))
            charged[0] = len(raw)
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                raise BadRequest("the body is not valid JSON", code="malformed_frame") from None
            _check_sizes(body, self.config.max_field)
        if request.query and not (route is not None and route.raw_url):
            if request.method != "GET":
                raise BadRequest(
                    "query parameters are read on GET only; send a JSON body",
                    code="invalid_field",
                )
            if body is not None and not isinstance(body, dict):
                raise BadRequest("the request body must be a map", code="invalid_field")
            body = {**(body or {}), **_query_fields(request, route)}
        if (
            isinstance(body, dict)
            and body.get("transient") is True
            and route is not None
            and route.fields is not None
            and "transient" in route.fields
        ):
            raise BadRequest(
                "transient keys live as long as their connection, and over HTTP each request "
                "is its own: use the Unix socket (or a plugin) for transient keys",
                code="invalid_value",
            )
        return body

    def _authorization(
        self, request: web.Request, route: Route | None, owner: Owner, body: Any
    ) -> Any:
        """Bind a bearer token to the request's owner; a Basic API key becomes the body."""
        value = request.headers.get("Authorization")
        if value is None:
            return body
        scheme, _, cred = value.strip().partition(" ")
        scheme, cred = scheme.lower(), cred.strip()
        is_auth = route is not None and route.path == AUTH_PATH and request.method == "POST"
        if scheme == "bearer" and cred:
            if not is_auth:  # session/auth with a bearer would end that session
                owner.token = cred
            return body
        if scheme == "basic" and cred:
            if not is_auth:
                raise Unauthenticated(
                    "Basic (the API key) is accepted on POST /sys/v1/session/auth only; "
                    "send the bearer token it returns",
                )
            if body not in (None, {}):
                raise BadRequest(
                    "give the API key in the Authorization header or the body, not both",
                    code="invalid_field",
                )
            return {"api_key": cred}
        raise Unauthenticated("Authorization must be Bearer <token> (or Basic <api_key>)")

    def _decode_binary(self, route: Route, body: dict[str, Any]) -> dict[str, Any]:
        assert route.fields is not None
        out = dict(body)
        for name, value in body.items():
            f = route.fields.get(name)
            if f is None:
                continue
            types = f.types if isinstance(f.types, tuple) else (f.types,)
            if bytes in types and str not in types and isinstance(value, str):
                out[name] = _b64(name, value)
            elif f.items is bytes and isinstance(value, list):
                out[name] = [_b64(name, v) if isinstance(v, str) else v for v in value]
        return out

    # -- other resources -----------------------------------------------------------------
    def _openapi_doc(self) -> web.Response:
        if self._openapi is None:
            doc = openapi.document(self.dispatcher.router.routes)
            self._openapi = openapi.dumps(doc).encode()
        return web.Response(
            body=self._openapi,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    def _console(self, name: str) -> web.StreamResponse:
        path = _console.resolve(self.console_dir, name)
        if path is None:
            return _error(404, "not_found", f"no console file {name!r}")
        if not path.is_file():
            return _error(
                404,
                "not_found",
                f"{path} is missing: a package bundles the console when it is built; "
                "a source tree gets the editor files from scripts/_setup.sh (npm ci)",
            )
        return web.FileResponse(
            path,
            headers={
                "Content-Type": TYPES[path.suffix] + "; charset=utf-8",
                "Cache-Control": "no-cache",
            },
        )


def tls_context(config: Config) -> ssl.SSLContext:
    """The gateway's server-side TLS settings: TLS 1.2 minimum and the ssl module's
    defaults for a server (ECDHE suites only, no compression, no renegotiation).

    The key file is checked like the daemon's other secrets before it is read; a
    problem is a :class:`ConfigError` naming the file, never its contents.
    """
    cert, key = config.http_tls_cert_file, config.http_tls_key_file
    assert cert is not None and key is not None
    check_tls_key(key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot read {exc.filename or cert}: {exc.strerror}") from None
    except OSError as exc:  # ssl.SSLError too: a bad PEM, or a key that is not the cert's
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ConfigError(
            f"http_tls_cert_file {cert} and http_tls_key_file {key} cannot be used "
            f"together ({reason}): PEM certificate chain and its unencrypted private key"
        ) from None
    return ctx


def _no_password() -> bytes:
    """An encrypted key would prompt on the terminal; the daemon has none to ask."""
    raise ConfigError("http_tls_key_file is encrypted; give the daemon an unencrypted key")


async def _hsts(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Strict-Transport-Security"] = "max-age=31536000"


def _metrics() -> web.Response:
    try:
        metrics = importlib.import_module("strongroomd.metrics")
    except ModuleNotFoundError as exc:
        if exc.name != "strongroomd.metrics":
            raise
        return _error(404, "not_found", "metrics are not available in this build")
    body, content_type = metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"}
    )


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["Server"] = "strongroomd"  # not the library and its version


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _json(status: int, body: Any) -> web.Response:
    try:
        try:
            text = json.dumps(body, default=_json_default, ensure_ascii=False, allow_nan=False)
        except ValueError:  # NaN or Infinity, which JSON lacks: sent as null
            text = json.dumps(
                _finite(body), default=_json_default, ensure_ascii=False, allow_nan=False
            )
    except (TypeError, ValueError):
        log.exception("unencodable response")
        status, text = 500, json.dumps({"error": "internal", "message": "unencodable response"})
    return web.Response(
        status=status,
        text=text,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _read(request: web.Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes as it arrives (chunked bodies too)."""
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _listen_tcp(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


_BUSY_BODY = b'{"error": "busy", "message": "too many connections; try again later"}'
_BUSY = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nServer: strongroomd\r\n\r\n" + _BUSY_BODY
)


def _error(status: int, code: str, message: str) -> web.Response:
    return _json(status, {"error": code, "message": message})


def _b64(name: str, value: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeError, ValueError):
        raise BadRequest(f"field {name!r} must be base64", code="invalid_field") from None


def _check_sizes(value: Any, limit: int) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if len(v) > limit:
                raise TooLarge(f"a field is over {limit} bytes")
        elif isinstance(v, list):
            if len(v) > limit:
                raise TooLarge(f"an array is over {limit} items")
            stack.extend(v)
        elif isinstance(v, dict):
            if len(v) > limit:
                raise TooLarge(f"a map is over {limit} entries")
            stack.extend(v.keys())
            stack.extend(v.values())


def _query_fields(request: web.Request, route: Route | None) -> dict[str, Any]:
    fields = (route.fields or {}) if route is not None else {}
    out: dict[str, Any] = {}
    for name in request.query:
        values = request.query.getall(name)
        f = fields.get(name)
        types = () if f is None else f.types if isinstance(f.types, tuple) else (f.types,)
        if list in types:
            out[name] = values
            continue
        value = values[-1]
        if int in types and bool not in types:
            try:
                out[name] = int(value)
            except ValueError:
                raise BadRequest(f"{name} must be an integer", code="invalid_field") from None
        elif bool in types:
            if value.lower() not in ("true", "false", "1", "0"):
                raise BadRequest(f"{name} must be true or false", code="invalid_field")
            out[name] = value.lower() in ("true", "1")
        else:
            out[name] = value
    return out
