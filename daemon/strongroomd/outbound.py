"""Plugins' outbound HTTP (DSM's ``request{}``), made by the daemon, never the worker.

The sandbox worker has no network at all (a seccomp filter refuses it every
socket, see :mod:`strongroomd._sandbox.worker`); a plugin's ``request{method,
url, headers, body}`` travels over the worker's channel like its API calls and
ends here. Off by default: a plugin may reach only the origins an admin put in
its ``request_allowlist``:

- ``https://host`` or ``https://host:port``; ``https://*.example.com`` for any
  name under ``example.com`` (not ``example.com`` itself);
- ``http://127.0.0.1:PORT`` or ``http://127.0.0.1:*``, only while the daemon's
  ``plugin_request_loopback_http`` setting is on (tests and development).

Whatever a name resolves to, the daemon never connects to a loopback,
link-local (cloud metadata at 169.254.169.254 included), multicast or
unspecified address (the loopback entries above excepted): the address is
checked when the socket is made, so a DNS answer cannot route around it.

Bounds, per request: connect within :data:`CONNECT_TIMEOUT`, the whole
exchange within :data:`TOTAL_TIMEOUT` and within what is left of the
invocation's wall clock (less :data:`MARGIN`, so the plugin can still handle
the error); a body of at most :data:`MAX_BODY` bytes each way; at most
:data:`MAX_REQUESTS` requests per invocation (redirect hops included).
Redirects (301, 302, 303, 307, 308) are followed, at most
:data:`MAX_REDIRECTS`, only to allowlisted origins; a hop elsewhere ends the
request with 403. Proxy settings in the environment are ignored; headers and
bodies go out exactly as the plugin gave them (no compression is asked for or
undone).

Every request is an audit record ``plugin.request`` under the invocation:
method, URL without its query string, status; never headers or bodies.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from strongroomd.audit import Audit, Kind
from strongroomd.auth import Principal
from strongroomd.errors import (
    ApiError,
    BadRequest,
    Busy,
    Forbidden,
    TimeLimit,
    TooLarge,
)

CONNECT_TIMEOUT = 5.0
TOTAL_TIMEOUT = 30.0
#: Taken off the invocation's remaining wall clock: the plugin gets its 504 back
#: and can answer before the sandbox's own deadline kills it.
MARGIN = 0.5
MAX_BODY = 2 * 1024 * 1024
MAX_REQUESTS = 50
MAX_REDIRECTS = 5
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16 * 1024
MAX_URL = 8192
MAX_ALLOWLIST = 32
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Set by the daemon from the URL and body, or about the connection: never the plugin's.
_REFUSED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: The plugin's headers that follow a redirect to another (allowlisted) origin.
_KEPT_ACROSS = frozenset(
    {"accept", "accept-language", "content-language", "content-type", "user-agent"}
)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_ORIGIN = re.compile(
    r"^(?P<scheme>https?)://(?P<wild>\*\.)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)"
    r"(?::(?P<port>\*|[0-9]{1,5}))?/?$",
    re.IGNORECASE,
)
_ENCODED = frozenset(' "<>`{}|\\^')
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
LOOPBACK = "127.0.0.1"


class BadGateway(ApiError):
    """The remote end failed: no connection, TLS, a broken or oversized answer (502).

    Only ever the Error a plugin's ``request{}`` returns, never an API response of
    its own (a plugin that hands it back ends with its status as ``plugin_error``),
    so it is not in :data:`strongroomd.errors.BY_CODE` nor the wire's codes.
    """

    status = 502
    codes = ("bad_gateway",)


@dataclass(frozen=True, slots=True)
class Origin:
    """One allowlist entry: scheme, host (``*.`` prefix: any name below it), port (None: any)."""

    scheme: str
    host: str
    port: int | None
    wildcard: bool = False

    def __str__(self) -> str:
        host = ("*." if self.wildcard else "") + self.host
        if self.port is None:
            return f"{self.scheme}://{host}:*"
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")

    def allows(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or (self.port is not None and port != self.port):
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def parse_origin(text: Any, *, loopback_http: bool) -> Origin:
    """An allowlist entry, checked; BadRequest naming what is wrong with it."""
    if not isinstance(text, str) or not (m := _ORIGIN.match(text.strip())):
        raise BadRequest(
            f"request_allowlist: {text!r} is not an origin like https://host or https://host:port",
            code="invalid_value",
        )
    scheme, host, port_text = m["scheme"].lower(), m["host"].lower(), m["port"]
    wildcard = m["wild"] is not None
    if scheme == "http":
        if host != LOOPBACK or wildcard or port_text is None:
            raise BadRequest(
                f"request_allowlist: {text!r}: plain http is allowed only as "
                f"http://{LOOPBACK}:PORT (or :*), for tests",
                code="invalid_value",
            )
        if not loopback_http:
            raise BadRequest(
                f"request_allowlist: {text!r}: http://{LOOPBACK} origins need the daemon "
                "setting plugin_request_loopback_http (tests and development only)",
                code="invalid_value",
            )
    elif port_text == "*":
        raise BadRequest(
            f"request_allowlist: {text!r}: an https origin names its port (default 443)",
            code="invalid_value",
        )
    port = None if port_text == "*" else int(port_text) if port_text else 443
    if port is not None and not 1 <= port <= 65535:
        raise BadRequest(f"request_allowlist: {text!r}: bad port", code="invalid_value")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise BadRequest(
                f"request_allowlist: {text!r}: bad IPv6 address", code="invalid_value"
            ) from None
        if wildcard:
            raise BadRequest(
                f"request_allowlist: {text!r}: no wildcard on an address", code="invalid_value"
            )
    else:
        host = host.rstrip(".")
        labels = host.split(".")
        if not all(_LABEL.match(label) for label in labels) or len(host) > 253:
            raise BadRequest(f"request_allowlist: {text!r}: bad host name", code="invalid_value")
        if wildcard and len(labels) < 2:
            raise BadRequest(
                f"request_allowlist: {text!r}: a wildcard needs a domain of two labels or more",
                code="invalid_value",
            )
    return Origin(scheme, host, port, wildcard)


def check_allowlist(value: Any, *, loopback_http: bool) -> list[str]:
    """A plugin's ``request_allowlist`` as stored: canonical origins, no duplicates."""
    if not isinstance(value, list):
        raise BadRequest("request_allowlist must be an array of origins", code="invalid_field")
    if len(value) > MAX_ALLOWLIST:
        raise BadRequest(
            f"request_allowlist: at most {MAX_ALLOWLIST} origins", code="invalid_value"
        )
    out: list[str] = []
    for entry in value:
        canon = str(parse_origin(entry, loopback_http=loopback_http))
        if canon not in out:
            out.append(canon)
    return out


def _allowed(entries: list[str], url: URL, loopback_http: bool) -> bool:
    host = (url.host or "").lower().rstrip(".")
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address, written as in the allowlist
    if url.scheme == "https" or loopback_http:
        for entry in entries:
            try:
                origin = parse_origin(entry, loopback_http=loopback_http)
            except BadRequest:
                continue  # an http entry while the setting is off: it opens nothing
            if origin.allows(url.scheme, host, url.port or 0):
                return True
    return False


def refused_address(addr: str, *, loopback_http: bool) -> bool:
    """Whether the daemon must not connect to ``addr`` for a plugin."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one (mapped, 6to4, Teredo's client) is
        # judged as that IPv4 address.
        teredo = ip.teredo[1] if ip.teredo else None
        ip = ip.ipv4_mapped or ip.sixtofour or teredo or ip
    if loopback_http and str(ip) == LOOPBACK:
        return False
    if ip in _METADATA:
        return True
    return bool(
        ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or (isinstance(ip, ipaddress.IPv4Address) and ip in _BROADCAST)
    )


_BROADCAST = ipaddress.IPv4Network("255.255.255.255/32")
#: Cloud metadata services outside link-local: AWS's IPv6 one, Alibaba's.
_METADATA = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)


class _RefusedAddress(OSError):
    pass


def redact(url: URL) -> str:
    """The URL for the audit log: no user info, no query string, no fragment."""
    port = "" if url.explicit_port is None else f":{url.explicit_port}"
    return f"{url.scheme}://{url.raw_host}{port}{url.raw_path}"


def _url(text: Any) -> URL:
    if not isinstance(text, str) or not text:
        raise BadRequest("request: url must be a string", code="invalid_field")
    if len(text) > MAX_URL:
        raise BadRequest(f"request: the url is over {MAX_URL} characters", code="invalid_value")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise BadRequest("request: the url has control characters", code="invalid_value")
    # As a browser's (and DSM's) URL parser does: what may not stand in a request
    # line is percent-encoded (a published plugin sends a query with spaces);
    # everything else goes out exactly as given, so signatures over it hold.
    text = "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in _ENCODED else quote(c, safe="") for c in text
    )
    try:
        url = URL(text, encoded=True)  # sent exactly as given: signatures cover it
    except ValueError:
        raise BadRequest(f"request: {text!r} is not a URL", code="invalid_value") from None
    if url.scheme not in ("http", "https") or not url.host or not url.is_absolute():
        raise BadRequest(
            f"request: {redact_text(text)} is not an absolute http(s) URL", code="invalid_value"
        )
    if url.user is not None or url.password is not None:
        raise BadRequest(
            "request: credentials in the URL are not allowed (send an Authorization header)",
            code="invalid_value",
        )
    return url.with_fragment(None)


def redact_text(text: str) -> str:
    return text.split("?", 1)[0][:200]


def _headers(value: Any, url: URL, body: bytes) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(
            "request: headers must be a table of names to values", code="invalid_field"
        )
    if len(value) > MAX_HEADERS:
        raise BadRequest(f"request: at most {MAX_HEADERS} headers", code="invalid_value")
    out: dict[str, str] = {}
    size = 0
    for name, raw in value.items():
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise BadRequest(f"request: bad header name {name!r}", code="invalid_value")
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise BadRequest(f"request: header {name} must be a string", code="invalid_value")
        text = raw if isinstance(raw, str) else str(raw)
        if any(c in text for c in "\r\n\0"):
            raise BadRequest(f"request: header {name} has a line break", code="invalid_value")
        size += len(name) + len(text)
        lower = name.lower()
        if lower in _REFUSED_HEADERS:
            raise BadRequest(
                f"request: the daemon sets {name} itself; leave it out", code="invalid_value"
            )
        if lower == "host":
            want = {url.raw_host or "", f"{url.raw_host}:{url.port}"}
            if text.lower() not in {w.lower() for w in want}:
                raise BadRequest(
                    "request: the Host header must name the URL's host", code="invalid_value"
                )
            continue  # the URL's own, as the daemon sends it
        if lower == "content-length":
            if text.strip() != str(len(body)):
                raise BadRequest(
                    "request: Content-Length does not match the body", code="invalid_value"
                )
            continue
        out[name] = text
    if size > MAX_HEADER_BYTES:
        raise BadRequest(f"request: headers over {MAX_HEADER_BYTES} bytes", code="invalid_value")
    return out


def _body(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, (bytes, bytearray)):
        raise BadRequest("request: body must be a string or a Blob", code="invalid_field")
    if len(value) > MAX_BODY:
        raise TooLarge(f"request: the body is over {MAX_BODY} bytes")
    return bytes(value)


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Requests:
    """One invocation's outbound requests: its count, its connections, its audit records."""

    def __init__(
        self,
        audit: Audit,
        *,
        loopback_http: bool,
        plugin_id: str,
        invocation_id: str,
    ) -> None:
        self.audit = audit
        self.loopback_http = loopback_http
        self.plugin_id = plugin_id
        self.invocation_id = invocation_id
        self.count = 0
        self._session: aiohttp.ClientSession | None = None
        #: The loopback exception holds for the request to http://127.0.0.1 being made
        #: (requests are one at a time), never for a name that resolves to it.
        self._loopback_now = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                ssl=ssl.create_default_context(),
                limit=4,
                use_dns_cache=False,
                socket_factory=self._socket,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # no proxies, no .netrc
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )
        return self._session

    def _socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """Every connection's socket: the address checked just before connecting."""
        family, kind, proto, _, sockaddr = addr_info
        if refused_address(str(sockaddr[0]), loopback_http=self._loopback_now):
            raise _RefusedAddress(f"the address {sockaddr[0]} is not reachable by plugins")
        return socket.socket(family, kind, proto)

    async def handle(
        self, msg: dict[str, Any], *, allowlist: list[str], principal: Principal, timeout: float
    ) -> tuple[int, Any]:
        """A worker's ``{"t": "http", ...}``: (200, the response) or (status, error body)."""
        try:
            reply = await self._request(msg, allowlist, principal, timeout)
        except ApiError as exc:
            return exc.status, exc.body()
        return 200, {"status": reply.status, "headers": reply.headers, "body": reply.body}

    async def _request(
        self, msg: dict[str, Any], allowlist: list[str], principal: Principal, timeout: float
    ) -> Reply:
        method = msg.get("method")
        if not isinstance(method, str) or method.upper() not in METHODS:
            raise BadRequest(
                f"request: method must be one of {', '.join(sorted(METHODS))}",
                code="invalid_value",
            )
        method = method.upper()
        url = _url(msg.get("url"))
        body = _body(msg.get("body"))
        headers = _headers(msg.get("headers"), url, body)
        if not allowlist:
            raise Forbidden(
                "request: this plugin may not make outbound requests (its request_allowlist "
                "is empty; an admin sets it)"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(TOTAL_TIMEOUT, timeout - MARGIN)
        for hop in range(MAX_REDIRECTS + 1):
            reply = await self._one(method, url, headers, body, allowlist, principal, deadline)
            location = reply.headers.get("location")
            if reply.status not in (301, 302, 303, 307, 308) or location is None:
                return reply
            if hop == MAX_REDIRECTS:
                raise BadGateway(f"request: more than {MAX_REDIRECTS} redirects")
            try:
                nxt = url.join(URL(location, encoded=True)).with_fragment(None)
            except ValueError:
                raise BadGateway("request: a redirect to a URL that cannot be read") from None
            if reply.status == 303 or (reply.status in (301, 302) and method == "POST"):
                method, body = ("GET" if method != "HEAD" else "HEAD"), b""
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            if (nxt.scheme, nxt.host, nxt.port) != (url.scheme, url.host, url.port):
                # Credentials meant for one origin never follow a redirect to another:
                # not only Authorization and Cookie, any header may carry one (X-Api-Key,
                # a signature over this request), so only content negotiation goes on.
                headers = {k: v for k, v in headers.items() if k.lower() in _KEPT_ACROSS}
            url = nxt
        raise AssertionError("unreachable")

    async def _one(
        self,
        method: str,
        url: URL,
        headers: dict[str, str],
        body: bytes,
        allowlist: list[str],
        principal: Principal,
        deadline: float,
    ) -> Reply:
        self.count += 1  # every attempt counts, refused ones too: the audit stays bounded
        if self.count > MAX_REQUESTS:
            if self.count == MAX_REQUESTS + 1:
                self._record(principal, method, url, Busy.status, "busy")
            raise Busy(f"request: more than {MAX_REQUESTS} requests in one invocation")
        status, code = 0, None
        try:
            try:
                reply = await self._send(method, url, headers, body, allowlist, deadline)
            except ApiError as exc:
                status, code = exc.status, exc.code
                raise
            status = reply.status
            return reply
        finally:
            if status and code != "unavailable":  # unavailable: the audit log cannot take it
                self._record(principal, method, url, status, code)

    def _record(
        self, principal: Principal, method: str, url: URL, status: int, code: str | None
    ) -> None:
        self.audit.record(
            "plugin.request",
            actor=principal,
            object_id=self.plugin_id,
            status=status,
            code=code,
            invocation_id=self.invocation_id,
            detail={
                "method": method,
                "url": redact(url)[:1024],
                "query": bool(url.raw_query_string),
            },
        )

    async def _send(
        self,
        method: str,
        url: URL,
        headers: dict[str, str],
        body: bytes,
        allowlist: list[str],
        deadline: float,
    ) -> Reply:
        self.audit.admit(Kind.USE)  # 503 when its record could not be kept: nothing sent
        if not _allowed(allowlist, url, self.loopback_http):
            raise Forbidden(f"request: {redact(url)} is not in this plugin's request_allowlist")
        if (
            url.host
            and _is_ip(url.host)
            and refused_address(url.host, loopback_http=self.loopback_http)
        ):
            raise Forbidden(f"request: the address {url.host} is not reachable by plugins")
        self._loopback_now = self.loopback_http and url.scheme == "http" and url.host == LOOPBACK
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeLimit("request: no time left in this invocation")
        timeout = aiohttp.ClientTimeout(total=left, connect=min(CONNECT_TIMEOUT, left))
        if "User-Agent" not in headers and "user-agent" not in {k.lower() for k in headers}:
            headers = {**headers, "User-Agent": "strongroomd"}
        try:
            async with self._client().request(
                method,
                url,
                headers=headers,
                data=body if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS") else None,
                allow_redirects=False,
                timeout=timeout,
                max_line_size=16384,
                max_field_size=16384,
            ) as resp:
                declared = resp.content_length
                if declared is not None and declared > MAX_BODY:
                    raise BadGateway(f"request: the response is over {MAX_BODY} bytes")
                data = await _read(resp)
                return Reply(resp.status, _reply_headers(resp), data)
        except ApiError:
            raise
        except TimeoutError:
            raise TimeLimit(
                f"request: {redact(url)} did not answer in time (the invocation's time, "
                f"at most {TOTAL_TIMEOUT:g} s)"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, _RefusedAddress):
                raise Forbidden(f"request: {exc.os_error}") from None
            raise BadGateway(f"request: cannot connect to {redact(url)}: {exc.os_error}") from None
        except aiohttp.ClientSSLError as exc:
            raise BadGateway(f"request: TLS with {url.host} failed: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise BadGateway(f"request: {redact(url)}: {type(exc).__name__}: {exc}"[:400]) from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_BODY:
            resp.close()
            raise BadGateway(f"request: the response is over {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reply_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """Lower-case names (as DSM gives them); repeated headers joined with ", "."""
    out: dict[str, str] = {}
    for name, value in resp.headers.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out
