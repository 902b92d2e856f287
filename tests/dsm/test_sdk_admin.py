"""DSM's Python SDK administering Strongroom: groups, apps and their credentials,
the account a signed-in administrator selects, plugins, the audit log, statistics,
sessions, and the error answers DSM's clients read (status, body, headers)."""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request

import pytest
import sdkms.v1 as v1

from tests.dsm.conftest import App, Dsm, configuration, raw_json, sdk, unique

ACCOUNT = "00000000-0000-0000-0000-000000000000"


def _raises(status: int, code: str, call, *args, **kw) -> v1.rest.ApiException:
    """DSM's SDK raises ApiException with the status and the JSON body as text."""
    with pytest.raises(v1.rest.ApiException) as err:
        call(*args, **kw)
    exc = err.value
    assert exc.status == status, (exc.status, exc.body)
    body = json.loads(exc.body)
    assert body["error"] == code and body["message"], body
    return exc


def test_groups_crud(admin: v1.ApiClient) -> None:
    groups = v1.GroupsApi(admin)
    g = groups.create_group(v1.GroupRequest(name=unique("g"), description="first"))
    assert g.group_id and g.description == "first" and g.created_at.endswith("Z")
    assert g.group_id in {x.group_id for x in groups.get_groups()}
    assert groups.get_group(g.group_id).name == g.name
    assert groups.update_group(g.group_id, v1.GroupRequest(description="two")).description == "two"
    _raises(409, "name_exists", groups.create_group, v1.GroupRequest(name=g.name))
    groups.delete_group(g.group_id)
    _raises(404, "not_found", groups.get_group, g.group_id)


def test_apps_crud_credentials_and_permissions(dsm: Dsm, admin: v1.ApiClient, app: App) -> None:
    apps = v1.AppsApi(admin)
    made = raw_json(
        apps.create_app_with_http_info(
            v1.AppRequest(
                name=unique("a"),
                default_group=app.group_id,
                add_groups=[app.group_id],
                description="d",
            ),
            _preload_content=False,
        )
    )
    app_id, key = made["app_id"], made["credential"]["api_key"]
    assert base64.b64decode(key).decode().startswith(app_id + ":")
    got = apps.get_app(app_id)
    assert got.app_id == app_id and got.default_group == app.group_id and got.enabled is True
    assert app_id in {a.app_id for a in apps.get_apps()}
    assert [a.app_id for a in apps.get_apps(group_id=app.group_id, limit=1000)].count(app_id) == 1
    assert apps.update_app(app_id, v1.AppRequest(description="e")).description == "e"
    # The secret is kept only as a salted hash: DSM's credential read cannot be served.
    exc = _raises(409, "conflict", apps.get_credential, app_id)
    assert "reset_secret" in json.loads(exc.body)["message"]
    # reset_secret: a new key (in the raw answer); the old one stops working.
    new = raw_json(
        apps.regenerate_api_key_with_http_info(
            app_id, v1.AppResetSecretRequest(), _preload_content=False
        )
    )["credential"]["api_key"]
    assert new != key
    assert v1.GroupsApi(sdk(dsm, new)).get_groups()
    cfg = configuration(dsm)
    cfg.app_api_key = key
    _raises(401, "bad_credentials", v1.AuthenticationApi(v1.ApiClient(cfg)).authorize)
    # An app is not an administrator: allowed its own group, refused the admin paths.
    assert {g.group_id for g in v1.GroupsApi(app.client).get_groups()} == {app.group_id}
    _raises(403, "forbidden", v1.AppsApi(app.client).get_apps)
    _raises(403, "forbidden", v1.GroupsApi(app.client).create_group, v1.GroupRequest(name="x"))
    apps.delete_app(app_id)
    _raises(404, "not_found", apps.get_app, app_id)


def test_admin_selects_the_one_account(admin: v1.ApiClient, app: App) -> None:
    """sdkms-cli's user-login asks for the user's accounts and selects one."""
    accounts = v1.UsersApi(admin).get_user_account()
    assert list(accounts) == [ACCOUNT]
    auth = v1.AuthenticationApi(admin)
    auth.select_account(v1.SelectAccountRequest(acct_id=ACCOUNT))
    _raises(404, "not_found", auth.select_account, v1.SelectAccountRequest(acct_id="other"))
    _raises(403, "forbidden", v1.UsersApi(app.client).get_user_account)
    _raises(
        403,
        "forbidden",
        v1.AuthenticationApi(app.client).select_account,
        v1.SelectAccountRequest(acct_id=ACCOUNT),
    )


def test_plugins_crud_and_invoke(admin: v1.ApiClient, app: App) -> None:
    plugins = v1.PluginsApi(admin)
    code = "function run(input) return {hello = input.name} end"
    made = plugins.create_plugin(
        v1.PluginRequest(
            name=unique("p"),
            default_group=app.group_id,
            add_groups=[app.group_id],
            # The SDK's enum values are "Lua" and "Standard": refused before.
            source=v1.PluginSource(language=v1.Language.LUA, code=code),
            plugin_type=v1.PluginType.STANDARD,
            enabled=True,
        )
    )
    assert made.plugin_id and made.default_group == app.group_id
    assert made.plugin_id in {p.plugin_id for p in plugins.get_plugins()}
    assert plugins.get_plugin(made.plugin_id).source.code == code
    out = v1.PluginsApi(app.client).invoke_plugin(made.plugin_id, {"name": "dsm"})
    assert out == {"hello": "dsm"}
    # DSM's GET invocation (no body: the plugin's input is empty).
    got = v1.PluginsApi(app.client).sys_v1_plugins_invoke_plugin_id_get(made.plugin_id)
    assert got == {}  # {hello = nil}: an empty table
    upd = plugins.update_plugin(made.plugin_id, v1.PluginRequest(description="d"))
    assert upd.description == "d"
    plugins.delete_plugin(made.plugin_id)
    _raises(404, "not_found", plugins.get_plugin, made.plugin_id)


def test_audit_log_stats_version_health(admin: v1.ApiClient, app: App) -> None:
    v1.GroupsApi(app.client).get_groups()
    # The SDK pages with size (DSM's name); the records are Strongroom's shape,
    # which the SDK's single-record AuditLogResponse model cannot hold: raw JSON.
    logs = raw_json(
        v1.LogsApi(admin).get_audit_logs_with_http_info(
            size=2, actor_id=app.app_id, _preload_content=False
        )
    )
    assert len(logs) == 2 and all(r["actor_id"] == app.app_id for r in logs)
    assert logs[0]["seq"] > logs[1]["seq"] and logs[0]["time"]
    stats = v1.StatsApi(admin)
    for answer in (
        stats.get_apps_stats(),
        stats.get_groups_stats(),
        stats.get_app_stats(app.app_id),
        stats.get_group_stats(app.group_id),
    ):
        # StatsResponse.time is a free-form object in the SDK: DSM's date histogram.
        assert answer.time["buckets"] and "total_txn" in answer.time["buckets"][0], answer
    _raises(403, "forbidden", v1.StatsApi(app.client).get_apps_stats)
    version = v1.AuthenticationApi(app.client).get_server_version()
    assert version.version and version.api_version == "1.0"
    assert version.server_mode == v1.ServerMode.SOFTWARE
    _, status, _ = v1.AuthenticationApi(app.client).check_health_with_http_info()
    assert status == 204


def test_sessions_and_error_shapes(dsm: Dsm, app: App) -> None:
    client = sdk(dsm, app.api_key)
    auth = v1.AuthenticationApi(client)
    auth.refresh()
    so = v1.SecurityObjectsApi(client)
    exc = _raises(404, "not_found", so.get_security_object, "00000000-0000-0000-0000-0000000000aa")
    assert exc.headers["Content-Type"].startswith("application/json")
    _raises(
        400,
        "invalid_key_size",
        so.generate_security_object,
        v1.SobjectRequest(name=unique("k"), obj_type=v1.ObjectType.AES, key_size=100),
    )
    _raises(
        422,
        "unsupported_algorithm",
        so.generate_security_object,
        v1.SobjectRequest(name=unique("k"), obj_type=v1.ObjectType("NOPE"), key_size=128),
    )
    auth.terminate()
    exc = _raises(401, "bad_credentials", so.get_security_objects)
    assert exc.headers["WWW-Authenticate"].startswith("Bearer")
    # No credential at all: 401 before anything is read.
    req = urllib.request.Request(dsm.url + "/crypto/v1/keys")
    ctx = ssl.create_default_context(cafile=str(dsm.certs.ca))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, context=ctx, timeout=30)
    assert err.value.code == 401
    assert json.loads(err.value.read())["error"] in ("unauthenticated", "bad_credentials")


def test_login_forms_the_sdk_offers(dsm: Dsm, app: App) -> None:
    """Configuration.username/password (app id and secret as Basic) and
    app_api_key (the base64 key, split by the SDK) both log in."""
    app_id, secret = base64.b64decode(app.api_key).decode().split(":", 1)
    cfg = configuration(dsm)
    cfg.username, cfg.password = app_id, secret
    auth = v1.AuthenticationApi(v1.ApiClient(cfg)).authorize()
    assert auth.token_type == "Bearer" and auth.expires_in > 0 and auth.entity_id == app_id
    cfg.password = secret + "x"
    _raises(401, "bad_credentials", v1.AuthenticationApi(v1.ApiClient(cfg)).authorize)
    # Listing with DSM's paging and sorting parameters (sort and start are not
    # implemented: ignored, as DSM ignores what it does not know).
    listed = v1.SecurityObjectsApi(sdk(dsm, app.api_key)).get_security_objects(
        sort="kid:asc", limit=2, offset=0
    )
    assert len(listed) <= 2


def test_list_filters_and_paging_the_sdk_sends(dsm: Dsm, admin: v1.ApiClient) -> None:
    """group_id, sort, start, limit, offset on apps, plugins and keys, creator on keys:
    dropped before, so a filtered list came back whole and paging by start never
    advanced. Paging by start now visits every item once."""
    groups = v1.GroupsApi(admin)
    g1 = groups.create_group(v1.GroupRequest(name=unique("lg"))).group_id
    g2 = groups.create_group(v1.GroupRequest(name=unique("lg"))).group_id
    apps = v1.AppsApi(admin)
    made = {}
    for g in (g1, g1, g1, g2):
        out = raw_json(
            apps.create_app_with_http_info(
                v1.AppRequest(name=unique("la"), default_group=g, add_groups=[g]),
                _preload_content=False,
            )
        )
        made[out["app_id"]] = (g, out["credential"]["api_key"])
    in_g1 = sorted(a for a, (g, _) in made.items() if g == g1)
    assert sorted(a.app_id for a in apps.get_apps(group_id=g1)) == in_g1
    seen, start = [], None
    while True:
        kw = {"start": start} if start else {}
        batch = apps.get_apps(group_id=g1, sort="app_id:asc", limit=2, **kw)
        if not batch:
            break
        seen += [a.app_id for a in batch]
        start = batch[-1].app_id
    assert seen == in_g1
    desc = [a.app_id for a in apps.get_apps(group_id=g1, sort="app_id:desc")]
    assert desc == in_g1[::-1]
    assert [a.app_id for a in apps.get_apps(group_id=g1, sort="app_id", offset=1, limit=1)] == [
        in_g1[1]
    ]
    _raises(400, "invalid_value", apps.get_apps, sort="secret:asc")
    # Keys: by creator, and paged by name.
    creator_id = next(a for a, (g, _) in made.items() if g == g2)
    client = sdk(dsm, made[creator_id][1])
    so = v1.SecurityObjectsApi(client)
    names = sorted(unique("lk") for _ in range(3))
    for n in names:
        so.generate_security_object(v1.SobjectRequest(name=n, obj_type=v1.ObjectType.AES))
    mine = v1.SecurityObjectsApi(admin).get_security_objects(creator=creator_id)
    assert sorted(k.name for k in mine) == names
    got, start = [], None
    while True:
        kw = {"start": start} if start else {}
        batch = so.get_security_objects(group_id=g2, sort="name:asc", limit=2, **kw)
        if not batch:
            break
        got += [k.name for k in batch]
        start = batch[-1].name
    assert got == names
    # Plugins by group.
    plugins = v1.PluginsApi(admin)
    code = v1.PluginSource(language=v1.Language.LUA, code="function run() return 1 end")
    p2 = plugins.create_plugin(
        v1.PluginRequest(name=unique("lp"), add_groups=[g2], default_group=g2, source=code)
    )
    assert [p.plugin_id for p in plugins.get_plugins(group_id=g2)] == [p2.plugin_id]
    assert plugins.get_plugins(group_id=g1) == []


def test_audit_log_filters_the_sdk_sends(admin: v1.ApiClient, app: App) -> None:
    now = int(time.time())
    v1.GroupsApi(app.client).get_groups()
    logs = v1.LogsApi(admin)

    def records(**kw) -> list[dict]:
        return raw_json(logs.get_audit_logs_with_http_info(_preload_content=False, **kw))

    recent = records(actor_type="App", range_from=now - 5, size=1000)
    assert recent and all(r["actor_kind"] == "app" for r in recent)
    assert any(r["actor_id"] == app.app_id for r in recent)
    assert records(actor_type="App", range_to=now - 3600, range_from=now - 3700) == []
    admins = records(actor_type="User", size=5)
    assert admins and all(r["actor_kind"] == "admin" for r in admins)
    for field in ("action_type", "severity"):
        with pytest.raises(v1.rest.ApiException) as err:
            logs.get_audit_logs(**{field: "x"})
        assert err.value.status == 400 and field in err.value.body
