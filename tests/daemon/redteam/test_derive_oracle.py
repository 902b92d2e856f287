"""Red team: derive must not turn a key that cannot be read into one that can.

A base key without EXPORT in its key_ops keeps its value in the token. If
DERIVEKEY with ``encrypt_data`` could make an exportable key, the exported
value would be AES(base, chosen data): an encryption oracle under a key the
caller may not encrypt with (PKCS#11's derived keys keep the base's
sensitivity for this reason). Checked: such a derive is refused, the default
key_ops of a key derived from it leave EXPORT out, and a derive from an
exportable base still gives an exportable key (its value checked with
cryptography).
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.conftest import Raw, unique
from tests.daemon.api.helpers import err, new_group, ok


def _derive(c: Raw, kid: str, g: str, data: bytes, key_ops: list[str] | None) -> dict:
    body = {
        "key": {"kid": kid},
        "name": unique("d"),
        "key_type": "AES",
        "key_size": 256,
        "group_id": g,
        "mechanism": {"encrypt_data": {"alg": "AES", "mode": "ECB", "plain": data}},
    }
    if key_ops is not None:
        body["key_ops"] = key_ops
    return c.call("POST", "/crypto/v1/derive", body)


def _key(c: Raw, g: str, ops: list[str]) -> str:
    body = {"name": unique("b"), "obj_type": "AES", "key_size": 256, "group_id": g, "key_ops": ops}
    return ok(c.call("POST", "/crypto/v1/keys", body))["kid"]


def test_derive_from_unexportable_base_cannot_ask_export(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    kid = _key(admin_raw, g, ["DERIVEKEY", "DECRYPT"])
    err(_derive(admin_raw, kid, g, os.urandom(32), ["ENCRYPT", "EXPORT"]), "key_op_not_permitted")


def test_derive_from_unexportable_base_defaults_without_export(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    kid = _key(admin_raw, g, ["DERIVEKEY"])
    new = ok(_derive(admin_raw, kid, g, os.urandom(32), None))
    assert "EXPORT" not in new["key_ops"]
    err(admin_raw.call("GET", f"/crypto/v1/keys/{new['kid']}/export"), "key_op_not_permitted")


def test_derive_from_exportable_base_may_export(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    kid = _key(admin_raw, g, ["DERIVEKEY", "EXPORT"])
    value = ok(admin_raw.call("GET", f"/crypto/v1/keys/{kid}/export"))["value"]
    data = os.urandom(32)
    new = ok(_derive(admin_raw, kid, g, data, ["ENCRYPT", "EXPORT"]))
    got = ok(admin_raw.call("GET", f"/crypto/v1/keys/{new['kid']}/export"))["value"]
    enc = Cipher(algorithms.AES(value), modes.ECB()).encryptor()
    assert got == enc.update(data) + enc.finalize()


def test_lua_derive_from_unexportable_base_cannot_ask_export(admin_raw: Raw) -> None:
    g = new_group(admin_raw)
    kid = _key(admin_raw, g, ["DERIVEKEY"])
    code = """
    function run(input)
      local base = assert(Sobject { kid = input.kid })
      local k, e = base:derive {
        name = input.name, key_type = 'AES', key_size = 256, key_ops = {'ENCRYPT', 'EXPORT'},
        mechanism = { encrypt_data = {
          alg = 'AES', mode = 'ECB', plain = Blob.from_hex(string.rep('00', 32)) } },
      }
      if k then return k:export().value:hex() end
      return tostring(e and e.message or e)
    end
    """
    body = {"code": code, "input": {"kid": kid, "name": unique("d")}, "groups": [g]}
    out = ok(admin_raw.call("POST", "/sys/v1/plugins/test", body))
    assert out["status"] == 200, out
    assert "EXPORT" in str(out["result"]) and len(str(out["result"])) != 64, out
