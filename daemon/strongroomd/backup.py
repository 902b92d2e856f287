"""Backup and restore of a state directory, safe while the daemon runs.

A backup is a tar of: ``strongroom.db`` (a snapshot through SQLite's online
backup API), the embedded SoftHSM's ``softhsm/tokens/`` and ``softhsm2.conf``,
the PINs (``softhsm/user.pin``, ``softhsm/so.pin``), ``admin.key`` when
present, and ``backup.json`` (what and when). It holds everything needed to use
the keys, so it is written encrypted under a passphrase given at backup time
(:mod:`strongroomd._backupcrypt`: scrypt, AES-256-GCM in chunks), mode 0600,
and the plain tar never touches the disk. Restore asks for the passphrase; it
still reads the plain tars older versions wrote.

The consistency rule. The daemon keeps, at every instant, *every key row has
its token object*: it creates the token object before committing the row, and
deletes the row before destroying the object (keyring.py). Copying the token
and the database at two different instants breaks that in either order (a key
created in between is a row without material if the token is copied first; a
key deleted in between is a row without material if the database is copied
first). So the backup freezes the token instead: it takes an exclusive flock
on ``<state_dir>/token.lock``, which every token write in the daemon holds
shared (``Token.open(write_lock=...)``); while it holds it, no token object is
made or destroyed. Under the freeze it copies the token files, then snapshots
the database. Rows then are a subset of the copied objects; the extra objects
(keys being created and not yet acknowledged, or being deleted) are removed by
the start-up reconcile after a restore, exactly as after a crash. The freeze
lasts as long as copying the token files takes; crypto requests queue behind a
write that waits for it (one PKCS#11 thread), none fails.

With a PKCS#11 module other than the embedded SoftHSM the keys live in that
HSM and are backed up with its vendor's tools; the tar then holds the database
and admin key only, to be restored against the same token.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import sqlite3
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from strongroomd import _backupcrypt, state
from strongroomd.config import Config, ConfigError

MANIFEST = "backup.json"
FORMAT = 1
#: Never part of a backup: they belong to one running daemon.
_SKIP = {"strongroomd.lock", "token.lock", "strongroomd.sock", "http.url"}


def token_lock_path(cfg: Config) -> Path:
    return cfg.state_dir / "token.lock"


def backup(cfg: Config, out: Path, passphrase: str) -> dict[str, object]:
    """Write the snapshot, encrypted, to ``out`` (replaced atomically); return its manifest."""
    if not passphrase:
        raise ConfigError("a backup needs a passphrase (it holds the token and its PINs)")
    if not cfg.db_path.is_file():
        raise ConfigError(f"no database at {cfg.db_path}: nothing to back up")
    manifest: dict[str, object] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "embedded": cfg.embedded,
        "token_label": cfg.token_label,
        "pkcs11_module": cfg.pkcs11_module,
    }
    tmp = out.with_name(f".{out.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            sealed = _backupcrypt.EncryptingWriter(fh, passphrase)
            _write_tar(cfg, sealed, manifest)
            sealed.close()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return manifest


def _write_tar(cfg: Config, fh: _backupcrypt.EncryptingWriter, manifest: dict[str, object]) -> None:
    with tarfile.open(fileobj=fh, mode="w") as tar:  # type: ignore[call-overload]
        lock = os.open(token_lock_path(cfg), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # token writes wait from here...
            t0 = time.monotonic()
            if cfg.embedded:
                _add_tree(tar, cfg.softhsm_dir / "tokens", cfg.state_dir)
            _add_bytes(tar, "strongroom.db", _snapshot(cfg.db_path))
            manifest["freeze_ms"] = round((time.monotonic() - t0) * 1000, 1)
        finally:
            os.close(lock)  # ...until here
        if cfg.embedded:
            conf = state.softhsm_conf(cfg)
            if conf.is_file():
                _add_bytes(tar, "softhsm/softhsm2.conf", conf.read_bytes())
            so_pin = cfg.softhsm_dir / "so.pin"
            if so_pin.is_file():
                _add_bytes(tar, "softhsm/so.pin", so_pin.read_bytes())
            # The PIN the token answers to, wherever it comes from (a credential too).
            pin = state.read_secret(cfg.resolve_pin_file())
            _add_bytes(tar, "softhsm/user.pin", (pin + "\n").encode())
        if cfg.admin_key_path.is_file():
            _add_bytes(tar, "admin.key", cfg.admin_key_path.read_bytes())
        _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2).encode())


def _snapshot(db_path: Path) -> bytes:
    """A consistent copy of the database, WAL included, while the daemon writes."""
    src = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(":memory:")
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
        return dst.serialize()
    finally:
        src.close()
        dst.close()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _add_tree(tar: tarfile.TarFile, root: Path, base: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.name in _SKIP or not (path.is_file() or path.is_dir()) or path.is_symlink():
            continue
        name = str(path.relative_to(base))
        if path.is_dir():
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, int(time.time())
            tar.addfile(info)
        else:
            _add_bytes(tar, name, path.read_bytes())


# -- restore ---------------------------------------------------------------------------


def kind(src: Path) -> str:
    """``"encrypted"`` or ``"tar"`` (unencrypted, from older versions); ConfigError otherwise."""
    try:
        with open(src, "rb") as fh:
            head = fh.read(len(_backupcrypt.MAGIC))
    except OSError as exc:
        raise ConfigError(f"cannot read backup {src}: {exc.strerror}") from None
    if head == _backupcrypt.MAGIC:
        return "encrypted"
    try:
        if tarfile.is_tarfile(src):
            return "tar"
    except OSError:
        pass
    raise ConfigError(f"{src} is not a Strongroom backup")


def restore(
    cfg: Config,
    src: Path,
    *,
    force: bool = False,
    passphrase: str | Callable[[], str] | None = None,
) -> dict[str, object]:
    """Unpack a backup into ``cfg.state_dir``; refuse a non-empty one unless ``force``.

    The daemon must not run on that directory (its lock is taken). The backup is
    unpacked beside the old contents first, so a bad archive or passphrase
    destroys nothing; a failed restore leaves behind no directory it made.
    ``passphrase`` may be a function, asked only once the backup is known to
    need it and the target to accept it.
    """
    encrypted = kind(src) == "encrypted"
    target = cfg.state_dir
    if target.exists() and any(p.name not in _SKIP for p in target.iterdir()) and not force:
        raise ConfigError(f"{target} is not empty; --force replaces its contents")
    secret = None
    if encrypted:
        secret = passphrase() if callable(passphrase) else passphrase
        if not secret:
            raise ConfigError(f"{src} is encrypted: give its passphrase")
    made_target = not target.exists()
    lock_path = target / "strongroomd.lock"
    made_lock = not lock_path.exists()
    try:
        state.private_dir(target)
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                made_lock = False  # the running daemon's
                raise ConfigError(f"a daemon is running on {target}; stop it first") from None
            manifest = _restore_locked(target, src, secret)
        finally:
            os.close(lock)
    except BaseException:
        if made_target:
            shutil.rmtree(target, ignore_errors=True)
        elif made_lock:
            lock_path.unlink(missing_ok=True)
        raise
    return manifest


def _restore_locked(target: Path, src: Path, passphrase: str | None) -> dict[str, object]:
    staging = target / ".restore"
    plain = target / ".restore.tar"
    for old in (staging, plain):
        if old.is_dir():
            shutil.rmtree(old)
        old.unlink(missing_ok=True)
    state.private_dir(staging)
    try:
        if passphrase is not None:
            fd = os.open(plain, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(src, "rb") as fh, os.fdopen(fd, "wb") as out:
                try:
                    _backupcrypt.decrypt(fh, out, passphrase)
                except _backupcrypt.BackupCryptError as exc:
                    raise ConfigError(f"cannot restore {src}: {exc}") from None
            manifest = _unpack(plain, staging, shown=src)
        else:
            manifest = _unpack(src, staging, shown=src)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        plain.unlink(missing_ok=True)
    for p in target.iterdir():
        if p == staging or p.name == "strongroomd.lock":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    for p in staging.iterdir():
        p.rename(target / p.name)
    staging.rmdir()
    return manifest


def _unpack(src: Path, dest: Path, *, shown: Path) -> dict[str, object]:
    """Unpack the tar ``src`` into ``dest``; errors name ``shown`` (the user's file)."""
    try:
        return _unpack_tar(src, dest, shown)
    except (tarfile.TarError, EOFError, UnicodeError, ValueError) as exc:
        # tarfile's own words describe its internals, not the user's problem.
        what = "damaged" if isinstance(exc, (EOFError, tarfile.ReadError)) else "not usable"
        raise ConfigError(f"{shown} is not a Strongroom backup, or it is {what}") from None


def _unpack_tar(src: Path, dest: Path, shown: Path) -> dict[str, object]:
    with tarfile.open(src, mode="r") as tar:
        members = tar.getmembers()
        names = {m.name for m in members}
        if MANIFEST not in names or "strongroom.db" not in names:
            raise ConfigError(f"{shown} is not a Strongroom backup (no {MANIFEST})")
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                raise ConfigError(f"{shown}: refusing member {m.name!r}")
        for m in members:
            path = dest / m.name
            if m.isdir():
                state.private_dir(path)
                continue
            state.private_dir(path.parent)
            data = tar.extractfile(m)
            assert data is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                shutil.copyfileobj(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
        manifest = json.loads((dest / MANIFEST).read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{shown}: unknown backup format")
    return manifest
