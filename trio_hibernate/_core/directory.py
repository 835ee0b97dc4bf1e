"""The objects a host knows: (namespace, id) -> entry. Plain Python.

An object is known while it has work (sockets, queued events, an instance: see
``ObjectCore.has_work``); then it is forgotten, whole. The settings that must outlive its
instances (spec 1: the auto-response pair and the event timeout) are handed to a
:class:`KeptSettings` store when it is forgotten and taken back when it is known again,
so an object visited once costs the directory nothing afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from .._statistics import ObjectStatistics
from .lifecycle import ObjectCore, ObjectState

if TYPE_CHECKING:
    from .._autoresponse import WebSocketRequestResponsePair
    from .._ids import ObjectId
    from .._limits import Limits

__all__ = ["DirectoryEntry", "KeptSettings", "ObjectDirectory", "Settings"]

#: An object's settings that outlive its instances: (auto-response pair, event timeout).
Settings = tuple["WebSocketRequestResponsePair | None", "int | None"]


class KeptSettings(Protocol):
    """Where the settings of forgotten objects go. Neither method raises: a store that
    fails reports it itself (the settings are lost, the object goes on)."""

    def keep(self, namespace: str, hex_id: str, settings: Settings) -> None:
        """Keep the settings of a forgotten object."""

    def take(self, namespace: str, hex_id: str) -> Settings | None:
        """Take back (and forget) what was kept for an object, if anything."""
        ...


class DirectoryEntry(Protocol):
    """What the directory needs of an entry."""

    @property
    def namespace(self) -> str: ...
    @property
    def object_id(self) -> ObjectId: ...
    @property
    def core(self) -> ObjectCore: ...
    @property
    def activation(self) -> object | None:
        """The live instance's activation, or None when the object is hibernated."""
        ...


E = TypeVar("E", bound=DirectoryEntry)
C = TypeVar("C")

#: What an object nobody knows looks like (:meth:`ObjectDirectory.statistics`).
_UNKNOWN = ObjectStatistics(
    state=ObjectState.HIBERNATED, websockets=0, queued_events=0, activations=0
)


class ObjectDirectory(Generic[E, C]):
    """(namespace, id) -> entry (``E``), for the objects a host knows.

    ``make_entry(namespace, object_id, cls, core)`` makes the entry of an object that
    becomes known (``cls``: its class, ``C``, opaque here).
    """

    __slots__ = ("_entries", "_limits", "_make_entry", "_settings")

    def __init__(
        self,
        make_entry: Callable[[str, ObjectId, C, ObjectCore], E],
        limits: Limits,
        settings: KeptSettings,
    ) -> None:
        self._make_entry = make_entry
        self._limits = limits
        self._settings = settings
        self._entries: dict[tuple[str, str], E] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[E]:
        """The known entries (a snapshot: the directory may change meanwhile)."""
        return iter(list(self._entries.values()))

    def get(self, namespace: str, object_id: ObjectId) -> E | None:
        """The entry of a known object, or None."""
        return self._entries.get((namespace, object_id.hex))

    def entry(self, namespace: str, object_id: ObjectId, cls: C) -> E:
        """The entry of an object, made (with its kept settings) if it is not known."""
        key = (namespace, object_id.hex)
        entry = self._entries.get(key)
        if entry is None:
            core = ObjectCore(self._limits)
            kept = self._settings.take(*key)
            if kept is not None:
                core.set_auto_response(kept[0])
                core.set_event_timeout_ms(kept[1])
            entry = self._make_entry(namespace, object_id, cls, core)
            self._entries[key] = entry
        return entry

    def forget_if_unused(self, entry: E) -> bool:
        """Drop an object with nothing left to do; keep its settings (see the module).
        Returns whether it was dropped."""
        core = entry.core
        key = (entry.namespace, entry.object_id.hex)
        if core.has_work or self._entries.get(key) is not entry:
            return False
        del self._entries[key]
        if core.auto_response is not None or core.event_timeout_ms is not None:
            self._settings.keep(*key, (core.auto_response, core.event_timeout_ms))
        return True

    def statistics(self, namespace: str, object_id: ObjectId) -> ObjectStatistics:
        """State and counts of one object (``HIBERNATED`` with zeros if unknown)."""
        entry = self.get(namespace, object_id)
        if entry is None:
            return _UNKNOWN
        core = entry.core
        return ObjectStatistics(
            state=core.state,
            websockets=len(core.registry),
            queued_events=core.queued,
            activations=core.generation,
        )

    def counts(self) -> tuple[int, int, int]:
        """(live objects, hibernated objects, accepted WebSockets)."""
        entries = self._entries.values()
        live = sum(1 for e in entries if e.activation is not None)
        return live, len(entries) - live, sum(len(e.core.registry) for e in entries)
