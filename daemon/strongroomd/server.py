"""Start-up, serving and shutdown of the daemon.

Start-up: state directory and token (first start makes them), database,
token index, reconcile, admin credential, then the socket. Shutdown on
SIGTERM/SIGINT: stop accepting, let in-flight requests finish within the
grace period, flush the audit log, close the database, close the token
session last. A second signal cancels what is left at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import resource
import signal
import socket
import uuid
from pathlib import Path
from typing import Any

import sdnotify

from strongroomd import _sandbox, backup, metrics, state
from strongroomd._token import Token
from strongroomd.api import ROUTES
from strongroomd.audit import Audit
from strongroomd.auth import Authenticator, api_key, new_secret
from strongroomd.config import Config
from strongroomd.context import Services
from strongroomd.dispatch import Dispatcher
from strongroomd.errors import Unavailable
from strongroomd.keyring import Keyring
from strongroomd.protocol import Admission, Budget, Connection, Limits, Listener, busy_frame
from strongroomd.router import Router
from strongroomd.store import GroupRow, PrincipalRow, Store, now_stamp

log = logging.getLogger("strongroomd")

#: Descriptors kept free of connections: token object files, the database and its
#: WAL, sandbox worker pipes (plugin_max_workers x ~4), log and listening sockets.
#: Connections at their caps must never make a worker spawn or a key write fail.
FD_RESERVE = 256
#: Listen backlog of the socket and the gateway: connections the kernel holds
#: before the daemon accepts (and, over a cap, refuses) them.
ACCEPT_BACKLOG = 128


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.services: Services | None = None
        self.dispatcher: Dispatcher | None = None
        self.connections: set[Connection] = set()
        self._server: Listener | None = None
        self.gateway: Any = None  # strongroomd.gateway.Gateway when http_enabled
        self._stop = asyncio.Event()
        #: Request bytes in flight over the socket and the gateway together.
        self.budget = Budget(config.max_inflight_bytes)
        self._caps: tuple[int, int] | None = None
        self._lock: int | None = None
        self._stopping = False
        self._lifecycle: asyncio.Task[None] | None = None

    # -- start-up -------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self._lock = _lock_state(cfg)
        token_settings = await asyncio.to_thread(state.prepare, cfg)
        store = _store(cfg)
        try:
            await store.open()
        except Unavailable as exc:
            await store.close()
            raise StartupError(f"cannot open the database: {exc.message}") from exc
        try:
            token = await Token.open(
                token_settings.module,
                token_settings.label,
                token_settings.pin,
                write_lock=backup.token_lock_path(cfg),
                slow_per_principal=cfg.token_slow_per_principal,
                slow_total=cfg.token_slow_total,
            )
        except Exception as exc:
            await store.close()
            raise StartupError(
                f"cannot open token {token_settings.label!r}: {type(exc).__name__} {exc}"
            ) from exc
        audit = Audit(store, cfg.audit_max_pending)
        await audit.start()
        keyring = Keyring(cfg, store, token)
        pool = _sandbox.Pool(
            warm=cfg.plugin_warm_workers,
            max_workers=cfg.plugin_max_workers,
            inspectable=cfg.inspectable,
        )
        services = Services(
            cfg, store, token, Authenticator(store, cfg.session_ttl), audit, keyring, pool
        )
        # Alone on the socket, a short operation runs inline (no thread hand-offs);
        # under load it queues, so the token thread works beside the event loop.
        token.quiet = lambda: services.socket_pending <= 1
        self.services = services
        self.dispatcher = services.dispatcher = Dispatcher(services, Router(ROUTES))
        await pool.start()
        metrics.bind(connections=lambda: len(self.connections), sandbox=lambda: pool.stats)
        found = await keyring.reconcile()
        if any(found.values()):
            log.warning("reconciled token and database: %s", found)
        audit.record("daemon.start", detail={"keys": len(store.keys), **found})
        await self._ensure_admin()
        if cfg.http_enabled:
            await self._serve_http()
        await self._listen()
        self._lifecycle = asyncio.create_task(self._tick(), name="key-lifecycle")

    async def _ensure_admin(self) -> None:
        """Make the ``default`` group and the admin on an empty database, once.

        Nodes started at the same instant on one empty PostgreSQL take turns in
        ``store.first_start()`` (an advisory lock), so exactly one makes them and
        writes ``admin.key``, in its own state directory; the others find the
        admin and log where its key is. No node writes a key file it does not
        also store the admin of."""
        assert self.services is not None
        store, cfg = self.services.store, self.config
        async with store.first_start():
            if not any(p.kind == "admin" for p in store.principals.values()):
                await self._make_admin()
            elif not cfg.admin_key_path.exists() and store.shared:
                made = await store.query(
                    "SELECT node, detail FROM audit WHERE action = 'admin.create' "
                    "ORDER BY seq DESC LIMIT 1"
                )
                where = (
                    f"node {made[0][0]} wrote it to {json.loads(made[0][1])['key_file']}"
                    if made
                    else "its log says 'created the admin credential'"
                )
                log.info(
                    "the admin exists, made by another node: its key file is in that node's "
                    "state directory (%s); this node has none at %s",
                    where,
                    cfg.admin_key_path,
                )
            elif not cfg.admin_key_path.exists():
                log.info(
                    "admin exists; its key file %s was removed (rotate with "
                    "`strongroomd admin rotate`)",
                    cfg.admin_key_path,
                )

    async def _make_admin(self) -> None:
        assert self.services is not None
        store, cfg = self.services.store, self.config
        group = next((g for g in store.groups.values() if g.name == "default"), None)
        if group is None:
            group = GroupRow(str(uuid.uuid4()), "default", "created at first start", now_stamp())
            await store.insert(group)
        secret, salt, digest = new_secret()
        admin = PrincipalRow(
            str(uuid.uuid4()),
            "admin",
            "admin",
            "the administrator",
            [group.id],
            group.id,
            digest,
            salt,
            True,
            now_stamp(),
        )
        # Key file first: a crash between the two leaves a key that does not work yet
        # (the next start makes a new admin and overwrites it), never an admin without a key.
        state.write_secret(cfg.admin_key_path, api_key(admin.id, secret) + "\n")
        await store.insert(admin)
        where = f" (node {cfg.node})" if store.shared else ""
        log.info("created the admin credential in %s%s", cfg.admin_key_path, where)
        # Written before other nodes may look (they wait in first_start): where the key is.
        seq = self.services.audit.record(
            "admin.create",
            object_id=admin.id,
            detail={"node": cfg.node, "key_file": str(cfg.admin_key_path)},
        )
        await self.services.audit.flush(seq)

    async def _serve_http(self) -> None:
        from strongroomd.gateway import Gateway  # aiohttp is imported only when enabled

        assert self.services is not None and self.dispatcher is not None
        url_file = self.config.state_dir / "http.url"
        url_file.unlink(missing_ok=True)
        gateway = Gateway(
            self.config,
            self.dispatcher,
            self.services.keyring,
            budget=self.budget,
            max_connections=self._connection_caps()[1],
        )
        try:
            url = await gateway.start()
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise StartupError(f"HTTP gateway: {exc.strerror}") from exc
            # The socket is the daemon's real interface: serve it, without the gateway.
            log.warning(
                "HTTP gateway and console off: %s; the Unix socket serves as usual. "
                "Pick another port with the http_port setting, STRONGROOM_HTTP_PORT or "
                "--http-port (0 picks a free one)",
                exc.strerror,
            )
            return
        self.gateway = gateway
        url_file.write_text(url + "\n")
        log.info("HTTP gateway on %s", url)

    async def _listen(self) -> None:
        assert self.dispatcher is not None
        path = self.config.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if _alive(path):
                raise StartupError(f"another daemon is serving {path}")
            path.unlink()
        cfg, dispatcher = self.config, self.dispatcher
        keyring = self.services.keyring if self.services else None
        limits = Limits(
            max_frame=cfg.max_frame,
            max_field=cfg.max_field,
            max_inflight=cfg.max_inflight,
            max_unauth_bytes=cfg.max_unauth_bytes,
            frame_timeout=cfg.frame_timeout,
            auth_timeout=cfg.auth_timeout,
        )
        admission = Admission("socket", self._connection_caps()[0])

        def factory() -> Connection:
            return Connection(
                dispatcher, keyring, self.connections, limits=limits, budget=self.budget
            )

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # never a moment where others could connect
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(ACCEPT_BACKLOG)
        path.chmod(cfg.socket_mode)
        self._server = Listener(
            sock,
            factory,
            admission,
            lambda: len(self.connections),
            busy_frame("too many connections; try again later"),
        )

    def _connection_caps(self) -> tuple[int, int]:
        """The socket's and the gateway's connection caps, below the descriptor limit.

        Raises the soft RLIMIT_NOFILE to the hard one first; if the caps and
        :data:`FD_RESERVE` still do not fit, both caps shrink (one warning).
        """
        if self._caps is None:
            cfg = self.config
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if hard == resource.RLIM_INFINITY or soft < hard:
                want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                    soft = want
            sock, http = cfg.max_connections, cfg.http_max_connections if cfg.http_enabled else 0
            room = max(soft - FD_RESERVE, 2)
            if sock + http > room:
                scale = room / (sock + http)
                sock, http = max(1, int(sock * scale)), (max(1, int(http * scale)) if http else 0)
                log.warning(
                    "only %d descriptors (RLIMIT_NOFILE): connection caps lowered to %d (socket) "
                    "and %d (HTTP), keeping %d for the token, database and sandbox; raise "
                    "LimitNOFILE",
                    soft,
                    sock,
                    http,
                    FD_RESERVE,
                )
            self._caps = (sock, http or cfg.http_max_connections)
        return self._caps

    # -- serving -------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        notifier = sdnotify.SystemdNotifier()  # a no-op without $NOTIFY_SOCKET
        try:
            notifier.notify("STATUS=starting: state directory, token, database")
            await self.start()
            log.info("serving on %s", self.config.socket_path)
            print(f"strongroomd: socket {self.config.socket_path}", flush=True)
            print(f"strongroomd: admin API key file {self.config.admin_key_path}", flush=True)
            if self.gateway is not None:
                print(f"strongroomd: console {self.gateway.url}/console/", flush=True)
            notifier.notify(f"READY=1\nSTATUS=serving on {self.config.socket_path}")
            await self._stop.wait()
        finally:
            notifier.notify("STOPPING=1\nSTATUS=stopping: finishing in-flight requests")
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._stopping:
            log.warning("second %s: cancelling in-flight requests", signal.Signals(sig).name)
            for conn in list(self.connections):
                for t in conn.tasks:
                    t.cancel()
            return
        log.info("%s: shutting down", signal.Signals(sig).name)
        self._stopping = True
        self._stop.set()

    async def _tick(self) -> None:
        """Scheduled deletions and rotation policies, every ``lifecycle_interval``."""
        assert self.services is not None
        keyring, audit = self.services.keyring, self.services.audit
        while True:
            await asyncio.sleep(self.config.lifecycle_interval)
            try:
                store = self.services.store
                if store.sharing is not None and not await store.sharing.leads():
                    continue  # several nodes: one does the clock's work
                done = await keyring.tick()
            except Exception:
                log.exception("key lifecycle pass failed")
                continue
            for kid in done["deleted"]:
                audit.record("key.scheduled_deletion", object_id=kid)
            for change in done["rotated"]:
                audit.record(
                    "key.scheduled_rotation",
                    object_id=change.split(" ")[0],
                    detail={"rotation": change},
                )

    async def shutdown(self) -> None:
        if self._lifecycle is not None:
            self._lifecycle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lifecycle
            self._lifecycle = None
        if self._server is not None:
            self._server.close()
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                await self.gateway.close()
            (self.config.state_dir / "http.url").unlink(missing_ok=True)
            self.gateway = None
        await asyncio.gather(*(c.drain(self.config.shutdown_grace) for c in list(self.connections)))
        for _ in range(100):  # let connection clean-ups (transient keys) run
            await asyncio.sleep(0)
        if self.services is not None:
            s = self.services
            for conn in list(self.connections):
                await s.keyring.drop_owner(conn.owner)
            await s.keyring.close(self.config.shutdown_grace)
            with contextlib.suppress(Exception):
                await s.sandbox.close()
            s.audit.record("daemon.stop")
            with contextlib.suppress(Exception):
                await s.audit.close()
            await s.store.close()
            await s.token.close()  # the token session closes last
            self.services = None
        with contextlib.suppress(FileNotFoundError):
            if self._server is not None:
                Path(self.config.socket_path).unlink()
        self._server = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _store(cfg: Config) -> Store:
    """SQLite in the state directory (one node), or the shared PostgreSQL (several)."""
    if not cfg.database_url:
        return Store(cfg.db_path)
    from strongroomd.pgstore import PgStore  # psycopg is imported only when used

    log.info("node %s on a shared database", cfg.node)
    if cfg.embedded:
        log.warning(
            "embedded SoftHSM with database_url: this node's token is its own (in its state "
            "directory), so other nodes on this database cannot use the keys it makes; "
            "several nodes need one shared token (pkcs11_module)"
        )
    return PgStore(
        cfg.database_url,
        cfg.node,
        node_timeout=cfg.node_timeout,
        confirm_timeout=cfg.confirm_timeout,
    )


def _lock_state(cfg: Config) -> int:
    """Hold the state directory for this process's lifetime; a second daemon stops here."""
    state.private_dir(cfg.state_dir)
    fd = os.open(cfg.state_dir / "strongroomd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another daemon is using {cfg.state_dir}") from None
    return fd


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True
