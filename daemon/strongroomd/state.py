"""First start on an empty state directory: directories, SoftHSM token, PINs.

Everything here is idempotent: a second start finds what the first made and
reuses it. PINs are generated, written 0600 before the token is made (so a
crash in between never leaves a token whose PIN is lost), and handed to the
token initialiser on stdin, never in argv.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from strongroomd.config import Config, ConfigError, find_softhsm


@dataclass(frozen=True, slots=True)
class TokenSettings:
    module: str
    label: str
    pin: str


def write_secret(path: Path, data: str) -> None:
    """Write a file that only its owner can read, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_secret(path: Path) -> str:
    try:
        mode = path.stat().st_mode & 0o777
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if mode & 0o077 and not str(path).startswith(os.environ.get("CREDENTIALS_DIRECTORY", "\0")):
        raise ConfigError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    if not value:
        raise ConfigError(f"{path} is empty")
    return value


def private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


#: The project's SoftHSM template (``softhsm_config/`` at the top of the source tree).
SOFTHSM_TEMPLATE = Path(__file__).resolve().parents[2] / "softhsm_config" / "softhsm2.conf"
#: The same text, for an installed package that has no source tree beside it
#: (tests/pkcs11/test_softhsm_config.py keeps the two equal).
BUILTIN_SOFTHSM_TEMPLATE = """\
# SoftHSM2 configuration for strongroomd's embedded token.
# strongroomd renders this template into <state_dir>/softhsm/softhsm2.conf
# (0600) at start and points SOFTHSM2_CONF at it; {tokendir} becomes
# <state_dir>/softhsm/tokens. Debian's SoftHSM has only the file backend.
directories.tokendir = {tokendir}
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""


def softhsm_template() -> str:
    try:
        return SOFTHSM_TEMPLATE.read_text()
    except OSError:
        return BUILTIN_SOFTHSM_TEMPLATE


def render_softhsm_conf(tokendir: Path) -> str:
    # str.replace, not format: the comments may hold braces of their own.
    return softhsm_template().replace("{tokendir}", str(tokendir.resolve()))


def softhsm_conf(cfg: Config) -> Path:
    return cfg.softhsm_dir / "softhsm2.conf"


def prepare(cfg: Config) -> TokenSettings:
    """Make the state directory and (embedded mode) the SoftHSM token; set SOFTHSM2_CONF."""
    private_dir(cfg.state_dir)
    if not cfg.embedded:
        return TokenSettings(
            cfg.pkcs11_module, cfg.token_label, read_secret(cfg.resolve_pin_file())
        )

    module = find_softhsm()
    hsm = cfg.softhsm_dir
    private_dir(hsm)
    private_dir(hsm / "tokens")
    conf = softhsm_conf(cfg)
    text = render_softhsm_conf(hsm / "tokens")
    if not conf.exists() or conf.read_text() != text:
        write_secret(conf, text)
    # SoftHSM reads this at C_Initialize; set it before anything loads the module.
    os.environ["SOFTHSM2_CONF"] = str(conf.resolve())

    so_pin_file, user_pin_file = hsm / "so.pin", cfg.resolve_pin_file()
    if not so_pin_file.exists():
        write_secret(so_pin_file, secrets.token_urlsafe(24))
    # Only the generated PIN is ever made here; a configured pin_file or a systemd
    # credential is the operator's (often on a read-only path) and must exist: its
    # value becomes the user PIN of a token made now, or must match an existing one.
    if not user_pin_file.exists() and user_pin_file == cfg.generated_pin_file:
        write_secret(user_pin_file, secrets.token_urlsafe(24))
    so_pin, user_pin = read_secret(so_pin_file), read_secret(user_pin_file)

    proc = subprocess.run(
        [sys.executable, "-m", "strongroomd._tokeninit", module, cfg.token_label],
        input=f"{so_pin}\n{user_pin}\n".encode(),
        capture_output=True,
        env=os.environ.copy(),
        check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(f"token initialisation failed: {proc.stderr.decode().strip()}")
    return TokenSettings(module, cfg.token_label, user_pin)
