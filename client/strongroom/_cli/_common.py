"""What every command family shares: the per-invocation state, output, input, lookups."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from strongroom._client import Client

EXIT_API, EXIT_USAGE, EXIT_TRANSPORT = 1, 2, 3


class Failure(click.ClickException):
    """A CLI-side error, reported as API errors are (JSON under --json)."""

    exit_code = EXIT_API

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code, self.hint = code, hint


class State:
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


pass_state = click.make_pass_decorator(State)


# -- output ----------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def print_json(value: Any) -> None:
    click.echo(json.dumps(jsonable(value), indent=2, sort_keys=True))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return json.dumps(jsonable(value), sort_keys=True)
    return str(value)


def _table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def show(state: State, record: Any, columns: Sequence[str] | None = None) -> None:
    if state.json:
        print_json(record)
    elif isinstance(record, list):
        _table(record, columns or [])
    else:
        width = max((len(k) for k in record), default=0)
        for k in sorted(record):
            click.echo(f"{k.ljust(width)}  {_cell(record[k])}")


# -- input -----------------------------------------------------------------------------


def read_input(path: str | None) -> bytes:
    if path in (None, "-"):
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from None


def write_output(path: str | None, data: bytes) -> None:
    if path in (None, "-"):
        out = sys.stdout.buffer
        if out.isatty():  # no raw bytes on a terminal
            click.echo(data.hex())
        else:
            out.write(data)
            out.flush()
    else:
        Path(path).write_bytes(data)


def json_arg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise click.UsageError(f"not valid JSON: {exc}") from None


def binary_fields(value: Any) -> Any:
    """Decode ``{"$base64": "..."}`` anywhere in a JSON body into bytes (msgpack bin)."""
    if isinstance(value, dict):
        if set(value) == {"$base64"}:
            try:
                return base64.b64decode(value["$base64"], validate=True)
            except (ValueError, TypeError):
                raise click.UsageError(f"not base64: {value['$base64']!r}") from None
        return {k: binary_fields(v) for k, v in value.items()}
    if isinstance(value, list):
        return [binary_fields(v) for v in value]
    return value


@contextlib.contextmanager
def busy(message: str) -> Iterator[None]:
    """A spinner on stderr while a slow call runs, on a terminal only (RSA-4096: seconds)."""
    if not sys.stderr.isatty():
        yield
        return
    stop = threading.Event()

    def spin() -> None:
        if stop.wait(0.3):  # quick calls show nothing
            return
        for ch in itertools.cycle("|/-\\"):
            sys.stderr.write(f"\r{ch} {message}")
            sys.stderr.flush()
            if stop.wait(0.1):
                break
        sys.stderr.write("\r" + " " * (len(message) + 2) + "\r")
        sys.stderr.flush()

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def complete_keys(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of key names from the daemon (silent when it cannot be reached)."""
    from click.shell_completion import CompletionItem

    try:
        params = ctx.find_root().params  # the root callback does not run while completing
        state = State(params.get("socket"), params.get("api_key_file"), False)
        with Client(state.socket, api_key=state.api_key(), timeout=2.0) as c:
            names = [k.get("name") for k in c.keys.list(limit=1000)]
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [CompletionItem(n) for n in sorted(set(filter(None, names))) if n.startswith(incomplete)]


# -- name resolution -------------------------------------------------------------------


def resolve(records: list[Any], value: str, id_field: str, what: str) -> dict[str, Any]:
    for r in records:
        if r.get(id_field) == value:
            return r
    named = [r for r in records if r.get("name") == value]
    if len(named) == 1:
        return named[0]
    if named:
        raise click.UsageError(f"several {what}s are named {value!r}: use the id")
    raise click.UsageError(f"no {what} with id or name {value!r}")


def group_id(state: State, value: str) -> str:
    return resolve(state.client.groups.list(), value, "group_id", "group")["group_id"]


def key_args(key: str | None, kid: str | None) -> dict[str, str]:
    if (key is None) == (kid is None):
        raise click.UsageError("name the key with exactly one of --key NAME or --kid KID")
    return {"name": key} if key is not None else {"kid": kid}  # type: ignore[dict-item]


def key_ref(positional: str | None, key: str | None, kid: str | None) -> dict[str, str]:
    """The descriptor for commands taking ``KEY`` (a name) or ``--key NAME`` or ``--kid KID``."""
    if positional is not None:
        if key is not None or kid is not None:
            raise click.UsageError("name the key once: KEY, --key NAME or --kid KID")
        return {"name": positional}
    return key_args(key, kid)


# -- shared options --------------------------------------------------------------------

key_options = [
    click.option("--key", "key", metavar="NAME", help="Key name.", shell_complete=complete_keys),
    click.option("--kid", metavar="KID", help="Key id."),
]
io_options = [
    click.option("--in", "in_path", metavar="FILE", help="Input file (default stdin)."),
    click.option("--out", "out_path", metavar="FILE", help="Output file (default stdout)."),
]


yes_option = click.option(
    "--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts)."
)


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def confirm(state: State, yes: bool, question: str) -> None:
    """Ask on a terminal before a destructive step; elsewhere go on (scripts pass --yes)."""
    if yes or not _interactive():
        return
    if not click.confirm(question, default=False, err=True):
        raise click.Abort()


def done(state: State, record: dict[str, Any], message: str) -> None:
    """Report a step that has no answer body: JSON under --json, else a line on stderr."""
    if state.json:
        print_json(record)
    else:
        click.echo(message, err=True)


def apply(options: list[Any]) -> Any:
    def deco(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco
