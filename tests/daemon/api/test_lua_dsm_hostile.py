"""Hostile use of issue 11's Lua API (rekey, Group, AuditLog.get_all, certificates,
BIP32, TR-31): huge inputs, deep structures, floods. Each plugin is contained
with its exact status while a bystander's requests keep succeeding (the
pattern of test_plugins_hostile.py)."""

from __future__ import annotations

import base64
import os

import pytest

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import bystander_encrypting, new_group, new_key, ok

# The cases below end by a check or a limit of their own, never by the wall clock: a
# generous one, so that seconds of contention on a loaded machine cannot reach it first.
LIMITS = {"wall_seconds": 60, "instructions": 50_000_000, "memory_bytes": 64 * 1024 * 1024}
# Floods meet the wall clock (3 s) long before the 10,000 API calls per invocation
# (each call here costs well over 0.3 ms): the worker is killed, 504.
FLOOD = {**LIMITS, "wall_seconds": 3, "instructions": 500_000_000}

# A plugin that returns the error it met (nil, err) answers with the API's status and
# error "plugin_error" (its own Error); one that raises answers 500 plugin_runtime_error.
# (name, code, status, error code, text in the message)
HOSTILE = [
    (
        "Group id of a megabyte",
        "function run() return Group { id = string.rep('a', 1 << 20) } end",
        404,
        "plugin_error",
        "no group",
    ),
    (
        "AuditLog.get_all limit of a billion",
        "function run() return AuditLog.get_all { limit = 1000000000 } end",
        400,
        "plugin_error",
        "limit <= 10000",
    ),
    (
        "AuditLog.get_all flood",
        """function run()
             while true do
               local r, e = AuditLog.get_all { limit = 1 }
               if r == nil then return nil, e end
             end
           end""",
        504,
        "time_limit",
        "longer than 3 s",
    ),
    (
        "rekey with a megabyte of metadata",
        """function run(input)
             local k = assert(Sobject { kid = input.kid })
             return k:rekey { custom_metadata = { big = string.rep('m', 1 << 20) } }
           end""",
        400,
        "plugin_error",
        "custom_metadata",
    ),
    (
        "CSR of 4 MiB of junk",
        "function run() return Pkcs10Csr.from_der(Blob.from_bytes(string.rep('x', 5 << 20))) end",
        500,
        "plugin_runtime_error",
        "too large",
    ),
    (
        "CSR nested a million deep",
        """function run()
             local der = string.rep('\\48\\132\\0\\0\\0\\0', 100000)
             return Pkcs10Csr.from_der(Blob.from_bytes(der))
           end""",
        500,
        "plugin_runtime_error",
        "not a readable certificate request",
    ),
    (
        "TbsCertificate with a megabyte extension 64 times",
        """function run(input)
             local name = X509Name.new():set(Oid.from_str('CN'), 'x')
             local t = TbsCertificate.new(input.ec, name, nil, 60)
             for i = 1, 64 do t:add_extension(Oid.from_str('1.2.3.' .. i), false,
               string.rep('\\4', 1000000)) end
             return t:sign(Sobject { name = input.ec }, input.ec, 64)
           end""",
        500,
        "plugin_runtime_error",
        "bytes in all",
    ),
    (
        "BIP32 seed of a kilobyte",
        """function run(input)
             return Sobject { kid = input.big_seed }:derive { key_type = 'BIP32',
               mechanism = { bip32_master_key = { network = 'mainnet' } }, transient = true }
           end""",
        400,
        "plugin_error",
        "16 to 64 bytes",
    ),
    (
        "BIP32 mechanism nested deep",
        """function run(input)
             local m = {}
             local cur = m
             for i = 1, 200 do cur.bip32_master_key = {}; cur = cur.bip32_master_key end
             return Sobject { kid = input.seed }:derive { key_type = 'BIP32', mechanism = m,
               transient = true }
           end""",
        400,
        "plugin_error",
        "nested too deeply",
    ),
    (
        "BIP32 children flood",
        """function run(input)
             local k = assert(Sobject { kid = input.seed }:derive { key_type = 'BIP32',
               mechanism = { bip32_master_key = { network = 'mainnet' } }, transient = true })
             for i = 1, 100000 do
               local c, e = k:transform { key_type = 'BIP32',
                 mechanism = { bip32_weak_child = { index = i } }, transient = true }
               if c == nil then return nil, e end
             end
           end""",
        504,
        "time_limit",
        "longer than 3 s",
    ),
    (
        "TR-31 block of 64 KiB",
        """function run(input)
             return tr31_open(Sobject { kid = input.kbpk }, 'D' .. string.rep('0', 65535))
           end""",
        400,
        "plugin_error",
        "16 to 16384",
    ),
    (
        "TR-31 block of 10 MB",
        """function run(input)
             return tr31_open(Sobject { kid = input.kbpk }, string.rep('D', 10000000))
           end""",
        400,
        "plugin_error",
        "at most 65536",
    ),
    (
        "TR-31 header of a megabyte",
        """function run(input)
             return Tr31Envelope.new('D', string.rep('x', 1 << 20))
           end""",
        500,
        "plugin_runtime_error",
        "key_usage must be a string",
    ),
]


@pytest.fixture(scope="module")
def setting(daemon):
    admin = Raw(daemon.socket)
    admin.login(daemon.admin_key)
    g = new_group(admin)
    key = new_key(admin, g)

    def imp(obj_type: str, value: bytes, ops: list[str]) -> str:
        body = {
            "name": unique("h"),
            "group_id": g,
            "obj_type": obj_type,
            "key_ops": ops,
            "value": base64.b64encode(value).decode(),
        }
        return ok(admin.call("PUT", "/crypto/v1/keys", body))["kid"]

    ec = unique("ec")
    ok(
        admin.call(
            "POST",
            "/crypto/v1/keys",
            {"name": ec, "group_id": g, "obj_type": "EC", "elliptic_curve": "NistP256"},
        )
    )
    input_ = {
        "kid": key["kid"],
        "ec": ec,
        "seed": imp("HMAC", os.urandom(32), ["MACGENERATE", "DERIVEKEY", "EXPORT"]),
        "big_seed": imp("SECRET", os.urandom(1024), ["DERIVEKEY", "EXPORT"]),
        "kbpk": imp("AES", os.urandom(32), ["ENCRYPT", "EXPORT"]),
    }
    rot = new_key(admin, g)
    yield admin, g, key, input_, rot
    admin.close()


def invoke(admin: Raw, g: str, code: str, input_: dict, limits: dict = LIMITS) -> dict:
    body = {
        "name": unique("hostile"),
        "groups": [g],
        "limits": limits,
        "source": {"language": "LUA", "code": code},
    }
    p = ok(admin.call("POST", "/sys/v1/plugins", body))
    return admin.call("POST", f"/sys/v1/plugins/{p['plugin_id']}", input_)


@pytest.mark.parametrize(
    ("name", "code", "status", "error", "text"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_use_is_contained(daemon, setting, name, code, status, error, text) -> None:
    admin, g, key, input_, rot = setting
    if "rekey" in name:
        input_ = {**input_, "kid": rot["kid"]}
    with bystander_encrypting(daemon, key["kid"]) as results:
        resp = invoke(admin, g, code, input_, FLOOD if "flood" in name else LIMITS)
    assert resp["status"] == status, resp
    assert resp["body"]["error"] == error, resp
    assert text in resp["body"]["message"], resp
    assert results and set(results) == {200}
    # the sandbox still serves: a well-behaved plugin runs right after
    assert ok(invoke(admin, g, "function run() return Group.get_all() ~= nil end", {})) is True
