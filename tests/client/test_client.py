"""Client against a real strongroomd (the session ``daemon`` fixture).

Paired with test_async_client.py: the same behaviours, awaited.
"""

from __future__ import annotations

import hashlib
import threading
import uuid

import pytest
import strongroom
from strongroom import Client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def admin(daemon):
    with Client(daemon.socket, api_key=daemon.admin_key, timeout=30) as c:
        yield c


@pytest.fixture
def world(daemon, admin):
    """Two groups; an app in the first; an AES key in each group."""
    g1 = admin.groups.create(unique("g"))
    g2 = admin.groups.create(unique("g"))
    app = admin.apps.create(unique("app"), groups=[g1])
    k1 = admin.keys.create(unique("k"), "AES", key_size=256, group_id=g1)
    k2 = admin.keys.create(unique("k"), "AES", key_size=256, group_id=g2)
    with Client(daemon.socket, api_key=app.credential.api_key) as c:
        yield {"g1": g1, "g2": g2, "app": app, "k1": k1, "k2": k2, "client": c}


def test_lazy_auth_and_session(admin) -> None:
    assert admin.groups.list()  # authenticated on the way
    r = admin.session.auth()
    assert r.token_type == "Bearer" and r.entity_id


def test_no_key_is_unauthenticated(daemon) -> None:
    with Client(daemon.socket, api_key=None) as c:
        c._api_key = None  # even if the environment has one
        with pytest.raises(strongroom.Unauthenticated):
            c.groups.list()


def test_bad_key(daemon) -> None:
    with Client(daemon.socket, api_key="bm9ib2R5Om5vdGhpbmc=") as c:
        with pytest.raises(strongroom.Unauthenticated) as info:
            c.keys.list()
        assert info.value.code == "bad_credentials"
        assert "bm9ib2R5" not in str(info.value)


def test_groups_and_apps(admin) -> None:
    g = admin.groups.create(unique("g"), description="d")
    assert admin.groups.get(g).name == g.name
    assert g.group_id in {x.group_id for x in admin.groups.list()}
    assert admin.groups.update(g, description="e").description == "e"
    app = admin.apps.create(unique("app"), groups=[g])
    assert app.credential.api_key
    assert admin.apps.get(app).app_id == app.app_id
    new = admin.apps.reset_secret(app)
    assert new.credential.api_key != app.credential.api_key
    admin.apps.delete(app)
    with pytest.raises(strongroom.NotFound):
        admin.apps.get(app)
    k = admin.keys.create(unique("k"), "AES", key_size=128, group_id=g)
    with pytest.raises(strongroom.Conflict) as info:
        admin.groups.delete(g)
    assert info.value.code == "group_not_empty"
    admin.keys.delete(k)
    assert admin.groups.delete(g) is None


def test_key_lifecycle(admin) -> None:
    name = unique("k")
    k = admin.keys.create(name, "AES", key_size=256, key_ops=["ENCRYPT", "DECRYPT"])
    assert isinstance(k, strongroom.Sobject) and k.name == name and k.key_size == 256
    assert admin.keys.get(k.kid) == admin.keys.info(name=name) == admin.keys.info(k)
    assert [x.kid for x in admin.keys.list(name=name)] == [k.kid]
    with pytest.raises(strongroom.Conflict) as info:
        admin.keys.create(name, "AES", key_size=256)
    assert info.value.code == "name_exists"
    assert admin.keys.update(k, description="x").description == "x"
    with pytest.raises(strongroom.Forbidden):
        admin.keys.export(k)
    admin.keys.delete(k)
    with pytest.raises(strongroom.NotFound):
        admin.keys.info(kid=k.kid)


def test_import_and_export(admin) -> None:
    value = bytes(range(32))
    k = admin.keys.import_key(unique("k"), "AES", value)
    assert admin.keys.export(k).value == value


def test_aes_gcm_and_bad_tag(admin) -> None:
    k = admin.keys.create(unique("k"), "AES", key_size=256)
    out = admin.crypto.encrypt(k, plain=b"hello", ad=b"ad")
    assert len(out.iv) == 12 and len(out.tag) == 16
    back = admin.crypto.decrypt(k, cipher=out.cipher, iv=out.iv, tag=out.tag, ad=b"ad")
    assert back.plain == b"hello"
    bad = bytes([out.tag[0] ^ 1]) + out.tag[1:]
    with pytest.raises(strongroom.BadTag) as info:
        admin.crypto.decrypt(k, cipher=out.cipher, iv=out.iv, tag=bad, ad=b"ad")
    assert info.value.code == "bad_tag"


def test_sign_verify_mac_digest(admin) -> None:
    ec = admin.keys.create(unique("k"), "EC", elliptic_curve="NistP256")
    sig = admin.crypto.sign(ec, data=b"msg", hash_alg="SHA256").signature
    assert admin.crypto.verify(ec, data=b"msg", signature=sig, hash_alg="SHA256").result
    assert not admin.crypto.verify(ec, data=b"msh", signature=sig, hash_alg="SHA256").result
    h = admin.keys.create(unique("k"), "HMAC", key_size=256)
    m = admin.crypto.mac(h, alg="SHA256", data=b"d").mac
    assert admin.crypto.macverify(h, alg="SHA256", data=b"d", mac=m).result
    assert admin.crypto.digest(b"abc", alg="SHA256").digest == hashlib.sha256(b"abc").digest()


def test_wrap_unwrap(admin) -> None:
    kek = admin.keys.create(unique("k"), "AES", key_size=256)
    subject = admin.keys.create(unique("k"), "AES", key_size=128, key_ops=["ENCRYPT", "EXPORT"])
    w = admin.crypto.wrapkey(kek, subject=subject, alg="AES", mode="KW")
    new = admin.crypto.unwrapkey(
        kek, wrapped_key=w.wrapped_key, alg="AES", mode="KW", obj_type="AES",
        name=unique("k"), key_ops=["ENCRYPT", "EXPORT"],
    )  # fmt: skip
    assert admin.keys.export(new).value == admin.keys.export(subject).value


def test_app_is_held_to_its_groups(world) -> None:
    c = world["client"]
    out = c.crypto.encrypt(world["k1"], plain=b"x")
    assert out.kid == world["k1"].kid
    with pytest.raises((strongroom.Forbidden, strongroom.NotFound)):
        c.crypto.encrypt(world["k2"], plain=b"x")


def test_pipeline_and_threads(admin) -> None:
    k = admin.keys.create(unique("k"), "AES", key_size=256)
    out = admin.pipeline(
        [("POST", "/crypto/v1/encrypt", {"key": {"kid": k.kid}, "alg": "AES", "plain": b"%d" % i})
         for i in range(50)]
    )  # fmt: skip
    desc = {"kid": k.kid}
    back = admin.pipeline(
        [("POST", "/crypto/v1/decrypt", {"key": desc, "alg": "AES", "cipher": o["cipher"],
                                         "iv": o["iv"], "tag": o["tag"]}) for o in out]
    )  # fmt: skip
    assert [b["plain"] for b in back] == [b"%d" % i for i in range(50)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                admin.crypto.digest(b"x")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_logs(admin) -> None:
    k = admin.keys.create(unique("k"), "AES", key_size=256)
    recs = admin.logs.list(object_id=k.kid, limit=10)
    assert recs and all(r.object_id == k.kid for r in recs)


def test_unknown_path_and_method(admin) -> None:
    with pytest.raises(strongroom.NotFound) as info:
        admin.request("GET", "/crypto/v1/nothing")
    assert info.value.code == "no_such_route"
    with pytest.raises(strongroom.MethodNotAllowed):
        admin.request("DELETE", "/crypto/v1/encrypt")


def test_transient_key_lives_with_the_connection(daemon) -> None:
    with Client(daemon.socket, api_key=daemon.admin_key) as c:
        t = c.keys.create(unique("t"), "AES", key_size=256, transient=True)
        out = c.crypto.encrypt(t, plain=b"x")
        assert c.crypto.decrypt(t, cipher=out.cipher, iv=out.iv, tag=out.tag).plain == b"x"


def test_unreachable_socket(tmp_path) -> None:
    with pytest.raises(strongroom.ConnectError) as info, Client(tmp_path / "x.sock") as c:
        c.groups.list()
    assert str(tmp_path / "x.sock") in str(info.value)
