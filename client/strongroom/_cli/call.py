"""``call``: send any request by method and path."""

from __future__ import annotations

import click

from strongroom._cli._common import State, binary_fields, json_arg, pass_state, print_json


@click.command()
@click.argument("method")
@click.argument("path")
@click.option(
    "--body",
    metavar="JSON",
    help='Request body as JSON; {"$base64": "..."} sends bytes. @FILE reads the JSON from FILE.',
)
@pass_state
def call(state: State, method: str, path: str, body: str | None) -> None:
    """Send any request by method and path; print the answer.

    Binary fields (plain, cipher, iv, tag, data...) are bytes on the wire:
    write them as {"$base64": "<base64>"} in --body. Bytes in the answer
    print as base64 strings. Example:

    \b
      strongroom call POST /crypto/v1/digest \\
        --body '{"alg": "SHA256", "data": {"$base64": "aGVsbG8="}}'
    """
    if body is not None and body.startswith("@"):
        try:
            with open(body[1:], encoding="utf-8") as f:
                body = f.read()
        except OSError as exc:
            raise click.UsageError(f"cannot read {body[1:]}: {exc.strerror}") from None
    print_json(state.client.request(method, path, binary_fields(json_arg(body))))
