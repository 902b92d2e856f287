"""What a handler gets: the services, the caller, and its connection's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strongroomd.outputs import Outputs

if TYPE_CHECKING:
    from strongroomd._sandbox import Pool
    from strongroomd._token import Token
    from strongroomd.audit import Audit
    from strongroomd.auth import Authenticator, Principal
    from strongroomd.config import Config
    from strongroomd.dispatch import Dispatcher
    from strongroomd.keyring import Keyring
    from strongroomd.store import KeyRow, Store


@dataclass(slots=True)
class Services:
    config: Config
    store: Store
    token: Token
    auth: Authenticator
    audit: Audit
    keyring: Keyring
    sandbox: Pool
    #: Set once the route table exists (it needs these services first).
    dispatcher: Dispatcher = field(init=False)
    #: Socket requests read and not yet answered, over all connections: the
    #: token layer runs short operations inline only when this is 1 (see
    #: ``strongroomd._token.Token.quiet``).
    socket_pending: int = 0
    #: What recent plugin invocations printed (admins read it; never audited).
    outputs: Outputs = field(default_factory=Outputs)


@dataclass(slots=True)
class Owner:
    """Who transient keys belong to: a connection, or one plugin invocation.

    When it ends, :meth:`strongroomd.keyring.Keyring.drop_owner` destroys its keys.
    """

    id: str
    principal: Principal | None = None
    token: str | None = None  # bearer token bound by session/auth
    transient: dict[str, KeyRow] = field(default_factory=dict)
    invocation_id: str | None = None
    #: Set when it ended: a creation finishing afterwards must not add a key to it.
    closed: bool = False
    #: Transient creations in flight (they count against max_transient_keys).
    transient_pending: int = 0


@dataclass(slots=True)
class Request:
    services: Services
    owner: Owner
    principal: Principal | None
    method: str
    path: str
    params: dict[str, str]
    body: Any
    #: What the audit record names as the request's object (set by handlers).
    object_id: str | None = None
    #: The plugin invocation this request started, if any (audit nests under it).
    invocation_id: str | None = None
    #: Extra facts for the audit record (size-capped by whoever sets them).
    audit_detail: dict[str, Any] | None = None

    @property
    def caller(self) -> Principal:
        assert self.principal is not None
        return self.principal
