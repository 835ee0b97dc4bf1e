"""The sockets accepted by one object, indexed by tag. Plain Python: no Trio, no clock.

A :class:`SocketRecord` is everything about an accepted socket that survives hibernation:
its tags, attachment, URL, the "object already called close()" flag and its auto-response
timestamp. The registry outlives every instance of the object; the Python ``WebSocket``
handles that object code sees are made per activation (see ``_websocket.py``).

Invariants (checked by :meth:`SocketRegistry.check_valid` in the state-machine tests):

* a record is in ``_by_tag[t]`` exactly when it is registered and carries tag ``t``;
* no tag index is empty; the registry holds at most ``limits.max_websockets_per_object``.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Protocol

import attrs

from .._errors import LimitExceededError
from .._limits import Limits

__all__ = ["ReadyState", "SocketRecord", "SocketRegistry", "Transport", "normalize_tags"]


class ReadyState(IntEnum):
    """WebSocket ``readyState`` values, as in the browser API."""

    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class Transport(Protocol):
    """What the core needs from a connection. Every call is synchronous and never blocks.

    ``send_message`` queues a data message; ``start_close`` sends the object's Close
    frame; ``begin_shutdown`` closes without any handler running (host shutdown, broken
    object); ``resume_reading`` says the object caught up with this socket's messages.
    """

    def send_message(self, data: str | bytes) -> None: ...

    def start_close(self, code: int | None, reason: str) -> None: ...

    def begin_shutdown(self, code: int, reason: str) -> None: ...

    def resume_reading(self) -> None: ...


@attrs.define(eq=False, slots=True)
class SocketRecord:
    """One accepted WebSocket, as the runtime remembers it across hibernation."""

    transport: Transport
    tags: tuple[str, ...]
    url: str
    attachment: bytes | None = None
    #: The object called ``close()``; ``send()`` now raises (workerd keeps this flag too).
    server_closed: bool = False
    #: The terminal event (close or error) is known; the socket is still listed until the
    #: object's handler for it has run.
    peer_closed: bool = False
    #: The terminal event has been dispatched; the record is out of the registry.
    released: bool = False
    #: Wall-clock seconds of the latest auto-response match, or None.
    auto_response_at: float | None = None
    #: Inbound messages of this socket queued for the object (backpressure).
    queued: int = 0
    #: Their size in bytes (UTF-8 for text).
    queued_bytes: int = 0
    #: The connection stopped reading until the object catches up (see ``queued``).
    reading_paused: bool = False

    @property
    def ready_state(self) -> ReadyState:
        """``OPEN`` until either side starts closing; ``CLOSED`` when both sides are done."""
        if self.released or self.peer_closed:
            # The runtime echoes the peer's Close before the handler runs (spec 7, Rule),
            # so inside ``websocket_close`` both directions are already closed.
            return ReadyState.CLOSED
        if self.server_closed:
            return ReadyState.CLOSING
        return ReadyState.OPEN


def normalize_tags(tags: Iterable[str], limits: Limits) -> tuple[str, ...]:
    """Validate tags and collapse duplicates, keeping first-occurrence order.

    The checks run per element in workerd's order: first the count (once
    ``max_tags_per_websocket`` distinct tags are collected, any further element fails, even a
    duplicate), then the length in UTF-8 bytes.

    Raises:
        TypeError: ``tags`` is a string (a common slip for ``[tag]``) or holds a non-string.
        LimitExceededError: too many tags, or a tag too long.
    """
    if isinstance(tags, str | bytes):
        raise TypeError(f"tags must be an iterable of strings, not a single string: {tags!r}")
    seen: dict[str, None] = {}
    limit = limits.max_tags_per_websocket
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError(f"every tag must be a str, got {type(tag).__name__}: {tag!r}")
        if len(seen) >= limit:
            raise LimitExceededError(
                f"a Hibernatable WebSocket cannot have more than {limit} tags; tag "
                f"{len(seen) + 1} was {tag!r} (Limits.max_tags_per_websocket)",
                limit_name="max_tags_per_websocket",
                limit=limit,
                value=len(seen) + 1,
            )
        size = len(tag.encode("utf-8"))
        if size > limits.max_tag_bytes:
            raise LimitExceededError(
                f'"{tag}" is longer than the max tag length ({limits.max_tag_bytes} bytes '
                f"when UTF-8 encoded; it is {size}; Limits.max_tag_bytes)",
                limit_name="max_tag_bytes",
                limit=limits.max_tag_bytes,
                value=size,
            )
        seen[tag] = None
    return tuple(seen)


class SocketRegistry:
    """The accepted sockets of one object, in acceptance order, indexed by tag."""

    __slots__ = ("_all", "_by_tag", "_limits")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        # dicts as ordered sets: O(1) add and remove, acceptance order kept.
        self._all: dict[SocketRecord, None] = {}
        self._by_tag: dict[str, dict[SocketRecord, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, record: object) -> bool:
        return record in self._all

    def check_capacity(self) -> None:
        """Raise :class:`LimitExceededError` if one more socket would be over the limit."""
        limit = self._limits.max_websockets_per_object
        if len(self._all) >= limit:
            raise LimitExceededError(
                f"only {limit} websockets can be accepted on a single Durable Object "
                f"instance; this would be number {len(self._all) + 1} "
                f"(Limits.max_websockets_per_object)",
                limit_name="max_websockets_per_object",
                limit=limit,
                value=len(self._all) + 1,
            )

    def add(self, record: SocketRecord) -> None:
        """Register ``record``. Raises :class:`LimitExceededError` when full."""
        self.check_capacity()
        self._all[record] = None
        for tag in record.tags:
            self._by_tag.setdefault(tag, {})[record] = None

    def remove(self, record: SocketRecord) -> None:
        """Unregister ``record`` (idempotent)."""
        if self._all.pop(record, 0) is None:
            for tag in record.tags:
                members = self._by_tag[tag]
                del members[record]
                if not members:
                    del self._by_tag[tag]

    def sockets(self, tag: str | None = None) -> list[SocketRecord]:
        """Registered sockets: all of them newest first, or those carrying ``tag``
        oldest first (workerd's orders, checked by the conformance suite)."""
        if tag is None:
            return list(reversed(self._all))
        members = self._by_tag.get(tag)
        return list(members) if members else []

    def check_valid(self) -> None:
        """Assert the invariants in the module docstring (for tests)."""
        assert len(self._all) <= self._limits.max_websockets_per_object
        for tag, members in self._by_tag.items():
            assert members, f"empty index for tag {tag!r}"
            for record in members:
                assert record in self._all
                assert tag in record.tags
        for record in self._all:
            for tag in record.tags:
                assert record in self._by_tag[tag]
