"""The async client's namespaces (``AsyncClient.keys`` ...), for type checkers.

Generated from _resources.py by tests/client/async_stub.py; do not edit.
At run time they are the classes of _resources.py, whose methods return
awaitables when the client is an AsyncClient.
"""

import builtins
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

from strongroom._client import BaseClient
from strongroom._models import (
    App,
    AuditRecord,
    ChainCheck,
    DecryptResult,
    DigestResult,
    EncryptResult,
    Group,
    Invocation,
    MacResult,
    Plugin,
    PluginTestResult,
    SessionToken,
    SignResult,
    Sobject,
    StreamFinal,
    StreamStart,
    StreamStep,
    VerifyResult,
    WrapResult,
)
from strongroom._types import AppGroups, IdLike, KeyLike, Mode

class AsyncSession:
    "``/sys/v1/session``. The client authenticates by itself; these are for explicit use."
    def __init__(self, client: BaseClient) -> None: ...
    async def auth(
        self, api_key: str | None = None, *, app_id: str | None = None, secret: str | None = None
    ) -> SessionToken: ...
    async def terminate(self) -> None: ...

class AsyncGroups:
    "``/sys/v1/groups``: results are :class:`Group`; ``delete`` returns None."
    def __init__(self, client: BaseClient) -> None: ...
    async def create(self, name: str, *, description: str | None = None, **extra: Any) -> Group: ...
    async def list(self) -> builtins.list[Group]: ...
    async def get(self, group_id: IdLike) -> Group: ...
    async def update(self, group_id: IdLike, **fields: Any) -> Group: ...
    async def delete(self, group_id: IdLike | None = None, *, name: str | None = None) -> None: ...

class AsyncApps:
    "``/sys/v1/apps``. ``create`` and ``reset_secret`` return ``credential.api_key`` once."
    def __init__(self, client: BaseClient) -> None: ...
    async def create(
        self,
        name: str,
        *,
        groups: AppGroups,
        default_group: IdLike | None = None,
        description: str | None = None,
        **extra: Any,
    ) -> App: ...
    async def list(self) -> builtins.list[App]: ...
    async def get(self, app_id: IdLike) -> App: ...
    async def update(
        self,
        app_id: IdLike,
        *,
        add_groups: AppGroups | None = None,
        mod_groups: AppGroups | None = None,
        del_groups: Sequence[IdLike] | None = None,
        **fields: Any,
    ) -> App: ...
    async def delete(self, app_id: IdLike) -> None: ...
    async def reset_secret(self, app_id: IdLike) -> App: ...

class AsyncKeys:
    "``/crypto/v1/keys``: results are :class:`Sobject`; ``delete`` returns None."
    def __init__(self, client: BaseClient) -> None: ...
    async def create(
        self,
        name: str,
        obj_type: str,
        *,
        key_size: int | None = None,
        elliptic_curve: str | None = None,
        key_ops: Sequence[str] | None = None,
        group_id: IdLike | None = None,
        description: str | None = None,
        custom_metadata: Mapping[str, str] | None = None,
        transient: bool | None = None,
        enabled: bool | None = None,
        **extra: Any,
    ) -> Sobject: ...
    async def import_key(
        self, name: str, obj_type: str, value: bytes, **fields: Any
    ) -> Sobject: ...
    async def list(
        self,
        *,
        group_id: IdLike | None = None,
        name: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> builtins.list[Sobject]: ...
    async def get(self, kid: IdLike) -> Sobject: ...
    async def info(
        self, key: KeyLike | None = None, *, kid: str | None = None, name: str | None = None
    ) -> Sobject: ...
    async def update(self, kid: IdLike, **fields: Any) -> Sobject: ...
    async def delete(self, kid: IdLike | None = None, *, name: str | None = None) -> None: ...
    @overload
    async def public(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        format: Literal["PEM", "pem", "OpenSSH", "OPENSSH", "openssh"] = "PEM",
    ) -> str: ...
    @overload
    async def public(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        format: Literal["DER", "der"],
    ) -> bytes: ...
    @overload
    async def public(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        format: Literal["JWK", "jwk"],
    ) -> dict[str, Any]: ...
    @overload
    async def public(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        format: str,
    ) -> str | bytes | dict[str, Any]: ...
    async def export(
        self, key: KeyLike | None = None, *, kid: str | None = None, name: str | None = None
    ) -> Sobject: ...

class AsyncCrypto:
    "``/crypto/v1/*`` operations; each returns the answer as its :class:`Record` type."
    def __init__(self, client: BaseClient) -> None: ...
    async def encrypt(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        plain: bytes,
        alg: str | None = None,
        mode: Mode | None = None,
        iv: bytes | None = None,
        ad: bytes | None = None,
        tag_len: int | None = None,
        **extra: Any,
    ) -> EncryptResult: ...
    async def decrypt(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        cipher: bytes,
        alg: str | None = None,
        mode: Mode | None = None,
        iv: bytes | None = None,
        ad: bytes | None = None,
        tag: bytes | None = None,
        **extra: Any,
    ) -> DecryptResult: ...
    async def encrypt_init(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        alg: str | None = None,
        mode: Mode | None = None,
        iv: bytes | None = None,
        ad: bytes | None = None,
    ) -> StreamStart: ...
    async def encrypt_update(self, state: bytes, plain: bytes) -> StreamStep: ...
    async def encrypt_final(self, state: bytes, tag_len: int | None = None) -> StreamFinal: ...
    async def decrypt_init(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        alg: str | None = None,
        mode: Mode | None = None,
        iv: bytes | None = None,
        ad: bytes | None = None,
    ) -> StreamStart: ...
    async def decrypt_update(self, state: bytes, cipher: bytes) -> StreamStep: ...
    async def decrypt_final(self, state: bytes, tag: bytes | None = None) -> StreamFinal: ...
    async def sign(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        data: bytes | None = None,
        hash: bytes | None = None,
        hash_alg: str | None = None,
        mode: Mode | None = None,
        **extra: Any,
    ) -> SignResult: ...
    async def verify(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        signature: bytes,
        data: bytes | None = None,
        hash: bytes | None = None,
        hash_alg: str | None = None,
        mode: Mode | None = None,
        **extra: Any,
    ) -> VerifyResult: ...
    async def mac(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        data: bytes,
        alg: str | None = None,
        **extra: Any,
    ) -> MacResult: ...
    async def macverify(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        data: bytes,
        mac: bytes,
        alg: str | None = None,
        **extra: Any,
    ) -> VerifyResult: ...
    async def digest(self, data: bytes, *, alg: str = "SHA256", **extra: Any) -> DigestResult: ...
    async def wrapkey(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        name: str | None = None,
        subject: KeyLike,
        alg: str,
        mode: Mode | None = None,
        **extra: Any,
    ) -> WrapResult: ...
    async def unwrapkey(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        wrapped_key: bytes,
        alg: str,
        obj_type: str,
        mode: Mode | None = None,
        name: str | None = None,
        key_ops: Sequence[str] | None = None,
        group_id: IdLike | None = None,
        transient: bool | None = None,
        **extra: Any,
    ) -> Sobject: ...
    async def agree(
        self,
        private_key: KeyLike,
        public_key: KeyLike,
        *,
        key_type: str,
        key_size: int,
        mechanism: str = "diffie_hellman",
        name: str | None = None,
        transient: bool | None = None,
        **extra: Any,
    ) -> Sobject: ...
    async def derive(
        self,
        key: KeyLike | None = None,
        *,
        kid: str | None = None,
        key_type: str,
        mechanism: Mapping[str, Any],
        key_size: int | None = None,
        name: str | None = None,
        key_ops: Sequence[str] | None = None,
        group_id: IdLike | None = None,
        transient: bool | None = None,
        **extra: Any,
    ) -> Sobject: ...

class AsyncLogs:
    "``/sys/v1/logs``: audit records, as a list of :class:`AuditRecord`."
    def __init__(self, client: BaseClient) -> None: ...
    async def list(
        self,
        *,
        object_id: str | None = None,
        actor_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        **filters: Any,
    ) -> builtins.list[AuditRecord]: ...
    async def verify(self) -> ChainCheck: ...
    async def stats(
        self,
        of: str = "apps",
        id: IdLike | None = None,
        *,
        num_points: int | None = None,
        top_count: int | None = None,
        range_from: int | None = None,
        range_to: int | None = None,
    ) -> dict[str, Any]: ...

class AsyncPlugins:
    "``/sys/v1/plugins``. ``invoke`` returns whatever the plugin's ``run`` returned."
    def __init__(self, client: BaseClient) -> None: ...
    async def create(
        self,
        name: str,
        code: str,
        *,
        groups: Sequence[IdLike],
        default_group: IdLike | None = None,
        description: str | None = None,
        enabled: bool | None = None,
        language: str = "LUA",
        plugin_type: str | None = None,
        **extra: Any,
    ) -> Plugin: ...
    async def list(self) -> builtins.list[Plugin]: ...
    async def get(self, plugin_id: IdLike) -> Plugin: ...
    async def update(
        self, plugin_id: IdLike, *, code: str | None = None, language: str = "LUA", **fields: Any
    ) -> Plugin: ...
    async def delete(self, plugin_id: IdLike) -> None: ...
    async def invoke(
        self, plugin_id: IdLike | None = None, input: Any = None, *, name: str | None = None
    ) -> Any: ...
    async def test(
        self,
        code: str,
        input: Any = None,
        *,
        groups: Sequence[IdLike] | None = None,
        invoker: Any = None,
        **extra: Any,
    ) -> PluginTestResult: ...
    async def output(self, invocation_id: str) -> Invocation: ...
