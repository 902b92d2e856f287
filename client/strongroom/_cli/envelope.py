"""Data keys and envelope files: ``datakey``, ``envelope encrypt``, ``envelope decrypt``."""

from __future__ import annotations

import base64
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import click

from strongroom import envelope as env
from strongroom._cli._common import Failure, State, apply, key_options, pass_state, show
from strongroom._exceptions import EnvelopeError

_HINTS = {
    "missing_dependency": "install the extra: pip install 'strongroom[envelope]'",
    "bad_tag": "is it the right file, opened with the KEK it names? (--key to name another)",
    "not_envelope": "envelope decrypt reads files made by envelope encrypt",
}


@contextlib.contextmanager
def _envelope_errors() -> Iterator[None]:
    try:
        yield
    except EnvelopeError as exc:
        raise Failure(exc.code, exc.message, _HINTS.get(exc.code)) from None
    except OSError as exc:
        raise click.UsageError(f"{exc.filename or 'file'}: {exc.strerror}") from None
    except ValueError as exc:  # a KEK that cannot wrap, bad --bits
        raise click.UsageError(str(exc)) from None


def _kek(key: str | None, kid: str | None, required: bool = True) -> dict[str, Any]:
    if key is not None and kid is not None:
        raise click.UsageError("name the KEK once: --key NAME or --kid KID")
    if key is None and kid is None:
        if required:
            raise click.UsageError("name the KEK with --key NAME or --kid KID")
        return {}
    return {"name": key} if key is not None else {"kid": kid}


bits_option = click.option(
    "--bits", type=click.Choice(["128", "192", "256"]), default="256", show_default=True,
    help="Size of the data key.",
)  # fmt: skip


@click.command()
@apply(key_options)
@bits_option
@click.option(
    "--wrapped-only", is_flag=True, help="Leave out the plaintext key (store it for later)."
)
@pass_state
def datakey(state: State, key: str | None, kid: str | None, bits: str, wrapped_only: bool) -> None:
    """Make an AES data key, wrapped under a KEK.

    As AWS KMS GenerateDataKey and Vault transit/datakey.

    Prints the wrapped key (base64; keep it with the data) and, unless
    --wrapped-only, the plaintext key to encrypt with locally. The KEK is an
    AES or RSA key with WRAPKEY.
    """
    with _envelope_errors():
        dk = state.client.datakey(**_kek(key, kid), bits=int(bits), plaintext=not wrapped_only)
    out: dict[str, Any] = {k: dk[k] for k in ("kid", "key_size", "wrap_alg", "wrap_mode")}
    out["wrapped_key"] = base64.b64encode(dk.wrapped_key).decode()
    if dk.plaintext is not None:
        out["plaintext"] = base64.b64encode(dk.plaintext).decode()
    show(state, out)


@click.group()
def envelope() -> None:
    """Encrypt files locally under a data key wrapped by a KEK.

    The data never goes to the daemon: each file gets a fresh AES-256 data
    key (AES-GCM), stored in the file wrapped under the KEK. Needs the
    cryptography package: pip install 'strongroom[envelope]'. Format: docs/api.md.
    """


def _streams(in_path: str | None, out_path: str | None) -> tuple[Any, Any]:
    src = sys.stdin.buffer if in_path in (None, "-") else in_path
    if out_path in (None, "-"):
        if sys.stdout.isatty():
            raise click.UsageError("the output is binary: give --out FILE, or pipe it")
        return src, sys.stdout.buffer
    return src, out_path


@envelope.command("encrypt")
@apply(key_options)
@click.option("--in", "in_path", metavar="FILE", help="File to encrypt (default stdin).")
@click.option("--out", "out_path", metavar="FILE", help="Envelope file (default stdout).")
@bits_option
@pass_state
def envelope_encrypt(
    state: State, key: str | None, kid: str | None, in_path: str | None, out_path: str | None,
    bits: str,
) -> None:  # fmt: skip
    """Encrypt a file under a fresh data key wrapped by the KEK."""
    kek = _kek(key, kid)
    src, dst = _streams(in_path, out_path)
    with _envelope_errors():
        header = env.encrypt_file(state.client, src, dst, **kek, bits=int(bits))
    if state.json and out_path not in (None, "-"):
        show(state, {"kek": header.kek, "alg": header.alg, "out": out_path})


@envelope.command("decrypt")
@apply(key_options)
@click.option("--in", "in_path", metavar="FILE", help="Envelope file (default stdin).")
@click.option("--out", "out_path", metavar="FILE", help="Decrypted file (default stdout).")
@pass_state
def envelope_decrypt(
    state: State, key: str | None, kid: str | None, in_path: str | None, out_path: str | None
) -> None:
    """Decrypt an envelope file.

    The KEK is the one the file names, unless --key or --kid. Nothing is
    written until the whole file checks.
    """
    kek = _kek(key, kid, required=False)
    src, dst = _streams(in_path, out_path)
    with _envelope_errors():
        header = env.decrypt_file(state.client, src, dst, **kek)
    if state.json and out_path not in (None, "-"):
        show(state, {"kek": header.kek, "alg": header.alg, "out": out_path})
