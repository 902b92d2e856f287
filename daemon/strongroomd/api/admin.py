"""/sys/v1/admin/*: the administrator's own credential, while the daemon runs.

``POST /sys/v1/admin/rotate`` gives the calling admin a new API key and writes
it to ``<state_dir>/admin.key`` (0600), where the first start put the first
one; the key never travels in the answer. ``strongroomd admin rotate`` calls it
when a daemon runs on the state directory, and rotates offline otherwise
(:mod:`strongroomd.admin`). The request's own audit record is the trace.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any

from strongroomd import state
from strongroomd.auth import api_key, new_secret, require_admin
from strongroomd.context import Request
from strongroomd.router import Route
from strongroomd.store import PrincipalRow


async def rotate(req: Request) -> dict[str, Any]:
    require_admin(req.caller)
    s, admin_id = req.services, req.caller.id
    req.object_id = admin_id
    key_file = s.config.admin_key_path
    secret, salt, digest = await asyncio.to_thread(new_secret)
    # As offline: the new key is on disk before the row changes, so a failure in
    # between leaves the old key working and admin.key as it was.
    pending = key_file.with_name("admin.key.new")
    await asyncio.to_thread(state.write_secret, pending, api_key(admin_id, secret) + "\n")
    try:
        await s.store.change(
            PrincipalRow, admin_id, lambda cur: replace(cur, salt=salt, secret_hash=digest)
        )
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, key_file)
    s.auth.drop_principal(admin_id)  # bearer sessions made with the old key end now
    return {"admin_id": admin_id, "key_file": str(key_file)}


ROUTES = [
    Route(
        "POST",
        "/sys/v1/admin/rotate",
        rotate,
        {},
        synopsis="New API key for the calling admin, written to <state_dir>/admin.key (admins).",
    ),
]
