"""When every event delivered so far has been handled: what ``TestHost.settle`` waits for.

An object is *at rest* when its mailbox is empty and no turn (nor the turn's storage
commit) is running: it is hibernated, or its live instance is parked waiting for the
next event. Tasks an object started with ``ctx.start_soon`` do not count: they are not
events. The supervisor tells a :class:`RestSignal` each time an object comes to rest,
so that a waiter re-checks :func:`busy_objects` then, instead of polling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, final

import trio

from ._core.lifecycle import ObjectState

if TYPE_CHECKING:
    from ._core.lifecycle import ObjectCore
    from ._ids import ObjectId

__all__ = [
    "Commit",
    "CommitState",
    "Parkable",
    "RestSignal",
    "RestingEntry",
    "busy_objects",
    "committing",
]


class CommitState(Protocol):
    """The runtime's side of an object's storage, as seen here."""

    @property
    def committing(self) -> bool:
        """True while a commit is flushed (in a worker thread, with a durable backend)."""
        ...


class Commit(Protocol):
    """An activation's turn commit, as seen here."""

    @property
    def state(self) -> CommitState: ...


class Parkable(Protocol):
    """An activation, as seen here."""

    @property
    def at_rest(self) -> bool:
        """Parked, waiting for an event (its last turn and commit are over, and no
        connection runs a turn of it)."""
        ...

    @property
    def commit(self) -> Commit | None:
        """Made when the object first uses its storage."""
        ...


class RestingEntry(Protocol):
    """An object the runtime knows, as seen here."""

    @property
    def namespace(self) -> str: ...
    @property
    def object_id(self) -> ObjectId: ...
    @property
    def core(self) -> ObjectCore: ...
    @property
    def activation(self) -> Parkable | None: ...


def busy_objects(entries: Iterable[RestingEntry]) -> list[str]:
    """The objects not at rest (see the module), each as ``"<namespace> <id>: <why>"``.

    Empty when every event delivered to these objects so far has been handled.
    """
    busy = []
    for entry in entries:
        core = entry.core
        activation = entry.activation
        state = core.state
        if core.queued:
            why = f"{core.queued} event(s) queued, {state.value}"
        elif state is ObjectState.LIVE and _committing(activation):
            # Before idle: a parked object's last commit may still be flushing, its
            # replies held by the output gate.
            why = "its storage commit is running"
        elif state is ObjectState.HIBERNATED or (
            state is ObjectState.LIVE and activation is not None and activation.at_rest
        ):
            continue  # at rest
        elif state is ObjectState.LIVE:
            why = "a turn is running"
        else:
            why = state.value  # the constructor runs, or the instance is being dropped
        busy.append(f"{entry.namespace} {entry.object_id}: {why}")
    return busy


def _committing(activation: Parkable | None) -> bool:
    commit = None if activation is None else activation.commit
    return commit is not None and commit.state.committing


def committing(entries: Iterable[RestingEntry]) -> bool:
    """Whether an object's storage commit is running. With a durable backend it runs in
    a worker thread, while every Trio task looks blocked: Trio's autojump clock would
    jump (to the next timeout) unless someone waits with ``wait_all_tasks_blocked``."""
    return any(_committing(entry.activation) for entry in entries)


@final
class RestSignal:
    """Wakes the tasks waiting in :meth:`wait` whenever an object comes to rest."""

    __slots__ = ("_lot",)

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()

    def object_rested(self) -> None:
        """An object parked waiting for an event, or its activation ended. Not a
        checkpoint; cheap when nobody waits."""
        if self._lot:
            self._lot.unpark_all()

    async def wait(self) -> None:
        """Wait until the next :meth:`object_rested` (a checkpoint: it blocks)."""
        await self._lot.park()
