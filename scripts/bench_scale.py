"""How the daemon scales with the number of keys in its token (``scripts/bench --keys N``).

With one key, then with N: sequential AES-GCM through the daemon, the same
loop in raw python-pkcs11 on the same token (so SoftHSM's own cost of N
objects shows up on both sides), and the daemon's start-up to ready. Keys
are made through the daemon (each is a token object and a row), so N =
10,000 takes a couple of minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _raw_rate(conf: str, pin_file: str, seconds: float) -> None:
    """Child process: AES-GCM on "scale-aes" with python-pkcs11 alone."""
    os.environ["SOFTHSM2_CONF"] = conf
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams

    token = pkcs11.lib(MODULE).get_token(token_label="strongroom")
    with token.open(user_pin=Path(pin_file).read_text().strip()) as s:
        key = s.get_key(object_class=ObjectClass.SECRET_KEY, label="scale-aes")
        plain, n, t0 = os.urandom(32), 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(20):
                key.encrypt(plain, mechanism=Mechanism.AES_GCM,
                            mechanism_param=GCMParams(os.urandom(12), b"", 128))  # fmt: skip
            n += 20
        print(json.dumps(n / (time.perf_counter() - t0)))


class _Daemon:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.sock = state / "strongroomd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Seconds from exec to the first answered request."""
        self.sock.unlink(missing_ok=True)
        env = {**os.environ, "STRONGROOM_STATE_DIR": str(self.state)}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strongroomd", "--log-level", "WARNING"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        from strongroom import Client

        while True:
            if self.proc.poll() is not None:
                raise SystemExit("the daemon exited")
            if self.sock.exists():
                try:
                    with Client(socket_path=str(self.sock), api_key=self.key) as c:
                        c.request("GET", "/sys/v1/health")
                    return time.perf_counter() - t0
                except Exception:
                    pass
            time.sleep(0.02)

    @property
    def key(self) -> str:
        p = self.state / "admin.key"
        return p.read_text().strip() if p.exists() else "bm90OnlldA=="

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def _daemon_rate(d: _Daemon, seconds: float) -> float:
    from strongroom import Client

    body = {"key": {"name": "scale-aes"}, "alg": "AES", "mode": "GCM", "plain": os.urandom(32)}
    with Client(socket_path=str(d.sock), api_key=d.key) as c:
        for _ in range(200):  # the hot copy, the first lookups
            c.request("POST", "/crypto/v1/encrypt", body)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            c.request("POST", "/crypto/v1/encrypt", body)
            n += 1
        return n / (time.perf_counter() - t0)


def _raw(d: _Daemon, seconds: float) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--raw", str(d.state / "softhsm" / "softhsm2.conf"),
         str(d.state / "softhsm" / "user.pin"), str(seconds)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout)


async def _make(sock: Path, key: str, n: int) -> float:
    from strongroom import AsyncClient

    counter = iter(range(n))
    t0 = time.perf_counter()
    async with AsyncClient(socket_path=str(sock), api_key=key) as c:

        async def worker() -> None:
            for i in counter:
                await c.request(
                    "POST", "/crypto/v1/keys", {"name": f"scale-{i}", "obj_type": "AES"}
                )

        await asyncio.gather(*(worker() for _ in range(32)))
    return n / (time.perf_counter() - t0)


def scale(n: int, seconds: float) -> int:
    from strongroom import Client

    with tempfile.TemporaryDirectory(prefix="strongroom-scale-") as tmp:
        d = _Daemon(Path(tmp) / "state")
        try:
            d.start()  # the first start makes the token
            with Client(socket_path=str(d.sock), api_key=d.key) as c:
                c.request("POST", "/crypto/v1/keys", {"name": "scale-aes", "obj_type": "AES"})
            d.stop()
            start1 = d.start()
            daemon1 = _daemon_rate(d, seconds)
            d.stop()
            raw1 = _raw(d, seconds)
            d.start()
            made = asyncio.run(_make(d.sock, d.key, n - 1))
            d.stop()
            start_n = d.start()
            daemon_n = _daemon_rate(d, seconds)
            d.stop()
            raw_n = _raw(d, seconds)
        finally:
            d.stop()
    print(f"{'sequential AES-GCM 32 B':32} {'1 key':>10} {f'{n:,} keys':>12} {'change':>8}")
    print(f"{'  raw python-pkcs11 (ops/s)':32} {raw1:10,.0f} {raw_n:12,.0f} "
          f"{raw_n / raw1 - 1:+8.1%}")  # fmt: skip
    print(f"{'  through the daemon (ops/s)':32} {daemon1:10,.0f} {daemon_n:12,.0f} "
          f"{daemon_n / daemon1 - 1:+8.1%}")  # fmt: skip
    print(f"{'start-up to ready (s)':32} {start1:10.2f} {start_n:12.2f}")
    print(f"\nkeys made through the daemon: {made:,.0f}/s")
    return 0


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--raw":
    _raw_rate(sys.argv[2], sys.argv[3], float(sys.argv[4]))
