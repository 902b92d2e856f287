"""The ``strongroom`` command line, over :class:`strongroom.Client`.

Exit status: 0 ok, 1 API error (``error: <code>: <message>`` on stderr),
2 usage, 3 the daemon could not be reached or understood. Secrets never come
from argv: the API key is read from ``STRONGROOM_API_KEY``, or from the file
named by ``--api-key-file`` / ``STRONGROOM_API_KEY_FILE``.

One module per command family: ``admin`` (login, groups, apps, logs, audit),
``keys``, ``crypto`` (encrypt, decrypt, sign, verify, mac, digest), ``plugins``,
``call``; ``_common`` holds what they share. This module builds the root group.
"""

from __future__ import annotations

from typing import Any

import click

from strongroom._cli import admin, call, crypto, keys, plugins
from strongroom._cli._common import EXIT_API, EXIT_TRANSPORT, EXIT_USAGE, State
from strongroom._exceptions import ApiError, TransportError

__all__ = ["EXIT_API", "EXIT_TRANSPORT", "EXIT_USAGE", "cli", "main"]


class _Group(click.Group):
    """Turns library errors into exit statuses, for every subcommand below it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            click.echo(f"error: {exc.code}: {exc.message}", err=True)
            tb = exc.body.get("traceback") if isinstance(exc.body, dict) else None
            if tb:
                click.echo(tb, err=True)
            ctx.exit(EXIT_API)
        except TransportError as exc:
            click.echo(f"error: {exc.message}", err=True)
            if exc.socket_path:
                click.echo(f"(is strongroomd running on {exc.socket_path}?)", err=True)
            ctx.exit(EXIT_TRANSPORT)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", metavar="PATH", help="Daemon socket [$STRONGROOM_SOCKET].")
@click.option("--api-key-file", metavar="FILE", help="File holding the API key.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def cli(ctx: click.Context, socket: str | None, api_key_file: str | None, as_json: bool) -> None:
    """Talk to strongroomd: keys, crypto, apps, groups, plugins, audit.

    The API key comes from $STRONGROOM_API_KEY, or from the file named by
    --api-key-file or $STRONGROOM_API_KEY_FILE; never from the command line.
    """
    ctx.obj = State(socket, api_key_file, as_json)


for _command in (
    admin.login,
    call.call,
    admin.groups,
    admin.apps,
    keys.keys,
    crypto.encrypt,
    crypto.decrypt,
    crypto.sign,
    crypto.verify,
    crypto.mac,
    crypto.digest,
    admin.logs,
    admin.audit,
    plugins.plugin,
):
    cli.add_command(_command)
del _command


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="strongroom")
