"""``keys``: create, list, show, delete and export security objects."""

from __future__ import annotations

import json
from contextlib import nullcontext

import click

from strongroom._cli._common import (
    Failure,
    State,
    apply,
    busy,
    complete_keys,
    confirm,
    done,
    group_id,
    key_options,
    key_ref,
    pass_state,
    print_json,
    read_input,
    show,
    write_output,
    yes_option,
)

#: Names given as --type that are curves of EC keys.
CURVE_TYPES = {
    c.upper(): c for c in ("Ed25519", "NistP256", "NistP384", "NistP521", "SecP256K1")
} | {"P256": "NistP256", "P384": "NistP384", "P521": "NistP521", "SECP256K1": "SecP256K1"}

KEY_COLUMNS = ["kid", "name", "obj_type", "key_size", "elliptic_curve", "group_id", "key_ops"]


@click.group()
def keys() -> None:
    """Manage keys (security objects)."""


@keys.command("list")
@click.option("--group", help="Only keys in this group (name or id).")
@click.option("--name", help="Only the key with this name.")
@click.option("--limit", type=int, help="At most this many keys.")
@click.option("--offset", type=int, help="Skip this many first.")
@pass_state
def keys_list(
    state: State, group: str | None, name: str | None, limit: int | None, offset: int | None
) -> None:
    """List the keys you can use."""
    gid = group_id(state, group) if group else None
    rows = state.client.keys.list(group_id=gid, name=name, limit=limit, offset=offset)
    show(state, rows, KEY_COLUMNS)


@keys.command("create")
@click.argument("name")
@click.option(
    "--type",
    "obj_type",
    required=True,
    help="AES, DES3, HMAC, SECRET, RSA or EC (curves: --curve).",
)
@click.option("--size", type=int, help="Key size in bits.")
@click.option("--curve", help="NistP256, NistP384, NistP521, SecP256K1, Ed25519.")
@click.option("--ops", help="Comma-separated key_ops, e.g. ENCRYPT,DECRYPT.")
@click.option("--group", help="Group name or id (default: your default group).")
@click.option("--description", help="Free text shown with the key.")
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
    """Create a key in the token; prints its description."""
    kind = obj_type.upper()
    if kind in CURVE_TYPES:
        raise click.BadParameter(
            f"{obj_type} is a curve, not a key type: use --type EC --curve {CURVE_TYPES[kind]}",
            param_hint="--type",
        )
    key_ops = [o.strip().upper() for o in ops.split(",") if o.strip()] if ops else None
    spin = busy(f"creating {kind} key {name}") if kind in ("RSA", "EC") else nullcontext()
    with spin:
        key = state.client.keys.create(
            name,
            kind,
            key_size=size,
            elliptic_curve=curve,
            key_ops=key_ops,
            group_id=group_id(state, group) if group else None,
            description=description,
            transient=transient or None,
        )
    show(state, key)


@keys.command("derive")
@click.argument("name")
@apply(key_options)
@click.option("--type", "key_type", required=True, help="The new key's type: AES, DES3, HMAC...")
@click.option("--size", type=int, help="The new key's size in bits (AES default 256).")
@click.option(
    "--in", "in_path", metavar="FILE", help="encrypt_data: the data the key encrypts (stdin)."
)
@click.option("--mode", help="encrypt_data: ECB (default) or CBC.")
@click.option("--iv", "iv_hex", metavar="HEX", help="encrypt_data: the CBC iv.")
@click.option("--hkdf", "hkdf_hash", metavar="HASH", help="Use HKDF with this hash instead.")
@click.option("--salt", "salt_hex", metavar="HEX", help="HKDF salt.")
@click.option("--info", "info_text", help="HKDF info (text).")
@click.option("--ops", help="Comma-separated key_ops of the new key.")
@click.option("--group", help="Group name or id of the new key.")
@pass_state
def keys_derive(
    state: State,
    name: str,
    key: str | None,
    kid: str | None,
    key_type: str,
    size: int | None,
    in_path: str | None,
    mode: str | None,
    iv_hex: str | None,
    hkdf_hash: str | None,
    salt_hex: str | None,
    info_text: str | None,
    ops: str | None,
    group: str | None,
) -> None:
    """Derive a new key NAME from --key/--kid (it needs DERIVEKEY).

    By default the token encrypts the input with the key (DSM's encrypt_data;
    the new value never leaves the token). --hkdf HASH derives with HKDF
    instead, from a key whose key_ops include EXPORT.
    """
    if hkdf_hash:
        hkdf: dict = {"hash_alg": hkdf_hash.upper()}
        if salt_hex:
            hkdf["salt"] = bytes.fromhex(salt_hex)
        if info_text is not None:
            hkdf["info"] = info_text.encode()
        mechanism: dict = {"hkdf": hkdf}
    else:
        data: dict = {"plain": read_input(in_path), "mode": (mode or "ECB").upper()}
        if iv_hex:
            data["iv"] = bytes.fromhex(iv_hex)
        mechanism = {"encrypt_data": data}
    key_ops = [o.strip().upper() for o in ops.split(",") if o.strip()] if ops else None
    new = state.client.crypto.derive(
        key_ref(None, key, kid),
        key_type=key_type.upper(),
        key_size=size,
        mechanism=mechanism,
        name=name,
        key_ops=key_ops,
        group_id=group_id(state, group) if group else None,
    )
    show(state, new)


key_arg = click.argument("name", required=False, metavar="[KEY]", shell_complete=complete_keys)


@keys.command("show")
@key_arg
@apply(key_options)
@pass_state
def keys_show(state: State, name: str | None, key: str | None, kid: str | None) -> None:
    """Show a key's description: KEY (a name), --key NAME or --kid KID."""
    show(state, state.client.keys.info(**key_ref(name, key, kid)))


@keys.command("delete")
@key_arg
@apply(key_options)
@yes_option
@pass_state
def keys_delete(
    state: State, name: str | None, key: str | None, kid: str | None, yes: bool
) -> None:
    """Delete a key from the token for good (asks first on a terminal)."""
    info = state.client.keys.info(**key_ref(name, key, kid))
    confirm(state, yes, f"Delete key {info.get('name')!r} ({info['kid']}) for good?")
    state.client.keys.delete(info["kid"])
    done(
        state,
        {"deleted": info["kid"], "name": info.get("name")},
        f"deleted key {info.get('name')} ({info['kid']})",
    )


@keys.command("export")
@key_arg
@apply(key_options)
@click.option("--out", "out_path", metavar="FILE", help="Write the raw value here.")
@pass_state
def keys_export(
    state: State, name: str | None, key: str | None, kid: str | None, out_path: str | None
) -> None:
    """Export a key's value (keys with EXPORT only).

    Writes the raw value, or the whole sobject with --json.
    """
    sobject = state.client.keys.export(**key_ref(name, key, kid))
    if state.json:
        print_json(sobject)
    else:
        write_output(out_path, sobject["value"])


@keys.command("public")
@key_arg
@apply(key_options)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["PEM", "DER", "JWK", "OpenSSH"], case_sensitive=False),
    default="PEM",
    show_default=True,
    help="Encoding of the public key.",
)
@click.option("--out", "out_path", metavar="FILE", help="Write it here (default stdout).")
@pass_state
def keys_public(state: State, name, key, kid, fmt: str, out_path: str | None) -> None:
    """Print an asymmetric key's public key (no EXPORT needed)."""
    desc = key_ref(name, key, kid)
    try:
        value = state.client.keys.public(**desc, format=fmt)
    except ValueError as exc:
        raise Failure("no_public_key", str(exc), "keys public works on RSA and EC keys") from None
    if isinstance(value, dict):
        data = (json.dumps(value, indent=2) + "\n").encode()
    elif isinstance(value, str):
        data = (value if value.endswith("\n") else value + "\n").encode()
    else:
        data = value
    if state.json and not isinstance(value, bytes):
        print_json({"format": fmt.upper(), "public_key": value})
    else:
        write_output(out_path, data)
