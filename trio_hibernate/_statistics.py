"""Statistics of a host: the counters it keeps, and the snapshots it hands out.

The counters are plain ints that the host's parts add to as things happen (a message is
one ``+= 1``, no lock: everything runs in the Trio thread); ``/_metrics`` reads them
when it is scraped (see ``_net/operations.py``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from typing import Final, Protocol

import attrs

from ._core.lifecycle import ObjectState

__all__ = ["TURN_SECONDS_BUCKETS", "AlarmCounts", "Counters", "HostStatistics", "ObjectStatistics"]

#: Upper bounds (seconds, inclusive) of the turn-duration histogram; a last bucket
#: (``+Inf``) takes the rest. From 50 us (an echo) to 10 s (a handler that waits).
TURN_SECONDS_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)


class AlarmCounts(Protocol):
    """What the alarm scheduler counted (``_storage/alarms.py``)."""

    fired: int
    retried: int
    given_up: int

    def __len__(self) -> int:
        """Alarms pending."""
        ...


def _empty_buckets() -> list[int]:
    return [0] * (len(TURN_SECONDS_BUCKETS) + 1)


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
    messages_in: int = 0
    """Data messages handed to ``websocket_message`` (hot path: added to directly)."""
    messages_out: int = 0
    """Data messages queued for clients (hot path: added to directly)."""
    handler_errors: dict[str, int] = attrs.Factory(dict)
    """Application code that raised, by hook (``websocket_message``, ``App.fetch``...)."""
    refusals: dict[str, int] = attrs.Factory(dict)
    """Clients refused before reaching an object, by cause (``origin``...)."""
    turn_buckets: list[int] = attrs.Factory(_empty_buckets)
    """Turns by duration: one count per :data:`TURN_SECONDS_BUCKETS` bound, then +Inf
    (not cumulative)."""
    turn_seconds: float = 0.0
    """Seconds that turns took, added up."""
    storage_failure: str | None = None
    """Why the last storage operation failed, until a commit succeeds again."""
    relayed: int = 0
    """Requests, WebSockets and stub calls peer hosts relayed here (cluster mode)."""

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
        """A storage commit succeeded: the storage works again (clears the failure)."""
        self.storage_commits += 1
        self.storage_failure = None

    def storage_failed(self, why: str) -> None:
        """A storage commit, or opening an object's database, failed (``why``)."""
        self.storage_failure = why

    def handler_error(self, hook: str) -> None:
        """Application code raised (or returned what it may not) in ``hook``."""
        self.handler_errors[hook] = self.handler_errors.get(hook, 0) + 1

    def refused(self, cause: str) -> None:
        """A client was refused before reaching an object, because of ``cause``."""
        self.refusals[cause] = self.refusals.get(cause, 0) + 1

    def turn_took(self, seconds: float) -> None:
        """A turn (one event run against an object) took ``seconds``."""
        self.turn_buckets[bisect_left(TURN_SECONDS_BUCKETS, seconds)] += 1
        self.turn_seconds += seconds

    def snapshot(
        self,
        *,
        live_objects: int,
        hibernated_objects: int,
        websockets: int,
        connections: int,
        buffered_bytes: int,
        alarms: AlarmCounts,
    ) -> HostStatistics:
        """These counts, and the gauges given, as a :class:`HostStatistics`."""
        cumulative = []
        total = 0
        bounds = (*TURN_SECONDS_BUCKETS, float("inf"))
        for bound, count in zip(bounds, self.turn_buckets, strict=True):
            total += count
            cumulative.append((bound, total))
        return HostStatistics(
            live_objects=live_objects,
            hibernated_objects=hibernated_objects,
            websockets=websockets,
            connections=connections,
            wakes=self.wakes,
            hibernations=self.hibernations,
            auto_responses=self.auto_responses,
            seconds_in_memory=self.seconds_in_memory,
            storage_commits=self.storage_commits,
            buffered_bytes=buffered_bytes,
            bad_requests=self.bad_requests,
            internal_errors=self.internal_errors,
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            handler_errors=dict(self.handler_errors),
            refusals=dict(self.refusals),
            alarms_pending=len(alarms),
            alarms_fired=alarms.fired,
            alarms_retried=alarms.retried,
            alarms_given_up=alarms.given_up,
            turns=total,
            turn_seconds=self.turn_seconds,
            turn_seconds_buckets=tuple(cumulative),
            storage_failure=self.storage_failure,
            relayed=self.relayed,
        )

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
    messages_in: int
    """Data messages handed to ``websocket_message`` handlers (auto-responses are in
    :attr:`auto_responses` instead)."""
    messages_out: int
    """Data messages queued for clients (sends, broadcast deliveries, auto-response
    replies)."""
    handler_errors: Mapping[str, int]
    """Application code that raised (logged with a traceback), by hook:
    ``websocket_message``, ``websocket_close``, ``websocket_error``, ``fetch``,
    ``alarm``, ``constructor``, ``start_soon``, ``App.authorize``, ``App.fetch``."""
    refusals: Mapping[str, int]
    """Clients refused before reaching an object, by cause: ``connection_limit`` (503,
    ``max_connections``), ``websocket_limit`` (503, ``max_websockets_per_object``),
    ``origin`` (403), ``handshake`` (a bad WebSocket version or key), ``authorize``
    (``App.authorize`` answered instead)."""
    alarms_pending: int
    """Alarms scheduled and not yet fired."""
    alarms_fired: int
    """Alarms that came due and were delivered to their object (retries included)."""
    alarms_retried: int
    """Retries scheduled after a failed ``alarm()`` run."""
    alarms_given_up: int
    """Alarms whose last retry failed too."""
    turns: int
    """Turns run (one event against an object each)."""
    turn_seconds: float
    """Seconds those turns took, added up (wall clock, ``time.perf_counter``)."""
    turn_seconds_buckets: tuple[tuple[float, int], ...]
    """The turns by duration, cumulative: ``(upper bound in seconds, turns that took at
    most that long)``; the last bound is ``inf``."""
    storage_failure: str | None
    """Why the last storage commit (or opening a database) failed, until one succeeds
    again; None while storage works. ``/_health`` answers 503 while it is set."""
    relayed: int = 0
    """Requests, WebSocket upgrades and stub calls that peer hosts relayed to this host's
    objects (cluster mode); those without the cluster key are not counted."""


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
