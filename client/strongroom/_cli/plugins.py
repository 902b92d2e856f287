"""``plugin``: push, list, delete, invoke and test Lua plugins."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from strongroom._cli._common import (
    EXIT_API,
    Failure,
    State,
    confirm,
    done,
    group_id,
    json_arg,
    jsonable,
    pass_state,
    print_json,
    read_input,
    resolve,
    show,
    yes_option,
)
from strongroom._exceptions import ApiError


@click.group()
def plugin() -> None:
    """Manage, invoke and test Lua plugins."""


def _plugin_id(state: State, value: str) -> str:
    return resolve(state.client.plugins.list(), value, "plugin_id", "plugin")["plugin_id"]


def _read_code(path: str) -> str:
    return read_input(path).decode("utf-8")


#: A global ``run`` defined as ``function run(`` or ``run = function(``.
_RUN = re.compile(r"^\s*(?:function\s+run\s*\(|run\s*=\s*function\s*\()", re.MULTILINE)


def _check_run(code: str, file: str) -> None:
    """Refuse code that defines no run(): it would compile, then fail at every invocation.

    A client-side check only (a source scan, so ``_ENV.run = ...`` tricks pass);
    the daemon compiles the code on save but does not run it.
    """
    if not _RUN.search(code):
        raise Failure(
            "no_run_function",
            f"{file} defines no run() function",
            "a plugin needs a global `function run(input, url, method) ... end`",
        )


@plugin.command("push")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--group", "groups_", multiple=True, required=True, help="Group name or id.")
@click.option("--name", help="Plugin name (default: the file's stem).")
@click.option("--description", help="Free text shown with the plugin.")
@pass_state
def plugin_push(state: State, file: str, groups_: tuple[str, ...], name, description) -> None:
    """Create a plugin from a Lua file, or update the one of that name."""
    name = name or Path(file).stem
    code = _read_code(file)
    _check_run(code, file)
    gids = [group_id(state, g) for g in groups_]
    existing = [p for p in state.client.plugins.list() if p.get("name") == name]
    if existing:
        r = state.client.plugins.update(
            existing[0]["plugin_id"], code=code, groups=gids, description=description
        )
    else:
        r = state.client.plugins.create(name, code, groups=gids, description=description)
    show(state, {k: v for k, v in r.items() if k != "source"})


@plugin.command("list")
@pass_state
def plugin_list(state: State) -> None:
    """List the plugins you can invoke."""
    show(state, state.client.plugins.list(), ["plugin_id", "name", "groups", "enabled"])


@plugin.command("delete")
@click.argument("plugin_", metavar="NAME_OR_ID")
@yes_option
@pass_state
def plugin_delete(state: State, plugin_: str, yes: bool) -> None:
    """Delete a plugin (asks first on a terminal)."""
    pid = _plugin_id(state, plugin_)
    confirm(state, yes, f"Delete plugin {plugin_!r} ({pid})?")
    state.client.plugins.delete(pid)
    done(state, {"deleted": pid}, f"deleted plugin {plugin_} ({pid})")


@plugin.command("invoke")
@click.argument("plugin_", metavar="NAME_OR_ID")
@click.option("--input", "input_", metavar="JSON", help="The plugin's input (default null).")
@pass_state
def plugin_invoke(state: State, plugin_: str, input_: str | None) -> None:
    """Invoke a plugin; prints its result as JSON."""
    print_json(state.client.plugins.invoke(_plugin_id(state, plugin_), json_arg(input_)))


@plugin.command("test")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--input", "input_", metavar="JSON", help="The plugin's input (default null).")
@click.option("--group", "groups_", multiple=True, help="Group name or id to run in.")
@pass_state
def plugin_test(state: State, file: str, input_: str | None, groups_: tuple[str, ...]) -> None:
    """Test-run a Lua file without saving it; prints result and output."""
    gids = [group_id(state, g) for g in groups_] or None
    try:
        r = state.client.plugins.test(_read_code(file), json_arg(input_), groups=gids)
    except ApiError as exc:  # a failed run may still have printed something
        if isinstance(exc.body, dict) and not state.json:
            _echo_output(exc.body)
        raise
    if state.json:
        print_json(r)
        if r.get("error"):
            click.get_current_context().exit(EXIT_API)
        return
    _echo_output(r)
    error = r.get("error")
    if error:
        err = error if isinstance(error, dict) else {"message": error}
        click.echo(f"error: {err.get('message', '')}", err=True)
        tb = err.get("traceback") or r.get("traceback")
        if tb:
            click.echo(tb, err=True)
        click.get_current_context().exit(EXIT_API)
    click.echo("result:")
    click.echo(json.dumps(jsonable(r.get("result")), indent=2, sort_keys=True))


@plugin.command("output")
@click.argument("invocation_id")
@pass_state
def plugin_output(state: State, invocation_id: str) -> None:
    """Show what a recent invocation printed (admins).

    Outputs are kept in memory only, never in the audit log: a restart or newer
    invocations forget them.
    """
    r = state.client.plugins.output(invocation_id)
    if state.json:
        print_json(r)
        return
    click.echo(r.get("output", ""), nl=False)
    if r.get("truncated"):
        click.echo("\n(output truncated)", err=True)


def _echo_output(body: dict[str, Any]) -> None:
    output = body.get("output", body.get("printed"))
    if output:
        click.echo("output:")
        click.echo(output if isinstance(output, str) else "\n".join(map(str, output)))
