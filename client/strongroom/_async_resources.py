"""The async client's namespaces: at run time, the classes of ``_resources``.

Their methods return awaitables when the client is an :class:`AsyncClient`
(its ``_call`` is a coroutine). Type checkers read ``_async_resources.pyi``
instead, which declares each method ``async`` with its return type.
"""

from strongroom._resources import Apps as AsyncApps
from strongroom._resources import Crypto as AsyncCrypto
from strongroom._resources import Groups as AsyncGroups
from strongroom._resources import Keys as AsyncKeys
from strongroom._resources import Logs as AsyncLogs
from strongroom._resources import Plugins as AsyncPlugins
from strongroom._resources import Session as AsyncSession

__all__ = [
    "AsyncApps",
    "AsyncCrypto",
    "AsyncGroups",
    "AsyncKeys",
    "AsyncLogs",
    "AsyncPlugins",
    "AsyncSession",
]
