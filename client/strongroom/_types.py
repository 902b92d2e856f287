"""Type aliases used in signatures."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from strongroom._models import Request, Response, Sobject

#: A key named by a descriptor map (``{"kid": ...}``, ``{"name": ...}``,
#: ``{"transient_key": ...}``) or by an :class:`~strongroom.Sobject`.
KeyLike: TypeAlias = "Mapping[str, Any] | Sobject"

#: A mode: a name (``"GCM"``, ``"OAEP_MGF1_SHA256"``...) or DSM's map form.
Mode: TypeAlias = "str | Mapping[str, Any]"

#: An id given as a string, or a record holding it (``group``, ``app``...).
IdLike: TypeAlias = "str | Mapping[str, Any]"

#: DSM's AppGroups: groups (the app gets every permission in each), or a map of
#: group id to DSM permission names (``{"<gid>": ["ENCRYPT", "DECRYPT"]}``).
AppGroups: TypeAlias = "Sequence[IdLike] | Mapping[str, Sequence[str]]"

#: One request for :meth:`Client.pipeline`: ``(method, path)`` or ``(method, path, body)``.
RequestSpec: TypeAlias = "tuple[str, str] | tuple[str, str, Any]"
RequestSpecs: TypeAlias = "Sequence[RequestSpec]"

#: What a mock transport calls: a request in, a response (or a raw frame map) out.
Handler: TypeAlias = "Callable[[Request], Response | dict[str, Any]]"
AsyncHandler: TypeAlias = "Callable[[Request], Awaitable[Response | dict[str, Any]]]"
