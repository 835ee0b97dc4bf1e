"""Waiting for the one answer to an event (the Trio side of :class:`~._core.events.Reply`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import outcome
import trio

from ._core.events import Reply

__all__ = ["OneShot"]

T = TypeVar("T")


class OneShot(Generic[T]):
    """A task waiting for :attr:`reply` to be answered.

    Once the waiter has stopped waiting (cancelled, timed out), a late answer goes to
    ``on_late`` instead (say, to let go of a WebSocket accepted after a 504), or is
    dropped.
    """

    __slots__ = ("_done", "_on_late", "_result", "_stopped", "reply")

    def __init__(self, on_late: Callable[[outcome.Outcome[T]], None] | None = None) -> None:
        self._done = trio.Event()
        self._result: outcome.Outcome[T] | None = None
        self._stopped = False
        self._on_late = on_late
        self.reply: Reply[T] = Reply(self._settle)
        """Give this to the event; answering it wakes :meth:`wait`."""

    def _settle(self, result: outcome.Outcome[T]) -> None:
        if self._stopped:
            if self._on_late is not None:
                self._on_late(result)
            return
        self._result = result
        self._done.set()

    async def wait(self) -> outcome.Outcome[T]:
        """The answer. A checkpoint. If cancelled, later answers are late (see above)."""
        try:
            await self._done.wait()
        except BaseException:
            self._stopped = True
            result = self._result
            if result is not None and self._on_late is not None:
                # Answered, then cancelled at the checkpoint: the answer is late too.
                self._on_late(result)
            raise
        self._stopped = True
        assert self._result is not None
        return self._result
