"""request{}: DSM's outbound HTTP call from a plugin, made by the daemon.

A local HTTP server on 127.0.0.1, started here, stands in for a cloud API.
The daemon under test has ``plugin_request_loopback_http`` on, so
``http://127.0.0.1:PORT`` origins may be allowlisted; the session daemon has
it off, and refuses them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from strongroomd import outbound

from tests.conftest import Daemon, Raw, start_daemon, unique
from tests.daemon.api.helpers import err, new_app, new_group, new_key, ok

BINARY = bytes(range(256)) * 4


class Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[dict[str, Any]] = []
        self.slow_arrived = threading.Event()
        self.release = threading.Event()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Upstream
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, ctype: str = "application/json", **hdrs: str):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in hdrs.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.server.seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers)}
        )
        route = parts.path
        if route == "/echo":
            out = {
                "method": self.command,
                "path": parts.path,
                "query": parts.query,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": base64.b64encode(body).decode(),
            }
            status = int(q.get("status", 200))
            self._answer(status, json.dumps(out).encode(), X_Reply="yes")
        elif route == "/binary":
            self._answer(200, BINARY, "application/octet-stream")
        elif route == "/slow":
            self.server.slow_arrived.set()
            self.server.release.wait(60)
            with contextlib.suppress(OSError):  # the daemon gave up on it long ago
                self._answer(200, b"{}")
        elif route == "/dribble":  # headers at once, then a byte now and then
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            with contextlib.suppress(OSError):
                while not self.server.release.wait(0.05):
                    self.wfile.write(b"d")
                    self.wfile.flush()
        elif route == "/big":
            self._answer(200, b"x" * (outbound.MAX_BODY + 1), "text/plain")
        elif route == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"y" * 65536
            for _ in range(outbound.MAX_BODY // len(chunk) + 2):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif route == "/loop":
            self.send_response(307)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route == "/redirect":
            self.send_response(int(q.get("code", 302)))
            self.send_header("Location", q["to"])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._answer(404, b'{"error":"nothing here"}')

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


def _serve() -> Iterator[Upstream]:
    server = Upstream()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    yield from _serve()


@pytest.fixture(scope="module")
def other() -> Iterator[Upstream]:
    """A second server: an origin that is not on the allowlist."""
    yield from _serve()


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("req"), config="plugin_request_loopback_http = true\n")
    yield d
    assert d.stop() == 0, d.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def admin(dev: Daemon) -> Iterator[tuple[Raw, str]]:
    conn = Raw(dev.socket)
    conn.login(dev.admin_key)
    yield conn, new_group(conn)
    conn.close()


def run(admin: tuple[Raw, str], code: str, allow: list[str], input_: Any = None, **extra: Any):
    conn, g = admin
    body = {"code": code, "input": input_ or {}, "groups": [g], "request_allowlist": allow}
    return ok(conn.call("POST", "/sys/v1/plugins/test", {**body, **extra}))


def result(out: dict[str, Any]) -> Any:
    assert out["status"] in (200, 204), (out.get("error"), out.get("traceback"))
    return out.get("result")


# What a plugin gets back from request{}, as data (a Blob body as base64).
SHOW = """
function show(r, e)
  if r == nil then return {error = {status = e.status, message = e.message}} end
  return {status = r.status, headers = r.headers, body = r.body:base64(),
          is_blob = pcall(function() return r.body:bytes() end)}
end
"""


def test_headers_json_bodies_and_status_codes(admin, upstream) -> None:
    code = (
        SHOW
        + """
    function run(input)
      local r = assert(request { method = 'POST', url = input.base .. '/echo?status=201&a=b%20c',
        headers = { ['Content-Type'] = 'application/json', ['X-Amz-Target'] = 'T.Op',
                    ['X-Count'] = 7 },
        body = json.encode({ hello = 'world', n = 3 }) })
      local sent = json.decode(r.body)   -- json.decode takes the Blob itself
      local nf = assert(request { method = 'GET', url = input.base .. '/nowhere' })
      -- spaces and non-ASCII are percent-encoded, as DSM's URL parser does
      local spaced = assert(request { url = input.base .. "/echo?q=SELECT Id FROM é" })
      local sp = json.decode(spaced.body)
      return { status = r.status, reply_header = r.headers['x-reply'],
               ctype = r.headers['content-type'], sent = sent, nf = nf.status,
               nf_body = json.decode(nf.body).error, spaced = sp.query }
    end"""
    )
    out = result(run(admin, code, [upstream.origin], {"base": upstream.origin}))
    assert out["status"] == 201 and out["reply_header"] == "yes"
    assert out["ctype"] == "application/json"
    sent = out["sent"]
    assert sent["method"] == "POST" and sent["path"] == "/echo"
    assert sent["query"] == "status=201&a=b%20c"  # the URL goes out exactly as given
    assert sent["headers"]["x-amz-target"] == "T.Op" and sent["headers"]["x-count"] == "7"
    assert sent["headers"]["content-type"] == "application/json"
    assert "accept-encoding" not in sent["headers"]  # nothing asked for that the plugin did not
    assert json.loads(base64.b64decode(sent["body"])) == {"hello": "world", "n": 3}
    assert out["nf"] == 404 and out["nf_body"] == "nothing here"
    assert out["spaced"] == "q=SELECT%20Id%20FROM%20%C3%A9"


def test_binary_bodies_both_ways(admin, upstream) -> None:
    code = (
        SHOW
        + """
    function run(input)
      local blob = Blob.from_base64(input.data)
      local r = assert(request { method = 'PUT', url = input.base .. '/echo', body = blob })
      local b = assert(request { method = 'GET', url = input.base .. '/binary' })
      local h = assert(request { method = 'HEAD', url = input.base .. '/binary' })
      return { echoed = json.decode(r.body).body, got = show(b), head = show(h) }
    end"""
    )
    data = base64.b64encode(BINARY).decode()
    out = result(run(admin, code, [upstream.origin], {"base": upstream.origin, "data": data}))
    assert base64.b64decode(out["echoed"]) == BINARY
    assert out["got"]["is_blob"] and base64.b64decode(out["got"]["body"]) == BINARY
    assert out["head"]["status"] == 200 and out["head"]["body"] == ""


def test_off_by_default_and_only_allowlisted_origins(admin, upstream, other) -> None:
    code = (
        SHOW
        + """
    function run(input)
      local r, e = request { method = 'GET', url = input.url }
      return show(r, e)
    end"""
    )
    # no allowlist at all
    out = result(run(admin, code, [], {"url": upstream.origin + "/echo"}))
    assert out["error"]["status"] == 403 and "request_allowlist" in out["error"]["message"]
    # another origin (another port) than the one allowed
    out = result(run(admin, code, [upstream.origin], {"url": other.origin + "/echo"}))
    assert out["error"]["status"] == 403
    assert other.seen == []
    # allowed
    out = result(run(admin, code, [upstream.origin], {"url": upstream.origin + "/echo"}))
    assert out["status"] == 200
    # https is not http: the scheme is part of the origin
    https = f"https://127.0.0.1:{upstream.server_address[1]}/echo"
    out = result(run(admin, code, [upstream.origin], {"url": https}))
    assert out["error"]["status"] == 403
    # the loopback wildcard port (dev setting) allows any port on 127.0.0.1
    out = result(run(admin, code, ["http://127.0.0.1:*"], {"url": other.origin + "/echo"}))
    assert out["status"] == 200


def test_addresses_never_reachable_even_when_listed(admin) -> None:
    code = (
        SHOW
        + """
    function run(input)
      local out = {}
      for i, url in ipairs(input.urls) do
        local r, e = request { method = 'GET', url = url }
        out[i] = show(r, e).error
      end
      return out
    end"""
    )
    urls = ["https://169.254.169.254/latest/meta-data", "https://[::1]/", "https://localhost/"]
    allow = ["https://169.254.169.254", "https://[::1]", "https://localhost"]
    out = result(run(admin, code, allow, {"urls": urls}))
    assert [e["status"] for e in out] == [403, 403, 403], out
    assert all("not reachable" in e["message"] for e in out), out


def test_bad_arguments(admin, upstream) -> None:
    code = (
        SHOW
        + """
    function run(input)
      local base = input.base
      local cases = {
        { method = 'BREW', url = base .. '/echo' },
        { url = 'ftp://127.0.0.1/x' },
        { url = 'http://user:pw@127.0.0.1:1/x' },
        { url = base .. '/echo', headers = { ['Bad Name'] = 'x' } },
        { url = base .. '/echo', headers = { ['X-A'] = 'a\\r\\nInjected: yes' } },
        { url = base .. '/echo', headers = { Host = 'elsewhere.example' } },
        { url = base .. '/echo', headers = { ['Transfer-Encoding'] = 'chunked' } },
        { url = base .. '/echo\tcontrol' },
      }
      local out = {}
      for i, t in ipairs(cases) do
        local r, e = request(t)
        out[i] = e and e.status or r.status
      end
      -- a Host header naming the URL's own host is fine (a published plugin signs it)
      local same = assert(request { url = base .. '/echo', headers = { host = input.hostport } })
      local ok1 = pcall(request, 'https://example.com')
      local ok2 = pcall(request, { url = base, body = {} })
      return { statuses = out, not_a_table = ok1, bad_body = ok2, same_host = same.status }
    end"""
    )
    hostport = upstream.origin.removeprefix("http://")
    out = result(
        run(admin, code, [upstream.origin], {"base": upstream.origin, "hostport": hostport})
    )
    assert out["statuses"] == [400] * 8 and out["same_host"] == 200
    assert out["not_a_table"] is False and out["bad_body"] is False
    assert all("Injected" not in str(s["headers"]) for s in upstream.seen)


def test_redirects_followed_only_within_the_allowlist(admin, upstream, other) -> None:
    code = (
        SHOW
        + """
    function run(input)
      local r1, e1 = request { method = 'POST', url = input.inside, body = 'x',
        headers = { Authorization = 'Bearer secret' } }
      local r2, e2 = request { method = 'GET', url = input.outside }
      local r3, e3 = request { method = 'GET', url = input.loop }
      return { inside = show(r1, e1), outside = show(r2, e2), loop = show(r3, e3) }
    end"""
    )
    base = upstream.origin
    inside = f"{base}/redirect?code=303&to={base}/echo%3Fafter%3D1"
    outside = f"{base}/redirect?code=302&to={other.origin}/echo"
    loop = f"{base}/loop"
    seen_before = len(other.seen)
    out = result(run(admin, code, [base], {"inside": inside, "outside": outside, "loop": loop}))
    echoed = json.loads(base64.b64decode(out["inside"]["body"]))
    assert out["inside"]["status"] == 200 and echoed["method"] == "GET"  # 303: GET, no body
    assert echoed["query"] == "after=1" and echoed["body"] == ""
    assert echoed["headers"]["authorization"] == "Bearer secret"  # same origin: kept
    assert out["outside"]["error"]["status"] == 403
    assert "request_allowlist" in out["outside"]["error"]["message"]
    assert len(other.seen) == seen_before  # the hop off the allowlist was never made
    assert out["loop"]["error"]["status"] == 502 and "redirects" in out["loop"]["error"]["message"]


def test_a_redirect_to_another_origin_carries_no_credentials(admin, upstream, other) -> None:
    code = (
        SHOW
        + """
    function run(input)
      local r, e = request { method = 'POST', url = input.url, body = 'x', headers = {
        Authorization = 'Bearer secret', ['X-Api-Key'] = 'k3y', Cookie = 'c=1',
        Accept = 'application/json', ['Content-Type'] = 'text/plain' } }
      return show(r, e)
    end"""
    )
    url = f"{upstream.origin}/redirect?code=307&to={other.origin}/echo"
    out = result(run(admin, code, [upstream.origin, other.origin], {"url": url}))
    echoed = json.loads(base64.b64decode(out["body"]))
    assert out["status"] == 200 and echoed["method"] == "POST"
    assert base64.b64decode(echoed["body"]) == b"x"  # 307: the body goes on
    sent = {k.lower() for k in echoed["headers"]}
    assert {"accept", "content-type"} <= sent
    assert not sent & {"authorization", "x-api-key", "cookie"}, echoed["headers"]


def test_oversized_responses_and_request_bodies(admin, upstream) -> None:
    code = (
        SHOW
        + """
    function run(input)
      local r1, e1 = request { url = input.base .. '/big' }
      local r2, e2 = request { url = input.base .. '/big-chunked' }
      local r3, e3 = request { method = 'POST', url = input.base .. '/echo',
        body = string.rep('z', input.max + 1) }
      return { declared = show(r1, e1), chunked = show(r2, e2), sent = show(r3, e3) }
    end"""
    )
    inp = {"base": upstream.origin, "max": outbound.MAX_BODY}
    out = result(run(admin, code, [upstream.origin], inp))
    assert out["declared"]["error"]["status"] == 502
    assert out["chunked"]["error"]["status"] == 502
    assert out["sent"]["error"]["status"] == 413


def test_too_many_requests_and_the_audit_trail(admin, dev, upstream) -> None:
    conn, _ = admin
    code = """
    function run(input)
      local n = 0
      for i = 1, 1000 do
        local r, e = request { url = input.base .. '/echo?secret=hunter2' }
        if r == nil then return nil, e end
        n = n + 1
      end
      return n
    end"""
    out = run(admin, code, [upstream.origin], {"base": upstream.origin})
    assert out["status"] == 429, out
    inv = out["invocation_id"]
    records = ok(conn.call("GET", "/sys/v1/logs", {"invocation_id": inv, "limit": 1000}))
    reqs = [r for r in records if r["action"] == "plugin.request"]
    assert len(reqs) == outbound.MAX_REQUESTS + 1  # each one made, and the refusal
    assert sum(r["status"] == 200 for r in reqs) == outbound.MAX_REQUESTS
    refused = [r for r in reqs if r["status"] == 429]
    assert len(refused) == 1 and refused[0]["code"] == "busy"
    first = next(r for r in reqs if r["status"] == 200)
    assert first["detail"] == {"method": "GET", "url": upstream.origin + "/echo", "query": True}
    assert "hunter2" not in json.dumps(records)


def test_timeout_while_a_bystander_keeps_working(admin, dev, upstream) -> None:
    conn, g = admin
    app = new_app(dev, conn, [g])
    key = new_key(app.conn, g)
    code = (
        SHOW
        + """
    function run(input)
      local r, e = request { url = input.base .. '/slow' }
      return show(r, e)
    end"""
    )
    got: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: got.update(
            run(
                admin,
                code,
                [upstream.origin],
                {"base": upstream.origin},
                limits={"wall_seconds": 3},
            )
        )
    )
    t.start()
    assert upstream.slow_arrived.wait(30)
    for _ in range(20):  # served while the plugin waits on its upstream
        body = {
            "key": {"kid": key["kid"]},
            "alg": "AES",
            "mode": "CBC",
            "plain": b"16 bytes, plain.",
        }
        assert ok(app.call("POST", "/crypto/v1/encrypt", body))["cipher"]
    t.join(60)
    assert not t.is_alive()
    out = result(got)
    assert out["error"]["status"] == 504, out
    app.conn.close()


def test_a_body_that_never_ends_is_cut_at_the_deadline(admin, upstream) -> None:
    code = (
        SHOW
        + """
    function run(input)
      local r, e = request { url = input.base .. '/dribble' }
      return show(r, e)
    end"""
    )
    inp = {"base": upstream.origin}
    out = result(run(admin, code, [upstream.origin], inp, limits={"wall_seconds": 2}))
    assert out["error"]["status"] == 504, out


def test_stored_plugin_allowlist_is_admin_set_and_checked(dev, admin, upstream) -> None:
    conn, g = admin
    app = new_app(dev, conn, [g])
    code = "function run(input) return assert(request{url = input.url}).status end"
    body = {"name": unique("p"), "source": {"language": "LUA", "code": code}, "groups": [g]}
    for bad in (
        ["http://example.com"],
        ["https://*.com"],
        ["https://example.com/path"],
        ["https://example.com:*"],
        ["ftp://example.com"],
        "https://example.com",
    ):
        code_ = "invalid_value" if isinstance(bad, list) else "invalid_field"
        err(conn.call("POST", "/sys/v1/plugins", {**body, "request_allowlist": bad}), code_)
    p = ok(conn.call("POST", "/sys/v1/plugins", body))
    assert p["request_allowlist"] == []
    pid = p["plugin_id"]
    denied = app.call("POST", f"/sys/v1/plugins/{pid}", {"url": upstream.origin + "/echo"})
    assert denied["status"] == 403, denied
    # an app may not set it
    refused = app.call("PATCH", f"/sys/v1/plugins/{pid}", {"request_allowlist": [upstream.origin]})
    assert refused["status"] == 403
    allow = ["HTTPS://API.Example.COM:443/", upstream.origin, "https://*.vault.azure.net"]
    p = ok(conn.call("PATCH", f"/sys/v1/plugins/{pid}", {"request_allowlist": allow}))
    assert p["request_allowlist"] == [
        "https://api.example.com",
        upstream.origin,
        "https://*.vault.azure.net",
    ]
    assert ok(app.call("POST", f"/sys/v1/plugins/{pid}", {"url": upstream.origin + "/echo"})) == 200
    ok(conn.call("PATCH", f"/sys/v1/plugins/{pid}", {"request_allowlist": []}))
    again = app.call("POST", f"/sys/v1/plugins/{pid}", {"url": upstream.origin + "/echo"})
    assert again["status"] == 403
    app.conn.close()


def test_loopback_http_needs_the_daemon_setting(daemon: Daemon, admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    code = "function run() return 1 end"
    body = {"name": unique("p"), "source": {"language": "LUA", "code": code}, "groups": [g]}
    resp = admin_raw.call(
        "POST", "/sys/v1/plugins", {**body, "request_allowlist": ["http://127.0.0.1:80"]}
    )
    assert err(resp, "invalid_value")["message"].find("plugin_request_loopback_http") > 0
    ok(
        admin_raw.call(
            "POST", "/sys/v1/plugins", {**body, "request_allowlist": ["https://example.com"]}
        )
    )


def test_origin_parsing() -> None:
    parse = outbound.parse_origin
    assert str(parse("https://Example.com", loopback_http=False)) == "https://example.com"
    assert (
        str(parse("https://example.com:8443/", loopback_http=False)) == "https://example.com:8443"
    )
    wild = parse("https://*.vault.azure.net", loopback_http=False)
    assert wild.allows("https", "kv1.vault.azure.net", 443)
    assert not wild.allows("https", "vault.azure.net", 443)
    assert not wild.allows("https", "evilvault.azure.net", 443)
    assert not wild.allows("https", "kv1.vault.azure.net", 8443)
    assert str(parse("http://127.0.0.1:*", loopback_http=True)) == "http://127.0.0.1:*"
    assert outbound.refused_address("::ffff:127.0.0.1", loopback_http=False)
    assert outbound.refused_address("169.254.169.254", loopback_http=True)
    assert not outbound.refused_address("10.1.2.3", loopback_http=False)
    assert not outbound.refused_address("127.0.0.1", loopback_http=True)
