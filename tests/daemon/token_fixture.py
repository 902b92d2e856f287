"""A fresh SoftHSM token for the token-layer tests: one per test process.

SoftHSM reads ``SOFTHSM2_CONF`` when the module is initialised, and a
process initialises it once, so every test in a process shares the token
made here. ``softhsm2-util`` is given the PINs in argv: acceptable for a
throw-away test token, never done by the daemon.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

MODULE = os.environ.get("STRONGROOM_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
LABEL = "strongroom-test"
USER_PIN = "1234-test-pin"
SO_PIN = "5678-test-so-pin"


@dataclass(frozen=True)
class SoftHSMToken:
    module: str
    label: str
    pin: str
    directory: str


_token: SoftHSMToken | None = None


def softhsm_token() -> SoftHSMToken:
    """Create (once per process) a SoftHSM token in a temporary directory."""
    global _token
    if _token is not None:
        return _token
    directory = tempfile.mkdtemp(prefix="strongroom-softhsm-")
    atexit.register(shutil.rmtree, directory, True)
    tokendir = os.path.join(directory, "tokens")
    os.mkdir(tokendir, 0o700)
    conf = os.path.join(directory, "softhsm2.conf")
    with open(conf, "w") as f:
        f.write(
            f"directories.tokendir = {tokendir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
        )
    os.environ["SOFTHSM2_CONF"] = conf
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            LABEL,
            "--so-pin",
            SO_PIN,
            "--pin",
            USER_PIN,
        ],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    _token = SoftHSMToken(MODULE, LABEL, USER_PIN, directory)
    return _token
