"""The Lua API of API.md 4.2 through the real daemon, results checked with `cryptography`.

Each test stores keys with known values (or exports public keys), runs a
plugin that uses them through the Lua API, and checks what comes back with an
independent implementation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from tests.conftest import unique
from tests.daemon.api.helpers import ok, run_lua


def put(env, obj_type: str, value: bytes, **extra) -> dict:
    admin, g = env
    return ok(
        admin.call(
            "PUT",
            "/crypto/v1/keys",
            {
                "name": unique(obj_type.lower()),
                "obj_type": obj_type,
                "value": value,
                "group_id": g,
                **extra,
            },
        )
    )


def test_sobject_lookup_and_listing(env) -> None:
    key = put(env, "AES", os.urandom(32))
    out = run_lua(
        env,
        """
        function run(input)
          local a = assert(Sobject{name = input.name})
          local b = assert(Sobject{kid = input.kid})
          local c = assert(Sobject{id = input.kid})
          local missing, err = Sobject{name = 'no such key'}
          local all = assert(Sobject.get_all{offset = 0, limit = 1000})
          local listed = false
          for _, k in ipairs(all) do if k.kid == input.kid then listed = true end end
          return {a = a.kid, b = b.name, c = c.obj_type, size = a.key_size,
                  missing = missing == nil, status = err.status, listed = listed}
        end""",
        {"name": key["name"], "kid": key["kid"]},
    )
    assert out == {
        "a": key["kid"],
        "b": key["name"],
        "c": "AES",
        "size": 256,
        "missing": True,
        "status": 404,
        "listed": True,
    }


def test_encrypt_decrypt_with_blob_and_base64_arguments(env) -> None:
    value = os.urandom(32)
    key = put(env, "AES", value)
    plain = b"lua says hello"
    out = run_lua(
        env,
        """
        function run(input)
          local k = assert(Sobject{kid = input.kid})
          local e1 = assert(k:encrypt{alg = 'AES', mode = 'GCM', plain = input.plain,
                                      ad = Blob.from_bytes('hdr')})
          -- the same call with base64 strings instead of Blobs
          local e2 = assert(k:encrypt{alg = 'AES', mode = 'GCM', plain = input.plain:base64()})
          local d = assert(k:decrypt{alg = 'AES', mode = 'GCM', cipher = e2.cipher:base64(),
                                     iv = e2.iv, tag = e2.tag:base64()})
          return {c1 = e1.cipher, iv1 = e1.iv, t1 = e1.tag, plain = d.plain}
        end""",
        {"kid": key["kid"], "plain": plain},
    )
    assert out["plain"] == plain
    assert AESGCM(value).decrypt(out["iv1"], out["c1"] + out["t1"], b"hdr") == plain


def test_sign_verify_checked_outside(env) -> None:
    priv = ec.generate_private_key(ec.SECP256R1())
    der = priv.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = put(env, "EC", der)
    out = run_lua(
        env,
        """
        function run(input)
          local k = assert(Sobject{kid = input.kid})
          local s = assert(k:sign{hash_alg = 'SHA256', data = Blob.from_bytes('signed')})
          local v = assert(k:verify{hash_alg = 'SHA256', data = Blob.from_bytes('signed'),
                                    signature = s.signature})
          local bad = assert(k:verify{hash_alg = 'SHA256', data = Blob.from_bytes('other'),
                                      signature = s.signature})
          return {sig = s.signature, ok = v.result, bad = bad.result, pub = k.pub_key}
        end""",
        {"kid": key["kid"]},
    )
    assert out["ok"] is True and out["bad"] is False
    priv.public_key().verify(out["sig"], b"signed", ec.ECDSA(hashes.SHA256()))
    assert out["pub"] == key["pub_key"]


def test_mac_and_mac_verify(env) -> None:
    secret = os.urandom(32)
    key = put(env, "HMAC", secret)
    out = run_lua(
        env,
        """
        function run(input)
          local k = assert(Sobject{kid = input.kid})
          local m = assert(k:mac{alg = 'SHA384', data = Blob.from_bytes('tag me')})
          local v = assert(k:mac_verify{alg = 'SHA384', data = Blob.from_bytes('tag me'),
                                        mac = m.mac})
          return {mac = m.mac, ok = v.result}
        end""",
        {"kid": key["kid"]},
    )
    assert out["mac"] == hmac.new(secret, b"tag me", hashlib.sha384).digest()
    assert out["ok"] is True


def test_wrap_unwrap_export_persist_update_delete(env) -> None:
    kek_value = os.urandom(32)
    kek = put(env, "AES", kek_value)
    name = unique("persisted")
    out = run_lua(
        env,
        """
        function run(input)
          local kek = assert(Sobject{kid = input.kek})
          local t = assert(Sobject.create{obj_type = 'AES', key_size = 128, transient = true,
                                          key_ops = {'ENCRYPT', 'DECRYPT', 'EXPORT'}})
          local value = assert(t:export()).value
          local w = assert(kek:wrap{subject = t, alg = 'AES', mode = 'KWP'})
          local u = assert(kek:unwrap{alg = 'AES', mode = 'KWP', obj_type = 'AES',
                                      wrapped_key = w.wrapped_key, transient = true,
                                      key_ops = {'EXPORT'}})
          local stored = assert(t:persist{name = input.name})
          assert(stored:update{description = 'made in Lua'})
          local again = assert(Sobject{kid = stored.kid})
          local desc = again.description
          assert(again:delete())
          local gone = Sobject{kid = stored.kid}
          return {value = value, wrapped = w.wrapped_key, unwrapped = assert(u:export()).value,
                  transient = t.transient, persisted = stored.transient, desc = desc,
                  gone = gone == nil}
        end""",
        {"kek": kek["kid"], "name": name},
    )
    assert len(out["value"]) == 16
    assert aes_key_unwrap_with_padding(kek_value, out["wrapped"]) == out["value"]
    assert out["unwrapped"] == out["value"]
    assert out["transient"] is True and out["persisted"] is False
    assert out["desc"] == "made in Lua" and out["gone"] is True


def test_agree_matches_outside(env) -> None:
    mine = ec.generate_private_key(ec.SECP384R1())
    peer = ec.generate_private_key(ec.SECP384R1())
    mine_key = put(
        env,
        "EC",
        mine.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        key_ops=["AGREEKEY", "EXPORT"],
    )
    peer_key = put(
        env,
        "EC",
        peer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    out = run_lua(
        env,
        """
        function run(input)
          local me = assert(Sobject{kid = input.mine})
          local peer = assert(Sobject{kid = input.peer})
          local s = assert(me:agree{public_key = peer, mechanism = 'diffie_hellman',
                                    key_type = 'SECRET', key_size = 384, transient = true,
                                    key_ops = {'EXPORT'}})
          return assert(s:export()).value
        end""",
        {"mine": mine_key["kid"], "peer": peer_key["kid"]},
    )
    assert out == mine.exchange(ec.ECDH(), peer.public_key())


def test_import_and_digest(env) -> None:
    value = os.urandom(16)
    out = run_lua(
        env,
        """
        function run(input)
          local k = assert(Sobject.import{name = input.name, obj_type = 'AES',
                                          value = input.value:base64()})
          local d = digest{alg = 'SHA256', data = Blob.from_bytes('abc')}
          return {exported = assert(k:export()).value, digest = d.digest}
        end""",
        {"name": unique("imported"), "value": value},
    )
    assert out["exported"] == value
    assert out["digest"] == hashlib.sha256(b"abc").digest()


def test_blob_functions(env) -> None:
    out = run_lua(
        env,
        """
        function run()
          local a = Blob.from_hex('0f0f')
          local b = Blob.from_base64('8PA=')   -- f0 f0
          return {
            hex = Blob.from_bytes('hi'):hex(), b64 = Blob.from_bytes('hi?'):base64(),
            url = Blob.from_bytes('\\251\\255'):base64_urlsafe(),
            slice = Blob.from_bytes('abcdef'):slice(2, 4):bytes(),
            cat = (a .. b):hex(), eq = a == Blob.from_hex('0F0F'), len = #(a .. b),
            band = (a & b):hex(), bor = (a | b):hex(), bxor = (a ~ b):hex(),
            r16 = #Blob.random{bytes = 16}, r128 = #Blob.random{bits = 128}, r8 = #Blob.random(8),
            differ = Blob.random(16) ~= Blob.random(16),
          }
        end""",
    )
    assert out == {  # hex is upper case, as DSM's
        "hex": "6869",
        "b64": base64.b64encode(b"hi?").decode(),
        "url": base64.urlsafe_b64encode(b"\xfb\xff").decode(),
        "slice": "bcd",
        "cat": "0F0FF0F0",
        "eq": True,
        "len": 4,
        "band": "0000",
        "bor": "FFFF",
        "bxor": "FFFF",
        "r16": 16,
        "r128": 16,
        "r8": 8,
        "differ": True,
    }


def test_json_cbor_null_time(env) -> None:
    out = run_lua(
        env,
        """
        function run()
          local j = json.decode('{"a":[1,2,{"b":null}],"s":"x"}')
          local c = cbor.decode(cbor.encode({n = 5, list = {1, 2}}))
          local t = Time.from_iso8601('2026-11-26T10:00:00Z')
          return {a2 = j.a[2], isnull = j.a[3].b == null, s = j.s,
                  roundtrip = json.decode(json.encode({k = 'v'})).k,
                  cbor_n = c.n, cbor_list = c.list[2],
                  epoch = t:unix_epoch_seconds(), later = t:add_seconds(90):to_iso8601(),
                  nanos = Time.at(2):unix_epoch_nanoseconds(),
                  now = Time.now_insecure():unix_epoch_seconds() > 1700000000}
        end""",
    )
    assert out["a2"] == 2 and out["isnull"] is True and out["s"] == "x"
    assert out["roundtrip"] == "v" and out["cbor_n"] == 5 and out["cbor_list"] == 2
    assert out["epoch"] == 1795687200
    assert out["later"] == "20261126T100130Z"  # DSM's compact form, as created_at
    assert out["nanos"] == 2_000_000_000 and out["now"] is True
