"""Concurrency soak: many clients, one small pool of names, kill -9 at random.

Starts a real strongroomd on a temporary state directory, makes a few groups
with one app each, and lets ``--clients`` clients (the admin and the apps, in
turn) hammer a small shared pool of key names for ``--seconds``: create (AES,
HMAC, EC; some transient), rename, update (enabled, key_ops narrowing,
description), delete, and use (encrypt / mac / sign, and later decrypt /
macverify / verify of what was produced). Meanwhile the daemon is killed with
SIGKILL at random intervals and restarted on the same state directory.

Every request's outcome goes into a ledger: acknowledged (2xx), rejected
(4xx: not applied), unknown (no answer, 5xx, or cut by a kill: it may or may
not have been applied, and if it was, before the next kill), or not sent (no
connection). At the end the daemon is killed once more, restarted, and the
ledger is checked through the daemon, then (after a clean stop) directly in
the SQLite database and the PKCS#11 token:

* every acknowledged key that no delete touched exists, with its material,
  and decrypts / verifies what was produced with it;
* every acknowledged delete stayed deleted (no row, no token object, 404);
* every field (name, enabled, key_ops) holds a value that some write could
  have left there: a write counts unless an acknowledged write of the same
  field started after it had certainly finished. Unknown-outcome writes are
  allowed but never required; the same rule checks what responses showed
  during the run (a successful encrypt shows the key enabled with ENCRYPT);
* token and database agree: no object without a row, no row without an
  object, labels are names, a key without EXPORT is not extractable;
* ``/sys/v1/logs/verify`` says ok.

It prints the counts and exits 1 on any violation. Loopback only (the Unix
socket); it stops by itself and removes its state directory (``--keep`` keeps
it), killing the daemon's process group on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INF = math.inf
now = time.monotonic

OP_OF_USE = {"AES": "ENCRYPT", "HMAC": "MACGENERATE", "EC": "SIGN"}
OP_OF_CHECK = {"AES": "DECRYPT", "HMAC": "MACVERIFY", "EC": "VERIFY"}
MAX_RECORDS = 8


# -- the daemon -----------------------------------------------------------------


class Daemon:
    """strongroomd in its own process group, so SIGKILL takes its workers too."""

    def __init__(self, state_dir: Path, python_path: str | None) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / "strongroomd.sock"
        self.log = state_dir.parent / "strongroomd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        env = {**os.environ, "STRONGROOM_STATE_DIR": str(state_dir)}
        for name in ("STRONGROOM_SOCKET", "STRONGROOM_API_KEY", "STRONGROOM_API_KEY_FILE"):
            env.pop(name, None)
        if python_path:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (python_path, env.get("PYTHONPATH", "")) if p
            )
        self.env = env

    def module_file(self) -> str:
        out = subprocess.run(
            [sys.executable, "-c", "import strongroomd; print(strongroomd.__file__)"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip() or out.stderr.strip()[-300:]

    def start(self, timeout: float = 90.0) -> None:
        with open(self.log, "ab") as log:
            log.write(f"\n=== soak: start at {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "strongroomd"],
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"strongroomd exited {self.proc.returncode}:\n{self.tail()}")
            if self.socket.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(self.socket))
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        raise RuntimeError(f"strongroomd did not start within {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL the group if it does not stop."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return -9
        # Anything the daemon left in its group (sandbox workers) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return rc

    @property
    def admin_key(self) -> str:
        return (self.state_dir / "admin.key").read_text().strip()


# -- the ledger -----------------------------------------------------------------


@dataclass(slots=True)
class Write:
    vals: dict[str, Any]  # field -> value written (key_ops as a frozenset)
    s: float
    e: float  # when the answer came; for an unknown outcome, resolved at the end
    ack: bool
    what: str


@dataclass(slots=True)
class Obs:
    """A response showed a field's value (or a property of it) between s and e."""

    kid: str
    field: str
    test: str  # "eq" | "has" | "lacks"
    value: Any
    s: float
    e: float
    what: str


@dataclass
class Key:
    kid: str
    group: str
    obj_type: str
    created: Write
    writes: list[Write] = field(default_factory=list)
    deletes: list[Write] = field(default_factory=list)  # acknowledged or unknown
    records: list[dict[str, Any]] = field(default_factory=list)
    # What clients believe now; only for choosing targets, never for checking.
    name: str = ""
    enabled: bool = True
    ops: frozenset[str] = frozenset()
    gone: bool = False

    def acked_delete(self) -> Write | None:
        return next((d for d in self.deletes if d.ack), None)


@dataclass
class Ledger:
    keys: dict[str, Key] = field(default_factory=dict)
    obs: list[Obs] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)
    unknown_creates: int = 0
    strays_deleted: int = 0
    transient_kids: set[str] = field(default_factory=set)
    stats: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[tuple[str, str]] = field(default_factory=list)

    def violate(self, kind: str, detail: str) -> None:
        self.violations.append((kind, detail))

    def resolve_unknown(self) -> None:
        """An unknown request was applied before the first kill after it was sent, or never."""
        kills = sorted(self.kills)
        for w in self.unknown():
            w.e = next((k for k in kills if k >= w.s), INF)

    def unknown(self) -> list[Write]:
        return [w for k in self.keys.values() for w in k.writes + k.deletes if not w.ack]


def candidates(key: Key, fld: str, s: float, e: float) -> list[Any]:
    """Values of ``fld`` that a linearizable daemon may show between s and e.

    A write that started before e counts unless an acknowledged write of the
    same field started after it had certainly finished and itself finished
    before s.
    """
    ws = [w for w in key.writes if fld in w.vals and w.s < e]
    newest = max((v.s for v in ws if v.ack and v.e < s), default=-INF)
    return [w.vals[fld] for w in ws if not w.e < newest]


def passes(test: str, value: Any, cand: Any) -> bool:
    if test == "eq":
        return value == cand
    if test == "has":
        return value in cand
    return value not in cand


# -- clients --------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    outcome: str  # "ok" | "rejected" | "unknown" | "not_sent"
    status: int
    code: str
    body: Any
    s: float
    e: float

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class Actor:
    """One client connection with one principal's credential."""

    def __init__(self, name: str, api_key: str, groups: list[str], admin: bool, soak: Soak):
        from strongroom import AsyncClient

        self.name = name
        self.api_key = api_key
        self.groups = groups
        self.admin = admin
        self.soak = soak
        self.client = AsyncClient(soak.daemon.socket, api_key=None, timeout=soak.args.timeout)
        self.rng = random.Random(soak.rng.random())

    def transport_generation(self) -> int:
        return self.client._transport.connections

    def sees(self, key: Key) -> bool:
        return self.admin or key.group in self.groups

    async def call(self, kind: str, method: str, path: str, body: Any = None) -> Result:
        from strongroom import ApiError, ConnectError, TransportError

        res = Result("not_sent", 401, "unauthenticated", None, now(), now())
        for _ in range(3):
            s = now()
            try:
                out = await self.client.request(method, path, body)
            except ConnectError:
                res = Result("not_sent", 0, "connect", None, s, now())
            except TransportError as exc:
                res = Result("unknown", 0, type(exc).__name__, None, s, now())
            except asyncio.CancelledError:
                self.soak.ledger.stats[(kind, "unknown")] += 1
                raise
            except ApiError as exc:
                if exc.status == 401 and path != "/sys/v1/session/auth":
                    # Refused before anything ran: log in and send it again.
                    if await self.login():
                        continue
                    res = Result("not_sent", 401, exc.code, None, s, now())
                elif exc.status >= 500:
                    res = Result("unknown", exc.status, exc.code, exc.body, s, now())
                else:
                    res = Result("rejected", exc.status, exc.code, exc.body, s, now())
            else:
                res = Result("ok", 200, "", out, s, now())
            break
        self.soak.ledger.stats[(kind, res.outcome)] += 1
        if res.outcome in ("rejected", "unknown") and res.code:
            self.soak.ledger.codes[f"{kind} {res.status} {res.code}"] += 1
        return res

    async def login(self) -> bool:
        r = await self.call("login", "POST", "/sys/v1/session/auth", {"api_key": self.api_key})
        return r.ok

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()


class Soak:
    def __init__(self, args: argparse.Namespace, daemon: Daemon) -> None:
        self.args = args
        self.daemon = daemon
        self.rng = random.Random(args.seed)
        self.ledger = Ledger()
        self.names = [f"soak-{i}" for i in range(args.names)]
        self.groups: list[str] = []
        self.stop_at = INF
        self.restarting = False
        self.dead = False
        self.taken: dict[str, float] = {}
        #: Names with a create in flight: a key the janitor finds under such a name
        #: may be acknowledged a moment later, so it is never judged stray.
        self.creating: dict[str, int] = {}

    # -- choosing ---------------------------------------------------------------

    def live(self, actor: Actor) -> list[Key]:
        return [k for k in self.ledger.keys.values() if not k.gone and actor.sees(k)]

    def free_name(self, rng: random.Random) -> str:
        held = {k.name for k in self.ledger.keys.values() if not k.gone}
        t = now()
        # A name refused lately (409) belongs to something we do not track as live.
        held |= {n for n, when in self.taken.items() if t - when < 2.0}
        free = [n for n in self.names if n not in held]
        if free and rng.random() < 0.75:
            return rng.choice(free)
        return rng.choice(self.names)

    # -- recording ----------------------------------------------------------------

    @staticmethod
    def begin(writes: list[Write], vals: dict[str, Any], what: str) -> Write:
        """A write about to be sent: unknown until answered (so also if cancelled)."""
        w = Write(vals, now(), INF, False, what)
        writes.append(w)
        return w

    @staticmethod
    def settle(writes: list[Write], w: Write, r: Result) -> None:
        if r.outcome in ("rejected", "not_sent"):
            writes.remove(w)  # not applied
            return
        w.s = r.s  # earlier attempts were refused unauthenticated
        if r.ok:
            w.ack, w.e = True, r.e

    def observe(self, key: Key, r: Result, sob: dict[str, Any], skip: set[str], what: str) -> None:
        for fld in ("name", "enabled", "key_ops"):
            if fld in skip or fld not in sob:
                continue
            value = frozenset(sob[fld]) if fld == "key_ops" else sob[fld]
            self.ledger.obs.append(Obs(key.kid, fld, "eq", value, r.s, r.e, what))
        key.name = sob.get("name", key.name)
        key.enabled = sob.get("enabled", key.enabled)
        key.ops = frozenset(sob.get("key_ops", key.ops))

    def existence(self, actor: Actor, key: Key, r: Result, what: str) -> None:
        """What a response says about whether the key exists."""
        # 403 (disabled, key_ops, not manageable) is decided on the key, so it existed.
        if r.ok or (r.outcome == "rejected" and r.status == 403 and actor.sees(key)):
            d = key.acked_delete()
            if d is not None and d.e < r.s:
                self.ledger.violate(
                    "acked_delete_undone_in_run",
                    f"{what} on {key.kid} answered {r.status} {r.code or 'ok'} after its delete "
                    "was acknowledged",
                )
        elif r.outcome == "rejected" and r.status == 404 and actor.sees(key):
            # Checked at the end, once every delete's outcome is known.
            self.ledger.obs.append(Obs(key.kid, "exists", "eq", False, r.s, r.e, what))
            if not [d for d in key.deletes if d.s < r.e]:
                key.gone = True  # stop choosing it; the end check decides
        elif r.outcome == "unknown" and r.status >= 500:
            self.ledger.obs.append(Obs(key.kid, "exists", "eq", f"5xx:{r.code}", r.s, r.e, what))

    # -- operations -----------------------------------------------------------------

    async def op_create(self, a: Actor) -> bool:
        name = self.free_name(a.rng)
        self.creating[name] = self.creating.get(name, 0) + 1
        try:
            return await self._create(a, name)
        finally:  # after the ledger has the key (no await between the answer and it)
            self.creating[name] -= 1
            if not self.creating[name]:
                del self.creating[name]

    async def _create(self, a: Actor, name: str) -> bool:
        rng = a.rng
        transient = rng.random() < 0.12
        t = "AES" if transient else rng.choices(["AES", "HMAC", "EC"], [6, 2.5, 1.5])[0]
        body: dict[str, Any] = {"name": name, "obj_type": t}
        if t == "AES":
            body["key_size"] = 256
            if rng.random() < 0.25:
                body["key_ops"] = ["ENCRYPT", "DECRYPT", "WRAPKEY", "APPMANAGEABLE", "EXPORT"]
        elif t == "HMAC":
            body["key_size"] = 256
        else:
            body["elliptic_curve"] = "NistP256"
        if transient:
            body["transient"] = True
        elif rng.random() < 0.05:
            body["enabled"] = False
        if a.admin:
            body["group_id"] = rng.choice(self.groups)
        if not transient:
            self.ledger.unknown_creates += 1  # until answered (so also if cancelled)
        r = await a.call(
            "create_transient" if transient else "create", "POST", "/crypto/v1/keys", body
        )
        if not transient and r.outcome != "unknown":
            self.ledger.unknown_creates -= 1
        if transient:
            if r.ok:
                await self.use_transient(a, r.body, a.transport_generation())
            return r.ok
        if r.outcome == "unknown":
            return False
        if not r.ok:
            if r.code == "name_exists":
                self.taken[name] = now()
            return False
        sob = r.body
        w = Write(
            {
                "name": sob["name"],
                "enabled": sob["enabled"],
                "key_ops": frozenset(sob["key_ops"]),
            },
            r.s,
            r.e,
            True,
            f"create by {a.name}",
        )
        if sob["kid"] in self.ledger.keys:
            self.ledger.violate("kid_reused", f"create answered an existing kid {sob['kid']}")
            return False
        key = Key(sob["kid"], sob["group_id"], t, w, [w])
        key.name, key.enabled, key.ops = sob["name"], sob["enabled"], frozenset(sob["key_ops"])
        self.ledger.keys[key.kid] = key
        if sob["name"] != name:
            self.ledger.violate("create_name", f"asked {name!r}, got {sob['name']!r}")
        return True

    async def use_transient(self, a: Actor, sob: dict[str, Any], gen: int) -> None:
        kid = sob["kid"]
        self.ledger.transient_kids.add(kid)
        plain = os.urandom(32)
        ref = {"transient_key": sob.get("transient_key", kid)}
        r = await a.call(
            "use_transient",
            "POST",
            "/crypto/v1/encrypt",
            {"key": ref, "alg": "AES", "mode": "GCM", "plain": plain},
        )
        if not r.ok:
            return
        out = r.body
        r2 = await a.call(
            "use_transient",
            "POST",
            "/crypto/v1/decrypt",
            {
                "key": ref,
                "alg": "AES",
                "mode": "GCM",
                "cipher": out["cipher"],
                "iv": out["iv"],
                "tag": out["tag"],
            },
        )
        same_conn = a.transport_generation() == gen
        if r2.ok and r2.body.get("plain") != plain:
            self.ledger.violate("transient_wrong_plaintext", f"transient {kid}")
        elif r2.outcome == "rejected" and same_conn and r2.status in (400, 403, 404):
            self.ledger.violate("transient_unusable", f"transient {kid}: {r2.status} {r2.code}")

    async def op_rename(self, a: Actor, key: Key) -> None:
        rng = a.rng
        body: dict[str, Any] = {"name": self.free_name(rng)}
        if rng.random() < 0.1:
            body["enabled"] = not key.enabled
        await self.patch(a, key, body, "rename")

    async def op_update(self, a: Actor, key: Key) -> None:
        rng = a.rng
        body: dict[str, Any] = {}
        choice = rng.random()
        narrowable = sorted(key.ops - {"APPMANAGEABLE"})
        if choice < 0.4:
            body["enabled"] = not key.enabled if rng.random() < 0.8 else key.enabled
        elif choice < 0.75 and len(narrowable) > 1:
            drop = rng.choice(narrowable)
            # EXPORT goes first when there is one: that is the one a stale write would restore.
            if "EXPORT" in narrowable and rng.random() < 0.6:
                drop = "EXPORT"
            body["key_ops"] = sorted(key.ops - {drop})
        elif choice < 0.9:
            body["enabled"] = rng.random() < 0.6
            body["description"] = f"d{rng.randrange(1000)}"
        else:
            body["description"] = f"d{rng.randrange(1000)}"
        await self.patch(a, key, body, "update")

    async def patch(self, a: Actor, key: Key, body: dict[str, Any], what: str) -> None:
        vals: dict[str, Any] = {}
        for fld in ("name", "enabled", "key_ops"):
            if fld in body:
                vals[fld] = frozenset(body[fld]) if fld == "key_ops" else body[fld]
        desc = f"{what} by {a.name} {sorted(body)}"
        w = self.begin(key.writes, vals, desc) if vals else None
        r = await a.call(what, "PATCH", f"/crypto/v1/keys/{key.kid}", body)
        if r.code == "name_exists" and "name" in body:
            self.taken[body["name"]] = now()
        if w is not None:
            self.settle(key.writes, w, r)
        if r.ok:  # the fields it wrote too: its own write is among the candidates
            self.observe(key, r, r.body, set(), desc)
        self.existence(a, key, r, desc)

    async def op_delete(self, a: Actor, key: Key) -> None:
        w = self.begin(key.deletes, {}, f"delete by {a.name}")
        r = await a.call("delete", "DELETE", f"/crypto/v1/keys/{key.kid}")
        self.settle(key.deletes, w, r)
        if r.ok:
            key.gone = True
        self.existence(a, key, r, f"delete by {a.name}")

    async def op_janitor(self, a: Actor, key: Key | None) -> None:
        """The admin finds what holds a name that was refused, and deletes it if it is stray.

        A stray is a key whose delete was acknowledged (already a violation, recorded
        by ``existence``) or one nobody was told about (an unknown-outcome create).
        Without this, such keys end up holding every name in the pool and the soak
        stops exercising anything but 409s.
        """
        t = now()
        live = {k.name for k in self.ledger.keys.values() if not k.gone}
        refused = [n for n, when in self.taken.items() if t - when < 2.0 and n not in live]
        if not refused:
            if key is not None:
                await self.op_get(a, key)
            return
        name = a.rng.choice(refused)
        r = await a.call("janitor", "POST", "/crypto/v1/keys/info", {"name": name})
        if not r.ok:
            return
        self.taken.pop(name, None)
        found = self.ledger.keys.get(r.body["kid"])
        what = f"janitor info name={name} by {a.name}"
        if found is not None:
            self.ledger.obs.append(Obs(found.kid, "name", "eq", name, r.s, r.e, what))
            self.observe(found, r, r.body, set(), what)
            self.existence(a, found, r, what)
            if found.acked_delete() is None:
                found.gone = False
                return
        if found is None and name in self.creating:
            return  # maybe the key of a create whose answer is on its way: not a stray
        deletes = found.deletes if found is not None else []
        w = self.begin(deletes, {}, f"janitor delete by {a.name}")
        r2 = await a.call("janitor", "DELETE", f"/crypto/v1/keys/{r.body['kid']}")
        self.settle(deletes, w, r2)
        if found is None and r2.ok:
            self.ledger.strays_deleted += 1

    async def op_get(self, a: Actor, key: Key) -> None:
        r = await a.call("get", "GET", f"/crypto/v1/keys/{key.kid}")
        if r.ok:
            self.observe(key, r, r.body, set(), f"get by {a.name}")
        self.existence(a, key, r, f"get by {a.name}")

    def use_obs(self, key: Key, r: Result, op: str, what: str) -> None:
        if r.ok:
            self.ledger.obs.append(Obs(key.kid, "enabled", "eq", True, r.s, r.e, what))
            self.ledger.obs.append(Obs(key.kid, "key_ops", "has", op, r.s, r.e, what))
        elif r.status == 403 and r.code == "key_op_not_permitted":
            self.ledger.obs.append(Obs(key.kid, "key_ops", "lacks", op, r.s, r.e, what))
        elif r.status == 403 and r.code == "forbidden":
            self.ledger.obs.append(Obs(key.kid, "enabled", "eq", False, r.s, r.e, what))

    async def op_use(self, a: Actor, key: Key) -> None:
        rng = a.rng
        by_name = rng.random() < 0.2
        ref = {"name": key.name} if by_name else {"kid": key.kid}
        data = os.urandom(rng.choice([16, 32, 48]))
        t = key.obj_type
        if t == "AES":
            path, body = "/crypto/v1/encrypt", {"alg": "AES", "mode": "GCM", "plain": data}
        elif t == "HMAC":
            path, body = "/crypto/v1/mac", {"alg": "SHA256", "data": data}
        else:
            path, body = "/crypto/v1/sign", {"hash_alg": "SHA256", "data": data}
        r = await a.call("use", "POST", path, {"key": ref, **body})
        what = f"use {OP_OF_USE[t]} by {a.name}" + (f" name={key.name}" if by_name else "")
        target = key
        if by_name:
            if not r.ok:
                return  # the name may belong to another key by now
            target = self.ledger.keys.get(r.body.get("kid", ""))  # type: ignore[assignment]
            if target is None:
                return  # a key whose creation had an unknown outcome
            self.ledger.obs.append(Obs(target.kid, "name", "eq", key.name, r.s, r.e, what))
            if not a.sees(target):
                self.ledger.violate("cross_group_use", f"{what} reached {target.kid}")
        else:
            self.existence(a, key, r, what)
        self.use_obs(target, r, OP_OF_USE[target.obj_type], what)
        if r.ok:
            if target.obj_type == "AES":
                rec = {"plain": data, **{k: r.body[k] for k in ("cipher", "iv", "tag")}}
            elif target.obj_type == "HMAC":
                rec = {"data": data, "mac": r.body["mac"]}
            else:
                rec = {"data": data, "signature": r.body["signature"]}
            if len(target.records) < MAX_RECORDS:
                target.records.append(rec)
            else:
                target.records[rng.randrange(MAX_RECORDS)] = rec

    async def op_check(self, a: Actor, key: Key) -> None:
        if not key.records:
            await self.op_use(a, key)
            return
        rec = a.rng.choice(key.records)
        path, body = check_request(key.obj_type, rec)
        r = await a.call("check", "POST", path, {"key": {"kid": key.kid}, **body})
        what = f"check {OP_OF_CHECK[key.obj_type]} by {a.name}"
        self.existence(a, key, r, what)
        self.use_obs(key, r, OP_OF_CHECK[key.obj_type], what)
        if r.ok and not check_passed(key.obj_type, rec, r.body):
            self.ledger.violate("wrong_result", f"{what} on {key.kid}: {r.body!r:.120}")
        elif r.outcome == "rejected" and r.code == "bad_tag":
            self.ledger.violate("wrong_result", f"{what} on {key.kid}: bad tag")

    async def op_probe(self, a: Actor) -> None:
        """An app reaching for another group's key must get nothing."""
        others = [k for k in self.ledger.keys.values() if not k.gone and not a.sees(k)]
        if not others:
            return
        key = a.rng.choice(others)
        r = await a.call(
            "probe", "PATCH", f"/crypto/v1/keys/{key.kid}", {"description": "not yours"}
        )
        if r.ok:
            self.ledger.violate("cross_group_update", f"{a.name} changed {key.kid}")

    # -- loops -----------------------------------------------------------------------

    async def worker(self, a: Actor, budget: int) -> None:
        rng = a.rng
        ops = ["create", "rename", "update", "delete", "use", "check", "get", "probe", "janitor"]
        weights = [18, 12, 18, 5, 26, 10, 5, 0 if a.admin else 3, 4 if a.admin else 0]
        for _ in range(budget):
            if now() >= self.stop_at or self.dead:
                return
            op = rng.choices(ops, weights)[0]
            keys = self.live(a)
            if op == "create":
                await self.op_create(a)
            elif op == "probe":
                await self.op_probe(a)
            elif op == "janitor":
                await self.op_janitor(a, rng.choice(keys) if keys else None)
            elif not keys:
                # Nothing to work on: create, and do not spin if that is refused.
                if not await self.op_create(a):
                    await asyncio.sleep(rng.uniform(0.02, 0.06))
            else:
                key = rng.choice(keys)
                await getattr(self, f"op_{op}")(a, key)
            if not self.up():
                await asyncio.sleep(rng.uniform(0.05, 0.2))

    def up(self) -> bool:
        return self.daemon.alive() and not self.restarting

    async def killer(self, lo: float, hi: float) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(lo, hi))
            if now() >= self.stop_at - 1:
                return
            await self.kill_and_restart()

    async def kill_and_restart(self) -> None:
        self.restarting = True
        try:
            await asyncio.to_thread(self.daemon.kill9)
            self.ledger.kills.append(now())
            try:
                await asyncio.to_thread(self.daemon.start)
            except RuntimeError as exc:
                self.dead = True
                self.ledger.violate("restart_failed", str(exc)[-1500:])
        finally:
            self.restarting = False


def check_request(obj_type: str, rec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if obj_type == "AES":
        return "/crypto/v1/decrypt", {
            "alg": "AES",
            "mode": "GCM",
            "cipher": rec["cipher"],
            "iv": rec["iv"],
            "tag": rec["tag"],
        }
    if obj_type == "HMAC":
        return "/crypto/v1/macverify", {"alg": "SHA256", "data": rec["data"], "mac": rec["mac"]}
    return "/crypto/v1/verify", {
        "hash_alg": "SHA256",
        "data": rec["data"],
        "signature": rec["signature"],
    }


def check_passed(obj_type: str, rec: dict[str, Any], body: dict[str, Any]) -> bool:
    if obj_type == "AES":
        return body.get("plain") == rec["plain"]
    return body.get("result") is True


# -- set-up ------------------------------------------------------------------------


async def setup(soak: Soak) -> list[Actor]:
    admin = Actor("admin", soak.daemon.admin_key, [], True, soak)
    actors_of: list[tuple[str, str, list[str], bool]] = []
    tag = uuid.uuid4().hex[:6]
    apps = []
    for i in range(soak.args.groups):
        r = await admin.call("setup", "POST", "/sys/v1/groups", {"name": f"soak-g{i}-{tag}"})
        if not r.ok:
            raise RuntimeError(f"cannot create a group: {r}")
        gid = r.body["group_id"]
        soak.groups.append(gid)
        r = await admin.call(
            "setup", "POST", "/sys/v1/apps", {"name": f"soak-app{i}-{tag}", "groups": [gid]}
        )
        if not r.ok:
            raise RuntimeError(f"cannot create an app: {r}")
        apps.append((f"app{i}", r.body["credential"]["api_key"], [gid], False))
    await admin.aclose()
    principals = [("admin", soak.daemon.admin_key, [], True), *apps]
    for i in range(soak.args.clients):
        name, key, groups, is_admin = principals[i % len(principals)]
        actors_of.append((f"{name}#{i}", key, groups, is_admin))
    return [Actor(n, k, g, adm, soak) for n, k, g, adm in actors_of]


# -- checks at the end -----------------------------------------------------------------


def check_observations(led: Ledger) -> int:
    checked = 0
    for o in led.obs:
        key = led.keys.get(o.kid)
        if key is None:
            continue
        checked += 1
        if o.field == "exists":
            # A 404 (or a 5xx) for a key acknowledged before and deleted by nobody.
            if key.created.e < o.s and not [d for d in key.deletes if d.s < o.e]:
                led.violate(
                    "acked_key_unavailable",
                    f"{o.what}: {key.kid} ({key.obj_type}) answered "
                    f"{'404' if o.value is False else o.value} though no delete was sent",
                )
            continue
        cands = candidates(key, o.field, o.s, o.e)
        if not any(passes(o.test, o.value, c) for c in cands):
            led.violate(
                f"stale_{o.field}",
                f"{o.what}: {key.kid} showed {o.field} {o.test} {show(o.value)}; "
                f"allowed {[show(c) for c in cands]}",
            )
    return checked


def show(v: Any) -> Any:
    return sorted(v) if isinstance(v, frozenset) else v


async def check_through_daemon(soak: Soak, counts: collections.Counter[str]) -> dict[str, Any]:
    """The ledger against what the restarted daemon answers (as the admin)."""
    led = soak.ledger
    admin = Actor("verifier", soak.daemon.admin_key, [], True, soak)
    listed: dict[str, Any] = {}
    offset = 0
    while True:
        r = await admin.call("verify", "GET", "/crypto/v1/keys", {"limit": 10000, "offset": offset})
        if not r.ok:
            led.violate("verify_failed", f"listing keys: {r.status} {r.code}")
            break
        for sob in r.body:
            listed[sob["kid"]] = sob
        if len(r.body) < 10000:
            break
        offset += 10000
    for key in led.keys.values():
        sob = listed.get(key.kid)
        d = key.acked_delete()
        if d is not None:
            counts["deletes checked"] += 1
            r = await admin.call("verify", "GET", f"/crypto/v1/keys/{key.kid}")
            if sob is not None or r.status != 404:
                led.violate(
                    "delete_undone", f"{key.kid}: deleted (acknowledged) but the daemon has it"
                )
            continue
        if not key.deletes:
            counts["acknowledged keys checked"] += 1
            if sob is None:
                led.violate(
                    "acked_key_lost",
                    f"{key.kid} ({key.obj_type}, group {soak.groups.index(key.group)}, "
                    f"last name {key.name!r}) is gone; no delete was ever sent",
                )
                continue
        elif sob is None:
            continue  # an unknown-outcome delete may have run
        if sob.get("state") == "missing":
            led.violate("row_without_material", f"{key.kid} is marked missing")
            continue
        op = OP_OF_CHECK[key.obj_type]
        if not (sob["enabled"] and op in sob["key_ops"]):
            counts["daemon use checks skipped (disabled or op removed)"] += 1
            continue
        for rec in key.records:
            path, body = check_request(key.obj_type, rec)
            r = await admin.call("verify", "POST", path, {"key": {"kid": key.kid}, **body})
            counts["data checked through the daemon"] += 1
            if not (r.ok and check_passed(key.obj_type, rec, r.body)):
                led.violate(
                    "acked_data_unreadable",
                    f"{key.kid}: {op} of acknowledged data -> {r.status} {r.code}",
                )
    unledgered = [kid for kid in listed if kid not in led.keys]
    counts["unledgered keys (from unknown-outcome creates)"] = len(unledgered)
    if len(unledgered) + led.strays_deleted > led.unknown_creates:
        led.violate(
            "unexplained_keys",
            f"{len(unledgered)} keys nobody was told about, {led.unknown_creates} unknown creates",
        )
    for kid in led.transient_kids & set(listed):
        led.violate("transient_persisted", f"transient {kid} is listed after a restart")
    r = await admin.call("verify", "GET", "/sys/v1/logs/verify")
    audit = r.body if r.ok else {"ok": False, "error": f"{r.status} {r.code}"}
    if not audit.get("ok"):
        led.violate("audit_chain", repr(audit))
    await admin.aclose()
    return {"listed": listed, "audit": audit}


def db_rows(state_dir: Path) -> dict[str, dict[str, Any]]:
    import json

    path = next(
        (p for p in (state_dir / "strongroom.db", state_dir / "strongroomd.db") if p.exists()),
        state_dir / "strongroom.db",
    )
    db = sqlite3.connect(path)  # the daemon has stopped
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM keys").fetchall()
    finally:
        db.close()
    out = {}
    for row in rows:
        d = dict(row)
        d["key_ops"] = frozenset(json.loads(d["key_ops"]))
        d["enabled"] = bool(d["enabled"])
        d["missing"] = bool(d.get("missing", 0))
        out[d["kid"]] = d
    return out


def token_objects(state_dir: Path) -> tuple[dict[str, list[dict[str, Any]]], int, Any]:
    """Every object in the token, by CKA_ID (a kid); the daemon must be stopped."""
    os.environ["SOFTHSM2_CONF"] = str(state_dir / "softhsm" / "softhsm2.conf")
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11 import exceptions as p11e
    from pkcs11._pkcs11 import SearchIter

    module = next(
        (
            m
            for m in (
                os.environ.get("STRONGROOM_PKCS11_MODULE", ""),
                "/usr/lib/softhsm/libsofthsm2.so",
                "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
                "/usr/local/lib/softhsm/libsofthsm2.so",
            )
            if m and os.path.exists(m)
        ),
        None,
    )
    if module is None:
        raise RuntimeError("no libsofthsm2.so")
    pin = (state_dir / "softhsm" / "user.pin").read_text().strip()
    token = pkcs11.lib(module).get_token(token_label="strongroom")
    session = token.open(user_pin=pin)
    out: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    unreadable = 0
    with SearchIter(session, {}, 1) as search:
        for batch in search:
            try:
                for obj in batch:
                    try:
                        kid = str(uuid.UUID(obj[Attribute.ID].decode()))
                    except (ValueError, UnicodeDecodeError, p11e.PKCS11Error):
                        continue
                    cls = obj.object_class
                    ent: dict[str, Any] = {"obj": obj, "cls": cls, "label": obj.label}
                    if cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY):
                        ent["extractable"] = bool(obj[Attribute.EXTRACTABLE])
                    out[kid].append(ent)
            except p11e.PKCS11Error:
                unreadable += 1
    return dict(out), unreadable, session


def token_check(key: Key, objs: list[dict[str, Any]], rec: dict[str, Any]) -> bool:
    """Use the token object directly on an acknowledged record."""
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams

    by = {o["cls"]: o["obj"] for o in objs}
    if key.obj_type == "AES":
        k = by[ObjectClass.SECRET_KEY]
        plain = k.decrypt(
            rec["cipher"] + rec["tag"],
            mechanism=Mechanism.AES_GCM,
            mechanism_param=GCMParams(rec["iv"], b"", len(rec["tag"]) * 8),
        )
        return plain == rec["plain"]
    if key.obj_type == "HMAC":
        k = by[ObjectClass.SECRET_KEY]
        return k.sign(rec["data"], mechanism=Mechanism.SHA256_HMAC) == rec["mac"]
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(rec["signature"])
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    pub = by[ObjectClass.PUBLIC_KEY]
    return bool(pub.verify(hashlib.sha256(rec["data"]).digest(), raw, mechanism=Mechanism.ECDSA))


def check_storage(soak: Soak, listed: dict[str, Any], counts: collections.Counter[str]) -> None:
    """The database and the token, read directly after a clean stop."""
    led = soak.ledger
    rows = db_rows(soak.daemon.state_dir)
    objs, unreadable, session = token_objects(soak.daemon.state_dir)
    try:
        counts["token objects unreadable"] = unreadable
        counts["database rows"] = len(rows)
        counts["token keys"] = len(objs)
        for kid in set(objs) - set(rows):
            what = "transient key" if kid in led.transient_kids else "object"
            led.violate("token_object_without_row", f"{what} {kid} {objs[kid][0]['label']!r}")
        for kid, row in rows.items():
            if kid not in objs:
                led.violate("row_without_token_object", f"{kid} {row['name']!r}")
            elif row["missing"]:
                led.violate("row_marked_missing", f"{kid} has its object yet is marked missing")
            sob = listed.get(kid)
            if sob is not None and (
                sob["name"] != row["name"]
                or sob["enabled"] != row["enabled"]
                or frozenset(sob["key_ops"]) != row["key_ops"]
            ):
                led.violate("daemon_db_mismatch", f"{kid}: daemon showed {sob}, db has {row}")
            for o in objs.get(kid, []):
                if o["label"] != row["name"]:
                    led.violate("token_label", f"{kid}: label {o['label']!r}, name {row['name']!r}")
                if o.get("extractable") and "EXPORT" not in row["key_ops"]:
                    led.violate(
                        "token_extractable_without_export",
                        f"{kid} ({row['name']!r}) key_ops {sorted(row['key_ops'])}",
                    )
        end = now()
        for key in led.keys.values():
            row = rows.get(key.kid)
            if key.acked_delete() is not None:
                if row is not None:
                    led.violate("deleted_row_back", f"{key.kid}: acknowledged delete, row exists")
                if key.kid in objs:
                    led.violate(
                        "deleted_object_back", f"{key.kid}: acknowledged delete, token object"
                    )
                continue
            if row is None:
                if not key.deletes and key.kid in listed:
                    led.violate("acked_key_lost_in_db", f"{key.kid} listed but has no row")
                continue
            counts["keys whose fields were checked"] += 1
            for fld in ("name", "enabled", "key_ops"):
                n_updates = sum(1 for w in key.writes[1:] if fld in w.vals)
                counts["acknowledged/unknown updates checked against the db"] += n_updates
                cands = candidates(key, fld, end, end)
                if row[fld] not in cands:
                    last = [w for w in key.writes if fld in w.vals][-3:]
                    led.violate(
                        f"update_lost_{fld}",
                        f"{key.kid}: db {fld}={show(row[fld])}, allowed {[show(c) for c in cands]}"
                        f"; last writes {[(w.what, show(w.vals[fld]), w.ack) for w in last]}",
                    )
            if key.kid in objs:
                for rec in key.records:
                    counts["data checked in the token"] += 1
                    try:
                        good = token_check(key, objs[key.kid], rec)
                    except Exception as exc:
                        good = False
                        rec = {**rec, "error": repr(exc)}
                    if not good:
                        led.violate(
                            "token_data_unreadable", f"{key.kid}: {rec.get('error', 'mismatch')}"
                        )
    finally:
        with contextlib.suppress(Exception):
            session.close()


# -- main -----------------------------------------------------------------------------


def parse_range(text: str) -> tuple[float, float] | None:
    if text in ("0", "off", "none"):
        return None
    for sep in (":", "-", ","):
        if sep in text:
            lo, hi = (float(x) for x in text.split(sep, 1))
            break
    else:
        lo = hi = float(text)
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError("--kill-every MIN:MAX with 0 < MIN <= MAX (or 0: off)")
    return lo, hi


def report(soak: Soak, counts: collections.Counter[str], elapsed: float, extra: dict) -> None:
    led = soak.ledger
    print(
        f"\n== strongroom soak: {elapsed:.0f}s, {soak.args.clients} clients, seed {soak.args.seed}"
    )
    print(f"   daemon: {extra.get('module', '?')}")
    kinds = sorted({k for k, _ in led.stats})
    outcomes = ["ok", "rejected", "unknown", "not_sent"]
    print(f"\n{'requests':<18}" + "".join(f"{o:>10}" for o in outcomes))
    for k in kinds:
        print(f"{k:<18}" + "".join(f"{led.stats[(k, o)]:>10}" for o in outcomes))
    total = {o: sum(v for (_, oo), v in led.stats.items() if oo == o) for o in outcomes}
    print(f"{'total':<18}" + "".join(f"{total[o]:>10}" for o in outcomes))
    if led.codes:
        print("\nrejected / unknown by code:")
        for code, n in led.codes.most_common(25):
            print(f"  {n:>7}  {code}")
    ledgered = len(led.keys)
    deleted = sum(1 for k in led.keys.values() if k.acked_delete())
    print(
        f"\nkills: {len(led.kills)} (the last one before the checks)"
        f"\nkeys acknowledged: {ledgered} (+{len(led.transient_kids)} transient), "
        f"deletes acknowledged: {deleted}, unknown-outcome creates: {led.unknown_creates}, "
        f"unknown-outcome writes and deletes: {len(led.unknown())}"
    )
    acked_updates = sum(1 for k in led.keys.values() for w in k.writes[1:] if w.ack)
    print(f"updates acknowledged (name/enabled/key_ops): {acked_updates}")
    for name, n in counts.items():
        print(f"{name}: {n}")
    log = soak.daemon.tail(1 << 30)
    print(
        "daemon log: start-up removed "
        f"{log.count('that has no database row')} token objects without a row, marked "
        f"{log.count('marked missing')} rows missing"
    )
    audit = extra.get("audit")
    if audit is not None:
        print(f"audit verify: {audit}")
    kinds_v = collections.Counter(k for k, _ in led.violations)
    verdict = "FAIL" if led.violations else "PASS"
    print(f"\nVIOLATIONS: {len(led.violations)} ({verdict})")
    kid_re = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    for kind, n in kinds_v.most_common():
        kids = {m.group(0) for k, d in led.violations if k == kind for m in [kid_re.search(d)] if m}
        print(f"  {n:>5}  {kind}" + (f" ({len(kids)} keys)" if kids else ""))
        for _, detail in [v for v in led.violations if v[0] == kind][:4]:
            print(f"           e.g. {detail}")


async def run(soak: Soak) -> tuple[collections.Counter[str], dict[str, Any]]:
    args = soak.args
    counts: collections.Counter[str] = collections.Counter()
    actors = await setup(soak)
    t0 = now()
    soak.stop_at = t0 + args.seconds
    killer = None
    if args.kill_every is not None:
        killer = asyncio.create_task(soak.killer(*args.kill_every))
    tasks = [
        asyncio.create_task(soak.worker(a, args.max_requests))
        for a in actors
        for _ in range(args.inflight)
    ]
    done, pending = await asyncio.wait(tasks, timeout=args.seconds + args.timeout + 30)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    if killer is not None:
        killer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await killer
        while soak.restarting:
            await asyncio.sleep(0.05)
    for a in actors:
        await a.aclose()
    print(f"soak: load done after {now() - t0:.0f}s; final kill -9, restart, checks", flush=True)
    if soak.dead:
        return counts, {}
    await soak.kill_and_restart()
    if soak.dead:
        return counts, {}
    soak.ledger.resolve_unknown()
    counts["observations checked"] = check_observations(soak.ledger)
    return counts, await check_through_daemon(soak, counts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="load duration (120)")
    ap.add_argument("--clients", type=int, default=8, help="client connections (8)")
    ap.add_argument("--inflight", type=int, default=2, help="requests in flight per client (2)")
    ap.add_argument(
        "--kill-every",
        type=parse_range,
        default=(5.0, 15.0),
        metavar="MIN:MAX",
        help="seconds between kill -9s, uniform in [MIN, MAX] (5:15); 0 turns kills off",
    )
    ap.add_argument("--names", type=int, default=24, help="size of the shared name pool (24)")
    ap.add_argument("--groups", type=int, default=3, help="groups, one app each (3)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (printed)")
    ap.add_argument("--timeout", type=float, default=20.0, help="per-request timeout (20)")
    ap.add_argument(
        "--max-requests", type=int, default=200_000, help="cap on operations per worker"
    )
    ap.add_argument(
        "--python-path",
        default=None,
        help="prepended to PYTHONPATH for the daemon and this script (e.g. another checkout's "
        "daemon:client directories)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the state directory and log")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    if args.clients < 1 or args.inflight < 1 or args.names < 1 or args.groups < 1:
        ap.error("--clients, --inflight, --names and --groups must be >= 1")
    if args.python_path:
        for p in reversed(args.python_path.split(os.pathsep)):
            sys.path.insert(0, p)
    tmp = Path(tempfile.mkdtemp(prefix="strongroom-soak-"))
    daemon = Daemon(tmp / "state", args.python_path)
    soak = Soak(args, daemon)
    extra: dict[str, Any] = {"module": daemon.module_file()}
    counts: collections.Counter[str] = collections.Counter()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = now()
    try:
        print(f"soak: state in {tmp}; daemon {extra['module']}; seed {args.seed}", flush=True)
        daemon.start()
        counts, out = asyncio.run(run(soak))
        extra.update(out)
        if not soak.dead:
            rc = daemon.stop()
            if rc != 0:
                soak.ledger.violate("unclean_stop", f"SIGTERM -> exit {rc}")
            check_storage(soak, out.get("listed", {}), counts)
        report(soak, counts, now() - t0, extra)
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        daemon.kill9()
        if args.keep:
            print(f"soak: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if soak.dead:
        print(f"\ndaemon log tail:\n{daemon.tail()}", file=sys.stderr)
    return 1 if soak.ledger.violations else 0


if __name__ == "__main__":
    sys.exit(main())
