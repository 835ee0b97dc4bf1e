"""Statistics of a host: the counters it keeps, and the snapshots it hands out."""

from __future__ import annotations

import attrs

from ._core.lifecycle import ObjectState

__all__ = ["Counters", "HostStatistics", "ObjectStatistics"]


@attrs.define(kw_only=True, slots=True)
class Counters:
    """What a host counted so far; its parts add to these as things happen.

    One object for every module (supervisors, connections, the storage commit) instead
    of counters written on the host itself. :meth:`Host.statistics` reads them.
    """

    wakes: int = 0
    """Instances constructed."""
    hibernations: int = 0
    """Instances dropped (idle, hook, strict mode, timeout, shutdown)."""
    auto_responses: int = 0
    """Auto-responses served without waking an object."""
    seconds_in_memory: float = 0.0
    """Trio-clock seconds instances spent in memory (finished activations)."""
    storage_commits: int = 0
    """Storage commits that succeeded."""
    bad_requests: int = 0
    """Requests refused as malformed (4xx)."""
    internal_errors: int = 0
    """Connections ended by an error of ours."""

    def woke(self) -> None:
        """An instance was constructed."""
        self.wakes += 1

    def hibernated(self) -> None:
        """An instance began to be dropped."""
        self.hibernations += 1

    def spent_in_memory(self, seconds: float) -> None:
        """An activation ended after ``seconds`` (Trio clock) in memory."""
        self.seconds_in_memory += seconds

    def auto_responded(self) -> None:
        """An auto-response was served without waking its object."""
        self.auto_responses += 1

    def committed(self) -> None:
        """A storage commit succeeded."""
        self.storage_commits += 1

    def bad_request(self) -> None:
        """A request was refused as malformed (4xx)."""
        self.bad_requests += 1

    def internal_error(self) -> None:
        """A connection was ended by an error of ours."""
        self.internal_errors += 1


@attrs.frozen(kw_only=True)
class HostStatistics:
    """A snapshot of a host (see :meth:`Host.statistics`)."""

    live_objects: int
    """Objects with an instance in memory."""
    hibernated_objects: int
    """Objects with connected WebSockets and no instance."""
    websockets: int
    """Accepted WebSockets, whether their object is live or hibernated."""
    connections: int
    """Open client connections (including ones still in the HTTP phase)."""
    wakes: int
    """Instances constructed so far."""
    hibernations: int
    """Instances dropped so far (idle, hook, strict mode, timeout, shutdown)."""
    auto_responses: int
    """Auto-responses served by the runtime without waking an object."""
    seconds_in_memory: float
    """Total (Trio clock) seconds that instances spent in memory, finished activations."""
    storage_commits: int
    """Storage commits that succeeded."""
    buffered_bytes: int
    """Bytes held for clients now: messages being received or queued, request bodies,
    outbound buffers (bounded by ``Limits.max_buffered_bytes``)."""
    bad_requests: int
    """Requests refused because they were malformed (400, 413, 431)."""
    internal_errors: int
    """Connections ended by an error of ours (answered 500 or closed 1011, and logged
    with a traceback)."""


@attrs.frozen(kw_only=True)
class ObjectStatistics:
    """A snapshot of one object (see :meth:`Host.object_statistics`)."""

    state: ObjectState
    """``HIBERNATED``, ``STARTING``, ``LIVE`` or ``STOPPING``."""
    websockets: int
    """Accepted WebSockets still listed by ``get_websockets()``."""
    queued_events: int
    """Events waiting for the object."""
    activations: int
    """Times the object's constructor has completed."""
