"""Command line: flags -> Config -> Server; exit codes.

strongroomd [serve] [--config FILE] [--state-dir DIR] [--socket PATH]
strongroomd check-config [--config FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from strongroomd import config as config_mod
from strongroomd.config import ConfigError

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_STARTUP_FAILURE = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strongroomd", description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="serve", choices=["serve", "check-config"])
    p.add_argument("--config", help="TOML settings file")
    p.add_argument("--state-dir", help="state directory (default ./var or $STRONGROOM_STATE_DIR)")
    p.add_argument("--socket", help="Unix socket path (default <state-dir>/strongroomd.sock)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = config_mod.load(args.config, state_dir=args.state_dir, socket=args.socket)
    except ConfigError as exc:
        print(f"strongroomd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        for name in cfg.__slots__:
            if name != "extra":
                print(f"{name} = {getattr(cfg, name)!r}")
        return EXIT_OK

    from strongroomd.server import Server, StartupError

    try:
        asyncio.run(Server(cfg).run())
    except (StartupError, ConfigError) as exc:
        logging.getLogger("strongroomd").error("cannot start: %s", exc)
        return EXIT_STARTUP_FAILURE
    except KeyboardInterrupt:  # pragma: no cover - the signal handler normally wins
        pass
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
