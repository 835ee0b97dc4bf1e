"""One object's life across activations: its state, mailbox, sockets and auto-response.

Plain Python: no Trio, no clock, no awaiting. The Trio layer (``_host.py``) feeds it what
happens and carries out what it answers; the state-machine tests drive it directly.

States (:class:`ObjectState`; the table :data:`TRANSITIONS`, keyed on the state and an
:class:`Input`, is the whole truth: a missing cell raises :class:`InvalidTransition`):

* ``HIBERNATED``: no instance. Accepted sockets stay connected and registered.
* ``STARTING``: a supervisor was asked for; the constructor has not finished.
* ``LIVE``: an instance exists and receives events, one turn at a time.
* ``STOPPING``: the instance is being dropped; events keep queueing.

Rule 1: events are delivered only in ``LIVE``, in arrival order, so no event reaches an
evicted instance. Rule 2: an event arriving for a ``HIBERNATED`` object asks for a wake
(:meth:`ObjectCore.enqueue` returns True) exactly once; one arriving while ``STOPPING`` is
kept and :meth:`ObjectCore.on_stopped` asks for the wake instead. Rule 3: a matched
auto-response never becomes an event. Rule 4: taking a message off the mailbox resumes the
reading of its socket once the object has caught up (the backpressure rule of
``sockets.py``).
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Final, cast

from .._autoresponse import WebSocketRequestResponsePair
from .._errors import InvalidTransition
from .._limits import Limits
from .events import Event, MessageEvent
from .sockets import SocketRecord, SocketRegistry

__all__ = ["TRANSITIONS", "Input", "InvalidTransition", "ObjectCore", "ObjectState"]


class ObjectState(Enum):
    """Where an object is in its life (see the module docstring for the rules)."""

    #: No instance in memory. Accepted sockets stay connected and registered.
    HIBERNATED = "hibernated"
    #: A supervisor was asked for; the constructor has not returned yet.
    STARTING = "starting"
    #: An instance exists and receives events, one turn at a time.
    LIVE = "live"
    #: The instance is being dropped; events keep queueing for the next one.
    STOPPING = "stopping"


class Input(Enum):
    """What the runtime tells an object's lifecycle."""

    #: Something was queued in the mailbox (:meth:`ObjectCore.enqueue`).
    EVENT = "event"
    #: The constructor returned (:meth:`ObjectCore.on_started`).
    STARTED = "started"
    #: The constructor raised (:meth:`ObjectCore.on_failed`).
    FAILED = "failed"
    #: Eviction begins: idle timeout, test hook, event timeout, failed commit or shutdown
    #: (:meth:`ObjectCore.begin_stop`).
    STOP = "stop"
    #: The instance is gone (:meth:`ObjectCore.on_stopped`).
    STOPPED = "stopped"


# Module constants for the hot paths: reading an Enum member off its class is slow.
_HIBERNATED: Final = ObjectState.HIBERNATED
#: The mailbox of an object with no events: empty, shared, never appended to (an empty
#: tuple that passes for a deque: only its length and iteration are ever used).
_NO_EVENTS: Final = cast("deque[Event]", ())
_LIVE: Final = ObjectState.LIVE

#: (state, input) -> next state; a missing pair raises :class:`InvalidTransition`.
TRANSITIONS: Final[dict[tuple[ObjectState, Input], ObjectState]] = {
    (ObjectState.HIBERNATED, Input.EVENT): ObjectState.STARTING,
    (ObjectState.STARTING, Input.EVENT): ObjectState.STARTING,
    (ObjectState.LIVE, Input.EVENT): ObjectState.LIVE,
    (ObjectState.STOPPING, Input.EVENT): ObjectState.STOPPING,
    (ObjectState.STARTING, Input.STARTED): ObjectState.LIVE,
    (ObjectState.STARTING, Input.FAILED): ObjectState.STOPPING,
    (ObjectState.STARTING, Input.STOP): ObjectState.STOPPING,
    (ObjectState.LIVE, Input.STOP): ObjectState.STOPPING,
    (ObjectState.STOPPING, Input.STOP): ObjectState.STOPPING,
    (ObjectState.STOPPING, Input.STOPPED): ObjectState.HIBERNATED,
}


class ObjectCore:
    """The part of an object that outlives its instances.

    Its state, auto-response pair and event timeout are read-only properties: the state
    moves through :data:`TRANSITIONS` only, the two settings change through
    :meth:`set_auto_response` and :meth:`set_event_timeout_ms` (``ObjectContext``
    validates what object code passes).
    """

    __slots__ = (
        "_auto_response",
        "_event_timeout_ms",
        "_mailbox",
        "_state",
        "generation",
        "limits",
        "registry",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.registry = SocketRegistry(limits)
        self._state = ObjectState.HIBERNATED
        self._auto_response: WebSocketRequestResponsePair | None = None
        self._event_timeout_ms: int | None = None
        #: Counts activations; the instance of generation N only ever sees events popped
        #: while ``generation == N``.
        self.generation = 0
        #: The events waiting for the instance. An object without any holds no deque (an
        #: empty one is ~600 bytes: per hibernated object, as much as its socket's record).
        self._mailbox: deque[Event] = _NO_EVENTS

    def _move(self, what: Input) -> ObjectState:
        try:
            new = TRANSITIONS[self._state, what]
        except KeyError:
            raise InvalidTransition(self._state, what) from None
        self._state = new
        return new

    @property
    def state(self) -> ObjectState:
        """Where the object is in its life."""
        return self._state

    # -- settings that outlive instances (spec 1) -----------------------------------------

    @property
    def auto_response(self) -> WebSocketRequestResponsePair | None:
        """The auto-response pair, or None."""
        return self._auto_response

    def set_auto_response(self, pair: WebSocketRequestResponsePair | None) -> None:
        """Replace the auto-response pair (None removes it; timestamps are kept)."""
        self._auto_response = pair

    @property
    def event_timeout_ms(self) -> int | None:
        """The socket event handlers' time limit in ms, or None for none."""
        return self._event_timeout_ms

    def set_event_timeout_ms(self, timeout_ms: int | None) -> None:
        """Replace the event timeout (None removes it)."""
        self._event_timeout_ms = timeout_ms

    # -- inputs from the connection layer -------------------------------------------------

    def is_auto_response(self, text: str) -> bool:
        """True when ``text`` matches the pair exactly and so must not be delivered."""
        pair = self._auto_response
        return pair is not None and pair.request == text

    def record_auto_response(self, record: SocketRecord, now: float) -> str | None:
        """Note a match (see :meth:`is_auto_response`) on ``record`` at wall time ``now``.

        Returns the response to send, or None when the object already closed the socket:
        the request is still swallowed and the timestamp still set, as in workerd.
        """
        pair = self._auto_response
        assert pair is not None
        record.auto_response_at = now
        return None if record.server_closed else pair.response

    def enqueue(self, event: Event) -> bool:
        """Queue ``event``. Returns True when the caller must start a supervisor (wake)."""
        if isinstance(event, MessageEvent):
            event.record.add_queued(event.size)
        mailbox = self._mailbox
        if mailbox is _NO_EVENTS:
            mailbox = self._mailbox = deque()
        mailbox.append(event)
        before = self._state
        if before is _LIVE:
            return False  # the hot path: the cell (LIVE, EVENT) -> LIVE, without a lookup
        self._move(Input.EVENT)
        return before is _HIBERNATED

    # -- inputs from the supervisor -------------------------------------------------------

    def on_started(self) -> int:
        """The constructor returned; the new instance is live. Returns its generation."""
        self._move(Input.STARTED)
        self.generation += 1
        return self.generation

    def on_failed(self) -> list[Event]:
        """The constructor raised. Returns (and forgets) every queued event.

        The caller answers them and, for a failed constructor, shuts the sockets down
        (:meth:`shut_down_sockets`); their reading is not resumed here.
        """
        self._move(Input.FAILED)
        dropped = list(self._mailbox)
        self._mailbox = _NO_EVENTS
        for event in dropped:
            if isinstance(event, MessageEvent):
                event.record.remove_queued(event.size)
        return dropped

    def begin_stop(self) -> None:
        """Eviction begins (idle timeout, test hook, event timeout or shutdown)."""
        self._move(Input.STOP)

    def on_stopped(self) -> bool:
        """The instance is gone. Returns True when queued events need a new instance."""
        self._move(Input.STOPPED)
        if self._mailbox:
            self._move(Input.EVENT)
            return True
        self._mailbox = _NO_EVENTS  # hibernated: no deque kept
        return False

    def pop_event(self) -> Event | None:
        """The next event for the live instance, or None when the mailbox is empty.

        Taking a message off the mailbox may let its socket be read again: when the
        connection paused it and the socket is now below both queue limits
        (:meth:`SocketRecord.take_queued`), this calls its ``transport.resume_reading()``.
        """
        if self._state is not _LIVE:
            raise InvalidTransition(self._state, "pop_event")
        mailbox = self._mailbox
        if not mailbox:
            return None
        event = mailbox.popleft()
        if isinstance(event, MessageEvent) and event.record.take_queued(event.size, self.limits):
            event.record.transport.resume_reading()
        return event

    def release(self, record: SocketRecord) -> None:
        """The socket's terminal event was dispatched, or the socket is let go without
        one: it leaves ``get_websockets`` (idempotent)."""
        record.release()
        self.registry.remove(record)

    def shut_down_sockets(self, code: int, reason: str) -> None:
        """Close every socket with ``code`` and ``reason``, running no handler (a failed
        constructor: 1011; a namespace a code update removed: 1012): each transport
        begins its shutdown and the record is released at once."""
        for record in self.registry.sockets():
            record.transport.begin_shutdown(code, reason)
            self.release(record)

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
        return bool(self.registry) or bool(self._mailbox) or self._state is not _HIBERNATED
