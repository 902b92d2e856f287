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

import json
from typing import Any

import click

from strongroom import __version__
from strongroom._cli import admin, call, crypto, envelope, keys, plugins
from strongroom._cli._common import EXIT_API, EXIT_TRANSPORT, EXIT_USAGE, Failure, State
from strongroom._exceptions import ApiError, TransportError

__all__ = ["EXIT_API", "EXIT_TRANSPORT", "EXIT_USAGE", "cli", "main"]


class _Group(click.Group):
    """Turns library errors into exit statuses, for every subcommand below it.

    Errors go to stderr as ``error: <code>: <message>``, plus a line on what
    to do next when there is one; under ``--json`` as one JSON object
    ``{"error", "message", "status"?, "hint"?, ...}`` instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            extra = {k: body[k] for k in ("traceback", "invocation_id") if body.get(k)}
            message = exc.message
            if exc.code == "unauthenticated" and _no_key(ctx):  # not the library's "api_key="
                message = (
                    "no API key was given: set STRONGROOM_API_KEY to the key, or "
                    "STRONGROOM_API_KEY_FILE (or --api-key-file) to a file holding it"
                )
            report(ctx, exc.code, message, _api_hint(ctx, exc), status=exc.status, **extra)
            ctx.exit(EXIT_API)
        except TransportError as exc:
            hint = None
            if exc.socket_path:
                hint = (
                    f"is strongroomd running on {exc.socket_path}? Point to its socket with "
                    "--socket, $STRONGROOM_SOCKET or $STRONGROOM_STATE_DIR"
                )
            report(ctx, "transport", exc.message, hint)
            ctx.exit(EXIT_TRANSPORT)
        except Failure as exc:
            report(ctx, exc.code, exc.message, exc.hint)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            if not _json(ctx):
                raise
            report(ctx, "usage", exc.format_message())
            ctx.exit(EXIT_USAGE)


def _no_key(ctx: click.Context) -> bool:
    return isinstance(ctx.obj, State) and ctx.obj.api_key() is None


def _json(ctx: click.Context) -> bool:
    return isinstance(ctx.obj, State) and ctx.obj.json


def report(
    ctx: click.Context, code: str, message: str, hint: str | None = None, **extra: Any
) -> None:
    """One error on stderr: a line (and a hint) or, under --json, a JSON object."""
    if _json(ctx):
        doc = {"error": code, "message": message, **({"hint": hint} if hint else {}), **extra}
        click.echo(json.dumps(doc, sort_keys=True), err=True)
        return
    click.echo(
        f"error: {code}: {message}" if code != "transport" else f"error: {message}", err=True
    )
    if extra.get("traceback"):
        click.echo(extra["traceback"], err=True)
    if extra.get("invocation_id"):
        click.echo(f"(invocation {extra['invocation_id']}: strongroom logs --invocation "
                   f"{extra['invocation_id']})", err=True)  # fmt: skip
    if hint:
        click.echo(f"hint: {hint}", err=True)


def _api_hint(ctx: click.Context, exc: ApiError) -> str | None:
    """What to do next, for the errors whose fix is on this side."""
    state = ctx.obj if isinstance(ctx.obj, State) else None
    if exc.code == "unauthenticated" and state is not None and state.api_key() is None:
        return (
            "the admin key is admin.key in the daemon's state directory; an app's key "
            "is shown once, by `apps create` or `apps reset-secret`"
        )
    if exc.code == "bad_credentials":
        return (
            "the API key was refused: check STRONGROOM_API_KEY / STRONGROOM_API_KEY_FILE "
            "(an app's key is shown once, at `apps create` or `apps reset-secret`)"
        )
    if exc.code == "token_expired":
        return "the session expired: run the command again"
    if exc.code in ("forbidden", "key_op_not_permitted"):
        return "an admin can widen the app's groups or the key's key_ops"
    return None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="strongroom")
@click.option(
    "--socket",
    metavar="PATH",
    help="Daemon socket [$STRONGROOM_SOCKET, else $STRONGROOM_STATE_DIR/strongroomd.sock].",
)
@click.option(
    "--api-key-file", metavar="FILE", help="File holding the API key [$STRONGROOM_API_KEY_FILE]."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output; errors as JSON on stderr."
)
@click.pass_context
def cli(ctx: click.Context, socket: str | None, api_key_file: str | None, as_json: bool) -> None:
    """Talk to strongroomd: keys, crypto, apps, groups, plugins, audit.

    The API key comes from $STRONGROOM_API_KEY, or from the file named by
    --api-key-file or $STRONGROOM_API_KEY_FILE; never from the command line.

    Shell completion (commands, options, key names):
    eval "$(_STRONGROOM_COMPLETE=bash_source strongroom)" in ~/.bashrc
    (zsh_source / fish_source for zsh and fish).
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
    envelope.datakey,
    envelope.envelope,
    admin.logs,
    admin.audit,
    plugins.plugin,
):
    cli.add_command(_command)
del _command


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="strongroom")
