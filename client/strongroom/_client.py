"""``Client`` and ``AsyncClient``: the same API, differing only in how they send.

Everything free of I/O (paths, bodies, key descriptors, error mapping,
authentication bookkeeping) lives in :class:`BaseClient` and the namespaces;
the two subclasses only implement ``_call``. The namespaces (``client.keys``,
``client.crypto``...) are in ``_resources``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from strongroom import _datakey
from strongroom._exceptions import ApiError, StrongroomError, TransportError, error_for
from strongroom._models import DataKey, Request, Response, wrap
from strongroom._resources import (
    AUTH_PATH,
    TERMINATE_PATH,
    Apps,
    Crypto,
    Groups,
    Keys,
    Logs,
    Plugins,
    Session,
    key_descriptor,
)
from strongroom._transports.base import AsyncBaseTransport, BaseTransport
from strongroom._transports.unix import AsyncUnixTransport, UnixTransport
from strongroom._types import KeyLike, RequestSpecs

if TYPE_CHECKING:
    from strongroom._async_resources import (
        AsyncApps,
        AsyncCrypto,
        AsyncGroups,
        AsyncKeys,
        AsyncLogs,
        AsyncPlugins,
        AsyncSession,
    )

__all__ = ["DEFAULT_SOCKET", "AsyncClient", "BaseClient", "Client", "key_descriptor"]

DEFAULT_SOCKET = "./var/strongroomd.sock"
SOCKET_NAME = "strongroomd.sock"
_REAUTH_CODES = frozenset({"token_expired", "unauthenticated"})


def default_socket() -> str:
    """``$STRONGROOM_SOCKET``, else ``$STRONGROOM_STATE_DIR/strongroomd.sock``, else ./var's."""
    path = os.environ.get("STRONGROOM_SOCKET")
    if path:
        return path
    state_dir = os.environ.get("STRONGROOM_STATE_DIR")
    if state_dir:
        return os.path.join(state_dir, SOCKET_NAME)
    return DEFAULT_SOCKET


def _env_api_key() -> str | None:
    key = os.environ.get("STRONGROOM_API_KEY")
    if key:
        return key.strip()
    path = os.environ.get("STRONGROOM_API_KEY_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return None


_NAMESPACES: dict[str, type] = {
    "session": Session,
    "groups": Groups,
    "apps": Apps,
    "keys": Keys,
    "crypto": Crypto,
    "logs": Logs,
    "plugins": Plugins,
}


class BaseClient:
    """What both clients share: configuration, namespaces, bodies, error mapping."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if socket_path is None:
            socket_path = default_socket()
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self._api_key = api_key if api_key is not None else _env_api_key()
        self._ids = itertools.count(1)
        self._authenticated = False
        self._auth_epoch = 0
        #: kid -> obj_type, so encrypt/decrypt by kid infer ``alg`` once.
        self._key_types: dict[str, str] = {}
        # One set of namespace classes serves both clients; each subclass
        # declares their types (the async ones in _async_resources.pyi).
        for attr, namespace in _NAMESPACES.items():
            setattr(self, attr, namespace(self))

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} socket_path={self.socket_path!r} "
            f"api_key={'set' if self._api_key else 'unset'}>"
        )

    @property
    def has_api_key(self) -> bool:
        return self._api_key is not None

    def _datakey_flow(
        self,
        kek: KeyLike | None,
        kid: str | None,
        name: str | None,
        bits: int,
        plaintext: bool,
    ) -> _datakey.Flow:
        return _datakey.generate(key_descriptor(kek, kid=kid, name=name), bits, plaintext)

    def _unwrap_flow(
        self,
        datakey: Mapping[str, Any] | None,
        kek: KeyLike | None,
        kid: str | None,
        name: str | None,
        wrapped_key: bytes | None,
        wrap_alg: str | None,
        wrap_mode: str | None,
    ) -> _datakey.Flow:
        if datakey is not None:
            if kek is None and kid is None and name is None:
                kid = datakey["kid"]
            wrapped_key = datakey["wrapped_key"] if wrapped_key is None else wrapped_key
            wrap_alg = wrap_alg or datakey.get("wrap_alg")
            wrap_mode = wrap_mode or datakey.get("wrap_mode")
        if wrapped_key is None:
            raise TypeError("give the data key (datakey=) or its wrapped_key=")
        desc = key_descriptor(kek, kid=kid, name=name)
        return _datakey.unwrap(desc, wrapped_key, wrap_alg, wrap_mode)

    def _build(self, method: str, path: str, body: Any = None) -> Request:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        return Request(next(self._ids), method.upper(), path, body)

    def _auth_request(self) -> Request:
        return self._build("POST", AUTH_PATH, {"api_key": self._api_key})

    def _needs_reauth(self, path: str, response: Response) -> bool:
        body = response.body
        return (
            path != AUTH_PATH
            and self._api_key is not None
            and response.status == 401
            and isinstance(body, dict)
            and body.get("error") in _REAUTH_CODES
        )

    def _needs_auth(self, path: str) -> bool:
        return path != AUTH_PATH and self._api_key is not None and not self._authenticated

    def _note(self, path: str, response: Response) -> None:
        """Track the connection's session from what went by."""
        if response.id is None:  # the transport dropped the connection
            self._authenticated = False
        elif path == AUTH_PATH and response.status < 400:
            self._authenticated = True
            self._auth_epoch += 1
        elif path == TERMINATE_PATH and response.status < 400:
            self._authenticated = False

    # What each client implements (the async ones return awaitables).
    keys: Any

    def _call(self, method: str, path: str, body: Any = None, model: Any = None) -> Any:
        raise NotImplementedError

    def _chain(self, first: Callable[[], Any], then: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def _result(self, response: Response, model: Any = None) -> Any:
        if response.id is None or response.status >= 400:
            exc = error_for(response.status, response.body)
            if exc.code == "unauthenticated" and self._api_key is None:
                exc.message = (
                    "this client has no API key: pass api_key=, or set STRONGROOM_API_KEY "
                    "(the key) or STRONGROOM_API_KEY_FILE (a file holding it)"
                )
                exc.args = (f"{exc.code}: {exc.message}",)
            raise exc
        if response.status == 204:
            return None
        return response.body if model is None else wrap(response.body, model)


class Client(BaseClient):
    """A synchronous client for strongroomd; thread-safe, one request at a time.

    Usage::

        with strongroom.Client() as c:
            key = c.keys.create("k1", "AES", key_size=256)
            out = c.crypto.encrypt(key, plain=b"hello")
            c.crypto.decrypt(key, cipher=out.cipher, iv=out.iv, tag=out.tag).plain

    Resources, one attribute per API path family (``help(client.keys)`` for each):

    * **session** - ``auth()``, ``terminate()``; the client authenticates by itself.
    * **groups** - ``create``, ``list``, ``get``, ``update``, ``delete``.
    * **apps** - ``create``, ``list``, ``get``, ``update``, ``delete``, ``reset_secret``.
    * **keys** - ``create``, ``import_key``, ``list``, ``get``, ``info``, ``update``,
      ``delete``, ``export``, ``public`` (PEM, DER, JWK, OpenSSH).
    * **crypto** - ``encrypt``, ``decrypt``, ``sign``, ``verify``, ``mac``,
      ``macverify``, ``digest``, ``wrapkey``, ``unwrapkey``, ``agree``.
    * **logs** - ``list`` (audit records), ``verify`` (the hash chain).
    * **plugins** - ``create``, ``list``, ``get``, ``update``, ``delete``,
      ``invoke``, ``test``, ``output``.

    And on the client itself: ``datakey()`` (a fresh AES data key wrapped
    under a KEK, as KMS GenerateDataKey) and ``unwrap_datakey()``; files are
    encrypted with one in :mod:`strongroom.envelope`.

    Methods return the decoded response body as typed models (``_models``):
    maps as :class:`Record` subclasses (dicts with attribute access, their
    fields declared: :class:`EncryptResult`, :class:`Group`...), keys as
    :class:`Sobject`, lists of those for list calls, None for 204.
    ``request()`` returns bodies exactly as decoded.
    Error responses raise :class:`ApiError` subclasses; socket and frame
    problems raise :class:`TransportError`.

    Parameters:

    * **socket_path** - the daemon's socket; default ``$STRONGROOM_SOCKET``,
      else ``strongroomd.sock`` in ``$STRONGROOM_STATE_DIR``, else
      ``./var/strongroomd.sock``.
    * **api_key** - default ``$STRONGROOM_API_KEY`` or the contents of
      ``$STRONGROOM_API_KEY_FILE``. When known, the client authenticates on its
      first request, and again once when the session expires.
    * **timeout** - seconds to wait for a response.
    * **transport** - a :class:`BaseTransport` (e.g. ``MockTransport``) to use
      instead of the Unix socket.
    """

    #: ``/sys/v1/session``: ``auth()``, ``terminate()`` (the client authenticates by itself).
    session: Session
    #: ``/sys/v1/groups``: ``create``, ``list``, ``get``, ``update``, ``delete``.
    groups: Groups
    #: ``/sys/v1/apps``: ``create``, ``list``, ``get``, ``update``, ``delete``, ``reset_secret``.
    apps: Apps
    #: ``/crypto/v1/keys``: ``create``, ``import_key``, ``list``, ``get``, ``info``, ``update``,
    #: ``delete``, ``export``, ``public``.
    keys: Keys
    #: ``/crypto/v1/*``: ``encrypt``, ``decrypt``, ``sign``, ``verify``, ``mac``, ``macverify``,
    #: ``digest``, ``wrapkey``, ``unwrapkey``, ``agree``.
    crypto: Crypto
    #: ``/sys/v1/logs``: ``list`` (audit records), ``verify`` (the hash chain).
    logs: Logs
    #: ``/sys/v1/plugins``: ``create``, ``list``, ``get``, ``update``, ``delete``, ``invoke``,
    #: ``test``.
    plugins: Plugins

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        transport: BaseTransport | None = None,
    ) -> None:
        super().__init__(socket_path, api_key, timeout)
        self._transport = transport or UnixTransport(self.socket_path, timeout=timeout)
        self._lock = threading.RLock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the session and transient keys end with it)."""
        with self._lock:
            self._authenticated = False
            self._transport.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send any request -> the response body as decoded; raises on error statuses."""
        return self._call(method, path, body)

    def pipeline(self, requests: RequestSpecs, *, return_exceptions: bool = False) -> list[Any]:
        """Send ``(method, path[, body])`` requests together; bodies in order.

        With ``return_exceptions`` an error response yields its ApiError in
        place, as with ``asyncio.gather``; otherwise the first one is raised.
        """
        specs = [(m, p, s[0] if s else None) for m, p, *s in requests]
        with self._lock:
            if any(self._needs_auth(p) for _, p, _ in specs):
                self._authenticate()
            responses = self._send([self._build(*s) for s in specs])
            retry = [i for i, r in enumerate(responses) if self._needs_reauth(specs[i][1], r)]
            if retry:
                self._authenticate()
                again = self._send([self._build(*specs[i]) for i in retry])
                for i, r in zip(retry, again, strict=True):
                    responses[i] = r
            for (_, path, _), r in zip(specs, responses, strict=True):
                self._note(path, r)
        results: list[Any] = []
        for r in responses:
            try:
                results.append(self._result(r))
            except ApiError as exc:
                if not return_exceptions:
                    raise
                results.append(exc)
        return results

    def datakey(
        self,
        kek: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        bits: int = 256,
        plaintext: bool = True,
    ) -> DataKey:
        """A fresh AES data key wrapped under the KEK, as KMS's GenerateDataKey.

        -> :class:`DataKey`: ``wrapped_key`` (store it with the data; the KEK
        alone opens it, with :meth:`unwrap_datakey`) and, unless
        ``plaintext=False``, ``plaintext``, the key itself to encrypt with
        locally and then forget. The KEK (``kek=`` descriptor or Sobject,
        ``kid=`` or ``name=``) is an AES or RSA key with WRAPKEY. The key is
        made in the daemon as a transient key, wrapped, exported only for the
        plaintext form, and deleted (see ``strongroom._datakey``).
        """
        return self._run(self._datakey_flow(kek, kid, name, bits, plaintext))

    def unwrap_datakey(
        self,
        datakey: Mapping[str, Any] | None = None,
        *,
        kek: KeyLike | None = None,
        kid: str | None = None,
        name: str | None = None,
        wrapped_key: bytes | None = None,
        wrap_alg: str | None = None,
        wrap_mode: str | None = None,
    ) -> bytes:
        """The plaintext of a data key, from a :class:`DataKey` (wrapped form is
        enough) or from ``wrapped_key=`` and the KEK. Needs UNWRAPKEY on the KEK;
        a wrong KEK or a changed wrapped key raises :class:`BadTag`."""
        flow = self._unwrap_flow(datakey, kek, kid, name, wrapped_key, wrap_alg, wrap_mode)
        return self._run(flow)

    def _run(self, flow: _datakey.Flow) -> Any:
        """Drive a flow (``strongroom._datakey``): each step's result is sent back in,
        its error thrown in, so the flow can clean up; -> what the flow returns."""
        try:
            step = next(flow)
            while True:
                try:
                    result = self._call(*step)
                except StrongroomError as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            return stop.value

    def _chain(self, first: Callable[[], Any], then: Callable[[Any], Any]) -> Any:
        """``then(first())``: two dependent calls (the async client awaits each)."""
        return then(first())

    def _call(self, method: str, path: str, body: Any = None, model: Any = None) -> Any:
        with self._lock:
            if self._needs_auth(path):
                self._authenticate()
            response = self._send([self._build(method, path, body)])[0]
            if self._needs_reauth(path, response):
                self._authenticate()
                response = self._send([self._build(method, path, body)])[0]
            self._note(path, response)
        return self._result(response, model)

    def _send(self, requests: list[Request]) -> list[Response]:
        try:
            return self._transport.handle_requests(requests)
        except TransportError:
            self._authenticated = False
            raise

    def _authenticate(self) -> None:
        response = self._send([self._auth_request()])[0]
        self._note(AUTH_PATH, response)
        self._result(response)


class AsyncClient(BaseClient):
    """An asyncio client for strongroomd: the API of :class:`Client`, awaited.

    Usage::

        async with strongroom.AsyncClient() as c:
            key = await c.keys.info(name="k1")
            outs = await asyncio.gather(
                *(c.crypto.encrypt(key, plain=m) for m in messages)
            )

    One connection carries every request at once (pipelining); responses are
    matched by id, in any order. If the connection drops, the requests in
    flight fail with :class:`TransportError` and the next request reconnects
    (and authenticates again). Parameters as for :class:`Client`; ``timeout``
    applies to each request, and ``transport`` is an
    :class:`AsyncBaseTransport`. Close with ``await client.aclose()``.
    """

    # The namespaces of Client, awaited (see _async_resources.pyi).
    #: ``/sys/v1/session``: ``auth()``, ``terminate()`` (the client authenticates by itself).
    session: AsyncSession
    #: ``/sys/v1/groups``: ``create``, ``list``, ``get``, ``update``, ``delete``.
    groups: AsyncGroups
    #: ``/sys/v1/apps``: ``create``, ``list``, ``get``, ``update``, ``delete``, ``reset_secret``.
    apps: AsyncApps
    #: ``/crypto/v1/keys``: ``create``, ``import_key``, ``list``, ``get``, ``info``, ``update``,
    #: ``delete``, ``export``, ``public``.
    keys: AsyncKeys
    #: ``/crypto/v1/*``: ``encrypt``, ``decrypt``, ``sign``, ``verify``, ``mac``, ``macverify``,
    #: ``digest``, ``wrapkey``, ``unwrapkey``, ``agree``.
    crypto: AsyncCrypto
    #: ``/sys/v1/logs``: ``list`` (audit records), ``verify`` (the hash chain).
    logs: AsyncLogs
    #: ``/sys/v1/plugins``: ``create``, ``list``, ``get``, ``update``, ``delete``, ``invoke``,
    #: ``test``.
    plugins: AsyncPlugins

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        transport: AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(socket_path, api_key, timeout)
        self._transport = transport or AsyncUnixTransport(self.socket_path, timeout=timeout)
        self._auth_lock: asyncio.Lock | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection, failing requests still in flight."""
        self._authenticated = False
        await self._transport.aclose()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send any request -> the response body as decoded; raises on error statuses."""
        return await self._call(method, path, body)

    async def datakey(
        self,
        kek: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        bits: int = 256,
        plaintext: bool = True,
    ) -> DataKey:
        """A fresh AES data key wrapped under the KEK: see :meth:`Client.datakey`."""
        return await self._run(self._datakey_flow(kek, kid, name, bits, plaintext))

    async def unwrap_datakey(
        self,
        datakey: Mapping[str, Any] | None = None,
        *,
        kek: KeyLike | None = None,
        kid: str | None = None,
        name: str | None = None,
        wrapped_key: bytes | None = None,
        wrap_alg: str | None = None,
        wrap_mode: str | None = None,
    ) -> bytes:
        """The plaintext of a data key: see :meth:`Client.unwrap_datakey`."""
        flow = self._unwrap_flow(datakey, kek, kid, name, wrapped_key, wrap_alg, wrap_mode)
        return await self._run(flow)

    async def _run(self, flow: _datakey.Flow) -> Any:
        """Drive a flow as :meth:`Client._run` does, awaiting each step."""
        try:
            step = next(flow)
            while True:
                try:
                    result = await self._call(*step)
                except StrongroomError as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            return stop.value

    async def _chain(self, first: Callable[[], Any], then: Callable[[Any], Any]) -> Any:
        out = then(await first())
        return await out if inspect.isawaitable(out) else out

    async def _call(self, method: str, path: str, body: Any = None, model: Any = None) -> Any:
        if self._needs_auth(path):
            await self._authenticate(self._auth_epoch)
        epoch = self._auth_epoch
        response = await self._send(self._build(method, path, body))
        if self._needs_reauth(path, response):
            await self._authenticate(epoch)
            response = await self._send(self._build(method, path, body))
        self._note(path, response)
        return self._result(response, model)

    async def _send(self, request: Request) -> Response:
        try:
            return await self._transport.handle_async_request(request)
        except TransportError:
            self._authenticated = False
            raise

    async def _authenticate(self, epoch: int) -> None:
        """Authenticate unless another task already did since ``epoch``."""
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            if self._authenticated and self._auth_epoch != epoch:
                return
            response = await self._send(self._auth_request())
            self._note(AUTH_PATH, response)
            self._result(response)
