"""Command line: flags -> Config -> Server; exit codes.

strongroomd [serve] [--config FILE] [--state-dir DIR] [--socket PATH] [--http-port N]
strongroomd --version
strongroomd check-config [--config FILE]
strongroomd audit verify [--state-dir DIR | --db FILE]   (database_url: that database)
strongroomd backup --out FILE [--passphrase-file FILE]
strongroomd restore --in FILE --state-dir DIR [--force] [--passphrase-file FILE]
strongroomd admin rotate
strongroomd migrate --to postgresql://USER@HOST:PORT/DB

The URL of migrate should carry no password: libpq reads one from ~/.pgpass
(PGPASSFILE) or $PGPASSWORD, as it does for the daemon's database_url.

A backup's passphrase comes from --passphrase-file, else
$STRONGROOM_BACKUP_PASSPHRASE, else a prompt on a terminal; never from argv.

Exit status: 0 ok, 1 a check failed (audit chain broken), 2 configuration or
usage error, 3 the daemon (or an offline command) could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path

import strongroomd
from strongroomd import config as config_mod
from strongroomd.config import ConfigError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_CONFIG = 2
EXIT_STARTUP_FAILURE = 3
#: Where a backup's passphrase may come from, besides --passphrase-file.
PASSPHRASE_ENV = "STRONGROOM_BACKUP_PASSPHRASE"  # noqa: S105 - a variable's name


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the subcommand's default.
    s = argparse.SUPPRESS
    common.add_argument("--config", default=s, help="TOML settings file")
    common.add_argument(
        "--state-dir", default=s, help="state directory (default ./var or $STRONGROOM_STATE_DIR)"
    )
    common.add_argument(
        "--socket", default=s, help="Unix socket path (default <state-dir>/strongroomd.sock)"
    )
    common.add_argument(
        "--http-port",
        default=s,
        type=int,
        metavar="N",
        help="HTTP gateway port when the gateway is enabled (default 8480 or "
        "$STRONGROOM_HTTP_PORT; 0 picks a free one)",
    )
    common.add_argument("--log-level", default=s, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p = argparse.ArgumentParser(
        prog="strongroomd", description=__doc__.splitlines()[0], parents=[common]
    )
    p.add_argument("--version", action="version", version=f"strongroomd {strongroomd.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", parents=[common], help="serve in the foreground (the default)")
    sub.add_parser(
        "check-config", parents=[common], help="print the resolved settings, or what is wrong"
    )
    audit = sub.add_parser("audit", parents=[common], help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    verify = audit_sub.add_parser(
        "verify", parents=[common], help="check the audit hash chain of a database file, offline"
    )
    verify.add_argument("--db", help="database file (default <state-dir>/strongroom.db)")
    file_help = (
        "file holding the backup's passphrase (else $STRONGROOM_BACKUP_PASSPHRASE, "
        "else asked on a terminal)"
    )
    backup = sub.add_parser(
        "backup", parents=[common], help="write a consistent snapshot (encrypted, 0600)"
    )
    backup.add_argument("--out", required=True, help="the backup file to write")
    backup.add_argument("--passphrase-file", metavar="FILE", help=file_help)
    restore = sub.add_parser(
        "restore", parents=[common], help="bring a snapshot back into a state directory"
    )
    restore.add_argument("--in", dest="in_", required=True, help="the backup file to read")
    restore.add_argument("--force", action="store_true", help="replace a non-empty state dir")
    restore.add_argument("--passphrase-file", metavar="FILE", help=file_help)
    mig = sub.add_parser(
        "migrate",
        parents=[common],
        help="copy this state directory's SQLite data into an empty PostgreSQL (daemon stopped)",
    )
    mig.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST:PORT/DB")
    admin = sub.add_parser("admin", parents=[common], help="administrator credential")
    admin_sub = admin.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)
    admin_sub.add_parser(
        "rotate",
        parents=[common],
        help="new admin API key in <state-dir>/admin.key (through the daemon when it runs)",
    )
    return p


# -- logging ---------------------------------------------------------------------------


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\\\n\r\t') and text.isprintable():
        return text
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{text}"'


class LogfmtFormatter(logging.Formatter):
    """One line per event: ``ts=... level=... logger=... msg="..." [exc="..."]``.

    Values are quoted and escaped as logfmt does, so a message or a traceback
    with newlines still makes exactly one line (journald and grep-friendly).
    Extra fields given with ``log.info(..., extra={"fields": {...}})`` follow.
    """

    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        parts = [
            f"ts={ts}",
            f"level={record.levelname.lower()}",
            f"logger={_logfmt_value(record.name)}",
            f"msg={_logfmt_value(record.getMessage())}",
        ]
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            parts += [f"{k}={_logfmt_value(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append(f"exc={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# -- commands --------------------------------------------------------------------------


def _check_config(cfg: config_mod.Config) -> int:
    for line in config_mod.describe(cfg):
        print(line)
    problems = config_mod.check(cfg)
    for problem in problems:
        print(f"strongroomd: configuration error: {problem}", file=sys.stderr)
    return EXIT_CONFIG if problems else EXIT_OK


def _audit_verify(cfg: config_mod.Config, db: str | None) -> int:
    from strongroomd.audit import verify_file

    if cfg.database_url and not db:  # several nodes: every node's records, one chain
        from strongroomd.config import redact_url
        from strongroomd.pgstore import verify_url

        try:
            checked, brk, _ = verify_url(cfg.database_url)
        except Exception as exc:
            where = redact_url(cfg.database_url)
            print(f"strongroomd: cannot read {where}: {type(exc).__name__}", file=sys.stderr)
            return EXIT_STARTUP_FAILURE
    else:
        path = Path(db) if db else cfg.db_path
        try:
            checked, brk = verify_file(path)
        except (OSError, ValueError, sqlite3.Error) as exc:
            print(f"strongroomd: cannot read {path}: {exc}", file=sys.stderr)
            return EXIT_STARTUP_FAILURE
    if brk is None:
        print(f"audit chain intact: {checked} records")
        return EXIT_OK
    print(f"audit chain broken at record {brk.seq}: {brk.reason} ({checked} records before it)")
    return EXIT_CHECK_FAILED


def _passphrase(file: str | None, *, confirm: bool) -> str:
    """The backup passphrase: a file, the environment, or a terminal prompt; never argv."""
    if file is not None:
        try:
            text = Path(file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read passphrase file {file}: {exc.strerror}") from None
    elif os.environ.get(PASSPHRASE_ENV):
        text = os.environ[PASSPHRASE_ENV]
    elif sys.stdin.isatty():
        text = getpass.getpass("backup passphrase: ")
        if confirm and getpass.getpass("again: ") != text:
            raise ConfigError("the passphrases differ")
    else:
        raise ConfigError(
            f"a backup is encrypted: give its passphrase with --passphrase-file FILE or "
            f"${PASSPHRASE_ENV} (never on the command line)"
        )
    if not text:
        raise ConfigError("the backup passphrase is empty")
    return text


def _serve(cfg: config_mod.Config) -> int:
    from strongroomd.server import Server, StartupError

    if not cfg.inspectable:
        _not_dumpable()

    try:
        asyncio.run(Server(cfg).run())
    except (StartupError, ConfigError) as exc:
        logging.getLogger("strongroomd").error("cannot start: %s", exc)
        return EXIT_STARTUP_FAILURE
    except KeyboardInterrupt:  # pragma: no cover - the signal handler normally wins
        pass
    return EXIT_OK


def _not_dumpable() -> None:
    """No /proc/PID/mem (nor ptrace, nor core dump) for other processes of this
    user, plugin workers included: before the PIN is read or a key is used."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    command = args.command or "serve"
    try:
        cfg = config_mod.load(
            getattr(args, "config", None),
            state_dir=getattr(args, "state_dir", None),
            socket=getattr(args, "socket", None),
            http_port=getattr(args, "http_port", None),
        )
    except ConfigError as exc:
        print(f"strongroomd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "check-config":
        return _check_config(cfg)
    if command == "audit":
        return _audit_verify(cfg, args.db)
    try:
        if cfg.database_url and command in ("backup", "restore"):
            raise ConfigError(
                "with database_url the metadata is in PostgreSQL: back it up with its own "
                "tools (pg_dump, base backups), and the token with the HSM vendor's"
            )
        if command == "backup":
            from strongroomd import backup

            secret = _passphrase(args.passphrase_file, confirm=True)
            backup.backup(cfg, Path(args.out), secret)
            print(f"strongroomd: encrypted backup written to {args.out}")
            return EXIT_OK
        if command == "restore":
            from strongroomd import backup

            backup.restore(
                cfg,
                Path(args.in_),
                force=args.force,
                passphrase=lambda: _passphrase(args.passphrase_file, confirm=False),
            )
            print(f"strongroomd: restored into {cfg.state_dir}")
            return EXIT_OK
        if command == "migrate":
            from strongroomd import migrate
            from strongroomd.server import StartupError, _lock_state

            try:
                lock = _lock_state(cfg)  # the daemon must not write meanwhile
            except StartupError as exc:
                raise ConfigError(f"{exc}: stop the daemon first") from None
            try:
                done = migrate.migrate(cfg, args.to)
            finally:
                os.close(lock)
            print(f"strongroomd: SQLite copy kept in {done.pop('backup')}")
            print("strongroomd: copied " + ", ".join(f"{n} {t}" for t, n in done.items()))
            print(
                "strongroomd: now set database_url in the configuration "
                "(docs/architecture.md, 'Several nodes') and start the daemon"
            )
            return EXIT_OK
        if command == "admin":
            from strongroomd import admin

            # Several nodes: only through a running node (the rows are in PostgreSQL).
            path = admin._rotate_online(cfg) if cfg.database_url else admin.rotate(cfg)
            print(f"strongroomd: new admin API key in {path}")
            return EXIT_OK
    except ConfigError as exc:
        print(f"strongroomd: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILURE
    return _serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
