"""The idle reaper: hibernates objects that waited ``idle_timeout`` seconds for an event.

One task for the whole host rather than a timer per object: a message then costs its
object no cancel scope (one per idle period was measurable on the echo path). Since every
object has the same ``idle_timeout``, the order in which activations became idle is also
the order in which they expire, so the reaper only ever looks at the oldest one.
"""

from __future__ import annotations

from typing import NoReturn, Protocol, final

import trio

from ._settling import RestSignal

__all__ = ["IdleReaper", "Stoppable"]


class Stoppable(Protocol):
    """An activation, as the reaper sees it."""

    def request_stop(self) -> None:
        """Hibernate as soon as the current turn (if any) is over."""


@final
class IdleReaper:
    """Asks activations idle for ``idle_timeout`` seconds to stop (see the module).

    The supervisor reports :meth:`idle_from` when its object parks waiting for an event
    and :meth:`busy_again` when it wakes up; :meth:`run` is the reaper's task.
    """

    __slots__ = ("_arrived", "_idle", "idle_timeout", "rests")

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        """Seconds an activation may wait for an event before it is stopped."""
        # Idle activations in the order they became idle (dicts keep insertion order).
        self._idle: dict[Stoppable, float] = {}
        self._arrived = trio.Event()
        self.rests = RestSignal()
        """Told (by the supervisors) whenever an object comes to rest: it parked
        waiting for an event, or its activation ended. ``TestHost.settle`` waits on it."""

    def idle_from(self, activation: Stoppable) -> None:
        """``activation`` is idle from now (Trio time): it is stopped after ``idle_timeout``."""
        self._idle[activation] = trio.current_time()
        if len(self._idle) == 1:
            self._arrived.set()

    def busy_again(self, activation: Stoppable) -> None:
        """``activation`` is no longer idle (nothing happens if it was not)."""
        self._idle.pop(activation, None)

    @property
    def idle_count(self) -> int:
        """How many activations are idle now."""
        return len(self._idle)

    async def run(self) -> NoReturn:
        """Stop each activation once it has been idle for ``idle_timeout``, forever."""
        idle = self._idle
        while True:
            if not idle:
                self._arrived = trio.Event()
                await self._arrived.wait()
                continue
            activation, since = next(iter(idle.items()))
            deadline = since + self.idle_timeout
            if trio.current_time() >= deadline:
                del idle[activation]
                activation.request_stop()
            else:
                await trio.sleep_until(deadline)
