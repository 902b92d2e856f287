"""Backup and restore of a state directory, safe while the daemon runs.

A backup is a tar (mode 0600) of: ``strongroom.db`` (a snapshot through
SQLite's online backup API), the embedded SoftHSM's ``softhsm/tokens/`` and
``softhsm2.conf``, the PINs (``softhsm/user.pin``, ``softhsm/so.pin``),
``admin.key`` when present, and ``backup.json`` (what and when).

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
from pathlib import Path

from strongroomd import state
from strongroomd.config import Config, ConfigError

MANIFEST = "backup.json"
FORMAT = 1
#: Never part of a backup: they belong to one running daemon.
_SKIP = {"strongroomd.lock", "token.lock", "strongroomd.sock", "http.url"}


def token_lock_path(cfg: Config) -> Path:
    return cfg.state_dir / "token.lock"


def backup(cfg: Config, out: Path) -> dict[str, object]:
    """Write the snapshot to ``out`` (replaced atomically); return its manifest."""
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
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w") as tar:
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
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return manifest


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


def restore(cfg: Config, src: Path, *, force: bool = False) -> dict[str, object]:
    """Unpack a backup into ``cfg.state_dir``; refuse a non-empty one unless ``force``.

    The daemon must not run on that directory (its lock is taken). The tar is
    unpacked beside the old contents first, so a bad archive destroys nothing.
    """
    target = cfg.state_dir
    if target.exists() and any(p.name not in _SKIP for p in target.iterdir()) and not force:
        raise ConfigError(f"{target} is not empty; --force replaces its contents")
    state.private_dir(target)
    lock = os.open(target / "strongroomd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"a daemon is running on {target}; stop it first") from None
        staging = target / ".restore"
        if staging.exists():
            shutil.rmtree(staging)
        state.private_dir(staging)
        try:
            manifest = _unpack(src, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
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
    finally:
        os.close(lock)
    return manifest


def _unpack(src: Path, dest: Path) -> dict[str, object]:
    try:
        tar = tarfile.open(src, mode="r")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise ConfigError(f"cannot read backup {src}: {exc}") from None
    with tar:
        members = tar.getmembers()
        names = {m.name for m in members}
        if MANIFEST not in names or "strongroom.db" not in names:
            raise ConfigError(f"{src} is not a strongroomd backup (no {MANIFEST})")
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                raise ConfigError(f"{src}: refusing member {m.name!r}")
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
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{src}: unknown backup format {manifest.get('format')!r}")
    return manifest
