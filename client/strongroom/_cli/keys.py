"""``keys``: create, list, show, delete and export security objects."""

from __future__ import annotations

import click

from strongroom._cli._common import (
    State,
    apply,
    group_id,
    key_args,
    key_options,
    pass_state,
    print_json,
    show,
    write_output,
)

KEY_COLUMNS = ["kid", "name", "obj_type", "key_size", "elliptic_curve", "group_id", "key_ops"]


@click.group()
def keys() -> None:
    """Manage keys (security objects)."""


@keys.command("list")
@click.option("--group", help="Only keys in this group (name or id).")
@click.option("--name", help="Only the key with this name.")
@click.option("--limit", type=int)
@click.option("--offset", type=int)
@pass_state
def keys_list(
    state: State, group: str | None, name: str | None, limit: int | None, offset: int | None
) -> None:
    gid = group_id(state, group) if group else None
    rows = state.client.keys.list(group_id=gid, name=name, limit=limit, offset=offset)
    show(state, rows, KEY_COLUMNS)


@keys.command("create")
@click.argument("name")
@click.option("--type", "obj_type", required=True, help="AES, DES3, HMAC, SECRET, RSA, EC...")
@click.option("--size", type=int, help="Key size in bits.")
@click.option("--curve", help="NistP256, NistP384, NistP521, SecP256K1, Ed25519.")
@click.option("--ops", help="Comma-separated key_ops, e.g. ENCRYPT,DECRYPT.")
@click.option("--group", help="Group name or id (default: your default group).")
@click.option("--description")
@click.option("--transient", is_flag=True, help="A session key (gone when this command ends).")
@pass_state
def keys_create(
    state: State,
    name: str,
    obj_type: str,
    size: int | None,
    curve: str | None,
    ops: str | None,
    group: str | None,
    description: str | None,
    transient: bool,
) -> None:
    key_ops = [o.strip().upper() for o in ops.split(",") if o.strip()] if ops else None
    key = state.client.keys.create(
        name,
        obj_type.upper(),
        key_size=size,
        elliptic_curve=curve,
        key_ops=key_ops,
        group_id=group_id(state, group) if group else None,
        description=description,
        transient=transient or None,
    )
    show(state, key)


@keys.command("show")
@apply(key_options)
@pass_state
def keys_show(state: State, key: str | None, kid: str | None) -> None:
    show(state, state.client.keys.info(**key_args(key, kid)))


@keys.command("delete")
@apply(key_options)
@pass_state
def keys_delete(state: State, key: str | None, kid: str | None) -> None:
    if kid is None:
        kid = state.client.keys.info(**key_args(key, kid))["kid"]
    state.client.keys.delete(kid)


@keys.command("export")
@apply(key_options)
@click.option("--out", "out_path", metavar="FILE", help="Write the raw value here.")
@pass_state
def keys_export(state: State, key: str | None, kid: str | None, out_path: str | None) -> None:
    """Export a key's value (keys with EXPORT only): raw, or the sobject with --json."""
    sobject = state.client.keys.export(**key_args(key, kid))
    if state.json:
        print_json(sobject)
    else:
        write_output(out_path, sobject["value"])
