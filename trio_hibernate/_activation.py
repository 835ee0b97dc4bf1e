"""An object's live part (:class:`Activation`) and how one turn runs on it (:class:`TurnRunner`).

A turn is one event run against the instance under the activation's turn lock, then the
commit of its writes. The supervisor runs turns in its own task, taking events off the
mailbox. A connection runs a message's turn itself, in its own task, when the object is
live and idle: its supervisor parked, its mailbox empty, its turn lock free (an *inline
turn*). That saves the hand-off to the supervisor's task (a wake-up and a task switch
per message), and changes nothing else:

- the same dispatch (containment, event timeout), commit and output gate;
- the turn holds the turn lock: the supervisor, woken by an event queued meanwhile,
  waits for it, so events keep their order (the socket's next message is read only
  after the turn; events that arrived during it run after it, in order);
- the object is not idle meanwhile: the reaper does not count the time, and
  ``TestHost.settle`` waits for the turn;
- a stop asked for meanwhile (a hook, the event timeout) happens once it is over, as
  after a supervisor turn; the supervisor waits for it before the instance is dropped;
- a cancellation of the activation (a reset, the host's shutdown) cancels it too.

For that last point a connection reads, while it runs inline turns of an activation,
inside a cancel scope it gives the activation (:meth:`TurnRunner.adopt`): the
activation cancels it when it is cancelled, and also when it ends (hibernation). The
connection then reads on outside any scope until it runs an inline turn again. So a
turn costs no cancel scope of its own (entering and leaving one costs about as much as
the hand-off saved), and a hibernated socket holds none (~800 bytes each).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING, final

import trio

from ._containment import abort_ends_here
from ._core.gate import OutputGate
from ._stubs import waiting_turns
from ._turnlock import TurnLock

if TYPE_CHECKING:
    from ._core.events import CallChain, Event, MessageEvent
    from ._core.lifecycle import ObjectCore
    from ._reaper import IdleReaper
    from ._storage.commit import TurnCommit

__all__ = ["Activation", "TurnRunner"]


class Activation:
    """The live part of an object: its scope, wake-up lot, gate, storage, bookkeeping.

    The runtime's handle on a running object (``entry.activation``): it can ask it to
    stop (:meth:`request_stop`), cancel it (:meth:`cancel`) and wait until it has
    (``stopped``).
    """

    __slots__ = (
        "background",
        "blocking",
        "cancelled",
        "commit",
        "gate",
        "idle",
        "inline_running",
        "inline_scopes",
        "inline_waiters",
        "lot",
        "owner",
        "reset_because",
        "runner",
        "scope",
        "stop_requested",
        "stopped",
        "turn_lock",
    )

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        #: :meth:`cancel` was called (``scope.cancel_called`` reads the clock: this is
        #: read on every message).
        self.cancelled = False
        self.lot = trio.lowlevel.ParkingLot()
        self.gate = OutputGate()
        self.commit: TurnCommit | None = None  # made when the storage is first used
        self.turn_lock = TurnLock()  # a turn and its commit, or an outside-turn commit
        self.background = 0  # ctx.start_soon tasks still running
        self.idle = False  # the supervisor is parked, waiting for an event
        #: Runs this activation's turns, once the instance is constructed.
        self.runner: TurnRunner | None = None
        #: A connection runs an inline turn.
        self.inline_running = False
        #: The scopes connections read in while they run inline turns: cancelled with
        #: the activation, and when it ends (see the module).
        self.inline_scopes: set[trio.CancelScope] = set()
        #: Woken when an inline turn ends, once the supervisor waits for one.
        self.inline_waiters: trio.lowlevel.ParkingLot | None = None
        #: The task whose writes belong to the current turn (the supervisor during a
        #: handler, or a start_soon task inside a transaction); others commit at once.
        self.owner: trio.lowlevel.Task | None = None
        self.stop_requested = False  # hibernate after the current turn
        self.stopped = trio.Event()
        #: Critical sections of ctx.start_soon tasks holding or waiting for the object:
        #: a stop waits for them (an object is not evicted mid-section).
        self.blocking = 0
        #: Why the object is being reset (ctx.abort, a failed critical section), or None.
        self.reset_because: str | None = None

    @property
    def at_rest(self) -> bool:
        """Parked, waiting for an event: no turn runs, in the supervisor or inline."""
        return self.idle and not self.inline_running

    def request_stop(self) -> None:
        """Hibernate as soon as the current turn (if any) is over.

        Graceful: nothing is cancelled (a cancellation could interrupt a turn or its
        commit); an idle supervisor is woken up to notice.
        """
        self.stop_requested = True
        self.lot.unpark_all()

    def cancel(self) -> None:
        """Cancel the activation: its supervisor, its tasks and an inline turn."""
        self.cancelled = True
        self.scope.cancel()
        self.let_connections_go()

    def let_connections_go(self) -> None:
        """Cancel the scopes connections read in for this activation: an inline turn
        running in one is cancelled; the others read on without a scope."""
        scopes, self.inline_scopes = self.inline_scopes, set()
        for scope in scopes:
            scope.cancel()

    def is_reset(self) -> bool:
        """Whether the object is being reset (a method: the answer changes across awaits)."""
        return self.reset_because is not None

    def reset(self, why: str) -> None:
        """Reset the object (see :mod:`._critical`): no event runs on this instance
        again; the first reason given is kept."""
        if self.reset_because is None:
            self.reset_because = why
        self.gate.seal()  # nothing the old instance still does may reach a client
        self.request_stop()

    async def inline_turn_over(self) -> None:
        """Wait until no inline turn runs (shielded: the instance must not be dropped
        under a turn; a cancelled activation has cancelled the turn too)."""
        if self.inline_running:
            waiters = self.inline_waiters = trio.lowlevel.ParkingLot()
            with trio.CancelScope(shield=True):
                while self.inline_running:
                    await waiters.park()


@final
class TurnRunner:
    """Runs turns of one activation: for its supervisor (:meth:`run`) and for
    connections (:meth:`can_run_inline`, :meth:`run_inline`). See the module."""

    __slots__ = ("_activation", "_chain", "_core", "_dispatch", "_reaper", "_strict", "_turn_took")

    def __init__(
        self,
        activation: Activation,
        dispatch: Callable[[Event], Awaitable[None]],
        core: ObjectCore,
        reaper: IdleReaper,
        chain: CallChain,
        strict: Callable[[], bool],
        turn_took: Callable[[float], None],
    ) -> None:
        self._activation = activation
        self._dispatch = dispatch
        self._core = core
        self._reaper = reaper
        self._chain = chain  # the object itself: what a turn's stub calls wait through
        #: Whether the host hibernates after every event (then the supervisor runs
        #: every turn: it stops after it).
        self._strict = strict
        self._turn_took = turn_took  # the host's turn-duration histogram (/_metrics)

    async def run(self, event: Event) -> None:
        """Run ``event`` and commit its writes (the caller holds the turn lock)."""
        activation = self._activation
        started = perf_counter()
        activation.owner = trio.lowlevel.current_task()
        try:
            with abort_ends_here:
                await self._dispatch(event)
        finally:
            activation.owner = None
            commit = activation.commit
            if commit is not None:
                if not activation.is_reset():
                    await commit.end_turn()
                else:
                    commit.abandon()  # a reset: the turn's writes are not kept
        self._turn_took(perf_counter() - started)  # the handler and its commit

    def can_run_inline(self) -> bool:
        """Whether a connection may run a message's turn now (see the module). Not
        when a stop is asked for, the activation is cancelled, or anything waits."""
        activation = self._activation
        return (
            activation.idle
            and not activation.inline_running
            and not activation.stop_requested
            and not self._core.queued
            and not activation.turn_lock.locked()
            and not activation.cancelled
            and not self._strict()
        )

    def adopt(self, scope: trio.CancelScope) -> None:
        """A connection reads in ``scope`` to run this activation's turns: cancel it
        with the activation, or when it ends (at once if it already has)."""
        activation = self._activation
        if activation.cancelled or activation.runner is not self:  # it ended
            scope.cancel()
        else:
            activation.inline_scopes.add(scope)

    def disown(self, scope: trio.CancelScope) -> None:
        """The connection left ``scope`` (its socket ended, or it was cancelled)."""
        self._activation.inline_scopes.discard(scope)

    async def run_inline(self, event: MessageEvent) -> None:
        """Run ``event``'s turn in the calling (connection) task, which checked
        :meth:`can_run_inline` just before, inside a scope given to :meth:`adopt`."""
        activation = self._activation
        lock = activation.turn_lock
        lock.acquire_nowait()
        activation.inline_running = True
        reaper = self._reaper
        reaper.busy_again(activation)
        token = waiting_turns.set(self._chain)
        try:
            await self.run(event)
        finally:
            waiting_turns.reset(token)
            activation.inline_running = False
            lock.release()
            if activation.inline_waiters is not None:
                activation.inline_waiters.unpark_all()
            if activation.stop_requested:
                activation.lot.unpark_all()  # the event timeout asked for it: stop now
            elif activation.idle and not activation.background:
                reaper.idle_from(activation)  # idle again, from now
            reaper.rests.object_rested()
