"""The output gate: an outgoing action waits until every write made before it is durable.

Plain Python. Writes are carried by numbered commits (1, 2, ...) that become durable in
order: the writes made now join the next commit (:attr:`OutputGate.next_commit`) until
:meth:`OutputGate.commit_started` seals it. An action (a message, a close, a reply) held
while a write is not durable waits for the commit that carries the latest write made
before it, even if its own turn wrote nothing; when that commit is durable the actions
held for it and for earlier ones run, in order (:meth:`OutputGate.open`). If a commit
fails, every held action is dropped: later actions waited for later commits, whose turns
saw the failed writes (:meth:`OutputGate.fail`). The peer never sees a reply whose write
was lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["OutputGate"]

_Held = tuple[int, Callable[[], None], Callable[[], None] | None]


class OutputGate:
    """Holds outgoing actions of one object while a write made before them is not durable."""

    __slots__ = ("_durable", "_failed", "_held", "_next", "_written")

    def __init__(self) -> None:
        self._next = 1  # the commit the writes made now join
        self._written = 0  # the commit carrying the latest write (0: none yet)
        self._durable = 0  # every commit up to this one is durable
        self._failed = False
        self._held: deque[_Held] = deque()

    @property
    def closed(self) -> bool:
        """True when an action would be held (a write is not durable yet, or a commit
        failed and the object is being reset)."""
        return self._failed or self._written > self._durable

    @property
    def next_commit(self) -> int:
        """The number of the commit that the writes made now will join."""
        return self._next

    @property
    def durable(self) -> int:
        """Every commit up to this number is durable (0: none yet)."""
        return self._durable

    @property
    def last_write(self) -> int:
        """The number of the commit carrying the latest write (0: none yet)."""
        return self._written

    def wrote(self) -> None:
        """A write was made: actions held from now on wait for :attr:`next_commit`."""
        self._written = self._next

    def commit_started(self) -> int:
        """The writes made so far are sealed into commit :attr:`next_commit`; returns
        its number. Later writes join the commit after it."""
        number = self._next
        self._next += 1
        return number

    def hold(self, action: Callable[[], None], on_drop: Callable[[], None] | None = None) -> None:
        """Run ``action`` now if the gate is open, else once the writes made before it
        are durable.

        If a commit fails instead, ``on_drop`` runs (a reply that must still be
        answered, with an error); after a failure it runs at once.
        """
        if self._failed:
            if on_drop is not None:
                on_drop()
        elif self._written > self._durable:
            self._held.append((self._written, action, on_drop))
        else:
            action()

    def open(self, through: int | None = None) -> None:
        """Commit ``through`` (default: every commit so far) is durable: run the
        actions held for it and for earlier commits, in order."""
        if through is None:
            through = self._written
            self._next = max(self._next, through + 1)  # that commit is over
        self._durable = max(self._durable, through)
        held = self._held
        while held and held[0][0] <= through:
            _, action, _ = held.popleft()
            action()

    def drop(self, from_commit: int | None = None) -> int:
        """Forget the actions held for commit ``from_commit`` and later ones (default:
        every held action); their ``on_drop`` runs. Returns how many were dropped.

        The writes they waited for were rolled back: actions held from now on wait only
        for the commits still kept.
        """
        held = self._held
        dropped: list[_Held] = []
        if from_commit is None:
            dropped.extend(held)
            held.clear()
            self._written = self._durable
        else:
            # Held in order of the commit they wait for: the ones to drop are a tail.
            while held and held[-1][0] >= from_commit:
                dropped.append(held.pop())
            dropped.reverse()
            self._written = max(self._durable, min(self._written, from_commit - 1))
        for _, _, on_drop in dropped:
            if on_drop is not None:
                on_drop()
        return len(dropped)

    def seal(self) -> None:
        """The object is being reset: every action held from now on is dropped (its
        ``on_drop`` runs), whatever the old instance's code still does (a ``finally``
        block, a turn that ran on). The actions already held wait for their commits as
        before."""
        self._failed = True

    def fail(self) -> int:
        """A commit failed: drop every held action, and every action held from now on
        (the object is being reset; its instance saw the failed writes). Returns how
        many were dropped."""
        dropped = self.drop()
        self._failed = True
        return dropped
