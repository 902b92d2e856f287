"""Load test of the resource bounds: idle and half-sent connections beside a working client.

Starts a daemon on a fresh state directory (default settings unless
``--config``), connects a bystander that encrypts with AES-GCM in a loop, then
opens ``--idle`` connections that send nothing and ``--half`` connections that
each send half of the largest frame allowed before authentication, in two
waves (the second after the deadlines closed the first). Samples the daemon's
RSS throughout and prints its peak, the bystander's latency, and what the
daemon did with the connections (refused at the cap, closed at a deadline).
Loopback only: everything goes over the daemon's Unix socket.

    .venv/bin/python scripts/load.py [--idle 2000] [--half 500] [--seconds 25]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "client"), str(ROOT / "daemon")]

from strongroom import Client, wire  # noqa: E402
from strongroomd.config import load  # noqa: E402


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start(state: Path, config: Path | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STRONGROOM_STATE_DIR": str(state)}
    env.pop("STRONGROOM_SOCKET", None)
    args = [sys.executable, "-m", "strongroomd"] + (["--config", str(config)] if config else [])
    log = open(state.parent / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=log, cwd=ROOT)
    sock = state / "strongroomd.sock"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"strongroomd exited {proc.returncode}: see {state.parent / 'daemon.log'}")
        if sock.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    return proc
                except OSError:
                    pass
        time.sleep(0.05)
    proc.kill()
    sys.exit("strongroomd did not start")


class Bystander(threading.Thread):
    """Encrypts 32 bytes with AES-256-GCM in a loop; records each call's latency."""

    def __init__(self, path: Path, api_key: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.client = Client(path, api_key)
        self.stop = stop
        self.latencies: list[float] = []
        self.errors: list[str] = []
        name = f"load-{time.time_ns()}"
        self.kid = self.client.request(
            "POST", "/crypto/v1/keys", {"name": name, "obj_type": "AES", "key_size": 256}
        )["kid"]

    def run(self) -> None:
        body = {"key": {"kid": self.kid}, "alg": "AES", "mode": "GCM", "plain": b"\0" * 32}
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                self.client.request("POST", "/crypto/v1/encrypt", body)
            except Exception as exc:  # counted and reported
                self.errors.append(type(exc).__name__)
                time.sleep(0.01)
                continue
            self.latencies.append(time.perf_counter() - t0)


def open_wave(path: Path, idle: int, half: int, half_bytes: int) -> list[socket.socket]:
    """``half`` connections that send half a frame, then ``idle`` that send nothing."""
    socks = []
    header = struct.pack(">I", half_bytes * 2)
    for i in range(half + idle):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(True)
        try:
            s.connect(str(path))
            if i < half:
                s.settimeout(2.0)  # the daemon may refuse it half way
                with contextlib.suppress(OSError):
                    s.sendall(header + b"\0" * half_bytes)
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def outcome(socks: list[socket.socket]) -> dict[str, int]:
    """What each connection got from the daemon (a refusal or deadline frame, or nothing)."""
    seen: dict[str, int] = {}
    for s in socks:
        s.setblocking(False)
        code = "open"
        try:
            data = s.recv(4096)
            if data:
                msgs = wire.FrameReader(1 << 20).feed(data)
                code = wire.decode(msgs[0])["body"]["error"] if msgs else "bytes"
            else:
                code = "closed"
        except BlockingIOError:
            pass
        except OSError:
            code = "reset"
        seen[code] = seen.get(code, 0) + 1
        s.close()
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--half", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=25.0, help="total run time")
    ap.add_argument("--config", type=Path, help="a strongroomd TOML file (default settings)")
    ap.add_argument(
        "--half-bytes",
        type=int,
        help="bytes each half-sent connection sends, of a frame twice that size "
        "(default: half of max_unauth_bytes; 2097152 replays the 4 MiB attack)",
    )
    args = ap.parse_args(argv)
    if args.idle + args.half > 20_000:
        ap.error("at most 20,000 connections")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle + args.half + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    cfg = load(args.config)
    unauth = getattr(cfg, "max_unauth_bytes", cfg.max_frame)  # (older daemons lack it)
    half_bytes = args.half_bytes or unauth // 2 - 8  # the most an unauthenticated frame may hold

    with tempfile.TemporaryDirectory(prefix="strongroom-load-") as tmp:
        state = Path(tmp) / "state"
        proc = start(state, args.config)
        try:
            sock_path = state / "strongroomd.sock"
            api_key = (state / "admin.key").read_text().strip()
            time.sleep(1.0)
            base = rss_kib(proc.pid)
            stop = threading.Event()
            bystander = Bystander(sock_path, api_key, stop)
            peak = [base]

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_kib(proc.pid))
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            bystander.start()
            t0 = time.monotonic()
            time.sleep(2.0)  # latency without load first
            quiet = len(bystander.latencies)
            waves = []
            timeouts = (getattr(cfg, "auth_timeout", 10.0), getattr(cfg, "frame_timeout", 10.0))
            wave_gap = max(timeouts) + 1.0
            while time.monotonic() - t0 + 2 < args.seconds:
                t_wave = time.monotonic()
                socks = open_wave(sock_path, args.idle, args.half, half_bytes)
                opened = time.monotonic() - t_wave
                time.sleep(max(0.5, min(wave_gap, args.seconds - (time.monotonic() - t0))))
                waves.append((len(socks), opened, outcome(socks)))
            stop.set()
            bystander.join(10)
            sampler.join(1)
            hwm = rss_kib(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(30)
        log = (Path(tmp) / "daemon.log").read_text()

    lat = sorted(bystander.latencies[quiet:])
    q = sorted(bystander.latencies[:quiet])

    def pct(xs: list[float], p: float) -> str:
        return f"{xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3:.2f} ms" if xs else "-"

    print("settings:")
    for name in (
        "max_connections",
        "max_unauth_bytes",
        "max_inflight_bytes",
        "frame_timeout",
        "auth_timeout",
        "max_frame",
    ):
        print(f"  {name} = {getattr(cfg, name, '(none)')}")
    print(f"load: {args.idle} idle + {args.half} half-sent ({half_bytes} of {half_bytes * 2} B)")
    for i, (n, secs, seen) in enumerate(waves, 1):
        print(f"  wave {i}: {n} connected in {secs:.1f} s; daemon's answers: {seen}")
    print(
        f"daemon RSS: {base / 1024:.0f} MiB at rest, peak {peak[0] / 1024:.0f} MiB sampled, "
        f"VmHWM {hwm / 1024:.0f} MiB"
    )
    print(f"bystander AES-GCM encrypt, quiet: n={len(q)} p50 {pct(q, 0.5)} p99 {pct(q, 0.99)}")
    print(
        f"bystander under load: n={len(lat)} p50 {pct(lat, 0.5)} p99 {pct(lat, 0.99)} "
        f"max {pct(lat, 1.0)} errors {len(bystander.errors)}"
    )
    if lat:
        print(f"  mean {statistics.fmean(lat) * 1e3:.2f} ms")
    warnings = [ln for ln in log.splitlines() if "level=warning" in ln or "level=error" in ln]
    print(
        f"daemon log: {len(log.splitlines())} lines, {len(warnings)} warnings/errors, "
        f"{len(log)} bytes"
    )
    for ln in warnings[:8]:
        print("  " + ln[:200])
    return 0 if not bystander.errors else 1


if __name__ == "__main__":
    sys.exit(main())
