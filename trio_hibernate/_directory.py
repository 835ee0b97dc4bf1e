"""The objects a host knows: their entries by (namespace, id), made on first use and
forgotten when they have nothing left to do."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import attrs

from ._core.lifecycle import ObjectCore, ObjectState
from ._statistics import ObjectStatistics

if TYPE_CHECKING:
    from ._core.events import Event
    from ._ids import ObjectId
    from ._limits import Limits
    from ._object import DurableObject
    from ._storage.alarms import AlarmKey
    from ._storage.settings import SettingsIndex
    from ._supervisor import Activation

__all__ = ["EntryOwner", "ObjectDirectory", "ObjectEntry"]

log = logging.getLogger("trio_hibernate.host")


class EntryOwner(Protocol):
    """What an entry asks of the runtime that keeps it."""

    def deliver(self, entry: ObjectEntry, event: Event) -> None:
        """Queue ``event`` for the object, waking it if it is hibernated."""

    def forget_if_unused(self, entry: ObjectEntry) -> None:
        """Drop the object from memory if it has nothing left to do."""

    def fail_object(self, entry: ObjectEntry, dropped: list[Event], why: str) -> None:
        """The constructor raised, or the object was reset (``why``): answer
        ``dropped``, close the sockets with 1011."""

    def refuse_unrun_event(self, entry: ObjectEntry, event: Event) -> None:
        """Answer an event that will not run (shutdown, or its namespace was removed)."""


@attrs.define(eq=False)
class ObjectEntry:
    """What the runtime keeps for an object it knows (live, or hibernated with sockets).

    It is also the object's address for connections and stubs: :meth:`deliver` queues
    an event for it.
    """

    owner: EntryOwner
    namespace: str
    object_id: ObjectId
    cls: type[DurableObject]
    """The class to construct on the next wake (replaced by live code updates)."""
    core: ObjectCore
    activation: Activation | None = None

    @property
    def alarm_key(self) -> AlarmKey:
        """How the alarm index names this object."""
        return (self.namespace, self.object_id.hex, self.object_id.name)

    def deliver(self, event: Event) -> None:
        """Queue ``event`` for the object, waking it if it is hibernated."""
        self.owner.deliver(self, event)

    def forget_if_unused(self) -> None:
        """Drop the object from memory if it has nothing left to do."""
        self.owner.forget_if_unused(self)

    def fail(self, dropped: list[Event], why: str) -> None:
        """The constructor raised, or the object was reset (see
        :meth:`EntryOwner.fail_object`)."""
        self.owner.fail_object(self, dropped, why)

    def refuse_unrun_event(self, event: Event) -> None:
        """Answer an event that will not run (see :meth:`EntryOwner.refuse_unrun_event`)."""
        self.owner.refuse_unrun_event(self, event)

    def statistics(self) -> ObjectStatistics:
        """The object's state and counts."""
        core = self.core
        return ObjectStatistics(
            state=core.state,
            websockets=len(core.registry),
            queued_events=core.queued,
            activations=core.generation,
        )


#: What an object nobody knows looks like (:meth:`ObjectDirectory.statistics`).
_UNKNOWN: ObjectStatistics = ObjectStatistics(
    state=ObjectState.HIBERNATED, websockets=0, queued_events=0, activations=0
)


class ObjectDirectory:
    """(namespace, id) -> :class:`ObjectEntry`, for the objects a host knows.

    An object is known while it has work (sockets, queued events, an instance). When it
    is forgotten, the settings that must outlive its instances (spec 1: the
    auto-response pair and the event timeout) go to ``settings`` and come back when it
    is known again.
    """

    __slots__ = ("_entries", "_limits", "_owner", "_settings")

    def __init__(self, owner: EntryOwner, limits: Limits, settings: SettingsIndex) -> None:
        self._owner = owner
        self._limits = limits
        self._settings = settings
        self._entries: dict[tuple[str, str], ObjectEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ObjectEntry]:
        """The known entries (a snapshot: the directory may change meanwhile)."""
        return iter(list(self._entries.values()))

    def get(self, namespace: str, object_id: ObjectId) -> ObjectEntry | None:
        """The entry of a known object, or None."""
        return self._entries.get((namespace, object_id.hex))

    def entry(self, namespace: str, object_id: ObjectId, cls: type[DurableObject]) -> ObjectEntry:
        """The entry of an object, made (with its kept settings) if it is not known."""
        key = (namespace, object_id.hex)
        entry = self._entries.get(key)
        if entry is None:
            core = ObjectCore(self._limits)
            try:
                kept = self._settings.take(*key)
            except sqlite3.Error:
                log.exception(
                    "could not read the kept settings of %s %s; they are lost",
                    namespace,
                    object_id,
                )
                kept = None
            if kept is not None:
                core.set_auto_response(kept[0])
                core.set_event_timeout_ms(kept[1])
            entry = ObjectEntry(self._owner, namespace, object_id, cls, core)
            self._entries[key] = entry
        return entry

    def forget_if_unused(self, entry: ObjectEntry) -> None:
        """Drop an object with nothing left to do; keep its settings (see the class)."""
        core = entry.core
        key = (entry.namespace, entry.object_id.hex)
        if core.has_work or self._entries.get(key) is not entry:
            return
        del self._entries[key]
        if core.auto_response is not None or core.event_timeout_ms is not None:
            try:
                self._settings.keep(*key, (core.auto_response, core.event_timeout_ms))
            except sqlite3.Error:  # the temporary directory is full, say: not fatal
                log.exception(
                    "could not keep the auto-response and event timeout of %s %s; they "
                    "are lost (the object must set them again)",
                    entry.namespace,
                    entry.object_id,
                )

    def statistics(self, namespace: str, object_id: ObjectId) -> ObjectStatistics:
        """State and counts of one object (``HIBERNATED`` with zeros if unknown)."""
        entry = self.get(namespace, object_id)
        return _UNKNOWN if entry is None else entry.statistics()

    def counts(self) -> tuple[int, int, int]:
        """(live objects, hibernated objects, accepted WebSockets)."""
        entries = self._entries.values()
        live = sum(1 for e in entries if e.activation is not None)
        return live, len(entries) - live, sum(len(e.core.registry) for e in entries)
