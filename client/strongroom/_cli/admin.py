"""Administration: ``login``, ``groups``, ``apps``, ``logs``, ``audit``."""

from __future__ import annotations

from typing import Any

import click

from strongroom._cli._common import (
    EXIT_API,
    State,
    confirm,
    done,
    group_id,
    pass_state,
    print_json,
    resolve,
    show,
    yes_option,
)


@click.command()
@pass_state
def login(state: State) -> None:
    """Check the credentials; print the entity id."""
    if state.api_key() is None:
        raise click.UsageError("no API key: set STRONGROOM_API_KEY or STRONGROOM_API_KEY_FILE")
    r = state.client.session.auth()
    if state.json:
        print_json({"entity_id": r.get("entity_id"), "expires_in": r.get("expires_in")})
    else:
        click.echo(r.get("entity_id"))


# -- groups ----------------------------------------------------------------------------


@click.group()
def groups() -> None:
    """Manage groups."""


@groups.command("list")
@pass_state
def groups_list(state: State) -> None:
    """List the groups you can see."""
    show(state, state.client.groups.list(), ["group_id", "name", "description"])


@groups.command("create")
@click.argument("name")
@click.option("--description", help="Free text shown with the group.")
@pass_state
def groups_create(state: State, name: str, description: str | None) -> None:
    """Create a group (admins)."""
    show(state, state.client.groups.create(name, description=description))


@groups.command("show")
@click.argument("group")
@pass_state
def groups_show(state: State, group: str) -> None:
    """Show a group, by name or id."""
    show(state, state.client.groups.get(group_id(state, group)))


@groups.command("delete")
@click.argument("group")
@yes_option
@pass_state
def groups_delete(state: State, group: str, yes: bool) -> None:
    """Delete an empty group (asks first on a terminal)."""
    gid = group_id(state, group)
    confirm(state, yes, f"Delete group {group!r} ({gid})?")
    state.client.groups.delete(gid)
    done(state, {"deleted": gid}, f"deleted group {group} ({gid})")


# -- apps ------------------------------------------------------------------------------


@click.group()
def apps() -> None:
    """Manage apps (API clients)."""


def _app_id(state: State, value: str) -> str:
    return resolve(state.client.apps.list(), value, "app_id", "app")["app_id"]


_GROUP_HELP = (
    "Group name or id, with the app's DSM permissions there after a colon "
    "(ops:ENCRYPT,DECRYPT; ops: for none); without a colon, every permission. Repeatable."
)


def _app_groups(state: State, values: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    """``--group NAME[:PERM,...]`` -> (groups with every permission, {group id: permissions}).

    The permissions follow the last colon, so a group whose name has a colon is
    given by its id (ids have none)."""
    plain: list[str] = []
    granted: dict[str, list[str]] = {}
    for value in values:
        name, colon, perms = value.rpartition(":")
        if not colon:
            plain.append(group_id(state, value))
        elif not name:
            raise click.UsageError(f"--group {value!r}: the group comes before the colon")
        else:
            granted[group_id(state, name)] = [p.strip() for p in perms.split(",") if p.strip()]
    return plain, granted


def _show_credential(state: State, app: Any) -> None:
    if state.json:
        print_json(app)
        return
    shown = {k: v for k, v in app.items() if k != "credential"}
    show(state, shown)
    click.echo(f"\napi_key  {app['credential']['api_key']}")
    click.echo("(shown once: store it now)", err=True)


@apps.command("list")
@pass_state
def apps_list(state: State) -> None:
    """List apps (admins), with each group's permissions.

    A group shows as NAME:PERMISSIONS, or NAME:* when the app has all of them.
    """
    apps_ = state.client.apps.list()
    if not state.json:
        names = {g["group_id"]: g["name"] for g in state.client.groups.list()}
        apps_ = [
            {**a, "groups": [_perms_cell(names, g, p) for g, p in a["groups"].items()]}
            for a in apps_
        ]
    show(state, apps_, ["app_id", "name", "groups", "default_group"])


#: How many permissions DSM defines: a group holding them all is shown as "*".
_ALL_PERMISSIONS = 33


def _perms_cell(names: dict[str, str], gid: str, perms: list[str]) -> str:
    shown = "*" if len(perms) >= _ALL_PERMISSIONS else "+".join(perms) or "-"
    return f"{names.get(gid, gid)}:{shown}"


@apps.command("create")
@click.argument("name")
@click.option("--group", "groups_", multiple=True, required=True, help=_GROUP_HELP)
@click.option("--default-group", help="Group name or id (default: the first --group).")
@click.option("--description", help="Free text shown with the app.")
@pass_state
def apps_create(
    state: State,
    name: str,
    groups_: tuple[str, ...],
    default_group: str | None,
    description: str | None,
) -> None:
    """Create an app; prints its API key once.

    \b
    strongroom apps create billing --group payments:ENCRYPT,DECRYPT --group audit:VERIFY
    """
    plain, granted = _app_groups(state, groups_)
    default = group_id(state, default_group) if default_group else None
    app = state.client.apps.create(
        name,
        groups=plain or granted,
        add_groups=granted if plain and granted else None,
        default_group=default,
        description=description,
    )
    _show_credential(state, app)


@apps.command("update")
@click.argument("app")
@click.option("--add-group", "add", multiple=True, help=_GROUP_HELP)
@click.option(
    "--mod-group", "mod", multiple=True, help="GROUP:PERM,... : new permissions in a group."
)
@click.option("--del-group", "del_", multiple=True, help="Group name or id to leave.")
@click.option("--default-group", help="Group name or id.")
@click.option("--description", help="Free text shown with the app.")
@click.option("--enable/--disable", "enabled", default=None, help="Let it log in, or not.")
@pass_state
def apps_update(
    state: State,
    app: str,
    add: tuple[str, ...],
    mod: tuple[str, ...],
    del_: tuple[str, ...],
    default_group: str | None,
    description: str | None,
    enabled: bool | None,
) -> None:
    """Change an app's groups, permissions, description or state.

    \b
    strongroom apps update billing --mod-group payments:ENCRYPT --del-group audit
    """
    aid = _app_id(state, app)
    add_plain, add_granted = _app_groups(state, add)
    mod_plain, mod_granted = _app_groups(state, mod)
    if mod_plain:
        raise click.UsageError("--mod-group takes GROUP:PERM,... (the new permissions)")
    fields: dict[str, Any] = {}
    if add_plain or add_granted:  # the list form gives every permission
        fields["add_groups"] = add_granted or add_plain
        if add_plain and add_granted:
            raise click.UsageError("give every --add-group with permissions, or none with them")
    updated = state.client.apps.update(
        aid,
        mod_groups=mod_granted or None,
        del_groups=[group_id(state, g) for g in del_] or None,
        default_group=group_id(state, default_group) if default_group else None,
        description=description,
        enabled=enabled,
        **fields,
    )
    show(state, updated)


@apps.command("show")
@click.argument("app")
@pass_state
def apps_show(state: State, app: str) -> None:
    """Show an app, by name or id."""
    show(state, state.client.apps.get(_app_id(state, app)))


@apps.command("delete")
@click.argument("app")
@yes_option
@pass_state
def apps_delete(state: State, app: str, yes: bool) -> None:
    """Delete an app and its API key (asks first on a terminal)."""
    aid = _app_id(state, app)
    confirm(state, yes, f"Delete app {app!r} ({aid})? Its API key stops working.")
    state.client.apps.delete(aid)
    done(state, {"deleted": aid}, f"deleted app {app} ({aid})")


@apps.command("reset-secret")
@click.argument("app")
@yes_option
@pass_state
def apps_reset_secret(state: State, app: str, yes: bool) -> None:
    """Give an app a new API key; the old one stops working."""
    aid = _app_id(state, app)
    confirm(state, yes, f"Reset the secret of app {app!r}? Its current API key stops working.")
    _show_credential(state, state.client.apps.reset_secret(aid))


# -- logs, audit -----------------------------------------------------------------------


@click.command()
@click.option("--object", "object_id", help="Only records about this object id.")
@click.option("--actor", "actor_id", help="Only records by this principal id.")
@click.option(
    "--invocation", "invocation_id", help="Only one plugin invocation's records (its id)."
)
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many.")
@click.option("--offset", type=int, help="Skip this many newest records first.")
@pass_state
def logs(state: State, object_id, actor_id, invocation_id, limit, offset) -> None:
    """Show audit records, newest first (admins)."""
    rows = state.client.logs.list(
        object_id=object_id,
        actor_id=actor_id,
        invocation_id=invocation_id,
        limit=limit,
        offset=offset,
    )
    if isinstance(rows, dict):  # a paged answer
        rows = rows.get("items", [])
    columns = ["seq", "time", "actor_kind", "actor_id", "action", "object_id", "status", "code"]
    if invocation_id:
        columns.append("invocation_id")
    show(state, rows, columns)


@click.group()
def audit() -> None:
    """Audit log checks."""


@audit.command("verify")
@pass_state
def audit_verify(state: State) -> None:
    """Check the audit hash chain; exit 1 naming the first bad record."""
    r = state.client.logs.verify()
    if state.json:
        print_json(r)
    elif r["ok"]:
        click.echo(f"audit chain intact: {r['records']} records")
    else:
        click.echo(f"audit chain broken: {r['reason']}")
    if not r["ok"]:
        click.get_current_context().exit(EXIT_API)
