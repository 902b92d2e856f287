"""The PKCS#11 provider against a real daemon: one world of groups, apps and keys."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from strongroom import Client

from tests.conftest import ROOT, Daemon, unique

#: `make -C pkcs11 asan-test` sets STRONGROOM_PKCS11_ASAN: the tests load the sanitized build
ASAN = bool(os.environ.get("STRONGROOM_PKCS11_ASAN"))
LIBDIR = ROOT / ".venv" / "lib"
MODULE = LIBDIR / "asan" / "libstrongroom-pkcs11.so" if ASAN else LIBDIR / "libstrongroom-pkcs11.so"


def build_module() -> Path:
    """Build and install the module (scripts/_setup.sh does it too); one builder at a time."""
    build = ROOT / "pkcs11" / "build"
    build.mkdir(exist_ok=True)
    target = "install-asan" if ASAN else "install"
    with open(build / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(
            ["make", "-s", "-C", str(ROOT / "pkcs11"), target, f"DESTDIR={LIBDIR}"],
            check=True,
            capture_output=True,
        )
    return MODULE


@pytest.fixture(scope="session")
def module() -> Path:
    return build_module()


@dataclass
class World:
    daemon: Daemon
    module: Path
    api_key: str  # app in group g1 (sees the keys below)
    other_key: str  # app in group g2 only
    tls_key: str = ""  # app in group g3: RSA and EC keys only (see test_openssl_ssh.py)
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> sobject
    names: dict[str, str] = field(default_factory=dict)  # role -> unique name

    def kid(self, role: str) -> str:
        return self.keys[self.names[role]]["kid"]

    def id_hex(self, role: str) -> str:
        return self.kid(role).encode().hex()

    def client(self) -> Client:
        return Client(self.daemon.socket, self.api_key)


KEY_SPECS = {
    "rsa": {"obj_type": "RSA", "key_size": 2048},
    "ec": {"obj_type": "EC", "elliptic_curve": "NistP256"},
    "ec384": {"obj_type": "EC", "elliptic_curve": "NistP384"},
    "ed": {"obj_type": "EC", "elliptic_curve": "Ed25519"},
    "aes": {"obj_type": "AES", "key_size": 256},
    "aes_x": {"obj_type": "AES", "key_size": 128, "key_ops": ["ENCRYPT", "DECRYPT", "EXPORT"]},
    "hmac": {"obj_type": "HMAC", "key_size": 256},
    "verify_only": {"obj_type": "EC", "elliptic_curve": "NistP256", "key_ops": ["VERIFY"]},
}


@pytest.fixture(scope="session")
def world(daemon: Daemon, module: Path) -> Iterator[World]:
    admin = Client(daemon.socket, daemon.admin_key)
    g1 = admin.request("POST", "/sys/v1/groups", {"name": unique("p11g1")})["group_id"]
    g2 = admin.request("POST", "/sys/v1/groups", {"name": unique("p11g2")})["group_id"]
    app = admin.request("POST", "/sys/v1/apps", {"name": unique("p11app"), "groups": [g1]})
    other = admin.request("POST", "/sys/v1/apps", {"name": unique("p11other"), "groups": [g2]})
    w = World(daemon, module, app["credential"]["api_key"], other["credential"]["api_key"])
    with w.client() as c:
        for role, spec in KEY_SPECS.items():
            name = unique(f"p11-{role}")
            w.names[role] = name
            w.keys[name] = c.request("POST", "/crypto/v1/keys", {"name": name, **spec})
    with Client(daemon.socket, w.other_key) as c:
        name = unique("p11-other-aes")
        w.names["other"] = name
        w.keys[name] = c.request("POST", "/crypto/v1/keys", {"name": name, "obj_type": "AES"})
    # libp11 0.4.12 (Debian 12's OpenSSL engine) stops enumerating keys at the
    # first key type it does not know (CKK_EC_EDWARDS): OpenSSL gets an app without one.
    g3 = admin.request("POST", "/sys/v1/groups", {"name": unique("p11g3")})["group_id"]
    tls = admin.request("POST", "/sys/v1/apps", {"name": unique("p11tls"), "groups": [g3]})
    w.tls_key = tls["credential"]["api_key"]
    with Client(daemon.socket, w.tls_key) as c:
        for role in ("rsa", "ec"):
            name = unique(f"p11-tls-{role}")
            w.names[f"tls_{role}"] = name
            w.keys[name] = c.request("POST", "/crypto/v1/keys", {"name": name, **KEY_SPECS[role]})
    admin.close()
    yield w


_LIB: dict[str, Any] = {}


@pytest.fixture(scope="session")
def p11(world: World) -> Any:
    """python-pkcs11's handle on the module, loaded once per test process."""
    import pkcs11

    if "lib" not in _LIB:
        os.environ["STRONGROOM_SOCKET"] = str(world.daemon.socket)
        _LIB["lib"] = pkcs11.lib(str(world.module))
    return _LIB["lib"]


@pytest.fixture
def session(p11: Any, world: World) -> Iterator[Any]:
    tok = p11.get_token(token_label="strongroom")
    with tok.open(user_pin=world.api_key, rw=True) as s:
        yield s


def tool_env(world: World, **extra: str) -> dict[str, str]:
    env = {**os.environ, "STRONGROOM_SOCKET": str(world.daemon.socket)}
    for name in ("STRONGROOM_PKCS11_CONFIG", "STRONGROOM_PKCS11_API_KEY_FILE"):
        env.pop(name, None)
    return {**env, **extra}
