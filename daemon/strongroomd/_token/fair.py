"""Who is asking the token for work, so the token thread can be fair to them.

The dispatcher sets :data:`caller` once it knows the principal of a request
(each request runs in its own task, so the value is per request); the token
thread's queues are keyed by it. Importing this module costs nothing on the
hot path: a ``ContextVar.get`` per queued job.
"""

from __future__ import annotations

from contextvars import ContextVar

#: The bucket for requests with no principal (public routes, start-up work).
ANONYMOUS = "anonymous"

#: The principal id of the request being handled (an app, the admin, or the
#: plugin whose invocation makes the call); :data:`ANONYMOUS` when unknown.
caller: ContextVar[str] = ContextVar("strongroom_token_caller", default=ANONYMOUS)
