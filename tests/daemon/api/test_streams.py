"""Multi-part encryption and decryption (DSM's encrypt|decrypt/init|update|final),
over the socket and over HTTP, checked with ``cryptography``."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.padding import PKCS7

from tests.conftest import Daemon, Raw, start_daemon, unique
from tests.daemon.api.helpers import err, new_app, new_group, ok
from tests.daemon.gateway.conftest import Http, b64, gateway_url

SIZES = [0, 1, 15, 16, 17, 4096, 100_003]


def _key(admin: Raw, group: str | None = None, value: bytes | None = None, **extra) -> dict:
    body = {"name": unique("s"), "obj_type": "AES", "value": value or os.urandom(32), **extra}
    if group:
        body["group_id"] = group
    return {**ok(admin.call("PUT", "/crypto/v1/keys", body)), "value": body["value"]}


def _chunks(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    i = 0
    for n in sizes * (len(data) // max(1, sum(sizes)) + 1):
        if i >= len(data):
            return
        yield data[i : i + n]
        i += n


def _encrypt(c: Raw, kid: str, data: bytes, per_key: bool = False, **init) -> tuple[dict, bytes]:
    base = f"/crypto/v1/keys/{kid}/encrypt" if per_key else "/crypto/v1/encrypt"
    key = {} if per_key else {"key": {"kid": kid}}
    start = ok(c.call("POST", f"{base}/init", {**key, **init}))
    state, out = start["state"], []
    for piece in _chunks(data, [1, 7, 4000, 65536, 33]):
        r = ok(c.call("POST", f"{base}/update", {"state": state, "plain": piece}))
        state = r["state"]
        out.append(r["cipher"])
    fin = ok(c.call("POST", f"{base}/final", {"state": state}))
    out.append(fin["cipher"])
    return {**start, **fin}, b"".join(out)


def _decrypt(c: Raw, kid: str, data: bytes, final: dict | None = None, **init) -> bytes:
    start = ok(c.call("POST", "/crypto/v1/decrypt/init", {"key": {"kid": kid}, **init}))
    state, out = start["state"], []
    for piece in _chunks(data, [3, 16, 5000, 70000]):
        r = ok(c.call("POST", "/crypto/v1/decrypt/update", {"state": state, "cipher": piece}))
        state = r["state"]
        out.append(r["plain"])
    fin = ok(c.call("POST", "/crypto/v1/decrypt/final", {"state": state, **(final or {})}))
    return b"".join(out) + fin["plain"]


@pytest.mark.parametrize("size", SIZES)
def test_gcm_both_ways(admin_raw: Raw, size: int) -> None:
    k = _key(admin_raw)
    data, ad = os.urandom(size), b"header"
    start, cipher = _encrypt(admin_raw, k["kid"], data, ad=ad)
    assert start["kid"] == k["kid"] and len(start["iv"]) == 12
    assert AESGCM(k["value"]).decrypt(start["iv"], cipher + start["tag"], ad) == data
    iv = os.urandom(12)
    sealed = AESGCM(k["value"]).encrypt(iv, data, ad)
    body, tag = sealed[:-16], sealed[-16:]
    got = _decrypt(admin_raw, k["kid"], body, {"tag": tag}, mode="GCM", iv=iv, ad=ad)
    assert got == data


def test_gcm_tag_checked_at_final_and_truncated_tags(admin_raw: Raw) -> None:
    k = _key(admin_raw)
    data, iv = os.urandom(5000), os.urandom(12)
    sealed = AESGCM(k["value"]).encrypt(iv, data, None)
    body, tag = sealed[:-16], sealed[-16:]
    for bad_tag, bad_body in ((bytes(16), body), (tag, body[:-1] + bytes([body[-1] ^ 1]))):
        start = ok(
            admin_raw.call(
                "POST",
                "/crypto/v1/decrypt/init",
                {"key": {"kid": k["kid"]}, "iv": iv, "mode": "GCM"},
            )
        )
        r = ok(
            admin_raw.call(
                "POST", "/crypto/v1/decrypt/update", {"state": start["state"], "cipher": bad_body}
            )
        )
        final = {"state": r["state"], "tag": bad_tag}
        err(admin_raw.call("POST", "/crypto/v1/decrypt/final", final), "bad_tag")
        # The stream ended with that answer.
        err(admin_raw.call("POST", "/crypto/v1/decrypt/final", final), "not_found")
    # A 12-byte tag (tag_len 96 at final) is the full tag's prefix, and decrypts.
    start = ok(admin_raw.call("POST", "/crypto/v1/encrypt/init", {"key": {"kid": k["kid"]}}))
    r = ok(
        admin_raw.call(
            "POST", "/crypto/v1/encrypt/update", {"state": start["state"], "plain": data}
        )
    )
    fin = ok(
        admin_raw.call("POST", "/crypto/v1/encrypt/final", {"state": r["state"], "tag_len": 96})
    )
    assert len(fin["tag"]) == 12
    dec = Cipher(algorithms.AES(k["value"]), modes.GCM(start["iv"], fin["tag"], 12)).decryptor()
    assert dec.update(r["cipher"] + fin["cipher"]) + dec.finalize() == data
    got = _decrypt(
        admin_raw, k["kid"], r["cipher"], {"tag": fin["tag"]}, mode="GCM", iv=start["iv"]
    )
    assert got == data


@pytest.mark.parametrize("size", SIZES)
def test_cbc_and_ctr_both_ways(admin_raw: Raw, size: int) -> None:
    k = _key(admin_raw)
    data = os.urandom(size)
    start, cipher = _encrypt(admin_raw, k["kid"], data, mode="CBC")
    assert "tag" not in start
    padder = PKCS7(128).padder()
    want = Cipher(algorithms.AES(k["value"]), modes.CBC(start["iv"])).encryptor()
    assert cipher == want.update(padder.update(data) + padder.finalize()) + want.finalize()
    assert _decrypt(admin_raw, k["kid"], cipher, mode="CBC", iv=start["iv"]) == data
    start, cipher = _encrypt(admin_raw, k["kid"], data, per_key=True, mode="CTR")
    want = Cipher(algorithms.AES(k["value"]), modes.CTR(start["iv"])).encryptor()
    assert cipher == want.update(data) + want.finalize()
    assert _decrypt(admin_raw, k["kid"], cipher, mode="CTR", iv=start["iv"]) == data


def test_bad_padding_at_final(admin_raw: Raw) -> None:
    k = _key(admin_raw)
    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(k["value"]), modes.CBC(iv)).encryptor()
    body = enc.update(bytes(range(32))) + enc.finalize()  # last byte 31: not PKCS#7
    start = ok(
        admin_raw.call(
            "POST", "/crypto/v1/decrypt/init", {"key": {"kid": k["kid"]}, "mode": "CBC", "iv": iv}
        )
    )
    r = ok(
        admin_raw.call(
            "POST", "/crypto/v1/decrypt/update", {"state": start["state"], "cipher": body}
        )
    )
    err(admin_raw.call("POST", "/crypto/v1/decrypt/final", {"state": r["state"]}), "bad_tag")


def test_state_is_the_callers_and_changes_each_step(daemon: Daemon, admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    a1, a2 = new_app(daemon, admin_raw, [g]), new_app(daemon, admin_raw, [g])
    try:
        k = _key(admin_raw, g)
        start = ok(a1.call("POST", "/crypto/v1/encrypt/init", {"key": {"kid": k["kid"]}}))
        s0 = start["state"]
        # Another app that may use the same key cannot continue it: as if it did not exist.
        err(a2.call("POST", "/crypto/v1/encrypt/update", {"state": s0, "plain": b"x"}), "not_found")
        err(
            a1.call("POST", "/crypto/v1/decrypt/update", {"state": s0, "cipher": b"x"}), "not_found"
        )
        err(
            a1.call("POST", "/crypto/v1/encrypt/update", {"state": os.urandom(32), "plain": b"x"}),
            "not_found",
        )
        r = ok(a1.call("POST", "/crypto/v1/encrypt/update", {"state": s0, "plain": b"abc"}))
        assert r["state"] != s0
        # A replayed (stale) state is refused, not applied twice.
        err(
            a1.call("POST", "/crypto/v1/encrypt/update", {"state": s0, "plain": b"abc"}), "conflict"
        )
        # The per-key form checks the path's key against the stream's.
        other = _key(admin_raw, g)
        err(
            a1.call(
                "POST",
                f"/crypto/v1/keys/{other['kid']}/encrypt/update",
                {"state": r["state"], "plain": b"x"},
            ),
            "invalid_value",
        )
        fin = ok(
            a1.call("POST", f"/crypto/v1/keys/{k['kid']}/encrypt/final", {"state": r["state"]})
        )
        assert (
            AESGCM(k["value"]).decrypt(start["iv"], r["cipher"] + fin["cipher"] + fin["tag"], None)
            == b"abc"
        )
        err(a1.call("POST", "/crypto/v1/encrypt/final", {"state": r["state"]}), "not_found")
    finally:
        a1.conn.close()
        a2.conn.close()


def test_init_checks_key_ops_and_a_disabled_key_ends_the_stream(
    daemon: Daemon, admin_raw: Raw
) -> None:
    g = new_group(admin_raw)
    app = new_app(daemon, admin_raw, [g])
    try:
        enc_only = _key(admin_raw, g, key_ops=["ENCRYPT"])
        body = {"key": {"kid": enc_only["kid"]}, "mode": "CBC", "iv": bytes(16)}
        err(app.call("POST", "/crypto/v1/decrypt/init", body), "key_op_not_permitted")
        outside = _key(admin_raw, new_group(admin_raw))
        err(
            app.call("POST", "/crypto/v1/encrypt/init", {"key": {"kid": outside["kid"]}}),
            "not_found",
        )
        k = _key(admin_raw, g)
        start = ok(
            app.call("POST", "/crypto/v1/encrypt/init", {"key": {"kid": k["kid"]}, "mode": "CTR"})
        )
        ok(admin_raw.call("PATCH", f"/crypto/v1/keys/{k['kid']}", {"enabled": False}))
        resp = app.call(
            "POST", "/crypto/v1/encrypt/update", {"state": start["state"], "plain": b"x"}
        )
        assert resp["status"] in (400, 403), resp
        ok(admin_raw.call("PATCH", f"/crypto/v1/keys/{k['kid']}", {"enabled": True}))
        err(
            app.call("POST", "/crypto/v1/encrypt/update", {"state": start["state"], "plain": b"x"}),
            "not_found",
        )
        # Modes that cannot stream, and keys that cannot.
        err(
            app.call("POST", "/crypto/v1/encrypt/init", {"key": {"kid": k["kid"]}, "mode": "ECB"}),
            "unsupported_algorithm",
        )
    finally:
        app.conn.close()


# -- bounds and HTTP, on a daemon of their own -------------------------------------

CONFIG = """
http_enabled = true
http_port = 0
stream_max_per_principal = 3
stream_max_total = 5
stream_idle_timeout = 2.0
"""
#: Longer than stream_idle_timeout. The timeout itself is long enough that the
#: requests of a bounds check all come well inside it on a loaded machine (at 0.5 s
#: the first stream could expire before the check that it still counts).
IDLE_WAIT = 2.2


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("streams"), config=CONFIG)
    d.url = gateway_url(d)  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0, d.log.read_text()[-3000:]


def test_bounds_per_principal_in_total_and_idle_expiry(small: Daemon) -> None:
    admin = Raw(small.socket)
    admin.login(small.admin_key)
    g = new_group(admin)
    apps = [new_app(small, admin, [g]) for _ in range(2)]
    try:
        k = _key(admin, g)
        init = {"key": {"kid": k["kid"]}}
        states = [
            ok(apps[0].call("POST", "/crypto/v1/encrypt/init", init))["state"] for _ in range(3)
        ]
        err(apps[0].call("POST", "/crypto/v1/encrypt/init", init), "busy")
        ok(apps[1].call("POST", "/crypto/v1/encrypt/init", init))
        ok(apps[1].call("POST", "/crypto/v1/encrypt/init", init))
        err(apps[1].call("POST", "/crypto/v1/encrypt/init", init), "busy")  # 5 in all
        ok(apps[0].call("POST", "/crypto/v1/encrypt/final", {"state": states[0]}))
        ok(apps[0].call("POST", "/crypto/v1/encrypt/init", init))
        # Idle streams end (the timer closes their sessions); their states are gone.
        time.sleep(IDLE_WAIT)
        err(
            apps[0].call("POST", "/crypto/v1/encrypt/update", {"state": states[1], "plain": b"x"}),
            "not_found",
        )
        for _ in range(3):
            ok(apps[0].call("POST", "/crypto/v1/encrypt/init", init))
    finally:
        for a in apps:
            a.conn.close()
        admin.close()


def test_over_http(small: Daemon) -> None:
    admin = Raw(small.socket)
    admin.login(small.admin_key)
    h = Http(small.url)  # type: ignore[attr-defined]
    h.login(small.admin_key)
    try:
        k = _key(admin)
        data = os.urandom(3000)
        start = ok(h.call("POST", f"/crypto/v1/keys/{k['kid']}/encrypt/init", {"ad": b64(b"a")}))
        state, cipher = start["state"], b""
        for piece in (data[:1000], data[1000:]):
            r = ok(
                h.call(
                    "POST",
                    f"/crypto/v1/keys/{k['kid']}/encrypt/update",
                    {"state": state, "plain": b64(piece)},
                )
            )
            state, cipher = r["state"], cipher + base64.b64decode(r["cipher"])
        fin = ok(h.call("POST", f"/crypto/v1/keys/{k['kid']}/encrypt/final", {"state": state}))
        iv, tag = base64.b64decode(start["iv"]), base64.b64decode(fin["tag"])
        assert (
            AESGCM(k["value"]).decrypt(iv, cipher + base64.b64decode(fin["cipher"]) + tag, b"a")
            == data
        )
        body = {"key": {"kid": k["kid"]}, "mode": "GCM", "iv": b64(iv), "ad": b64(b"a")}
        start = ok(h.call("POST", "/crypto/v1/decrypt/init", body))
        r = ok(
            h.call(
                "POST",
                "/crypto/v1/decrypt/update",
                {"state": start["state"], "cipher": b64(cipher)},
            )
        )
        fin = ok(h.call("POST", "/crypto/v1/decrypt/final", {"state": r["state"], "tag": b64(tag)}))
        assert base64.b64decode(r["plain"]) + base64.b64decode(fin["plain"]) == data
    finally:
        h.close()
        admin.close()
