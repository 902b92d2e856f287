"""What recent plugin invocations printed, kept in memory for admins.

A plugin's ``print()`` output never enters the hash-chained audit log: that log
cannot forget, and a plugin may print secrets (a tokenizer printing card
numbers). Test runs return their output; for real invocations the daemon keeps
the last ones here, each capped, all of them capped, oldest evicted first, and
lost on restart. Admins read them by invocation id
(``GET /sys/v1/plugins/invocations/{invocation_id}/output``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

#: Bytes kept of one invocation's output (UTF-8); the rest is cut.
MAX_PER_INVOCATION = 16 * 1024
#: Bytes kept over all invocations; the oldest go first.
MAX_TOTAL = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Printed:
    invocation_id: str
    plugin_id: str
    at: str
    output: str
    truncated: bool

    @property
    def size(self) -> int:
        return len(self.output.encode())


class Outputs:
    """A bounded, oldest-first store of invocation outputs."""

    def __init__(self, per_invocation: int = MAX_PER_INVOCATION, total: int = MAX_TOTAL) -> None:
        self.per_invocation = per_invocation
        self.total = total
        self._kept: OrderedDict[str, Printed] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def bytes(self) -> int:
        return self._bytes

    def add(self, invocation_id: str, plugin_id: str, at: str, output: str) -> None:
        if not output:
            return
        raw = output.encode()
        truncated = len(raw) > self.per_invocation
        if truncated:
            output = raw[: self.per_invocation].decode(errors="ignore")
        item = Printed(invocation_id, plugin_id, at, output, truncated)
        old = self._kept.pop(invocation_id, None)
        if old is not None:
            self._bytes -= old.size
        self._kept[invocation_id] = item
        self._bytes += item.size
        while self._bytes > self.total and self._kept:
            _, gone = self._kept.popitem(last=False)
            self._bytes -= gone.size

    def get(self, invocation_id: str) -> Printed | None:
        return self._kept.get(invocation_id)
