"""What the runtime keeps for an object it knows (:class:`ObjectEntry`, the object's
address), and where the settings of forgotten objects go (:class:`LoggedSettings`).
The table of entries is ``_core/directory.py``."""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING, Protocol

import attrs

from ._core.directory import Settings
from ._storage.settings import SettingsIndex

if TYPE_CHECKING:
    from ._activation import Activation, TurnRunner
    from ._core.events import Event
    from ._core.lifecycle import ObjectCore
    from ._ids import ObjectId
    from ._object import DurableObject
    from ._storage.alarms import AlarmKey

__all__ = ["EntryOwner", "LoggedSettings", "ObjectEntry"]

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
    placed: int | None = None
    """Cluster mode: the epoch under which this host owns the object, None while it has
    not claimed it (events then go through the cluster's placement first)."""

    @property
    def alarm_key(self) -> AlarmKey:
        """How the alarm index names this object."""
        return (self.namespace, self.object_id.hex, self.object_id.name)

    def deliver(self, event: Event) -> None:
        """Queue ``event`` for the object, waking it if it is hibernated."""
        self.owner.deliver(self, event)

    def inline_turns(self) -> TurnRunner | None:
        """What runs a message's turn in a connection's own task, when the live
        instance can take one now (see ``_activation.py``); None: deliver it."""
        activation = self.activation
        if activation is None:
            return None
        runner = activation.runner
        if runner is None or not runner.can_run_inline():
            return None
        return runner

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


class LoggedSettings:
    """The settings index as the directory's ``KeptSettings``: a failure of the
    temporary SQLite file (the disk is full, say) is logged, not raised: the settings are
    lost, the object goes on (it must set them again)."""

    __slots__ = ("_index",)

    def __init__(self, index: SettingsIndex) -> None:
        self._index = index

    def keep(self, namespace: str, hex_id: str, settings: Settings) -> None:
        """Keep the settings of a forgotten object (see ``SettingsIndex.keep``)."""
        try:
            self._index.keep(namespace, hex_id, settings)
        except sqlite3.Error:
            log.exception(
                "could not keep the auto-response and event timeout of %s %s; they are "
                "lost (the object must set them again)",
                namespace,
                hex_id,
            )

    def take(self, namespace: str, hex_id: str) -> Settings | None:
        """Take back what was kept for an object (see ``SettingsIndex.take``)."""
        try:
            return self._index.take(namespace, hex_id)
        except sqlite3.Error:
            log.exception(
                "could not read the kept settings of %s %s; they are lost", namespace, hex_id
            )
            return None
