"""The web console in headless Chromium (Debian's, driven by Playwright; never downloaded).

One scenario, as a person would use it: log in, make a group, a key and an
app, write a plugin in the editor, test it, break it and follow the
traceback to the line, save it, invoke it and read its nested audit trail.
Screenshots go to test-output/screenshots/.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import strongroom

from tests.conftest import Raw, unique
from tests.daemon.gateway.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = ROOT / "test-output" / "screenshots"
#: The console's one date format (UTC), with and without milliseconds.
DATE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
DATE_MS = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}")
COMPACT_DATE = re.compile(r"\d{8}T\d{6}Z")

GOOD = """-- encrypt the input's text with the named key
function run(input)
  local key = assert(Sobject { name = input.key })
  local out = assert(key:encrypt { plain = Blob.from_bytes(input.text), alg = "AES" })
  print("encrypted", #input.text, "bytes")
  return { size = #out.cipher, kid = key.kid }
end
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "chromium is missing: scripts/test installs it (apt)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, http_daemon: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)  # a wait's bound on a loaded machine, not a latency check
    pg.problems = []
    pg.on("pageerror", lambda e: pg.problems.append(f"page error: {e}"))
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(m.text))
    # Every asset comes from the gateway itself: anything else would be a bug.
    pg.route(
        lambda url: not url.startswith(http_daemon.url),
        lambda route: (pg.problems.append(f"external request {route.request.url}"), route.abort()),
    )
    yield pg
    ctx.close()


def shot(pg: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"console-{name}.png"), full_page=True)


def cm(pg: Any, js: str) -> Any:
    return pg.evaluate(
        f"(() => {{ const cm = document.querySelector('.CodeMirror').CodeMirror; {js} }})()"
    )


def rows(pg: Any, column: str) -> list[str]:
    return pg.locator(f"#audit-list .audit-row .{column}").all_text_contents()


def until(check: Any, timeout: float = 30.0) -> None:
    """Poll ``check`` (the page's CSP forbids wait_for_function's eval)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_console_scenario(page: Any, http_daemon: Any) -> None:
    pg = page
    pg.goto(f"{http_daemon.url}/")
    pg.wait_for_selector("#view-login:not([hidden])")
    assert not pg.is_visible("#nav") and not pg.is_visible("#who")  # nothing to navigate yet
    shot(pg, "0-login")
    pg.fill("#login-key", "bm9ib2R5Om5vdGhpbmc=")  # nobody:nothing
    pg.click("#login-form button")
    pg.wait_for_selector("#flash:not([hidden])")
    assert "Log in failed" in pg.text_content("#flash")
    pg.problems.clear()  # the refused login logged its 401
    pg.fill("#login-key", http_daemon.admin_key)
    pg.click("#login-form button")
    pg.wait_for_selector("#view-keys:not([hidden])")
    assert "admin" in pg.text_content("#who-name")
    assert not pg.is_visible("#flash")  # the failed login's message went with it
    assert pg.is_visible("#nav button[data-view=apps]") and pg.is_visible("#nav")

    # A group, a key in it, an app in it (whose API key shows once).
    group, key, app = unique("cg"), unique("ck"), unique("ca")
    pg.click("#nav button[data-view=groups]")
    pg.fill("#group-form [name=name]", group)
    pg.click("#group-form button")
    pg.wait_for_selector(f"#groups-table td:text-is('{group}')")
    created = pg.locator("#groups-table tr", has_text=group).locator("td").nth(3).text_content()
    assert DATE.fullmatch(created), created
    pg.click("#nav button[data-view=keys]")
    # The new-key form shows only the fields the chosen type takes.
    assert pg.is_visible("#key-size-field") and not pg.is_visible("#key-curve-field")
    for kind, size, curve in [("EC", False, True), ("DES3", False, False), ("RSA", True, False)]:
        pg.select_option("#key-form [name=obj_type]", kind)
        assert pg.is_visible("#key-size-field") == size, kind
        assert pg.is_visible("#key-curve-field") == curve, kind
    assert pg.input_value("#key-form [name=key_size]") == "2048"
    pg.select_option("#key-form [name=obj_type]", "AES")
    pg.fill("#key-form [name=name]", key)
    pg.select_option("#key-form [name=group_id]", label=group)
    pg.click("#key-form button")
    pg.wait_for_selector("#key-detail:not([hidden])")
    detail = pg.text_content("#key-detail")
    assert key in detail and "AES" in detail and group in detail and "ENCRYPT" in detail
    assert "[object" not in detail and not pg.is_visible("#pub-key")  # AES: no public key
    assert DATE.search(detail) and not COMPACT_DATE.search(detail)
    pg.click(f"#keys-table td:text-is('{key}')")

    # An EC key's detail shows its public key, in each form the client library gives.
    ec_key = unique("cec")
    pg.fill("#key-form [name=name]", ec_key)
    pg.select_option("#key-form [name=obj_type]", "EC")
    pg.select_option("#key-form [name=elliptic_curve]", "NistP256")
    pg.click("#key-form button")
    pg.wait_for_selector(f"#key-detail h3:text-is('{ec_key}')")
    detail = pg.text_content("#key-detail")
    assert "[object" not in detail
    with strongroom.Client(http_daemon.socket, api_key=http_daemon.admin_key) as c:
        pem = c.keys.public(name=ec_key)
        jwk = c.keys.public(name=ec_key, format="JWK")
        ssh = c.keys.public(name=ec_key, format="OpenSSH")
    assert pg.text_content("#pub-key").strip() == pem.strip()
    shot(pg, "1-key-public")
    pg.select_option("#pub-format", "JWK")
    assert json.loads(pg.text_content("#pub-key")) == jwk
    pg.select_option("#pub-format", "OPENSSH")
    assert pg.text_content("#pub-key") == ssh
    pg.select_option("#key-form [name=obj_type]", "AES")
    pg.click("#nav button[data-view=apps]")
    pg.fill("#app-form [name=name]", app)
    pg.locator("#app-form label.pick", has_text=group).locator("input").check()
    pg.click("#app-form button[type=submit]")
    pg.wait_for_selector("#app-secret:not([hidden])")
    assert len(pg.text_content("#app-secret-key").strip()) > 40
    pg.wait_for_selector(f"#apps-table td:text-is('{app}')")
    # DSM's groups map, shown per group; no permissions typed: every permission
    assert pg.locator(f"#apps-table td:text-is('{group}: all')").count() >= 1
    app_key = pg.text_content("#app-secret-key").strip()
    shot(pg, "1-app-key")
    pg.click("#app-secret-done")
    # An app with chosen permissions: DSM's map form, shown as given.
    narrow = unique("capp")
    pg.fill("#app-form [name=name]", narrow)
    pg.locator("#app-form label.pick", has_text=group).locator("input").check()
    pg.fill("#app-form [name=permissions]", "encrypt, DECRYPT")
    pg.click("#app-form button[type=submit]")
    pg.wait_for_selector(f"#apps-table td:text-is('{narrow}')")
    row = pg.locator("#apps-table tr", has=pg.locator(f"td:text-is('{narrow}')"))
    assert row.locator("td").nth(1).text_content() == f"{group}: ENCRYPT DECRYPT"
    pg.click("#app-secret-done")

    # A new plugin in the editor, in that group only.
    pg.click("#nav button[data-view=plugins]")
    pg.click("#plugin-new")
    pg.wait_for_selector("#view-editor:not([hidden]) .CodeMirror")
    name = unique("cplug")
    pg.fill("#plugin-name", name)
    for box in pg.locator("#plugin-groups input").all():
        box.uncheck()
    pg.locator("#plugin-groups label.pick", has_text=group).locator("input").check()
    # A run too short for the sandbox's 1,000-instruction count step is not "0 instructions".
    cm(pg, "cm.setValue('function run() return 1 end');")
    pg.click("#plugin-test")
    pg.wait_for_selector("#run-title:text('Test run: 200')")
    assert "under 1,000 instructions" in pg.text_content("#run-stats")
    pg.evaluate("(() => { document.querySelector('#run-title').textContent = ''; })()")
    cm(pg, f"cm.setValue({json.dumps(GOOD)});")
    keywords = pg.locator("#editor .cm-keyword").all_text_contents()
    assert {"function", "local", "return", "end"} <= set(keywords)
    assert pg.locator("#editor .cm-string").count() >= 3
    assert pg.locator("#editor .CodeMirror-linenumber").count() >= 7

    # Test run with mock input: result, printed output, time and resources.
    pg.fill("#plugin-input", json.dumps({"key": key, "text": "hello"}))
    pg.click("#plugin-test")
    pg.wait_for_selector("#run-title:text('Test run: 200')")
    assert json.loads(pg.text_content("#run-result"))["size"] == 5
    assert "encrypted\t5\tbytes" in pg.text_content("#run-output")
    stats = pg.text_content("#run-stats")
    assert "ms" in stats and "instructions" in stats and "memory peak" in stats
    assert not re.search(r"(?<![\d,])0 instructions", stats), stats  # a run that ran code
    shot(pg, "2-test-run")

    # Break it: the traceback's line link moves the editor to the line.
    cm(pg, "cm.focus(); cm.setCursor({line: 4, ch: 0});")
    pg.keyboard.press("End")
    pg.keyboard.type("\nlocal boom = nil .. 'x'")
    pg.click("#plugin-test")
    pg.wait_for_selector("#run-title:text('Test run: 500')")
    assert "attempt to concatenate" in pg.text_content("#run-error")
    assert "test:6:" in pg.text_content("#run-traceback")
    cm(pg, "cm.setCursor({line: 0, ch: 0});")
    pg.click("#run-traceback a.line-link[data-line='6']")
    assert cm(pg, "return cm.getCursor().line;") == 5
    shot(pg, "3-traceback")

    # Fix, save (version 1), change and save again (version 2).
    cm(pg, f"cm.setValue({json.dumps(GOOD)});")
    pg.click("#plugin-save")
    pg.wait_for_selector("#plugin-version:text('version 1')")
    cm(pg, "cm.replaceRange('-- v2\\n', {line: 0, ch: 0});")
    pg.click("#plugin-save")
    pg.wait_for_selector("#plugin-version:text('version 2')")

    # Invoke the saved plugin; its own operations nest under the invocation.
    pg.click("#plugin-invoke")
    pg.wait_for_selector("#invoke-audit:not([hidden]) .invocation")
    assert pg.text_content("#run-title") == "Invocation: 200"
    head = pg.text_content("#invoke-audit .invocation > .audit-row .action")
    assert head == "POST /sys/v1/plugins/{plugin_id}"
    nested = pg.locator("#invoke-audit .invocation .nested .action").all_text_contents()
    assert "POST /crypto/v1/encrypt" in nested and "POST /crypto/v1/keys/info" in nested
    assert "encrypted" in pg.text_content("#run-output")  # kept in memory, not in the audit log
    shot(pg, "4-invoke")

    pg.click("#nav button[data-view=audit]")
    pg.wait_for_selector("#audit-list .invocation .nested")
    heads = pg.locator("#view-audit .audit-head span").all_text_contents()
    assert heads[:5] == ["Time (UTC)", "Actor", "Action", "Object", "Status"]
    times = pg.locator("#audit-list .audit-row .time").all_text_contents()
    assert times and all(DATE_MS.fullmatch(t) for t in times), times[:3]
    shot(pg, "5-audit")
    pg.fill("#audit-filters [name=action]", "encrypt")
    pg.click("#audit-refresh")
    until(lambda: (got := rows(pg, "action")) and all("encrypt" in a for a in got))
    assert pg.locator("#audit-list .audit-row").count() >= 1
    pg.click("#audit-filters button[type=reset]")
    # A refused request by a known caller (failed logins are counted per minute,
    # so the one above is not a record yet).
    admin = Raw(http_daemon.socket)
    admin.login(http_daemon.admin_key)
    assert admin.call("GET", f"/crypto/v1/keys/{unique('x')}")["status"] == 404
    admin.close()
    pg.check("#audit-filters [name=failed]")
    pg.click("#audit-refresh")
    until(lambda: (got := rows(pg, "status")) and all(int(s.split()[0]) >= 400 for s in got))
    assert "404" in pg.text_content("#audit-list")  # the refused request
    shot(pg, "6-audit-failures")
    pg.fill("#audit-filters [name=invocation_id]", "no-such-invocation")
    pg.click("#audit-refresh")
    pg.wait_for_selector("#audit-list p.muted:text('no records')")
    assert pg.problems == []

    # An app sees no admin views or forms, and can invoke the plugin in its group.
    pg.click("#logout")
    pg.wait_for_selector("#view-login:not([hidden])")
    assert not pg.is_visible("#nav")
    pg.fill("#login-key", app_key)
    pg.click("#login-form button")
    pg.wait_for_selector("#view-keys:not([hidden])")
    assert "app" in pg.text_content("#who-name")
    assert not pg.is_visible("#nav button[data-view=apps]")
    assert not pg.is_visible("#nav button[data-view=audit]")
    pg.click("#nav button[data-view=groups]")
    assert not pg.is_visible("#group-form")
    pg.click("#nav button[data-view=plugins]")
    assert not pg.is_visible("#plugin-new")
    pg.click(f"#plugins-table td:text-is('{name}')")
    pg.wait_for_selector("#view-editor:not([hidden])")
    assert not pg.is_visible("#plugin-save") and not pg.is_visible("#plugin-test")
    assert pg.is_disabled("#plugin-name")
    assert pg.is_visible("#editor-note") and not pg.is_visible("#editor")
    pg.fill("#plugin-input", json.dumps({"key": key, "text": "hi"}))
    pg.click("#plugin-invoke")
    pg.wait_for_selector("#run-title:text('Invocation: 200')")
    assert json.loads(pg.text_content("#run-result"))["size"] == 2
    shot(pg, "7-app-invoke")
    assert pg.problems == []
