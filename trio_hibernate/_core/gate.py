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
        self._held: list[tuple[Callable[[], None], Callable[[], None] | None]] = []

    def hold(self, action: Callable[[], None], on_drop: Callable[[], None] | None = None) -> None:
        """Run ``action`` now if the gate is open, else when it opens.

        If the write fails instead, ``on_drop`` runs (a reply that must still be
        answered, with an error).
        """
        if self.closed:
            self._held.append((action, on_drop))
        else:
            action()

    def open(self) -> None:
        """The write is durable: run the held actions in order."""
        self.closed = False
        held, self._held = self._held, []
        for action, _ in held:
            action()

    def drop(self) -> int:
        """The write failed: forget the held actions. Returns how many were dropped."""
        self.closed = False
        held, self._held = self._held, []
        for _, on_drop in held:
            if on_drop is not None:
                on_drop()
        return len(held)
