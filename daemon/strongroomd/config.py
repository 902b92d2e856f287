"""Daemon settings: plain values, resolved once by :func:`load`.

Precedence, lowest first: built-in defaults, the TOML file given with
``--config``, then the environment (``STRONGROOM_STATE_DIR``,
``STRONGROOM_SOCKET``, ``STRONGROOM_PKCS11_MODULE``, ``STRONGROOM_HTTP``,
``STRONGROOM_HTTP_PORT``), then the command line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


class ConfigError(Exception):
    """A setting that cannot be used; the message names it."""


@dataclass(slots=True)
class Config:
    #: Directory holding the database, the socket, the admin key and (for the
    #: embedded SoftHSM) the token and its PINs.
    state_dir: Path = Path("var")
    #: Unix socket path; default ``<state_dir>/strongroomd.sock``.
    socket: Path | None = None
    #: Socket file mode: 0o600 (owner only) or 0o660 (owner and group).
    socket_mode: int = 0o660
    #: PKCS#11 module. Empty means the embedded SoftHSM, initialised on first start.
    pkcs11_module: str = ""
    #: Token label to use (created on first start for the embedded SoftHSM).
    token_label: str = "strongroom"  # noqa: S105 - a label, not a secret
    #: File holding the user PIN; default ``<state_dir>/softhsm/user.pin``. With
    #: systemd, ``$CREDENTIALS_DIRECTORY/pin`` is used when present.
    pin_file: Path | None = None
    #: Largest frame a client may send (bytes).
    max_frame: int = 4 * 1024 * 1024
    #: Largest string or binary field inside a frame (bytes).
    max_field: int = 1024 * 1024
    #: Requests one connection may have in flight before it gets 429.
    max_inflight: int = 1024
    #: Resource bounds (docs/protocol.md, "Resource bounds"). Socket connections
    #: at once; beyond, a new one gets ``429 busy`` and is closed.
    max_connections: int = 1024
    #: HTTP gateway connections at once (its own cap, so a flood of one front end
    #: never locks the other out); beyond, ``429 busy`` and closed.
    http_max_connections: int = 256
    #: Largest frame (socket) or body (HTTP) before authentication, and what an
    #: unauthenticated socket connection may have buffered (bytes).
    max_unauth_bytes: int = 64 * 1024
    #: Request bytes in flight over all connections; when spent, the socket stops
    #: reading (backpressure) and the gateway answers ``429 busy``.
    max_inflight_bytes: int = 128 * 1024 * 1024
    #: Seconds a started frame (or HTTP body) has to arrive whole.
    frame_timeout: float = 10.0
    #: Seconds a socket connection has to authenticate (and an HTTP connection may
    #: sit idle) before it is closed.
    auth_timeout: float = 10.0
    #: Session token lifetime (seconds).
    session_ttl: int = 3600
    #: Seconds SIGTERM waits for in-flight requests before cancelling them.
    shutdown_grace: float = 10.0
    #: Transient keys one connection may hold at once.
    max_transient_keys: int = 1000
    #: Days between POST .../schedule_deletion and the deletion, unless the request
    #: says otherwise (the key is unusable meanwhile; cancel_deletion undoes it).
    key_deletion_pending_days: int = 7
    #: How often the daemon does what the clock made due: scheduled deletions and
    #: rotation policies (seconds; a rotation may start up to this late).
    lifecycle_interval: float = 60.0
    #: Token thread, slow lane (key-pair generation; docs/protocol.md, "Token
    #: scheduling"): generations one principal may have queued or running;
    #: beyond, ``429 busy``. Two keep one client's generations back to back.
    token_slow_per_principal: int = 2
    #: Generations queued or running over all principals; beyond, ``429 busy``.
    #: Eight RSA-4096 (~2-3 s each in SoftHSM) drain in ~20 s, inside the
    #: clients' default 30 s timeout.
    token_slow_total: int = 8
    #: Multi-part encryption/decryption (``/crypto/v1/encrypt/init`` ...): streams
    #: one principal may have open at once; beyond, ``429 busy``. Each holds one
    #: or two PKCS#11 sessions (a few KiB in SoftHSM); 16 lets a client stream
    #: several files in parallel while one principal cannot take them all.
    stream_max_per_principal: int = 16
    #: Streams open at once over all principals; beyond, ``429 busy``.
    stream_max_total: int = 256
    #: Seconds a stream may sit idle before it is ended and its sessions closed:
    #: four times the clients' default 30 s request timeout.
    stream_idle_timeout: float = 120.0
    #: Plugin sandbox: Lua memory cap per invocation (bytes).
    plugin_memory_bytes: int = 64 * 1024 * 1024
    #: Plugin sandbox: Lua VM instructions per invocation.
    plugin_instructions: int = 100_000_000
    #: Plugin sandbox: wall-clock deadline per invocation (seconds); the worker is killed.
    plugin_wall_seconds: float = 5.0
    #: Plugin sandbox: blank workers kept started, so an invocation never waits for one.
    plugin_warm_workers: int = 2
    #: Plugin sandbox: most worker processes alive at once.
    plugin_max_workers: int = 8
    #: Plugin sandbox: API calls one invocation may make (each is audited).
    plugin_max_api_calls: int = 10_000
    #: Plugin ``request{}``: let an admin put ``http://127.0.0.1:PORT`` (or ``:*``)
    #: in a plugin's ``request_allowlist``, plain HTTP to this host's loopback. For
    #: tests and development only; otherwise only ``https://`` origins are allowed.
    plugin_request_loopback_http: bool = False
    #: Let tools running as the daemon's user (gdb, py-spy, /proc/PID/fd and
    #: /proc/PID/mem) inspect the daemon and its plugin workers. Off: both are
    #: made non-dumpable, so a worker that escaped its sandbox cannot read the
    #: daemon's memory (the PIN, hot keys) nor a sibling's. For debugging only.
    inspectable: bool = False
    #: Audit records queued in memory, at most (~250 bytes each; ~2 s of the
    #: fastest operation). Full, or the log failing to write: see docs/protocol.md.
    audit_max_pending: int = 100_000
    #: HTTP/JSON gateway and web console: off unless enabled (``STRONGROOM_HTTP=1``
    #: does it too; ``scripts/run`` sets it).
    http_enabled: bool = False
    #: Gateway address. Loopback only, unless ``http_allow_remote`` is set.
    http_host: str = "127.0.0.1"
    #: Gateway TCP port; 0 picks a free one (``STRONGROOM_HTTP_PORT``, ``--http-port``).
    #: The URL is logged and written to ``<state_dir>/http.url`` once the gateway
    #: listens. A port in use leaves the gateway off with a warning; the socket serves.
    http_port: int = 8480
    #: Allow a non-loopback ``http_host``. Without ``http_tls_cert_file`` the
    #: gateway speaks plain HTTP: only behind a TLS-terminating proxy.
    http_allow_remote: bool = False
    #: The gateway serves HTTPS itself (TLS 1.2 or later) with this certificate
    #: chain (PEM: the server certificate first, then any intermediates). Set with
    #: ``http_tls_key_file``; neither: plain HTTP. ``http.url`` then says https://.
    http_tls_cert_file: Path | None = None
    #: The certificate's private key (PEM, unencrypted). A secret: it must be owned
    #: by the daemon's user and not readable by group or others (chmod 600), or the
    #: daemon refuses to start.
    http_tls_key_file: Path | None = None
    #: Web console files; default the package's bundle, else the source tree's
    #: ``console/`` (see :mod:`strongroomd._console`).
    http_console_dir: Path | None = None

    #: Several nodes (docs/architecture.md, "Several nodes"): a PostgreSQL URL
    #: (``postgresql://user@host:5432/db``) shared by every node instead of the
    #: state directory's SQLite file. Empty: SQLite, one node.
    database_url: str = ""
    #: This node's name among the nodes sharing ``database_url``; unique and the
    #: same across restarts. Default: ``<hostname>:<state_dir>``.
    node_name: str = ""
    #: Seconds without a heartbeat after which the other nodes stop waiting for a
    #: node (and the node itself stops serving key use: it fails closed first).
    node_timeout: float = 10.0
    #: Seconds a change waits for every live node to confirm it; past that it is
    #: answered with ``unconfirmed_nodes``. At least ``node_timeout / 2 + 1``: a
    #: node named there has stopped serving by itself by then.
    confirm_timeout: float = 6.0

    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def http_tls(self) -> bool:
        """The gateway serves HTTPS itself."""
        return self.http_tls_cert_file is not None

    @property
    def socket_path(self) -> Path:
        return self.socket or self.state_dir / "strongroomd.sock"

    @property
    def node(self) -> str:
        return self.node_name or f"{socket.gethostname()}:{self.state_dir.resolve()}"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "strongroom.db"

    @property
    def admin_key_path(self) -> Path:
        return self.state_dir / "admin.key"

    @property
    def softhsm_dir(self) -> Path:
        return self.state_dir / "softhsm"

    @property
    def embedded(self) -> bool:
        return not self.pkcs11_module

    @property
    def generated_pin_file(self) -> Path:
        """Where the embedded SoftHSM's generated user PIN lives."""
        return self.softhsm_dir / "user.pin"

    def resolve_pin_file(self) -> Path:
        """The user PIN's file: ``pin_file``, else the systemd credential ``pin``,
        else (embedded SoftHSM only) the generated ``<state_dir>/softhsm/user.pin``.

        Only that last one is ever created by the daemon; the others must exist.
        """
        if self.pin_file:
            return self.pin_file
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and (Path(creds) / "pin").exists():
            return Path(creds) / "pin"
        if not self.embedded:
            raise ConfigError(
                "pkcs11_module is set, so the token's PIN must be given: set pin_file, "
                "or pass a systemd credential named 'pin' (LoadCredential=pin:FILE)"
            )
        return self.generated_pin_file


_PATHS = {
    "state_dir",
    "socket",
    "pin_file",
    "http_console_dir",
    "http_tls_cert_file",
    "http_tls_key_file",
}


def load(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Build a Config from defaults, an optional TOML file, the environment and overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                values.update(tomllib.load(fh))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    env = {
        "state_dir": os.environ.get("STRONGROOM_STATE_DIR"),
        "socket": os.environ.get("STRONGROOM_SOCKET"),
        "pkcs11_module": os.environ.get("STRONGROOM_PKCS11_MODULE"),
    }
    values.update({k: v for k, v in env.items() if v})
    if os.environ.get("STRONGROOM_HTTP", "").lower() in ("1", "true", "yes", "on"):
        values["http_enabled"] = True
    if os.environ.get("STRONGROOM_HTTP_PORT"):
        values["http_port"] = _port(os.environ["STRONGROOM_HTTP_PORT"], "STRONGROOM_HTTP_PORT")
    values.update({k: v for k, v in overrides.items() if v is not None})

    known = {f.name: f for f in fields(Config) if f.name != "extra"}
    cfg = Config()
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
        value = _coerce(key, value, getattr(cfg, key))
        setattr(cfg, key, value)
    if cfg.socket_mode not in (0o600, 0o660):
        raise ConfigError("socket_mode must be 0o600 or 0o660")
    for name in (
        "max_frame",
        "max_field",
        "max_inflight",
        "session_ttl",
        "max_transient_keys",
        "key_deletion_pending_days",
        "lifecycle_interval",
        "token_slow_per_principal",
        "token_slow_total",
        "stream_max_per_principal",
        "stream_max_total",
        "stream_idle_timeout",
        "plugin_memory_bytes",
        "plugin_instructions",
        "plugin_wall_seconds",
        "plugin_max_workers",
        "plugin_max_api_calls",
        "audit_max_pending",
        "max_connections",
        "http_max_connections",
        "max_unauth_bytes",
        "max_inflight_bytes",
        "frame_timeout",
        "auth_timeout",
        "node_timeout",
        "confirm_timeout",
    ):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"setting {name!r} must be positive")
    _check_http(cfg)
    if cfg.database_url and not cfg.database_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("database_url must be a postgresql:// URL")
    if cfg.confirm_timeout < cfg.node_timeout / 2 + 1:
        raise ConfigError(
            "confirm_timeout must be at least node_timeout / 2 + 1 (a node named as not "
            "confirming must have stopped serving by itself by the time it is named)"
        )
    return cfg


def _check_http(cfg: Config) -> None:
    if not 0 <= cfg.http_port <= 65535:
        raise ConfigError("setting 'http_port' must be 0..65535")
    if (cfg.http_tls_cert_file is None) != (cfg.http_tls_key_file is None):
        raise ConfigError("set http_tls_cert_file and http_tls_key_file together (or neither)")
    if cfg.http_enabled and not cfg.http_allow_remote and not is_loopback(cfg.http_host):
        if cfg.http_tls:
            raise ConfigError(
                f"http_host {cfg.http_host!r} is not a loopback address: set "
                "http_allow_remote = true to serve the gateway (HTTPS) to the network"
            )
        raise ConfigError(
            f"http_host {cfg.http_host!r} is not a loopback address; the gateway speaks plain "
            "HTTP: set http_tls_cert_file and http_tls_key_file, or set "
            "http_allow_remote = true only behind a TLS-terminating proxy"
        )


def check_tls_key(path: Path) -> None:
    """Refuse a TLS private key that others could read: like the PIN and admin key,
    it must belong to the daemon's user with no group or other access (0600).
    A systemd credential (``$CREDENTIALS_DIRECTORY``) is systemd's to protect."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read http_tls_key_file {path}: {exc.strerror}") from None
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and path.resolve().is_relative_to(Path(creds).resolve()):
        return
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"http_tls_key_file {path} is owned by uid {st.st_uid}, not by the daemon's "
            f"user (uid {os.geteuid()}); chown it"
        )
    if st.st_mode & 0o077:
        raise ConfigError(
            f"http_tls_key_file {path} is readable by others (mode {st.st_mode & 0o777:o}); "
            "chmod 600 it"
        )


def _load_tls(cert: Path, key: Path) -> None:
    """What the gateway will do at start: load the chain and its key (never shown)."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or "unusable"
        raise ConfigError(
            f"http_tls_cert_file {cert} and http_tls_key_file {key} cannot be used "
            f"together ({reason}): PEM certificate chain and its unencrypted private key"
        ) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _port(text: str, source: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{source} must be a port number (0..65535), not {text!r}") from None


def _coerce(key: str, value: Any, default: Any) -> Any:
    if key in _PATHS:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"setting {key!r} must be a path string")
        return Path(value).expanduser()
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
        raise ConfigError(f"setting {key!r} must be {want.__name__}")
    return value


def find_softhsm() -> str:
    for candidate in DEFAULT_MODULES:
        if Path(candidate).exists():
            return candidate
    raise ConfigError("SoftHSM2 is not installed (no libsofthsm2.so); install the softhsm2 package")


def describe(cfg: Config) -> list[str]:
    """The resolved settings as ``name = value`` lines (TOML-like; paths, never secrets)."""
    out = []
    for f in fields(Config):
        if f.name == "extra":
            continue
        value = getattr(cfg, f.name)
        if f.name == "socket_mode":
            out.append(f"{f.name} = 0o{value:o}")
        elif value is None:
            out.append(f"# {f.name} is unset")
        elif f.name == "database_url":
            out.append(f"{f.name} = {_toml_value(redact_url(value))}")
        else:
            out.append(f"{f.name} = {_toml_value(value)}")
    out.append("# resolved:")
    out.append(f"#   socket path   {cfg.socket_path}")
    out.append(f"#   database      {redact_url(cfg.database_url) or cfg.db_path}")
    try:
        module = cfg.pkcs11_module or f"{find_softhsm()} (embedded SoftHSM)"
    except ConfigError:
        module = "(embedded SoftHSM, not installed)"
    out.append(f"#   pkcs11 module {module}")
    if cfg.http_enabled:
        scheme = "https (TLS 1.2+)" if cfg.http_tls else "http (plain)"
        out.append(f"#   gateway       {scheme} on {cfg.http_host}:{cfg.http_port}")
    try:
        out.append(f"#   PIN file      {cfg.resolve_pin_file()}")
    except ConfigError:
        out.append("#   PIN file      (none)")
    return out


def redact_url(url: str) -> str:
    """A database URL without its password, for logs and check-config."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def check(cfg: Config) -> list[str]:
    """What would stop the daemon from starting with ``cfg`` (empty: nothing found)."""
    problems = []
    try:
        pin = cfg.resolve_pin_file()
    except ConfigError as exc:
        problems.append(str(exc))
        pin = None
    if cfg.embedded:
        try:
            find_softhsm()
        except ConfigError as exc:
            problems.append(str(exc))
        if pin is not None and pin != cfg.generated_pin_file and not pin.is_file():
            problems.append(f"the PIN file {pin} does not exist")
    else:
        if not Path(cfg.pkcs11_module).is_file():
            problems.append(f"pkcs11_module {cfg.pkcs11_module} does not exist")
        if pin is not None and not pin.is_file():
            problems.append(f"the PIN file {pin} does not exist")
    if pin is not None and pin.is_file() and not os.access(pin, os.R_OK):
        problems.append(f"the PIN file {pin} is not readable by this user")
    if cfg.http_enabled and cfg.http_tls:
        assert cfg.http_tls_cert_file is not None and cfg.http_tls_key_file is not None
        if not os.access(cfg.http_tls_cert_file, os.R_OK):
            problems.append(f"http_tls_cert_file {cfg.http_tls_cert_file} is not readable")
        try:
            check_tls_key(cfg.http_tls_key_file)
            _load_tls(cfg.http_tls_cert_file, cfg.http_tls_key_file)
        except ConfigError as exc:
            problems.append(str(exc))
    existing = next((p for p in (cfg.state_dir, *cfg.state_dir.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"the state directory {cfg.state_dir} is not writable ({existing})")
    return problems
