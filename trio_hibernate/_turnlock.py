"""The lock an object's turns take (:class:`TurnLock`)."""

from __future__ import annotations

from types import TracebackType
from typing import final

import trio

__all__ = ["TurnLock"]


@final
class TurnLock:
    """An activation's turn lock: a turn and its commit, a background task's transaction,
    a critical section hold it (see ``_activation.py``). As :class:`trio.Lock`: held by
    one task, handed over in FIFO order on release, ``acquire`` a checkpoint.

    Taken and released on every message, so it leaves out what ``trio.Lock`` does there
    that costs: the KeyboardInterrupt protection of each method and the registration of
    the owner as a parking-lot breaker (which wakes the waiters with an error if the
    owner ends without releasing: every holder here releases in a ``finally``). On the
    echo path that was about a tenth of the server's time spent in Python.
    """

    __slots__ = ("_lot", "_owner")

    def __init__(self) -> None:
        self._owner: trio.lowlevel.Task | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        """Whether a task holds the lock."""
        return self._owner is not None

    def acquire_nowait(self) -> None:
        """Take the lock now.

        Raises:
            trio.WouldBlock: it is held, or tasks wait for it.
        """
        if self._owner is not None or self._lot:
            raise trio.WouldBlock
        self._owner = trio.lowlevel.current_task()

    async def acquire(self) -> None:
        """Take the lock, waiting for it if need be (a checkpoint)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._owner is None and not self._lot:
            self._owner = trio.lowlevel.current_task()
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._lot.park()  # release() makes this task the owner

    def release(self) -> None:
        """Give the lock back (to the task that waited longest, if any).

        Raises:
            RuntimeError: the calling task does not hold it.
        """
        if trio.lowlevel.current_task() is not self._owner:
            raise RuntimeError("a turn lock was released by a task that does not hold it")
        if self._lot:
            (self._owner,) = self._lot.unpark(count=1)
        else:
            self._owner = None

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
