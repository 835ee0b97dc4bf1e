"""One object's life across activations: its state, mailbox, sockets and auto-response.

Plain Python: no Trio, no clock, no awaiting. The Trio layer (``_host.py``) feeds it what
happens and carries out what it answers; the state-machine tests drive it directly.

States (the table :data:`TRANSITIONS` is the whole truth; a missing cell raises
:class:`InvalidTransition`):

* ``HIBERNATED``: no instance. Accepted sockets stay connected and registered.
* ``STARTING``: a supervisor was asked for; the constructor has not finished.
* ``LIVE``: an instance exists and receives events, one turn at a time.
* ``STOPPING``: the instance is being dropped; events keep queueing.

Rule 1: events are delivered only in ``LIVE``, in arrival order, so no event reaches an
evicted instance. Rule 2: an event arriving for a ``HIBERNATED`` object asks for a wake
(:meth:`ObjectCore.enqueue` returns True) exactly once; one arriving while ``STOPPING`` is
kept and :meth:`ObjectCore.on_stopped` asks for the wake instead. Rule 3: a matched
auto-response never becomes an event.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Final

from .._autoresponse import WebSocketRequestResponsePair
from .._errors import InvalidTransition
from .._limits import Limits
from .events import Event, MessageEvent
from .sockets import SocketRecord, SocketRegistry

__all__ = ["InvalidTransition", "ObjectCore", "ObjectState"]


class ObjectState(Enum):
    """Where an object is in its life. See the module docstring."""

    HIBERNATED = "hibernated"
    STARTING = "starting"
    LIVE = "live"
    STOPPING = "stopping"


_H, _S, _L, _T = (
    ObjectState.HIBERNATED,
    ObjectState.STARTING,
    ObjectState.LIVE,
    ObjectState.STOPPING,
)

#: (state, input) -> next state. Inputs: ``event`` (something queued), ``started``
#: (constructor returned), ``failed`` (constructor raised), ``stop`` (begin eviction),
#: ``stopped`` (instance gone).
TRANSITIONS: Final[dict[tuple[ObjectState, str], ObjectState]] = {
    (_H, "event"): _S,
    (_S, "event"): _S,
    (_L, "event"): _L,
    (_T, "event"): _T,
    (_S, "started"): _L,
    (_S, "failed"): _T,
    (_S, "stop"): _T,
    (_L, "stop"): _T,
    (_T, "stop"): _T,
    (_T, "stopped"): _H,
}


class ObjectCore:
    """The part of an object that outlives its instances."""

    __slots__ = (
        "_mailbox",
        "auto_response",
        "event_timeout_ms",
        "generation",
        "limits",
        "registry",
        "state",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.registry = SocketRegistry(limits)
        self.state = ObjectState.HIBERNATED
        self.auto_response: WebSocketRequestResponsePair | None = None
        self.event_timeout_ms: int | None = None
        #: Counts activations; the instance of generation N only ever sees events popped
        #: while ``generation == N``.
        self.generation = 0
        self._mailbox: deque[Event] = deque()

    def _move(self, what: str) -> ObjectState:
        try:
            new = TRANSITIONS[self.state, what]
        except KeyError:
            raise InvalidTransition(self.state, what) from None
        self.state = new
        return new

    # -- inputs from the connection layer -------------------------------------------------

    def is_auto_response(self, text: str) -> bool:
        """True when ``text`` matches the pair exactly and so must not be delivered."""
        pair = self.auto_response
        return pair is not None and pair.request == text

    def record_auto_response(self, record: SocketRecord, now: float) -> str | None:
        """Note a match (see :meth:`is_auto_response`) on ``record`` at wall time ``now``.

        Returns the response to send, or None when the object already closed the socket:
        the request is still swallowed and the timestamp still set, as in workerd.
        """
        pair = self.auto_response
        assert pair is not None
        record.auto_response_at = now
        return None if record.server_closed else pair.response

    def enqueue(self, event: Event) -> bool:
        """Queue ``event``. Returns True when the caller must start a supervisor (wake)."""
        if isinstance(event, MessageEvent):
            event.record.queued += 1
            event.record.queued_bytes += event.size
        self._mailbox.append(event)
        before = self.state
        if before is _L:
            return False  # the hot path: (LIVE, "event") -> LIVE, without the table
        self._move("event")
        return before is ObjectState.HIBERNATED

    # -- inputs from the supervisor -------------------------------------------------------

    def on_started(self) -> int:
        """The constructor returned; the new instance is live. Returns its generation."""
        self._move("started")
        self.generation += 1
        return self.generation

    def on_failed(self) -> list[Event]:
        """The constructor raised. Returns (and forgets) every queued event."""
        self._move("failed")
        dropped = list(self._mailbox)
        self._mailbox.clear()
        for event in dropped:
            if isinstance(event, MessageEvent):
                event.record.queued -= 1
                event.record.queued_bytes -= event.size
        return dropped

    def begin_stop(self) -> None:
        """Eviction begins (idle timeout, test hook, event timeout or shutdown)."""
        self._move("stop")

    def on_stopped(self) -> bool:
        """The instance is gone. Returns True when queued events need a new instance."""
        self._move("stopped")
        if self._mailbox:
            self._move("event")
            return True
        return False

    def pop_event(self) -> Event | None:
        """The next event for the live instance, or None when the mailbox is empty."""
        if self.state is not ObjectState.LIVE:
            raise InvalidTransition(self.state, "pop_event")
        if not self._mailbox:
            return None
        event = self._mailbox.popleft()
        if isinstance(event, MessageEvent):
            event.record.queued -= 1
            event.record.queued_bytes -= event.size
        return event

    def release(self, record: SocketRecord) -> None:
        """The socket's terminal event was dispatched: it leaves ``get_websockets``."""
        record.released = True
        self.registry.remove(record)

    @property
    def queued(self) -> int:
        """Events waiting in the mailbox."""
        return len(self._mailbox)

    @property
    def has_work(self) -> bool:
        """True while the host must keep this core: sockets, events or an instance.

        The auto-response pair and the event timeout outlive instances (spec 1) only as
        long as the object has sockets: a hibernated object with none is forgotten
        whole, so an object visited once costs nothing afterwards (workerd drops an
        actor's hibernation manager likewise once its last socket is gone).
        """
        return bool(self.registry) or bool(self._mailbox) or self.state is not _H
