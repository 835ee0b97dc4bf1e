"""What cluster mode needs from the host's runtime (met structurally by ``Runtime``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .._app import App
    from .._core.budget import MemoryBudget
    from .._core.directory import ObjectDirectory
    from .._core.events import Event
    from .._directory import ObjectEntry
    from .._ids import ObjectId
    from .._object import DurableObject
    from .._reaper import IdleReaper
    from .._storage.alarms import AlarmScheduler

__all__ = ["ClusterRuntime"]


class ClusterRuntime(Protocol):
    """What a cluster node needs from the runtime it places objects for."""

    @property
    def app(self) -> App: ...
    @property
    def closing(self) -> bool: ...
    @property
    def objects(self) -> ObjectDirectory[ObjectEntry, type[DurableObject]]: ...
    @property
    def alarms(self) -> AlarmScheduler: ...
    @property
    def buffers(self) -> MemoryBudget: ...
    @property
    def reaper(self) -> IdleReaper:
        """Its ``rests`` signal fires whenever an activation ends."""
        ...

    def entry_for(self, namespace: str, object_id: ObjectId) -> ObjectEntry:
        """The entry of an object, made if the runtime does not know it yet."""
        ...

    def deliver(self, entry: ObjectEntry, event: Event) -> None:
        """Queue ``event`` for the object (placed: runs here)."""

    def forget_if_unused(self, entry: ObjectEntry) -> None:
        """Drop an object with nothing left to do from memory."""

    def spawn(self, async_fn: Callable[[], Awaitable[Any]]) -> None:
        """Run ``async_fn`` in the host nursery."""
