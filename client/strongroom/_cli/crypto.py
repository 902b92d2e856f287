"""Crypto operations: ``encrypt``, ``decrypt``, ``sign``, ``verify``, ``mac``, ``digest``."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import click

from strongroom._cli._common import (
    EXIT_API,
    Failure,
    State,
    apply,
    io_options,
    key_args,
    key_options,
    pass_state,
    print_json,
    read_input,
    write_output,
)
from strongroom._exceptions import TooLarge, TransportError


def _iv_len(alg: str, mode: str | None) -> int:
    mode = (mode or ("CBC" if alg == "DES3" else "GCM")).upper()
    if mode == "ECB" or alg not in ("AES", "DES3"):
        return 0
    if alg == "DES3":
        return 8
    return 12 if mode == "GCM" else 16


#: strongroomd's default bounds (config ``max_field`` and ``max_frame``).
MAX_FIELD, MAX_FRAME = 1024 * 1024, 4 * 1024 * 1024


@contextlib.contextmanager
def _size_check(size: int) -> Iterator[None]:
    """Turn "too large" (or the daemon dropping an over-long frame) into what to do."""
    try:
        yield
    except (TooLarge, TransportError) as exc:
        if isinstance(exc, TransportError) and size <= MAX_FIELD:
            raise
        hint = (
            f"the input is {size:,} bytes: more than strongroomd takes in one request "
            f"(a field holds at most max_field, {MAX_FIELD:,} bytes by default; a frame "
            f"max_frame, {MAX_FRAME:,}). encrypt and decrypt stream symmetric keys' input "
            "over that size; for other operations split the input, or raise max_field "
            "and max_frame in strongroomd's config"
        )
        detail = exc.message if isinstance(exc, TooLarge) else "the daemon closed the connection"
        raise Failure("too_large", detail, hint) from None


#: Input larger than this goes through the daemon in pieces (multi-part); each
#: piece is one field, so it must fit max_field.
STREAM_OVER = STREAM_CHUNK = MAX_FIELD


class _Source:
    """The input: a regular file read piece by piece, or bytes already read."""

    def __init__(self, in_path: str | None) -> None:
        self.file: IO[bytes] | None = None
        self.data = b""
        if in_path not in (None, "-") and Path(in_path).is_file():
            try:
                self.file = open(in_path, "rb")  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise click.UsageError(f"cannot read {in_path}: {exc.strerror}") from None
            self.size = os.fstat(self.file.fileno()).st_size
        else:
            self.data = read_input(in_path)
            self.size = len(self.data)

    def read(self, start: int, end: int) -> bytes:
        if self.file is None:
            return self.data[start:end]
        self.file.seek(start)
        return self.file.read(end - start)

    def pieces(self, start: int, end: int) -> Iterator[bytes]:
        for at in range(start, end, STREAM_CHUNK):
            yield self.read(at, min(end, at + STREAM_CHUNK))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Sink:
    """Where the output goes. A file is written under a temporary name and
    renamed only when the whole operation succeeded (so a failed GCM tag check
    leaves no plaintext behind); stdout gets pieces as they come, unless
    ``hold`` (unauthenticated plaintext), when it gets them only at the end."""

    def __init__(self, out_path: str | None, hold: bool) -> None:
        self.path = None if out_path in (None, "-") else Path(out_path)
        self.held: list[bytes] = []
        self.hold = hold and self.path is None
        self.tmp: IO[bytes] | None = None
        if self.path is not None:
            fd, name = tempfile.mkstemp(dir=self.path.parent or ".", prefix=f".{self.path.name}.")
            self.tmp = os.fdopen(fd, "wb")
            self.tmp_name = name

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.tmp is not None:
            self.tmp.write(data)
        elif self.hold:
            self.held.append(data)
        else:
            write_output(None, data)

    def commit(self) -> None:
        if self.tmp is not None:
            self.tmp.close()
            os.replace(self.tmp_name, self.path)  # type: ignore[arg-type]
        elif self.held:
            write_output(None, b"".join(self.held))

    def discard(self) -> None:
        if self.tmp is not None:
            self.tmp.close()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_name)


def _progress(size: int, label: str) -> Any:
    """A progress bar on a terminal (stderr), nothing elsewhere (not even the label)."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(_NoBar())
    return click.progressbar(length=size, label=label, file=sys.stderr)


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _pump(
    src: _Source,
    start: int,
    end: int,
    state: bytes,
    step: Callable[[bytes, bytes], tuple[bytes, bytes]],
    sink: _Sink,
    label: str,
) -> bytes:
    with _progress(end - start, label) as bar:
        for piece in src.pieces(start, end):
            state, out = step(state, piece)
            sink.write(out)
            bar.update(len(piece))
    return state


def _decode_b64(name: str, value: Any) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise click.UsageError(f"the JSON input's {name!r} is not base64") from None


def _json_envelope(data: bytes) -> dict[str, Any] | None:
    """What `strongroom --json encrypt` wrote, if ``data`` is that; else None."""
    if data.lstrip()[:1] != b"{":
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "cipher" not in doc:
        return None
    return doc


def _alg_of(state: State, desc: dict[str, str], alg: str | None) -> str:
    return alg.upper() if alg else state.client.keys.info(**desc)["obj_type"]


@click.command()
@apply(key_options + io_options)
@click.option("--alg", help="Key algorithm (default: the key's type).")
@click.option("--mode", help="GCM (AES default), CBC, CBCNOPAD, CTR, ECB; RSA: OAEP_MGF1_SHA256...")
@click.option("--ad", "ad_path", metavar="FILE", help="Additional authenticated data (GCM).")
@pass_state
def encrypt(state: State, key, kid, in_path, out_path, alg, mode, ad_path) -> None:
    """Encrypt; writes iv || cipher || tag (or JSON with --json)."""
    desc = key_args(key, kid)
    alg = _alg_of(state, desc, alg)
    ad = read_input(ad_path) if ad_path else None
    src = _Source(in_path)
    try:
        if src.size > STREAM_OVER and alg in ("AES", "DES3", "DES"):
            return _encrypt_stream(state, desc, src, out_path, alg, mode, ad)
        plain = src.read(0, src.size)
    finally:
        src.close()
    with _size_check(len(plain)):
        r = state.client.crypto.encrypt(desc, alg=alg, plain=plain, mode=mode, ad=ad)
    if state.json:  # everything decrypt needs to read it back
        print_json({**r, "alg": alg, **({"mode": mode.upper()} if mode else {})})
    else:
        write_output(out_path, (r.get("iv") or b"") + r["cipher"] + (r.get("tag") or b""))


def _encrypt_stream(state: State, desc, src: _Source, out_path, alg, mode, ad) -> None:
    """Multi-part: iv first, then the cipher piece by piece, then the tag."""
    c = state.client.crypto
    init = c.encrypt_init(desc, alg=alg, mode=mode, ad=ad)
    sink = _Sink(None if state.json else out_path, hold=state.json)
    try:
        if not state.json:
            sink.write(init.get("iv") or b"")

        def step(st: bytes, piece: bytes) -> tuple[bytes, bytes]:
            r = c.encrypt_update(st, piece)
            return r["state"], r["cipher"]

        st = _pump(src, 0, src.size, init["state"], step, sink, "encrypting")
        fin = c.encrypt_final(st)
        if state.json:
            sink.write(fin["cipher"])
            cipher = b"".join(sink.held)
            doc = {"kid": init.get("kid"), "cipher": cipher, "iv": init.get("iv")}
            if fin.get("tag") is not None:
                doc["tag"] = fin["tag"]
            print_json({**doc, "alg": alg, **({"mode": mode.upper()} if mode else {})})
            return
        sink.write(fin["cipher"] + (fin.get("tag") or b""))
    except BaseException:
        sink.discard()
        raise
    sink.commit()


def _decrypt_stream(state: State, desc, src: _Source, out_path, alg, mode, ad, n, t) -> None:
    """Multi-part: iv from the start of the input, the tag from its end. GCM
    plaintext is unauthenticated until final: it reaches --out only by a rename
    after final succeeds, and stdout only then."""
    c = state.client.crypto
    iv = src.read(0, n) or None
    tag = src.read(src.size - t, src.size) or None
    init = c.decrypt_init(desc, alg=alg, mode=mode, iv=iv, ad=ad)
    sink = _Sink(out_path, hold=t > 0)
    try:

        def step(st: bytes, piece: bytes) -> tuple[bytes, bytes]:
            r = c.decrypt_update(st, piece)
            return r["state"], r["plain"]

        st = _pump(src, n, src.size - t, init["state"], step, sink, "decrypting")
        sink.write(c.decrypt_final(st, tag)["plain"])
    except BaseException:
        sink.discard()
        raise
    sink.commit()


@click.command()
@apply(key_options + io_options)
@click.option("--alg", help="Key algorithm (default: the key's type).")
@click.option("--mode", help="As for encrypt.")
@click.option("--ad", "ad_path", metavar="FILE", help="Additional authenticated data (GCM).")
@click.option(
    "--tag-len",
    type=click.IntRange(32, 128),
    default=128,
    show_default=True,
    help="GCM tag length in bits, as the protocol's tag_len.",
)
@pass_state
def decrypt(state: State, key, kid, in_path, out_path, alg, mode, ad_path, tag_len) -> None:
    """Decrypt what `encrypt` wrote (raw, or its --json form).

    Raw input is iv || cipher || tag; the --json form carries the key's kid,
    so --key/--kid may be left out.
    """
    if tag_len % 8:
        raise click.BadParameter(
            "a whole number of bytes, in bits (e.g. 128)", param_hint="--tag-len"
        )
    src = _Source(in_path)
    try:
        if src.size > STREAM_OVER and src.read(0, 64).lstrip()[:1] != b"{":
            desc = key_args(key, kid)
            alg = _alg_of(state, desc, alg)
            if alg in ("AES", "DES3", "DES"):
                n = _iv_len(alg, mode)
                gcm = alg == "AES" and (mode or "GCM").upper() == "GCM"
                t = tag_len // 8 if gcm else 0
                ad = read_input(ad_path) if ad_path else None
                return _decrypt_stream(state, desc, src, out_path, alg, mode, ad, n, t)
        data = src.read(0, src.size)
    finally:
        src.close()
    doc = _json_envelope(data)
    if doc is not None:  # the --json form: fields by name, the key from it unless named
        if key is None and kid is None and doc.get("kid"):
            kid = doc["kid"]
        mode = mode or doc.get("mode")
    desc = key_args(key, kid)
    alg = _alg_of(state, desc, alg or (doc or {}).get("alg"))
    if doc is not None:
        iv, tag = _decode_b64("iv", doc.get("iv")), _decode_b64("tag", doc.get("tag"))
        cipher = _decode_b64("cipher", doc["cipher"]) or b""
    else:
        n = _iv_len(alg, mode)
        gcm = alg == "AES" and (mode or "GCM").upper() == "GCM"
        t = tag_len // 8 if gcm else 0
        if len(data) < n + t:
            raise click.UsageError("input too short for its iv and tag")
        iv, cipher, tag = data[:n] or None, data[n : len(data) - t], data[len(data) - t :] or None
    ad = read_input(ad_path) if ad_path else None
    with _size_check(len(cipher)):
        r = state.client.crypto.decrypt(
            desc, alg=alg, cipher=cipher, mode=mode, iv=iv, tag=tag, ad=ad
        )
    if state.json:
        print_json(r)
    else:
        write_output(out_path, r["plain"])


@click.command()
@apply(key_options + io_options)
@click.option("--hash-alg", default="SHA256", show_default=True, help="Hash of the data.")
@click.option("--prehashed", is_flag=True, help="The input is already a hash.")
@click.option("--mode", help="RSA: PKCS1_V15 (default) or PSS.")
@pass_state
def sign(state: State, key, kid, in_path, out_path, hash_alg, prehashed, mode) -> None:
    """Sign the input; writes the signature."""
    data = read_input(in_path)
    field = {"hash": data} if prehashed else {"data": data}
    r = state.client.crypto.sign(key_args(key, kid), hash_alg=hash_alg, mode=mode, **field)
    if state.json:
        print_json(r)
    else:
        write_output(out_path, r["signature"])


@click.command()
@apply(key_options)
@click.option("--in", "in_path", metavar="FILE", help="Signed data (default stdin).")
@click.option("--signature", "sig_path", metavar="FILE", required=True, help="The signature.")
@click.option("--hash-alg", default="SHA256", show_default=True, help="Hash of the data.")
@click.option("--prehashed", is_flag=True, help="The input is already a hash.")
@click.option("--mode", help="RSA: PKCS1_V15 (default) or PSS.")
@pass_state
def verify(state: State, key, kid, in_path, sig_path, hash_alg, prehashed, mode) -> None:
    """Verify a signature; exit status 1 when it is invalid.

    Prints valid or invalid.
    """
    data = read_input(in_path)
    field = {"hash": data} if prehashed else {"data": data}
    r = state.client.crypto.verify(
        key_args(key, kid),
        signature=read_input(sig_path),
        hash_alg=hash_alg,
        mode=mode,
        **field,
    )
    ok = bool(r.get("result"))
    if state.json:
        print_json(r)
    else:
        click.echo("valid" if ok else "invalid")
    if not ok:
        click.get_current_context().exit(EXIT_API)


@click.command()
@apply(key_options + io_options)
@click.option("--alg", default="SHA256", show_default=True, help="Hash, or CMAC for AES keys.")
@pass_state
def mac(state: State, key, kid, in_path, out_path, alg) -> None:
    """Compute a MAC over the input."""
    r = state.client.crypto.mac(key_args(key, kid), alg=alg, data=read_input(in_path))
    if state.json:
        print_json(r)
    else:
        write_output(out_path, r["mac"])


@click.command()
@apply(io_options)
@click.option("--alg", default="SHA256", show_default=True, help="SHA1, SHA256, SHA384, SHA512.")
@pass_state
def digest(state: State, in_path, out_path, alg) -> None:
    """Hash the input (no key involved)."""
    r = state.client.crypto.digest(read_input(in_path), alg=alg)
    if state.json:
        print_json(r)
    else:
        write_output(out_path, r["digest"])
