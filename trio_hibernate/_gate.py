"""The output gate: messages sent after an uncommitted write wait for the commit.

Plain Python. While the gate is closed, ``send``/``close`` calls are held in order; when
the write is durable they are released, and if the commit fails they are dropped (the
peer never sees a reply whose write was lost).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["OutputGate"]


class OutputGate:
    """Holds outgoing actions of one object while a write is not yet durable."""

    __slots__ = ("_held", "closed")

    def __init__(self) -> None:
        self.closed = False
        self._held: list[Callable[[], None]] = []

    def hold(self, action: Callable[[], None]) -> None:
        """Run ``action`` now if the gate is open, else when it opens."""
        if self.closed:
            self._held.append(action)
        else:
            action()

    def open(self) -> None:
        """The write is durable: run the held actions in order."""
        self.closed = False
        held, self._held = self._held, []
        for action in held:
            action()

    def drop(self) -> int:
        """The write failed: forget the held actions. Returns how many were dropped."""
        self.closed = False
        dropped = len(self._held)
        self._held = []
        return dropped
