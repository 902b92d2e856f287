"""Crypto operations: ``encrypt``, ``decrypt``, ``sign``, ``verify``, ``mac``, ``digest``."""

from __future__ import annotations

import click

from strongroom._cli._common import (
    EXIT_API,
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


def _iv_len(alg: str, mode: str | None) -> int:
    mode = (mode or ("CBC" if alg == "DES3" else "GCM")).upper()
    if mode == "ECB" or alg not in ("AES", "DES3"):
        return 0
    if alg == "DES3":
        return 8
    return 12 if mode == "GCM" else 16


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
    r = state.client.crypto.encrypt(desc, alg=alg, plain=read_input(in_path), mode=mode, ad=ad)
    if state.json:
        print_json(r)
    else:
        write_output(out_path, (r.get("iv") or b"") + r["cipher"] + (r.get("tag") or b""))


@click.command()
@apply(key_options + io_options)
@click.option("--alg", help="Key algorithm (default: the key's type).")
@click.option("--mode", help="As for encrypt.")
@click.option("--ad", "ad_path", metavar="FILE", help="Additional authenticated data (GCM).")
@click.option("--tag-len", type=int, default=16, show_default=True, help="GCM tag bytes.")
@pass_state
def decrypt(state: State, key, kid, in_path, out_path, alg, mode, ad_path, tag_len) -> None:
    """Decrypt what `encrypt` wrote (iv || cipher || tag)."""
    desc = key_args(key, kid)
    alg = _alg_of(state, desc, alg)
    data = read_input(in_path)
    n = _iv_len(alg, mode)
    gcm = alg == "AES" and (mode or "GCM").upper() == "GCM"
    t = tag_len if gcm else 0
    if len(data) < n + t:
        raise click.UsageError("input too short for its iv and tag")
    iv, cipher, tag = data[:n] or None, data[n : len(data) - t], data[len(data) - t :] or None
    ad = read_input(ad_path) if ad_path else None
    r = state.client.crypto.decrypt(desc, alg=alg, cipher=cipher, mode=mode, iv=iv, tag=tag, ad=ad)
    if state.json:
        print_json(r)
    else:
        write_output(out_path, r["plain"])


@click.command()
@apply(key_options + io_options)
@click.option("--hash-alg", default="SHA256", show_default=True)
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
@click.option("--signature", "sig_path", metavar="FILE", required=True)
@click.option("--hash-alg", default="SHA256", show_default=True)
@click.option("--prehashed", is_flag=True, help="The input is already a hash.")
@click.option("--mode", help="RSA: PKCS1_V15 (default) or PSS.")
@pass_state
def verify(state: State, key, kid, in_path, sig_path, hash_alg, prehashed, mode) -> None:
    """Verify a signature; prints valid/invalid, exit status 1 when invalid."""
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
@click.option("--alg", default="SHA256", show_default=True)
@pass_state
def digest(state: State, in_path, out_path, alg) -> None:
    """Hash the input (no key involved)."""
    r = state.client.crypto.digest(read_input(in_path), alg=alg)
    if state.json:
        print_json(r)
    else:
        write_output(out_path, r["digest"])
