"""Mechanisms beyond the main matrix, checked with cryptography: DES3, AES-CTR,
AES key wrap with padding, AES-CMAC; and a host that forks and signs in the child."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from typing import Any

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes, serialization
from cryptography.hazmat.primitives import padding as sympad
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from tests.conftest import ROOT
from tests.pkcs11.conftest import World, tool_env

EXTRACTABLE = {Attribute.EXTRACTABLE: True}


def test_des3_cbc_pad_cbc_ecb(session: Any) -> None:
    k = session.generate_key(KeyType.DES3, store=False, template=EXTRACTABLE)
    value = k[Attribute.VALUE]
    assert len(value) == 24
    assert k[Attribute.VALUE_LEN] == 24
    iv = os.urandom(8)
    msg = b"triple des through strongroom"
    ct = k.encrypt(msg, mechanism=Mechanism.DES3_CBC_PAD, mechanism_param=iv)
    pad = sympad.PKCS7(64).padder()
    padded = pad.update(msg) + pad.finalize()
    enc = Cipher(TripleDES(value), modes.CBC(iv)).encryptor()
    assert ct == enc.update(padded) + enc.finalize()
    assert k.decrypt(ct, mechanism=Mechanism.DES3_CBC_PAD, mechanism_param=iv) == msg
    block = os.urandom(16)
    ct = k.encrypt(block, mechanism=Mechanism.DES3_CBC, mechanism_param=iv)
    enc = Cipher(TripleDES(value), modes.CBC(iv)).encryptor()
    assert ct == enc.update(block) + enc.finalize()
    ct = k.encrypt(block, mechanism=Mechanism.DES3_ECB)
    enc = Cipher(TripleDES(value), modes.ECB()).encryptor()
    assert ct == enc.update(block) + enc.finalize()
    assert k.decrypt(ct, mechanism=Mechanism.DES3_ECB) == block


def test_aes_ctr(session: Any) -> None:
    k = session.generate_key(KeyType.AES, 256, store=False, template=EXTRACTABLE)
    value = k[Attribute.VALUE]
    # CK_AES_CTR_PARAMS: ulCounterBits then the 16-byte counter block
    cb = os.urandom(8) + b"\x00" * 7 + b"\x01"
    msg = b"counter mode, not a multiple of the block size"
    # python-pkcs11 has no AES_CTR parameter class: the C struct, packed (CK_ULONG, 16 bytes)
    param = struct.pack("@L16s", 64, cb)
    ct = k.encrypt(msg, mechanism=Mechanism.AES_CTR, mechanism_param=param)
    enc = Cipher(algorithms.AES(value), modes.CTR(cb)).encryptor()
    assert ct == enc.update(msg) + enc.finalize()
    assert k.decrypt(ct, mechanism=Mechanism.AES_CTR, mechanism_param=param) == msg


def test_aes_key_wrap_pad(session: Any) -> None:
    kek = session.generate_key(
        KeyType.AES,
        256,
        store=False,
        template={Attribute.WRAP: True, Attribute.UNWRAP: True, **EXTRACTABLE},
    )
    # a 20-byte HMAC key: not a multiple of 8, so only KWP (RFC 5649) can wrap it
    subject = session.generate_key(KeyType.GENERIC_SECRET, 160, store=False, template=EXTRACTABLE)
    wrapped = kek.wrap_key(subject, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    assert len(wrapped) == 32
    value = subject[Attribute.VALUE]
    assert aes_key_unwrap_with_padding(kek[Attribute.VALUE], wrapped) == value
    new = kek.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.GENERIC_SECRET,
        wrapped,
        mechanism=Mechanism.AES_KEY_WRAP_PAD,
        store=False,
        template=EXTRACTABLE,
    )
    assert new[Attribute.VALUE] == value


def test_aes_cmac(session: Any) -> None:
    k = session.generate_key(
        KeyType.AES,
        128,
        store=False,
        template={Attribute.SIGN: True, Attribute.VERIFY: True, **EXTRACTABLE},
    )
    assert k[Attribute.SIGN] is True
    msg = b"authenticated by CMAC"
    mac = k.sign(msg, mechanism=Mechanism.AES_CMAC)
    c = cmac.CMAC(algorithms.AES(k[Attribute.VALUE]))
    c.update(msg)
    assert mac == c.finalize()
    assert k.verify(msg, mac, mechanism=Mechanism.AES_CMAC)
    assert not k.verify(msg + b"!", mac, mechanism=Mechanism.AES_CMAC)


def test_fork_child_initializes_again_and_signs(world: World) -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "pkcs11" / "_fork_host.py"),
            str(world.module),
            world.api_key,
            world.names["ec"],
        ],
        env=tool_env(world),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["child-before-init"] == "PKCS11Error"  # not initialised in the child
    assert lines["child-exit"] == "0"
    pub = serialization.load_der_public_key(world.keys[world.names["ec"]]["pub_key"])
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    for who in ("parent", "child", "parent-after"):
        sig = bytes.fromhex(lines[who])
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        pub.verify(der, f"signed by the {who}".encode(), ec.ECDSA(hashes.SHA256()))
