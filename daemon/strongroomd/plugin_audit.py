"""What a plugin may read of the audit log (Lua's ``AuditLog.get_all``).

By default a plugin reads only the records of its own invocations: the
invocation requests themselves and every API call any of its invocations made.
An admin may grant a plugin the whole log with the plugin field
``audit_read: true``. The grant is kept with the plugin's limits (under
:data:`AUDIT_READ`), so it needs no schema change; the API shows it as its own
field and never among the limits.
"""

from __future__ import annotations

from typing import Any

AUDIT_READ = "audit_read"


def granted(limits: dict[str, Any]) -> bool:
    return limits.get(AUDIT_READ) is True


def with_grant(
    limits: dict[str, Any], grant: bool | None, before: dict[str, Any]
) -> dict[str, Any]:
    """``limits`` with the grant: ``grant`` when given, else what ``before`` held."""
    out = {k: v for k, v in limits.items() if k != AUDIT_READ}
    if grant if grant is not None else granted(before):
        out[AUDIT_READ] = True
    return out


def shown(limits: dict[str, Any]) -> dict[str, Any]:
    """The limits as the API shows them (without the grant)."""
    return {k: v for k, v in limits.items() if k != AUDIT_READ}


#: The records of a plugin's own invocations (two parameters: the plugin id twice).
OWN_RECORDS = (
    "invocation_id IN (SELECT invocation_id FROM audit WHERE invocation_id IS NOT NULL "
    "AND (actor_id = ? OR object_id = ?))"
)
