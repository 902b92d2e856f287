"""Strongroom benchmark: the daemon against raw python-pkcs11 on the same token, in one run.

Starts a daemon on a fresh state directory, makes the benchmark keys through
it, measures the raw in-process python-pkcs11 rate on those very token
objects in a child process (the daemon idles meanwhile), then the same
operations through the daemon's socket, and prints ops/s and daemon/raw.

    scripts/bench [--seconds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODULE = "/usr/lib/softhsm/libsofthsm2.so"


# -- the PKCS#11 provider vs the Python client (child process) --------------------------


def provider_main(sock: str, key_file: str, seconds: float) -> None:
    """The same sequential loop through libstrongroom-pkcs11.so and through the client.

    The API key comes from its 0600 file, never from argv (which any local user
    may read in /proc)."""
    api_key = Path(key_file).read_text().strip()
    os.environ["STRONGROOM_SOCKET"] = sock
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams
    from strongroom import Client

    def rate(fn: Any, secs: float) -> float:
        n, t0 = 0, time.perf_counter()
        end = t0 + secs
        while True:
            for _ in range(10):
                fn()
            n += 10
            now = time.perf_counter()
            if now >= end:
                return n / (now - t0)

    plain, nonce, msg = os.urandom(32), os.urandom(12), b"benchmark message"
    lib = pkcs11.lib(str(ROOT / ".venv" / "lib" / "libstrongroom-pkcs11.so"))
    gcm = GCMParams(nonce)
    enc = {"key": {"name": "bench-aes"}, "alg": "AES", "mode": "GCM", "plain": plain}
    sign = {"key": {"name": "bench-rsa"}, "hash_alg": "SHA256", "data": msg}
    out: dict[str, float] = {}
    # Alternate the two paths (two rounds, best of each) so that neither gets
    # the quieter half of a busy machine.
    with (
        lib.get_token(token_label="strongroom").open(user_pin=api_key) as s,
        Client(socket_path=sock, api_key=api_key) as c,
    ):
        aes = s.get_key(object_class=ObjectClass.SECRET_KEY, label="bench-aes")
        rsa = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label="bench-rsa")
        runs = {
            "p11_aes_gcm": lambda: aes.encrypt(
                plain, mechanism=Mechanism.AES_GCM, mechanism_param=gcm
            ),
            "client_aes_gcm": lambda: c.request("POST", "/crypto/v1/encrypt", enc),
            "p11_rsa_sign": lambda: rsa.sign(msg, mechanism=Mechanism.SHA256_RSA_PKCS),
            "client_rsa_sign": lambda: c.request("POST", "/crypto/v1/sign", sign),
        }
        for _ in range(2):
            for name, fn in runs.items():
                out[name] = max(out.get(name, 0.0), rate(fn, seconds / 2))
    print(json.dumps(out))


# -- raw python-pkcs11 (child process) ------------------------------------------------


def raw_main(conf: str, pin_file: str, seconds: float) -> None:
    os.environ["SOFTHSM2_CONF"] = conf
    import hashlib

    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams

    lib = pkcs11.lib(MODULE)
    token = lib.get_token(token_label="strongroom")
    pin = Path(pin_file).read_text().strip()
    out: dict[str, float] = {}
    with token.open(user_pin=pin, rw=True) as s:

        def one(label: str, cls: ObjectClass) -> Any:
            return s.get_key(object_class=cls, label=label)

        aes = one("bench-aes", ObjectClass.SECRET_KEY)
        rsa = one("bench-rsa", ObjectClass.PRIVATE_KEY)
        eck = one("bench-ec", ObjectClass.PRIVATE_KEY)
        plain = os.urandom(32)

        def rate(fn: Any, secs: float = seconds) -> float:
            n, t0 = 0, time.perf_counter()
            end = t0 + secs
            while True:
                for _ in range(20):
                    fn()
                n += 20
                now = time.perf_counter()
                if now >= end:
                    return n / (now - t0)

        out["aes_gcm"] = rate(
            lambda: aes.encrypt(
                plain,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(os.urandom(12), b"", 128),
            )
        )
        out["rsa_sign"] = rate(lambda: rsa.sign(b"x" * 32, mechanism=Mechanism.SHA256_RSA_PKCS))
        out["ecdsa_sign"] = rate(
            lambda: eck.sign(hashlib.sha256(b"x" * 32).digest(), mechanism=Mechanism.ECDSA)
        )

        def create() -> None:
            k = s.generate_key(
                KeyType.AES,
                256,
                store=True,
                label="bench-raw",
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )
            created.append(k)

        created: list[Any] = []
        out["key_create"] = rate(create, min(seconds, 2.0))
        for k in created:
            k.destroy()
    print(json.dumps(out))


# -- through the daemon ---------------------------------------------------------------------


async def through_daemon(sock: Path, api_key: str, seconds: float) -> dict[str, Any]:
    from strongroom import AsyncClient

    plain = os.urandom(32)
    enc = (
        "POST",
        "/crypto/v1/encrypt",
        {"key": {"name": "bench-aes"}, "alg": "AES", "mode": "GCM", "plain": plain},
    )
    rsa = (
        "POST",
        "/crypto/v1/sign",
        {"key": {"name": "bench-rsa"}, "hash_alg": "SHA256", "data": b"x" * 32},
    )
    ecd = (
        "POST",
        "/crypto/v1/sign",
        {"key": {"name": "bench-ec"}, "hash_alg": "SHA256", "data": b"x" * 32},
    )
    counter = iter(range(10**9))

    def create() -> tuple[str, str, dict[str, Any]]:
        return (
            "POST",
            "/crypto/v1/keys",
            {"name": f"bench-create-{next(counter)}", "obj_type": "AES", "key_size": 256},
        )

    async def rate(clients: list[Any], req: Any, window: int, secs: float) -> float:
        done = 0
        end = time.perf_counter() + secs

        async def worker(c: Any) -> None:
            nonlocal done
            while time.perf_counter() < end:
                r = req() if callable(req) else req
                await c.request(*r)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients for _ in range(window)))
        return done / (time.perf_counter() - t0)

    async def latencies(c: Any, req: Any, n: int = 2000) -> dict[str, float]:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await c.request(*req)
            samples.append((time.perf_counter() - t0) * 1e6)
        samples.sort()
        return {"p50_us": statistics.median(samples), "p99_us": samples[int(n * 0.99)]}

    out: dict[str, Any] = {}
    clients = [AsyncClient(socket_path=str(sock), api_key=api_key) for _ in range(4)]
    try:
        for c in clients:
            await c.request("GET", "/sys/v1/groups")
        await rate(clients[:1], enc, 64, 0.5)  # warm the hot-key cache
        out["aes_gcm_1conn"] = await rate(clients[:1], enc, 256, seconds)
        out["aes_gcm_4conn"] = await rate(clients, enc, 64, seconds)
        out["aes_gcm_latency"] = await latencies(clients[0], enc)
        kid = (await clients[0].request("POST", "/crypto/v1/keys/info", {"name": "bench-aes"}))[
            "kid"
        ]
        batch = (
            "POST",
            "/crypto/v1/keys/batch/encrypt",
            [{"kid": kid, "request": {"plain": plain}} for _ in range(64)],
        )
        out["aes_gcm_batch64"] = 64 * await rate(clients[:1], batch, 4, seconds)
        out["rsa_sign"] = await rate(clients[:1], rsa, 16, seconds)
        out["ecdsa_sign"] = await rate(clients[:1], ecd, 64, seconds)
        out["key_create"] = await rate(clients[:1], create, 16, min(seconds, 2.0))
        out.update(await plugins(clients, enc, rate, latencies, seconds))
    finally:
        for c in clients:
            await c.aclose()
    return out


ECHO = "function run(input) return input end"
ONE_ENCRYPT = """
function run(input)
  local key = assert(Sobject{name = "bench-aes"})
  return assert(key:encrypt{alg = "AES", mode = "GCM", plain = input.plain})
end"""


async def plugins(
    clients: list[Any], enc: Any, rate: Any, latencies: Any, seconds: float
) -> dict[str, Any]:
    """Plugin invocation figures, in the same run as the direct requests."""
    c = clients[0]
    group = (await c.request("GET", "/sys/v1/groups"))[0]["group_id"]
    ids = {}
    for name, code in (("bench-echo", ECHO), ("bench-encrypt", ONE_ENCRYPT)):
        made = await c.request(
            "POST",
            "/sys/v1/plugins",
            {"name": name, "groups": [group], "source": {"language": "LUA", "code": code}},
        )
        ids[name] = made["plugin_id"]
    echo = ("POST", f"/sys/v1/plugins/{ids['bench-echo']}", {"hello": "world"})
    one = ("POST", f"/sys/v1/plugins/{ids['bench-encrypt']}", {"plain": os.urandom(32)})
    await latencies(c, echo, 200)  # warm the workers bound to each plugin
    await latencies(c, one, 200)
    return {
        "echo_latency": await latencies(c, echo),
        "echo_1conn": await rate(clients[:1], echo, 4, seconds),
        "echo_4conn": await rate(clients, echo, 4, seconds),
        "plugin_encrypt_latency": await latencies(c, one),
        "direct_encrypt_latency": await latencies(c, enc),
    }


def stream_main(sock: Path, api_key: str, tmp: str, mib: int = 50) -> dict:
    """MB/s of an AES-256-GCM encryption of a ``mib`` MiB file through the CLI
    (multi-part, one process start included) against ``cryptography``'s AES-GCM
    on the same file (read included), in the same run."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from strongroom import Client

    with Client(socket_path=str(sock), api_key=api_key) as c:
        c.request("POST", "/crypto/v1/keys", {"name": "bench-stream", "obj_type": "AES"})
    src, dst = Path(tmp) / "stream.in", Path(tmp) / "stream.out"
    src.write_bytes(os.urandom(mib * 1024 * 1024))
    env = {**os.environ, "STRONGROOM_SOCKET": str(sock), "STRONGROOM_API_KEY": api_key}
    cli = [sys.executable, "-c", "from strongroom._cli import cli; cli()"]
    t0 = time.perf_counter()
    subprocess.run(
        [*cli, "encrypt", "--key", "bench-stream", "--in", str(src), "--out", str(dst)],
        env=env,
        check=True,
    )
    t_cli = time.perf_counter() - t0
    t0 = time.perf_counter()
    AESGCM(os.urandom(32)).encrypt(os.urandom(12), src.read_bytes(), None)
    t_lib = time.perf_counter() - t0
    mb = mib * 1024 * 1024 / 1e6
    return {"cli_mb_s": mb / t_cli, "cryptography_mb_s": mb / t_lib, "mib": mib}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--raw", nargs=2, metavar=("CONF", "PIN_FILE"), help=argparse.SUPPRESS)
    ap.add_argument("--provider", nargs=2, metavar=("SOCK", "KEY_FILE"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--keys",
        type=int,
        default=0,
        help="instead: AES-GCM and start-up with this many keys in the token vs one",
    )
    args = ap.parse_args()
    if args.keys:
        from bench_scale import scale

        return scale(args.keys, args.seconds)
    if args.raw:
        raw_main(args.raw[0], args.raw[1], args.seconds)
        return 0
    if args.provider:
        provider_main(args.provider[0], args.provider[1], args.seconds)
        return 0

    from strongroom import Client

    with tempfile.TemporaryDirectory(prefix="strongroom-bench-") as tmp:
        state = Path(tmp) / "state"
        env = {**os.environ, "STRONGROOM_STATE_DIR": str(state)}
        log = open(Path(tmp) / "daemon.log", "wb")  # noqa: SIM115 - closed below
        daemon = subprocess.Popen(
            [sys.executable, "-m", "strongroomd", "--log-level", "WARNING"],
            env=env,
            stdout=log,
            stderr=log,
        )
        sock = state / "strongroomd.sock"
        try:
            for _ in range(600):
                if sock.exists():
                    break
                if daemon.poll() is not None:
                    raise SystemExit("daemon failed to start")
                time.sleep(0.05)
            api_key = (state / "admin.key").read_text().strip()
            with Client(socket_path=str(sock), api_key=api_key) as c:
                for name, body in (
                    ("bench-aes", {"obj_type": "AES", "key_size": 256}),
                    ("bench-rsa", {"obj_type": "RSA", "key_size": 2048}),
                    ("bench-ec", {"obj_type": "EC", "elliptic_curve": "NistP256"}),
                ):
                    c.request("POST", "/crypto/v1/keys", {"name": name, **body})
            raw_out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--seconds",
                    str(args.seconds),
                    "--raw",
                    str(state / "softhsm" / "softhsm2.conf"),
                    str(state / "softhsm" / "user.pin"),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            raw = json.loads(raw_out.stdout)
            got = asyncio.run(through_daemon(sock, api_key, args.seconds))
            prov_out = subprocess.run(
                [sys.executable, __file__, "--seconds", str(args.seconds), "--provider",
                 str(sock), str(state / "admin.key")],
                capture_output=True,
                text=True,
                check=True,
            )  # fmt: skip
            provider = json.loads(prov_out.stdout)
            streaming = stream_main(sock, api_key, tmp)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            log.close()

    rows = [
        ("AES-256-GCM 32 B, 1 connection pipelined", raw["aes_gcm"], got["aes_gcm_1conn"]),
        ("AES-256-GCM 32 B, 4 connections", raw["aes_gcm"], got["aes_gcm_4conn"]),
        ("AES-256-GCM 32 B, batches of 64 items", raw["aes_gcm"], got["aes_gcm_batch64"]),
        ("RSA-2048 PKCS#1 v1.5 sign (SHA-256)", raw["rsa_sign"], got["rsa_sign"]),
        ("ECDSA P-256 sign (SHA-256)", raw["ecdsa_sign"], got["ecdsa_sign"]),
        ("AES-256 key creation (token object)", raw["key_create"], got["key_create"]),
    ]
    if args.json:
        print(
            json.dumps(
                {"raw": raw, "daemon": got, "provider": provider, "streaming": streaming},
                indent=2,
            )
        )
        return 0
    print(f"{'operation':44} {'raw ops/s':>11} {'daemon ops/s':>13} {'daemon/raw':>11}")
    for name, r, d in rows:
        print(f"{name:44} {r:11,.0f} {d:13,.0f} {d / r:11.2f}")
    lat = got["aes_gcm_latency"]
    print(
        f"\nAES-GCM single request latency through the daemon: p50 {lat['p50_us']:.0f} us, "
        f"p99 {lat['p99_us']:.0f} us"
    )
    echo = got["echo_latency"]
    print(
        f"\nplugin echo: p50 {echo['p50_us']:.0f} us, p99 {echo['p99_us']:.0f} us; "
        f"{got['echo_1conn']:,.0f} invocations/s on 1 connection, {got['echo_4conn']:,.0f} on 4"
    )
    pe, de = got["plugin_encrypt_latency"], got["direct_encrypt_latency"]
    print(
        f"plugin doing one AES-GCM encrypt: p50 {pe['p50_us']:.0f} us vs direct request "
        f"p50 {de['p50_us']:.0f} us: {pe['p50_us'] / de['p50_us']:.2f}x"
    )
    print(f"\n{'PKCS#11 provider, one thread, sequential':44} {'client ops/s':>12} "
          f"{'module ops/s':>13} {'module/client':>14}")  # fmt: skip
    for name, key in (
        ("RSA-2048 PKCS#1 v1.5 sign (SHA-256)", "rsa_sign"),
        ("AES-256-GCM 32 B", "aes_gcm"),
    ):
        cl, p11 = provider[f"client_{key}"], provider[f"p11_{key}"]
        print(f"{name:44} {cl:12,.0f} {p11:13,.0f} {p11 / cl:14.2f}")
    st = streaming
    print(
        f"\n{'streaming, one file':44} {'cryptography':>12} {'CLI (daemon)':>13} {'CLI/crypto':>14}"
    )
    print(
        f"{'AES-256-GCM ' + str(st['mib']) + ' MiB file, MB/s':44} "
        f"{st['cryptography_mb_s']:12,.0f} {st['cli_mb_s']:13,.0f} "
        f"{st['cli_mb_s'] / st['cryptography_mb_s']:14.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
