"""``call``: send any request by method and path."""

from __future__ import annotations

import click

from strongroom._cli._common import State, json_arg, pass_state, print_json


@click.command()
@click.argument("method")
@click.argument("path")
@click.option("--body", metavar="JSON", help="Request body as JSON.")
@pass_state
def call(state: State, method: str, path: str, body: str | None) -> None:
    """Send any request, e.g. `call GET /sys/v1/groups`; print the body as JSON."""
    print_json(state.client.request(method, path, json_arg(body)))
