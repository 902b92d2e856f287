"""Strongroom benchmark, several nodes: one node against two on one PostgreSQL and one token.

Starts a throw-away PostgreSQL (tests/multinode/pg.py: initdb and postgres as an
unprivileged user, loopback, temporary directory) and nodes on one SoftHSM
token directory, then measures:

- AES-256-GCM encrypt and RSA-2048 sign throughput with every client on node A,
  then with the clients spread over A and B; the CPU time each node process
  spent per request (from /proc/<pid>/stat);
- propagation: from sending a disable to node A until node B refuses the key,
  over ``--trials`` trials (p50/p99; the disable is answered only once B
  confirmed, so B refuses at its first try after the answer), and the disable's
  own latency.

On a machine with two cores, two nodes share the cores one node had: this shows
the overhead of a second node, not the gain several hosts give.

    scripts/bench --nodes 2 [--seconds 3] [--trials 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (and of its reaped children: none here)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def rate(
    socks: list[str], api_key: str, req: tuple, per_node: int, window: int, secs: float
) -> tuple[float, list[int]]:
    """Requests per second with ``per_node`` clients on each socket; and requests per node."""
    from strongroom import AsyncClient

    clients = [
        (i, AsyncClient(socket_path=s, api_key=api_key))
        for i, s in enumerate(socks)
        for _ in range(per_node)
    ]
    done = [0] * len(socks)
    try:
        for _, c in clients:
            await c.request(*req)  # log in, warm the node's hot-key cache
        end = time.perf_counter() + secs

        async def worker(i: int, c: Any) -> None:
            while time.perf_counter() < end:
                await c.request(*req)
                done[i] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i, c) for i, c in clients for _ in range(window)))
        return sum(done) / (time.perf_counter() - t0), done
    finally:
        for _, c in clients:
            await c.aclose()


def measure(nodes: list[Any], api_key: str, req: tuple, window: int, secs: float) -> dict:
    pids = [n.proc.pid for n in nodes]
    before = [cpu_seconds(p) for p in pids]
    ops, done = asyncio.run(
        rate([str(n.socket) for n in nodes], api_key, req, 4 // len(nodes), window, secs)
    )
    cpu = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
    return {
        "ops_per_s": round(ops),
        "cpu_us_per_request": [
            round(c / max(d, 1) * 1e6, 1) for c, d in zip(cpu, done, strict=True)
        ],
        "requests": done,
    }


def propagation(a: Any, b: Any, api_key: str, kid: str, trials: int) -> dict:
    from strongroom import ApiError, Client

    enc = {"key": {"kid": kid}, "alg": "AES", "mode": "GCM", "plain": b"x" * 32}
    seen, answered, tries = [], [], []
    with (
        Client(socket_path=str(a.socket), api_key=api_key) as ca,
        Client(socket_path=str(b.socket), api_key=api_key) as cb,
    ):
        cb.request("POST", "/crypto/v1/encrypt", enc)
        for _ in range(trials):
            t0 = time.perf_counter()
            ca.request("PATCH", f"/crypto/v1/keys/{kid}", {"enabled": False})
            answered.append(time.perf_counter() - t0)
            n = 0
            while True:
                n += 1
                try:
                    cb.request("POST", "/crypto/v1/encrypt", enc)
                except ApiError as exc:
                    if exc.status == 403:
                        break
                    raise
            seen.append(time.perf_counter() - t0)
            tries.append(n)
            ca.request("PATCH", f"/crypto/v1/keys/{kid}", {"enabled": True})
            cb.request("POST", "/crypto/v1/encrypt", enc)  # enabled again on B at once

    def pct(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {
            "p50_ms": round(statistics.median(xs) * 1e3, 2),
            "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e3, 2),
        }

    return {
        "trials": trials,
        "disable_to_refusal_on_other_node": pct(seen),
        "disable_answered": pct(answered),
        "max_tries_on_other_node": max(tries),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2, choices=[2])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from strongroom import Client

    from tests.multinode.conftest import Cluster
    from tests.multinode.pg import Postgres

    pg = Postgres()
    out: dict[str, Any] = {"cores": os.cpu_count()}
    try:
        pg.start()
        with tempfile.TemporaryDirectory(prefix="strongroom-bench-nodes-") as tmp:
            cluster = Cluster(Path(tmp), pg, names=("A", "B")).start()
            try:
                a, b = cluster["A"], cluster["B"]
                key = cluster.admin_key
                with Client(socket_path=str(a.socket), api_key=key) as c:
                    for body in (
                        {"name": "bench-aes", "obj_type": "AES", "key_size": 256},
                        {"name": "bench-rsa", "obj_type": "RSA", "key_size": 2048},
                        {"name": "bench-prop", "obj_type": "AES", "key_size": 128},
                    ):
                        made = c.request("POST", "/crypto/v1/keys", body)
                        if body["name"] == "bench-prop":
                            prop_kid = made["kid"]
                enc = (
                    "POST",
                    "/crypto/v1/encrypt",
                    {
                        "key": {"name": "bench-aes"},
                        "alg": "AES",
                        "mode": "GCM",
                        "plain": os.urandom(32),
                    },
                )
                sign = (
                    "POST",
                    "/crypto/v1/sign",
                    {"key": {"name": "bench-rsa"}, "hash_alg": "SHA256", "data": b"x" * 32},
                )
                for name, req, window in (("aes_gcm", enc, 64), ("rsa_sign", sign, 8)):
                    out[f"{name}_1node"] = measure([a], key, req, window, args.seconds)
                    out[f"{name}_2nodes"] = measure([a, b], key, req, window, args.seconds)
                out["propagation"] = propagation(a, b, key, prop_kid, args.trials)
            finally:
                cluster.stop()
    finally:
        pg.destroy()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"strongroom nodes benchmark ({out['cores']} cores; two nodes share them)")
    for name in ("aes_gcm", "rsa_sign"):
        one, two = out[f"{name}_1node"], out[f"{name}_2nodes"]
        print(
            f"  {name:9s} 1 node  {one['ops_per_s']:>7d}/s  CPU/request "
            f"{one['cpu_us_per_request'][0]} us"
        )
        print(
            f"  {name:9s} 2 nodes {two['ops_per_s']:>7d}/s  CPU/request A "
            f"{two['cpu_us_per_request'][0]} us, B {two['cpu_us_per_request'][1]} us"
        )
    p = out["propagation"]
    print(
        f"  disable on A -> refused on B: p50 {p['disable_to_refusal_on_other_node']['p50_ms']}"
        f" ms, p99 {p['disable_to_refusal_on_other_node']['p99_ms']} ms over {p['trials']} "
        f"trials (disable answered p50 {p['disable_answered']['p50_ms']} ms; B refused at "
        f"try {p['max_tries_on_other_node']} at worst)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
