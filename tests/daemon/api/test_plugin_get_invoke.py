"""Invoking a plugin by GET, with extra path segments and a query: DSM's ``url``.

DSM hands ``run(input, url, method)`` the path's segments (``url.path``, extra
ones included) and the raw query string (``url.query``, absent without one).
Published plugins read them as e.g. ``url.path[6]`` and a ``requestId=`` in
``url.query`` after a GET on ``/sys/v1/plugins/invoke/{id}/{key id}``. Checked
over the socket (the frame's path carries the query) and over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Daemon, Raw, start_daemon, unique
from tests.daemon.api.helpers import err, new_app, new_group, ok
from tests.daemon.gateway.conftest import CONFIG, Http, gateway_url

ECHO = """
function run(input, url, method)
  local segs = {}
  for i, s in ipairs(url.path) do segs[i] = s end
  return { path = segs, n = #url.path, query = url.query, has_query = url.query ~= nil,
           method = method, input = input }
end"""

# The published pattern: an id in the 6th segment, a request id in the query.
BYOK = """
function run(input, url, method)
  if method == 'GET' then
    local id, query = url.path[6], url.query
    local request_id
    if query ~= nil and string.match(query, 'requestId') then
      request_id = string.match(query, 'requestId=([^&]*)')
    end
    return { kid = id, jti = request_id }
  end
  return { created = input.name }
end"""


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    dm = start_daemon(tmp_path_factory.mktemp("getinv"), config=CONFIG)
    dm.url = gateway_url(dm)  # type: ignore[attr-defined]
    yield dm
    assert dm.stop() == 0, dm.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def setup(d: Daemon) -> Iterator[dict[str, Any]]:
    admin = Raw(d.socket)
    admin.login(d.admin_key)
    g, other = new_group(admin), new_group(admin)
    app = new_app(d, admin, [g])
    outsider = new_app(d, admin, [other])

    def plugin(code: str) -> str:
        body = {"name": unique("p"), "source": {"language": "LUA", "code": code}, "groups": [g]}
        return ok(admin.call("POST", "/sys/v1/plugins", body))["plugin_id"]

    yield {
        "admin": admin,
        "app": app,
        "outsider": outsider,
        "echo": plugin(ECHO),
        "byok": plugin(BYOK),
    }
    app.conn.close()
    outsider.conn.close()
    admin.close()


def test_get_over_the_socket(setup) -> None:
    app, pid = setup["app"], setup["echo"]
    out = ok(app.call("GET", f"/sys/v1/plugins/invoke/{pid}"))
    assert out["path"] == ["sys", "v1", "plugins", "invoke", pid]
    assert out["has_query"] is False and out["method"] == "GET" and out.get("input") is None
    out = ok(app.call("GET", f"/sys/v1/plugins/invoke/{pid}/extra/seg%2Fment?requestId=42&x=%20y"))
    assert out["path"] == ["sys", "v1", "plugins", "invoke", pid, "extra", "seg%2Fment"]
    assert out["n"] == 7 and out["query"] == "requestId=42&x=%20y"
    out = ok(app.call("GET", f"/sys/v1/plugins/invoke/{pid}?"))
    assert out["has_query"] is True and out["query"] == ""


def test_post_with_extra_segments_and_a_query(setup) -> None:
    app, pid = setup["app"], setup["echo"]
    out = ok(app.call("POST", f"/sys/v1/plugins/{pid}/a/b?q=1", {"k": 1}))
    assert out == {
        "path": ["sys", "v1", "plugins", pid, "a", "b"],
        "n": 6,
        "query": "q=1",
        "has_query": True,
        "method": "POST",
        "input": {"k": 1},
    }
    out = ok(app.call("POST", f"/sys/v1/plugins/invoke/{pid}", {"k": 2}))
    assert out["path"] == ["sys", "v1", "plugins", "invoke", pid] and out["input"] == {"k": 2}
    # the plain form is unchanged: four segments, no query
    out = ok(app.call("POST", f"/sys/v1/plugins/{pid}", None))
    assert out["path"] == ["sys", "v1", "plugins", pid] and out["has_query"] is False


def test_the_published_pattern(setup) -> None:
    app, pid = setup["app"], setup["byok"]
    out = ok(app.call("GET", f"/sys/v1/plugins/invoke/{pid}/opq-123?requestId=abc-9"))
    assert out == {"kid": "opq-123", "jti": "abc-9"}
    assert ok(app.call("POST", f"/sys/v1/plugins/{pid}", {"name": "k1"})) == {"created": "k1"}


def test_who_may_invoke_and_the_audit(setup) -> None:
    admin, outsider, pid = setup["admin"], setup["outsider"], setup["echo"]
    err(outsider.call("GET", f"/sys/v1/plugins/invoke/{pid}/x?y=1"), "not_found")
    err(outsider.call("POST", f"/sys/v1/plugins/{pid}/x"), "not_found")
    out = setup["app"].call("GET", f"/sys/v1/plugins/invoke/{pid}/audited?secret=1")
    assert out["status"] == 200
    recs = ok(admin.call("GET", "/sys/v1/logs", {"object_id": pid, "limit": 50}))
    got = [r for r in recs if r["action"] == "GET /sys/v1/plugins/invoke/{plugin_id}"]
    assert got and got[0]["actor_id"] == setup["app"].id and got[0]["status"] == 200


def test_a_query_elsewhere_is_refused(setup) -> None:
    admin = setup["admin"]
    err(admin.call("GET", "/sys/v1/groups?limit=1"), "invalid_field")
    err(admin.call("POST", "/crypto/v1/keys/info?x=1", {"name": "nope"}), "invalid_field")
    # and a plugin's management routes take none either
    err(admin.call("GET", f"/sys/v1/plugins/{setup['echo']}?x=1"), "invalid_field")


def test_get_and_post_over_http(d: Daemon, setup) -> None:
    http = Http(d.url)  # type: ignore[attr-defined]
    http.login(setup["app"].api_key)
    pid = setup["echo"]
    try:
        r = http.call("GET", f"/sys/v1/plugins/invoke/{pid}/seg/two?requestId=7&a=%20b&limit=3")
        assert r["status"] == 200, r
        assert r["body"]["path"] == ["sys", "v1", "plugins", "invoke", pid, "seg", "two"]
        assert r["body"]["query"] == "requestId=7&a=%20b&limit=3"
        assert r["body"]["method"] == "GET" and r["body"].get("input") is None
        r = http.call("GET", f"/sys/v1/plugins/invoke/{pid}")
        assert r["body"]["has_query"] is False
        r = http.call("POST", f"/sys/v1/plugins/{pid}/x?q=%C3%A9", {"k": [1, 2]})
        assert r["status"] == 200, r
        assert r["body"]["path"] == ["sys", "v1", "plugins", pid, "x"]
        assert r["body"]["query"] == "q=%C3%A9" and r["body"]["input"] == {"k": [1, 2]}
        byok = setup["byok"]
        r = http.call("GET", f"/sys/v1/plugins/invoke/{byok}/opq-9?requestId=r-1")
        assert r["body"] == {"kid": "opq-9", "jti": "r-1"}
        # elsewhere over HTTP, GET queries are still body fields, and POST queries refused
        assert http.call("GET", "/sys/v1/plugins?limit=1")["status"] in (200, 403)
        assert http.call("POST", "/crypto/v1/keys/info?x=1", {"name": "n"})["status"] == 400
    finally:
        http.close()
