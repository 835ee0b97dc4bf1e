"""The host's memory budget: bytes held on behalf of clients. Plain Python, no Trio.

What counts: inbound messages being reassembled, messages queued for objects, request
bodies being read, and outbound bytes buffered for peers that read slowly. The
connection that would take the budget over its limit is the one refused (its message
closed with 1013, its request answered 503, or, a slow reader, disconnected), never the
host; see ``docs/operations.md``.
"""

from __future__ import annotations

__all__ = ["MemoryBudget"]


class MemoryBudget:
    """A counter of held bytes with a limit (``Limits.max_buffered_bytes``)."""

    __slots__ = ("limit", "peak", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes as held, unless that would pass the limit (then
        nothing changes and False is returned)."""
        used = self.used + size
        if used > self.limit:
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def give(self, size: int) -> None:
        """``size`` bytes are no longer held."""
        self.used -= size
        assert self.used >= 0, "the memory budget gave back more than it took"
