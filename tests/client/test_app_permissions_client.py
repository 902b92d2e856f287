"""DSM's app permissions through the client library and the CLI (real daemon)."""

from __future__ import annotations

import json
import uuid

import pytest
import strongroom
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from strongroom import Client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def admin(daemon):
    with Client(daemon.socket, api_key=daemon.admin_key, timeout=30) as c:
        yield c


def test_client_permission_map_create_and_update(daemon, admin) -> None:
    g1, g2 = admin.groups.create(unique("g")), admin.groups.create(unique("g"))
    key = admin.keys.create(
        unique("k"), "AES", key_size=256, group_id=g1, key_ops=["ENCRYPT", "DECRYPT", "EXPORT"]
    )
    app = admin.apps.create(unique("app"), groups={g1.group_id: ["encrypt"]})
    assert app.groups == {g1.group_id: ["ENCRYPT"]}
    with Client(daemon.socket, api_key=app.credential.api_key) as c:
        out = c.crypto.encrypt(kid=key.kid, plain=b"typed")
        value = admin.keys.export(kid=key.kid).value
        assert AESGCM(value).decrypt(out.iv, out.cipher + out.tag, None) == b"typed"
        with pytest.raises(strongroom.Forbidden) as exc:
            c.crypto.decrypt(kid=key.kid, cipher=out.cipher, iv=out.iv, tag=out.tag, mode="GCM")
        assert exc.value.code == "app_permission_denied"
        got = admin.apps.update(
            app, add_groups=[g2], mod_groups={g1.group_id: ["ENCRYPT", "DECRYPT"]}
        )
        assert (
            got.groups[g1.group_id] == ["ENCRYPT", "DECRYPT"]
            and "MANAGE" in got.groups[g2.group_id]
        )
        back = c.crypto.decrypt(kid=key.kid, cipher=out.cipher, iv=out.iv, tag=out.tag, mode="GCM")
        assert back.plain == b"typed"
    assert set(admin.apps.update(app, del_groups=[g2]).groups) == {g1.group_id}
    # The list form (groups records) keeps meaning every permission.
    plain = admin.apps.create(unique("app"), groups=[g2])
    assert "DECRYPT" in plain.groups[g2.group_id] and "MANAGE" in plain.groups[g2.group_id]


def test_client_plugin_type(admin) -> None:
    g = admin.groups.create(unique("g"))
    p = admin.plugins.create(
        unique("p"), "function run() return 1 end", groups=[g], plugin_type="STANDARD"
    )
    assert p.plugin_type == "STANDARD"
    with pytest.raises(strongroom.BadRequest) as exc:
        admin.plugins.create(unique("p"), "function run() end", groups=[g], plugin_type="NOPE")
    assert exc.value.code == "invalid_value"


def test_cli_group_permissions(sr) -> None:
    g1, g2 = unique("g"), unique("g")
    sr("groups", "create", g1)
    sr("groups", "create", g2)
    name = unique("app")
    app = json.loads(
        sr(
            "--json", "apps", "create", name, "--group", f"{g1}:ENCRYPT,decrypt", "--group", g2
        ).stdout
    )
    groups = {json.loads(sr("--json", "groups", "show", g).stdout)["group_id"]: g for g in (g1, g2)}
    by_name = {groups[gid]: perms for gid, perms in app["groups"].items()}
    assert by_name[g1] == ["ENCRYPT", "DECRYPT"] and "EXPORT" in by_name[g2]
    out = json.loads(
        sr("--json", "apps", "update", name, "--mod-group", f"{g1}:SIGN", "--del-group", g2).stdout
    )
    assert {groups[g]: p for g, p in out["groups"].items()} == {g1: ["SIGN"]}
    out = json.loads(sr("--json", "apps", "update", name, "--add-group", f"{g2}:").stdout)
    assert {groups[g]: p for g, p in out["groups"].items()} == {g1: ["SIGN"], g2: []}
    listed = [line for line in sr("apps", "list").stdout.splitlines() if name in line]
    assert len(listed) == 1 and f"{g1}:SIGN,{g2}:-" in listed[0], listed
    ok_all = unique("app")
    sr("apps", "create", ok_all, "--group", g2)
    assert any(
        ok_all in line and f"{g2}:*" in line for line in sr("apps", "list").stdout.splitlines()
    )
    r = sr("apps", "update", name, "--mod-group", f"{g1}:FLY", code=1)
    assert "invalid_value" in r.stderr and "FLY" in r.stderr
    r = sr("apps", "update", name, "--mod-group", g1, code=2)
    assert "GROUP:PERM" in r.output
    assert "ops:ENCRYPT,DECRYPT" in sr("apps", "create", "--help").stdout
