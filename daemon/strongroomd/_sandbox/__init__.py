"""The plugin sandbox: Lua 5.3 in spawned worker processes.

The only package that imports lupa, and only in the worker. The daemon uses
:class:`Pool` (in :mod:`.pool`); :mod:`.worker` is the child process and
``prelude.lua`` the trusted Lua core that builds each plugin's environment.

    pool = Pool(warm=2, max_workers=8)
    await pool.start()
    outcome = await pool.invoke(plugin, input, url=..., method="POST",
                                context=..., host=host, limits=Limits())

Names are resolved lazily so that the worker process, which imports this
package on its way to :mod:`.worker`, never loads asyncio or the pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strongroomd._sandbox.pool import Host, Limits, Outcome, PluginCode, Pool

__all__ = ["Host", "Limits", "Outcome", "PluginCode", "Pool"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from strongroomd._sandbox import pool

        return getattr(pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
