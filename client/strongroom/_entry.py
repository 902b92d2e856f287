"""The ``strongroom`` console script: the CLI if click is installed, else how to get it.

Kept apart from ``strongroom._cli`` (which imports click at once) so that a
client installed without the ``cli`` extra answers with a fix, not a traceback.
"""

from __future__ import annotations

import importlib.util
import sys

MISSING_CLICK = (
    "strongroom: the command line needs the click package, which is not installed.\n"
    "Install the client with its cli extra:  pip install 'strongroom[cli]'\n"
    "(from a checkout: pip install './client[cli]'; the library itself needs only msgpack)\n"
)


def main() -> None:
    """Console-script entry point."""
    if importlib.util.find_spec("click") is None:
        sys.stderr.write(MISSING_CLICK)
        sys.exit(2)
    from strongroom._cli import main as cli_main

    cli_main()
