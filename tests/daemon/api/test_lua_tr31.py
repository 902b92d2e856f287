"""TR-31 key blocks in the Lua API (issue 11): ``Tr31Envelope.new(...):seal(kbpk,
target)`` and ``tr31_open(kbpk, block)``, as DSM's tr31 plugin uses them.

Blocks sealed by a plugin are opened by ``psec`` outside the daemon; blocks made
by psec are opened by a plugin. Both keys must have EXPORT.
"""

from __future__ import annotations

import base64
import os

import psec.tr31
import pytest

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import lua_test_run, ok, run_lua

SEAL_LUA = r"""
function run(input)
  local h = input.header
  local e = Tr31Envelope.new(h.version, h.key_usage, h.algorithm, h.mode_of_use,
    h.key_version_number, h.exportability, h.key_context)
  local kbpk = assert(Sobject { kid = input.kbpk })
  local target = assert(Sobject { kid = input.target })
  local block, err = e:seal(kbpk, target)
  if block == nil then return nil, err end
  return block
end
"""

OPEN_LUA = r"""
function run(input)
  local kbpk = assert(Sobject { kid = input.kbpk })
  local key, err = tr31_open(kbpk, input.block)
  if err ~= nil then return nil, err end
  -- as the tr31 plugin does: import what the block held
  local imported = assert(Sobject.import { name = input.name, obj_type = 'AES', value = key,
    key_ops = { 'ENCRYPT', 'EXPORT' } })
  return { hex = key:hex(), kid = imported.kid }
end
"""


def _aes(admin: Raw, g: str, value: bytes, ops: list[str]) -> str:
    body = {
        "name": unique("aes"),
        "group_id": g,
        "obj_type": "AES",
        "key_ops": ops,
        "value": base64.b64encode(value).decode(),
    }
    return ok(admin.call("PUT", "/crypto/v1/keys", body))["kid"]


@pytest.mark.parametrize(("version", "kbpk_len"), [("D", 32), ("B", 24), ("D", 16)])
def test_sealed_by_a_plugin_opened_by_psec(env, version, kbpk_len) -> None:
    admin, g = env
    kbpk, target = os.urandom(kbpk_len), os.urandom(16)
    if version == "B":  # version B's protection key is a TDES key
        body = {
            "name": unique("kbpk"),
            "group_id": g,
            "obj_type": "DES3",
            "key_ops": ["ENCRYPT", "EXPORT"],
            "value": base64.b64encode(kbpk).decode(),
        }
        kbpk_id = ok(admin.call("PUT", "/crypto/v1/keys", body))["kid"]
        kbpk = bytes.fromhex(
            ok(admin.call("POST", "/crypto/v1/keys/export", {"kid": kbpk_id}))["value"].hex()
        )
    else:
        kbpk_id = _aes(admin, g, kbpk, ["ENCRYPT", "EXPORT"])
    target_id = _aes(admin, g, target, ["ENCRYPT", "EXPORT"])
    header = {
        "version": version,
        "key_usage": "D0",
        "algorithm": "A",
        "mode_of_use": "B",
        "key_version_number": "12",
        "exportability": "E",
        "key_context": "1",
    }
    block = run_lua(env, SEAL_LUA, {"kbpk": kbpk_id, "target": target_id, "header": header})
    h, key = psec.tr31.unwrap(kbpk, block)
    assert key == target
    assert (h.version_id, h.key_usage, h.algorithm, h.mode_of_use) == (version, "D0", "A", "B")
    assert (h.version_num, h.exportability, h.reserved) == ("12", "E", "10")


def test_made_by_psec_opened_by_a_plugin(env) -> None:
    admin, g = env
    kbpk, target = os.urandom(32), os.urandom(32)
    kbpk_id = _aes(admin, g, kbpk, ["ENCRYPT", "EXPORT"])
    block = psec.tr31.wrap(kbpk, psec.tr31.Header("D", "D0", "A", "B", "00", "E"), target)
    name = unique("opened")
    out = run_lua(env, OPEN_LUA, {"kbpk": kbpk_id, "block": block, "name": name})
    assert out["hex"] == target.hex().upper()
    value = ok(admin.call("POST", "/crypto/v1/keys/export", {"kid": out["kid"]}))["value"]
    assert value == target


def test_a_tampered_block_and_a_wrong_key_are_refused(env) -> None:
    admin, g = env
    kbpk = os.urandom(32)
    kbpk_id = _aes(admin, g, kbpk, ["ENCRYPT", "EXPORT"])
    other_id = _aes(admin, g, os.urandom(32), ["ENCRYPT", "EXPORT"])
    block = psec.tr31.wrap(kbpk, psec.tr31.Header("D", "D0", "A", "B", "00", "E"), os.urandom(16))
    flipped = block[:-1] + ("0" if block[-1] != "0" else "1")
    for kid, b in ((kbpk_id, flipped), (other_id, block), (kbpk_id, "D0016")):
        out = lua_test_run(env, OPEN_LUA, {"kbpk": kid, "block": b, "name": unique("x")})
        assert out["status"] == 400, out
        assert "TR-31" in out["error"]["message"] or "key block" in out["error"]["message"]


def test_keys_without_export_are_refused_naming_export(env) -> None:
    admin, g = env
    locked_kbpk = _aes(admin, g, os.urandom(32), ["ENCRYPT"])
    kbpk = _aes(admin, g, os.urandom(32), ["ENCRYPT", "EXPORT"])
    locked_target = _aes(admin, g, os.urandom(16), ["ENCRYPT"])
    header = {
        "version": "D",
        "key_usage": "D0",
        "algorithm": "A",
        "mode_of_use": "B",
        "key_version_number": "00",
        "exportability": "N",
        "key_context": "0",
    }
    for kb, target in ((locked_kbpk, kbpk), (kbpk, locked_target)):
        out = lua_test_run(env, SEAL_LUA, {"kbpk": kb, "target": target, "header": header})
        assert out["status"] == 403, out
        assert "do not include EXPORT" in out["error"]["message"]
    block = psec.tr31.wrap(
        os.urandom(32), psec.tr31.Header("D", "D0", "A", "B", "00", "E"), b"k" * 16
    )
    out = lua_test_run(env, OPEN_LUA, {"kbpk": locked_kbpk, "block": block, "name": unique("x")})
    assert out["status"] == 403 and "EXPORT" in out["error"]["message"]


def test_bad_headers_are_refused(env) -> None:
    admin, g = env
    kbpk = _aes(admin, g, os.urandom(32), ["ENCRYPT", "EXPORT"])
    target = _aes(admin, g, os.urandom(16), ["ENCRYPT", "EXPORT"])
    good = {
        "version": "D",
        "key_usage": "D0",
        "algorithm": "A",
        "mode_of_use": "B",
        "key_version_number": "00",
        "exportability": "E",
        "key_context": "0",
    }
    for field, value in (
        ("key_usage", "TOOLONG"),
        ("version", "Z"),
        ("key_context", "x"),
        ("algorithm", "\u00e9"),
    ):
        out = lua_test_run(
            env, SEAL_LUA, {"kbpk": kbpk, "target": target, "header": {**good, field: value}}
        )
        assert out["status"] == 400, (field, out)
