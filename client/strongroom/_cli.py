"""The ``strongroom`` command line, over :class:`strongroom.Client`.

Exit status: 0 ok, 1 API error (``error: <code>: <message>`` on stderr),
2 usage, 3 the daemon could not be reached or understood. Secrets never come
from argv: the API key is read from ``STRONGROOM_API_KEY``, or from the file
named by ``--api-key-file`` / ``STRONGROOM_API_KEY_FILE``.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from strongroom._client import Client
from strongroom._exceptions import ApiError, TransportError

EXIT_API, EXIT_USAGE, EXIT_TRANSPORT = 1, 2, 3


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


class _State:
    def __init__(self, socket: str | None, api_key_file: str | None, as_json: bool) -> None:
        self.socket = socket
        self.api_key_file = api_key_file
        self.json = as_json
        self._client: Client | None = None

    def api_key(self) -> str | None:
        path = self.api_key_file or os.environ.get("STRONGROOM_API_KEY_FILE")
        if self.api_key_file is None and os.environ.get("STRONGROOM_API_KEY"):
            return os.environ["STRONGROOM_API_KEY"].strip()
        if path:
            try:
                return Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise click.UsageError(
                    f"cannot read the API key file {path}: {exc.strerror}"
                ) from None
        return None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.socket, api_key=self.api_key() or None)
            click.get_current_context().call_on_close(self._client.close)
        return self._client


pass_state = click.make_pass_decorator(_State)


# -- output ----------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2, sort_keys=True))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return json.dumps(_jsonable(value), sort_keys=True)
    return str(value)


def _table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _show(state: _State, record: Any, columns: Sequence[str] | None = None) -> None:
    if state.json:
        _print_json(record)
    elif isinstance(record, list):
        _table(record, columns or [])
    else:
        width = max((len(k) for k in record), default=0)
        for k in sorted(record):
            click.echo(f"{k.ljust(width)}  {_cell(record[k])}")


def _read_input(path: str | None) -> bytes:
    if path in (None, "-"):
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from None


def _write_output(path: str | None, data: bytes) -> None:
    if path in (None, "-"):
        out = sys.stdout.buffer
        if out.isatty():  # no raw bytes on a terminal
            click.echo(data.hex())
        else:
            out.write(data)
            out.flush()
    else:
        Path(path).write_bytes(data)


# -- name resolution -------------------------------------------------------------------


def _resolve(records: list[Any], value: str, id_field: str, what: str) -> dict[str, Any]:
    for r in records:
        if r.get(id_field) == value:
            return r
    named = [r for r in records if r.get("name") == value]
    if len(named) == 1:
        return named[0]
    if named:
        raise click.UsageError(f"several {what}s are named {value!r}: use the id")
    raise click.UsageError(f"no {what} with id or name {value!r}")


def _group_id(state: _State, value: str) -> str:
    return _resolve(state.client.groups.list(), value, "group_id", "group")["group_id"]


def _key_args(key: str | None, kid: str | None) -> dict[str, str]:
    if (key is None) == (kid is None):
        raise click.UsageError("name the key with exactly one of --key NAME or --kid KID")
    return {"name": key} if key is not None else {"kid": kid}  # type: ignore[dict-item]


key_options = [
    click.option("--key", "key", metavar="NAME", help="Key name."),
    click.option("--kid", metavar="KID", help="Key id."),
]
io_options = [
    click.option("--in", "in_path", metavar="FILE", help="Input file (default stdin)."),
    click.option("--out", "out_path", metavar="FILE", help="Output file (default stdout)."),
]


def _apply(options: list[Any]) -> Any:
    def deco(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


# -- root ------------------------------------------------------------------------------


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
    ctx.obj = _State(socket, api_key_file, as_json)


@cli.command()
@pass_state
def login(state: _State) -> None:
    """Check the credentials; print the entity id."""
    if state.api_key() is None:
        raise click.UsageError("no API key: set STRONGROOM_API_KEY or STRONGROOM_API_KEY_FILE")
    r = state.client.session.auth()
    if state.json:
        _print_json({"entity_id": r.get("entity_id"), "expires_in": r.get("expires_in")})
    else:
        click.echo(r.get("entity_id"))


@cli.command()
@click.argument("method")
@click.argument("path")
@click.option("--body", metavar="JSON", help="Request body as JSON.")
@pass_state
def call(state: _State, method: str, path: str, body: str | None) -> None:
    """Send any request, e.g. `call GET /sys/v1/groups`; print the body as JSON."""
    _print_json(state.client.request(method, path, _json_arg(body)))


def _json_arg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise click.UsageError(f"not valid JSON: {exc}") from None


# -- groups, apps ----------------------------------------------------------------------


@cli.group()
def groups() -> None:
    """Manage groups."""


@groups.command("list")
@pass_state
def groups_list(state: _State) -> None:
    _show(state, state.client.groups.list(), ["group_id", "name", "description"])


@groups.command("create")
@click.argument("name")
@click.option("--description")
@pass_state
def groups_create(state: _State, name: str, description: str | None) -> None:
    _show(state, state.client.groups.create(name, description=description))


@groups.command("show")
@click.argument("group")
@pass_state
def groups_show(state: _State, group: str) -> None:
    _show(state, state.client.groups.get(_group_id(state, group)))


@groups.command("delete")
@click.argument("group")
@pass_state
def groups_delete(state: _State, group: str) -> None:
    state.client.groups.delete(_group_id(state, group))


@cli.group()
def apps() -> None:
    """Manage apps (API clients)."""


def _app_id(state: _State, value: str) -> str:
    return _resolve(state.client.apps.list(), value, "app_id", "app")["app_id"]


def _show_credential(state: _State, app: Any) -> None:
    if state.json:
        _print_json(app)
        return
    shown = {k: v for k, v in app.items() if k != "credential"}
    _show(state, shown)
    click.echo(f"\napi_key  {app['credential']['api_key']}")
    click.echo("(shown once: store it now)", err=True)


@apps.command("list")
@pass_state
def apps_list(state: _State) -> None:
    _show(state, state.client.apps.list(), ["app_id", "name", "groups", "default_group"])


@apps.command("create")
@click.argument("name")
@click.option("--group", "groups_", multiple=True, required=True, help="Group name or id.")
@click.option("--default-group", help="Group name or id (default: the first --group).")
@click.option("--description")
@pass_state
def apps_create(
    state: _State,
    name: str,
    groups_: tuple[str, ...],
    default_group: str | None,
    description: str | None,
) -> None:
    """Create an app; prints its API key once."""
    gids = [_group_id(state, g) for g in groups_]
    default = _group_id(state, default_group) if default_group else None
    app = state.client.apps.create(
        name, groups=gids, default_group=default, description=description
    )
    _show_credential(state, app)


@apps.command("show")
@click.argument("app")
@pass_state
def apps_show(state: _State, app: str) -> None:
    _show(state, state.client.apps.get(_app_id(state, app)))


@apps.command("delete")
@click.argument("app")
@pass_state
def apps_delete(state: _State, app: str) -> None:
    state.client.apps.delete(_app_id(state, app))


@apps.command("reset-secret")
@click.argument("app")
@pass_state
def apps_reset_secret(state: _State, app: str) -> None:
    """Give the app a new secret; prints its new API key once."""
    _show_credential(state, state.client.apps.reset_secret(_app_id(state, app)))


# -- keys ------------------------------------------------------------------------------

KEY_COLUMNS = ["kid", "name", "obj_type", "key_size", "elliptic_curve", "group_id", "key_ops"]


@cli.group()
def keys() -> None:
    """Manage keys (security objects)."""


@keys.command("list")
@click.option("--group", help="Only keys in this group (name or id).")
@click.option("--name", help="Only the key with this name.")
@click.option("--limit", type=int)
@click.option("--offset", type=int)
@pass_state
def keys_list(
    state: _State, group: str | None, name: str | None, limit: int | None, offset: int | None
) -> None:
    gid = _group_id(state, group) if group else None
    rows = state.client.keys.list(group_id=gid, name=name, limit=limit, offset=offset)
    _show(state, rows, KEY_COLUMNS)


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
    state: _State,
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
        group_id=_group_id(state, group) if group else None,
        description=description,
        transient=transient or None,
    )
    _show(state, key)


@keys.command("show")
@_apply(key_options)
@pass_state
def keys_show(state: _State, key: str | None, kid: str | None) -> None:
    _show(state, state.client.keys.info(**_key_args(key, kid)))


@keys.command("delete")
@_apply(key_options)
@pass_state
def keys_delete(state: _State, key: str | None, kid: str | None) -> None:
    if kid is None:
        kid = state.client.keys.info(**_key_args(key, kid))["kid"]
    state.client.keys.delete(kid)


@keys.command("export")
@_apply(key_options)
@click.option("--out", "out_path", metavar="FILE", help="Write the raw value here.")
@pass_state
def keys_export(state: _State, key: str | None, kid: str | None, out_path: str | None) -> None:
    """Export a key's value (keys with EXPORT only): raw, or the sobject with --json."""
    sobject = state.client.keys.export(**_key_args(key, kid))
    if state.json:
        _print_json(sobject)
    else:
        _write_output(out_path, sobject["value"])


# -- crypto ----------------------------------------------------------------------------


def _iv_len(alg: str, mode: str | None) -> int:
    mode = (mode or ("CBC" if alg == "DES3" else "GCM")).upper()
    if mode == "ECB" or alg not in ("AES", "DES3"):
        return 0
    if alg == "DES3":
        return 8
    return 12 if mode == "GCM" else 16


def _alg_of(state: _State, desc: dict[str, str], alg: str | None) -> str:
    return alg.upper() if alg else state.client.keys.info(**desc)["obj_type"]


@cli.command()
@_apply(key_options + io_options)
@click.option("--alg", help="Key algorithm (default: the key's type).")
@click.option("--mode", help="GCM (AES default), CBC, CBCNOPAD, CTR, ECB; RSA: OAEP_MGF1_SHA256...")
@click.option("--ad", "ad_path", metavar="FILE", help="Additional authenticated data (GCM).")
@pass_state
def encrypt(state: _State, key, kid, in_path, out_path, alg, mode, ad_path) -> None:
    """Encrypt; writes iv || cipher || tag (or JSON with --json)."""
    desc = _key_args(key, kid)
    alg = _alg_of(state, desc, alg)
    ad = _read_input(ad_path) if ad_path else None
    r = state.client.crypto.encrypt(desc, alg=alg, plain=_read_input(in_path), mode=mode, ad=ad)
    if state.json:
        _print_json(r)
    else:
        _write_output(out_path, (r.get("iv") or b"") + r["cipher"] + (r.get("tag") or b""))


@cli.command()
@_apply(key_options + io_options)
@click.option("--alg", help="Key algorithm (default: the key's type).")
@click.option("--mode", help="As for encrypt.")
@click.option("--ad", "ad_path", metavar="FILE", help="Additional authenticated data (GCM).")
@click.option("--tag-len", type=int, default=16, show_default=True, help="GCM tag bytes.")
@pass_state
def decrypt(state: _State, key, kid, in_path, out_path, alg, mode, ad_path, tag_len) -> None:
    """Decrypt what `encrypt` wrote (iv || cipher || tag)."""
    desc = _key_args(key, kid)
    alg = _alg_of(state, desc, alg)
    data = _read_input(in_path)
    n = _iv_len(alg, mode)
    gcm = alg == "AES" and (mode or "GCM").upper() == "GCM"
    t = tag_len if gcm else 0
    if len(data) < n + t:
        raise click.UsageError("input too short for its iv and tag")
    iv, cipher, tag = data[:n] or None, data[n : len(data) - t], data[len(data) - t :] or None
    ad = _read_input(ad_path) if ad_path else None
    r = state.client.crypto.decrypt(desc, alg=alg, cipher=cipher, mode=mode, iv=iv, tag=tag, ad=ad)
    if state.json:
        _print_json(r)
    else:
        _write_output(out_path, r["plain"])


@cli.command()
@_apply(key_options + io_options)
@click.option("--hash-alg", default="SHA256", show_default=True)
@click.option("--prehashed", is_flag=True, help="The input is already a hash.")
@click.option("--mode", help="RSA: PKCS1_V15 (default) or PSS.")
@pass_state
def sign(state: _State, key, kid, in_path, out_path, hash_alg, prehashed, mode) -> None:
    """Sign the input; writes the signature."""
    data = _read_input(in_path)
    field = {"hash": data} if prehashed else {"data": data}
    r = state.client.crypto.sign(_key_args(key, kid), hash_alg=hash_alg, mode=mode, **field)
    if state.json:
        _print_json(r)
    else:
        _write_output(out_path, r["signature"])


@cli.command()
@_apply(key_options)
@click.option("--in", "in_path", metavar="FILE", help="Signed data (default stdin).")
@click.option("--signature", "sig_path", metavar="FILE", required=True)
@click.option("--hash-alg", default="SHA256", show_default=True)
@click.option("--prehashed", is_flag=True, help="The input is already a hash.")
@click.option("--mode", help="RSA: PKCS1_V15 (default) or PSS.")
@pass_state
def verify(state: _State, key, kid, in_path, sig_path, hash_alg, prehashed, mode) -> None:
    """Verify a signature; prints valid/invalid, exit status 1 when invalid."""
    data = _read_input(in_path)
    field = {"hash": data} if prehashed else {"data": data}
    r = state.client.crypto.verify(
        _key_args(key, kid),
        signature=_read_input(sig_path),
        hash_alg=hash_alg,
        mode=mode,
        **field,
    )
    ok = bool(r.get("result"))
    if state.json:
        _print_json(r)
    else:
        click.echo("valid" if ok else "invalid")
    if not ok:
        click.get_current_context().exit(EXIT_API)


@cli.command()
@_apply(key_options + io_options)
@click.option("--alg", default="SHA256", show_default=True, help="Hash, or CMAC for AES keys.")
@pass_state
def mac(state: _State, key, kid, in_path, out_path, alg) -> None:
    """Compute a MAC over the input."""
    r = state.client.crypto.mac(_key_args(key, kid), alg=alg, data=_read_input(in_path))
    if state.json:
        _print_json(r)
    else:
        _write_output(out_path, r["mac"])


@cli.command()
@_apply(io_options)
@click.option("--alg", default="SHA256", show_default=True)
@pass_state
def digest(state: _State, in_path, out_path, alg) -> None:
    """Hash the input (no key involved)."""
    r = state.client.crypto.digest(_read_input(in_path), alg=alg)
    if state.json:
        _print_json(r)
    else:
        _write_output(out_path, r["digest"])


# -- audit, plugins --------------------------------------------------------------------


@cli.command()
@click.option("--object", "object_id", help="Only records about this object id.")
@click.option("--actor", "actor_id", help="Only records by this principal id.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--offset", type=int)
@pass_state
def logs(state: _State, object_id, actor_id, limit, offset) -> None:
    """Show audit records."""
    rows = state.client.logs.list(
        object_id=object_id, actor_id=actor_id, limit=limit, offset=offset
    )
    if isinstance(rows, dict):  # a paged answer
        rows = rows.get("items", [])
    columns = ["seq", "time", "actor_kind", "actor_id", "action", "object_id", "status", "code"]
    _show(state, rows, columns)


@cli.group()
def audit() -> None:
    """Audit log checks."""


@audit.command("verify")
@pass_state
def audit_verify(state: _State) -> None:
    """Check the audit hash chain in the daemon; exit 1 naming the first bad record."""
    r = state.client.logs.verify()
    if state.json:
        _print_json(r)
    elif r["ok"]:
        click.echo(f"audit chain intact: {r['records']} records")
    else:
        click.echo(f"audit chain broken: {r['reason']}")
    if not r["ok"]:
        click.get_current_context().exit(EXIT_API)


@cli.group()
def plugin() -> None:
    """Manage, invoke and test Lua plugins."""


def _plugin_id(state: _State, value: str) -> str:
    return _resolve(state.client.plugins.list(), value, "plugin_id", "plugin")["plugin_id"]


def _read_code(path: str) -> str:
    return _read_input(path).decode("utf-8")


@plugin.command("push")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--group", "groups_", multiple=True, required=True, help="Group name or id.")
@click.option("--name", help="Plugin name (default: the file's stem).")
@click.option("--description")
@pass_state
def plugin_push(state: _State, file: str, groups_: tuple[str, ...], name, description) -> None:
    """Create the plugin, or update the one with that name."""
    name = name or Path(file).stem
    code = _read_code(file)
    gids = [_group_id(state, g) for g in groups_]
    existing = [p for p in state.client.plugins.list() if p.get("name") == name]
    if existing:
        r = state.client.plugins.update(
            existing[0]["plugin_id"], code=code, groups=gids, description=description
        )
    else:
        r = state.client.plugins.create(name, code, groups=gids, description=description)
    _show(state, {k: v for k, v in r.items() if k != "source"})


@plugin.command("list")
@pass_state
def plugin_list(state: _State) -> None:
    _show(state, state.client.plugins.list(), ["plugin_id", "name", "groups", "enabled"])


@plugin.command("delete")
@click.argument("plugin_")
@pass_state
def plugin_delete(state: _State, plugin_: str) -> None:
    state.client.plugins.delete(_plugin_id(state, plugin_))


@plugin.command("invoke")
@click.argument("plugin_", metavar="NAME_OR_ID")
@click.option("--input", "input_", metavar="JSON", help="The plugin's input (default null).")
@pass_state
def plugin_invoke(state: _State, plugin_: str, input_: str | None) -> None:
    """Invoke a plugin; prints its result as JSON."""
    _print_json(state.client.plugins.invoke(_plugin_id(state, plugin_), _json_arg(input_)))


@plugin.command("test")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--input", "input_", metavar="JSON", help="The plugin's input (default null).")
@click.option("--group", "groups_", multiple=True, help="Group name or id to run in.")
@pass_state
def plugin_test(state: _State, file: str, input_: str | None, groups_: tuple[str, ...]) -> None:
    """Run unsaved code; prints the result, what it printed, and any error."""
    gids = [_group_id(state, g) for g in groups_] or None
    try:
        r = state.client.plugins.test(_read_code(file), _json_arg(input_), groups=gids)
    except ApiError as exc:  # a failed run may still have printed something
        if isinstance(exc.body, dict) and not state.json:
            _echo_output(exc.body)
        raise
    if state.json:
        _print_json(r)
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
    click.echo(json.dumps(_jsonable(r.get("result")), indent=2, sort_keys=True))


def _echo_output(body: dict[str, Any]) -> None:
    output = body.get("output", body.get("printed"))
    if output:
        click.echo("output:")
        click.echo(output if isinstance(output, str) else "\n".join(map(str, output)))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="strongroom")
