"""Critical sections and resets: ``ctx.block_concurrency_while`` and ``ctx.abort``.

The rules, as on Cloudflare (``blockConcurrencyWhile``, ``abort``) unless said otherwise:

1. **No other event runs during a critical section.** ``block_concurrency_while(fn)``
   runs ``fn()`` holding the object: events arriving meanwhile (messages, closes,
   fetches, calls, alarms) queue, and run in arrival order once it returns.

   - In a turn (a handler, or a task the turn waits for) it runs within the turn, whose
     commit covers its writes.
   - In a ``ctx.start_soon`` task it takes the object's turn lock, as a background
     transaction does: it waits for the current turn, no turn starts until it is over,
     and its writes are committed when it ends (a failed commit raises to the task).
   - In the constructor (which cannot await) it is scheduled: the supervisor runs the
     constructor's sections in order, holding the object, and commits their writes,
     before the first event is dispatched. The awaitable it returns there gives the
     section's result once it has run (a handler may await it; the constructor cannot).

2. **A time limit of 30 s** (:data:`BLOCK_CONCURRENCY_TIMEOUT_SECONDS`, Cloudflare's):
   past it ``fn`` is cancelled and :class:`TimeoutError` raised, and the object is reset.
3. **A section that raises resets the object** (rule 5), and the exception propagates to
   whoever awaited ``block_concurrency_while`` (catching it there does not undo the
   reset; catch inside ``fn`` to avoid it). In the constructor it is a failed
   constructor: the exception is logged.
4. **``ctx.abort(reason)`` resets the object at once**: the reason is logged, the
   object's tasks (the running turn, ``ctx.start_soon`` tasks, sections) are cancelled,
   and the caller is unwound by :class:`~._errors.ObjectAborted`, which application code
   cannot usefully catch. The in-flight event fails: a fetch gets 500, a stub call an
   error, an alarm is retried.
5. **A reset** drops the instance: no event runs on it again. The writes not yet
   committed are rolled back and the messages the output gate holds are dropped;
   queued events are answered with an error (a fetch 500, a stub call an error, an
   alarm retried later) and the object's WebSockets are closed with 1011, as for a
   constructor that raises (spec 9). The next event constructs a new instance.
   (workerd drops a reset object's hibernatable WebSockets without a Close frame.)
6. **An object is not evicted in the middle of a critical section**: an idle object
   with a ``ctx.start_soon`` task never expires, and an eviction asked for while a
   task's section holds (or waits for) the object waits for the section to end.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, Protocol, TypeVar, final

import trio

from ._containment import Containment, abort_ends_here
from ._errors import ObjectAborted

if TYPE_CHECKING:
    from ._containment import ObjectLog
    from ._storage.commit import TurnCommit
    from ._turnlock import TurnLock

__all__ = ["BLOCK_CONCURRENCY_TIMEOUT_SECONDS", "CriticalSections", "Holder"]

T = TypeVar("T")

#: How long a critical section may run before it is cancelled (Cloudflare: 30 s).
BLOCK_CONCURRENCY_TIMEOUT_SECONDS: Final = 30.0

_ABORT_DEFAULT: Final = "Application called abort() to reset the object."


class Holder(Protocol):
    """The activation whose object the sections hold."""

    turn_lock: TurnLock
    owner: trio.lowlevel.Task | None
    commit: TurnCommit | None
    blocking: int
    stopped: trio.Event
    reset_because: str | None

    def reset(self, why: str) -> None:
        """Reset the object: no event runs on this instance again (rule 5)."""

    def cancel(self) -> None:
        """Cancel the activation's tasks, and the turn it runs (in any task)."""


@final
class _Scheduled(Generic[T]):
    """A section the constructor scheduled; awaiting it gives its result once run."""

    __slots__ = ("async_fn", "done", "value")

    def __init__(self, async_fn: Callable[[], Awaitable[T]]) -> None:
        self.async_fn = async_fn
        self.done = False
        self.value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        if not self.done:
            raise RuntimeError(
                "a block_concurrency_while() called in the constructor runs after the "
                "constructor returns, before the first event; await it from a handler"
            )
        yield from ()  # a generator that never suspends: __await__ returns an iterator
        return self.value  # type: ignore[return-value]  # a T once done


@final
class CriticalSections:
    """The critical sections and the reset of one activation (see the module).

    Args:
        activation: the activation (its turn lock, owner, scope, commit).
        label: the object, as messages name it (``"<namespace> <id>"``).
        holds: whether the current task holds the object (a turn, or a task it waits for).
        holding: entered around a task's section, which holds the object as a turn does.
        log: the object's logger.
    """

    __slots__ = ("_activation", "_holding", "_holds", "_label", "_log", "_startup", "constructing")

    def __init__(
        self,
        activation: Holder,
        *,
        label: str,
        holds: Callable[[], bool],
        holding: Callable[[], AbstractContextManager[object]],
        log: ObjectLog,
    ) -> None:
        self._activation = activation
        self._label = label
        self._holds = holds
        self._holding = holding
        self._log = log
        self._startup: list[_Scheduled[Any]] = []
        self.constructing = False
        """True while the constructor runs: sections are scheduled, not run."""

    # -- ctx.block_concurrency_while -----------------------------------------------------

    def block(self, async_fn: Callable[[], Awaitable[T]], /) -> Awaitable[T]:
        """``ctx.block_concurrency_while(async_fn)`` (rule 1)."""
        given: object = async_fn
        if not callable(given):
            if inspect.iscoroutine(given):
                given.close()  # never awaited: no warning about it on top of this error
            raise TypeError(
                "block_concurrency_while() takes an async function to call with no "
                f"arguments (pass self.load, not self.load()), got {async_fn!r}"
            )
        if self.constructing:
            scheduled = _Scheduled(async_fn)
            self._startup.append(scheduled)
            return scheduled
        return self._run(async_fn)

    async def _run(self, async_fn: Callable[[], Awaitable[T]]) -> T:
        if self._holds():
            await trio.lowlevel.checkpoint()  # as the lock's acquire is, below
            return await self._section(async_fn)
        activation = self._activation
        activation.blocking += 1  # an eviction now waits for this section (rule 6)
        try:
            async with activation.turn_lock:
                activation.owner = trio.lowlevel.current_task()
                try:
                    with self._holding():
                        result = await self._section(async_fn)
                finally:
                    activation.owner = None
                if activation.commit is not None and activation.reset_because is None:
                    await activation.commit.commit()
                return result
        finally:
            activation.blocking -= 1

    async def _section(self, async_fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``async_fn`` under the time limit (rule 2); reset the object if it fails."""
        try:
            with trio.move_on_after(BLOCK_CONCURRENCY_TIMEOUT_SECONDS):
                return await async_fn()
        except Exception as exc:
            self._reset(f"block_concurrency_while() raised {exc!r}")
            raise
        why = (
            f"block_concurrency_while() in {self._label} ran longer than "
            f"{BLOCK_CONCURRENCY_TIMEOUT_SECONDS:g} s (Cloudflare's limit): it was "
            "cancelled and the object is reset"
        )
        self._reset(why)
        raise TimeoutError(why)

    async def run_startup(self) -> str | None:
        """Run the sections the constructor scheduled, in order, holding the object, and
        commit their writes (rule 1). Returns None, or why the object must be reset:
        then what failed is logged and the writes are rolled back."""
        if not self._startup:
            return None
        activation = self._activation
        startup, self._startup = self._startup, []
        async with activation.turn_lock:
            activation.owner = trio.lowlevel.current_task()
            try:
                with (
                    Containment(
                        self._log,
                        "block_concurrency_while() in the constructor of %s failed; "
                        "closing its WebSockets with 1011",
                        self._label,
                    ),
                    abort_ends_here,
                ):
                    for scheduled in startup:
                        scheduled.value = await self._section(scheduled.async_fn)
                        scheduled.done = True
            finally:
                activation.owner = None
            commit = activation.commit
            why = activation.reset_because  # set by a failed section, or ctx.abort()
            if commit is not None:
                if why is None:
                    await commit.end_turn()
                else:
                    commit.abandon()
        return why

    # -- resets --------------------------------------------------------------------------

    def _reset(self, why: str) -> None:
        activation = self._activation
        activation.reset(why)
        if activation.commit is not None:
            activation.commit.abandon()

    def abort(self, reason: str | None = None) -> NoReturn:
        """``ctx.abort(reason)`` (rule 4)."""
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"abort() takes a str reason (or None), not {reason!r}")
        activation = self._activation
        if activation.stopped.is_set():
            raise RuntimeError(
                f"ctx.abort() on {self._label} after its instance was dropped: a context "
                "resets only its own live instance"
            )
        text = reason if reason is not None else _ABORT_DEFAULT
        self._log.error("%s reset by ctx.abort(): %s", self._label, text)
        self._reset(f"ctx.abort(): {text}")
        if not self.constructing:
            activation.cancel()  # the running turn and the object's tasks fail
        raise ObjectAborted(text)
