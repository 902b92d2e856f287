"""The wire: framing, malformed input, pipelining, limits. Real daemon, real socket."""

from __future__ import annotations

import struct

import msgpack
import pytest
from strongroom import wire

from tests.conftest import Raw


def ping(r: Raw) -> None:
    """The connection (and the daemon) still serve well-formed requests."""
    resp = r.call("POST", "/crypto/v1/digest", {"alg": "SHA256", "data": b"x"})
    assert resp["status"] in (200, 401), resp


def test_unauthenticated_request_is_refused(raw: Raw) -> None:
    resp = raw.call("GET", "/crypto/v1/keys")
    assert resp["status"] == 401
    assert resp["body"]["error"] == "unauthenticated"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # truncated array
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({"method": "GET", "path": "/sys/v1/groups"}),  # no id
        msgpack.packb({"id": "seven", "method": "GET", "path": "/"}),  # id of the wrong type
    ],
)
def test_malformed_frames_get_an_error_without_id_and_the_connection_lives(
    admin_raw: Raw, payload: bytes
) -> None:
    admin_raw.send_raw(struct.pack(">I", len(payload)) + payload)
    resp = admin_raw.recv()
    assert resp["id"] is None
    assert resp["status"] == 400
    assert resp["body"]["error"] == "malformed_frame"
    ping(admin_raw)


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({"id": 5, "method": "FETCH", "path": "/sys/v1/groups"}, "malformed_frame"),
        ({"id": 5, "method": "GET", "path": 12}, "malformed_frame"),
        ({"id": 5, "method": "GET", "path": "/sys/v1/groups", "bogus": 1}, "malformed_frame"),
        ({"id": 5, "method": "GET", "path": "/nope"}, "no_such_route"),
        ({"id": 5, "method": "DELETE", "path": "/sys/v1/groups"}, "method_not_allowed"),
        ({"id": 5, "method": "POST", "path": "/crypto/v1/digest", "body": [1]}, "invalid_field"),
    ],
)
def test_bad_envelopes_are_answered_with_their_id(admin_raw: Raw, msg: dict, code: str) -> None:
    admin_raw.send_raw(wire.frame(msg))
    resp = admin_raw.recv()
    assert resp["id"] == 5
    assert resp["body"]["error"] == code
    assert resp["status"] == wire.CODES[code]
    ping(admin_raw)


def test_oversized_frame_closes_only_that_connection(daemon, admin_raw: Raw) -> None:
    other = Raw(daemon.socket)
    other.login(daemon.admin_key)
    admin_raw.send_raw(struct.pack(">I", 64 * 1024 * 1024) + b"\0" * 16)
    resp = admin_raw.recv()
    assert resp["status"] == 413 and resp["body"]["error"] == "too_large"
    with pytest.raises((ConnectionError, OSError)):
        admin_raw.call("GET", "/sys/v1/groups")
    ping(other)
    other.close()


def test_oversized_field_is_refused(admin_raw: Raw) -> None:
    resp = admin_raw.call(
        "POST", "/crypto/v1/digest", {"alg": "SHA256", "data": b"\0" * (1024 * 1024 + 1)}
    )
    assert resp["status"] == 413 and resp["body"]["error"] == "too_large"
    ping(admin_raw)


def test_pipelined_requests_all_answered_by_id(admin_raw: Raw) -> None:
    ids = [
        admin_raw.send("POST", "/crypto/v1/digest", {"alg": "SHA256", "data": bytes([i])})
        for i in range(200)
    ]
    seen = {}
    for _ in ids:
        resp = admin_raw.recv()
        seen[resp["id"]] = resp
    assert set(seen) == set(ids)
    import hashlib

    for i, rid in enumerate(ids):
        assert seen[rid]["body"]["digest"] == hashlib.sha256(bytes([i])).digest()


def test_request_may_carry_a_bearer_token(daemon, raw: Raw) -> None:
    other = Raw(daemon.socket)
    token = other.login(daemon.admin_key)["access_token"]
    resp = raw.call("GET", "/sys/v1/groups", auth=token)
    assert resp["status"] == 200
    bad = raw.call("GET", "/sys/v1/groups", auth="not-a-token")
    assert bad["status"] == 401 and bad["body"]["error"] == "bad_credentials"
    other.close()


def test_socket_is_not_world_accessible(daemon) -> None:
    mode = daemon.socket.stat().st_mode & 0o777
    assert mode & 0o007 == 0
    for name in ("admin.key", "strongroom.db", "softhsm/user.pin", "softhsm/so.pin"):
        assert (daemon.state_dir / name).stat().st_mode & 0o077 == 0, name
