"""The read loop of one WebSocket: receive, feed the frame reader, act on its events.

It delivers each message to the object (or runs its turn inline, see ``_activation.py``),
answers what needs no object itself (protocol pings, the auto-response, the reply to a
peer's Close), stops reading while the object is behind (backpressure), drops a message
that stalls (``partial_message_timeout``), and reports the socket's end to its transport
(:class:`Ending`): the peer's Close, a violation, or the connection lost.

Nothing keeps the last bytes received, or the last message, alive while the socket is
idle: only the frame reader's state (no buffer between frames) and the parked task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol, final

import trio

from .._core.events import CloseEvent, ErrorEvent, MessageEvent
from .._core.frames import encode_pong
from .._core.sockets import should_pause_reading
from .._core.wsevents import CloseState, PeerClose, Ping, Violation

if TYPE_CHECKING:
    from .._core.budget import MemoryBudget
    from .._core.sockets import SocketRecord
    from .._core.wsevents import ClosingHandshake, ReaderEvent
    from .._core.wsreader import FrameReader
    from .channel import ByteChannel
    from .owner import ConnectionOwner, ObjectLink
    from .writer import Writer

__all__ = ["DROP_REASON", "Ending", "ReadLoop"]

log = logging.getLogger("trio_hibernate.connection")

#: The reason of the 1006 an object hears when the peer went without a Close.
DROP_REASON: Final = "WebSocket disconnected without sending Close frame."
_OPEN: Final = CloseState.OPEN


def _over_budget(budget: MemoryBudget, what: str, peer: str) -> str:
    """Log that ``what`` would take the host over its memory budget; the close reason."""
    log.warning(
        "%s: closing with 1013: %s would take the host over its memory "
        "budget (%d of Limits.max_buffered_bytes=%d in use)",
        peer,
        what,
        budget.used,
        budget.limit,
    )
    return (
        f"the server is over its memory budget ({budget.limit} bytes, "
        "Limits.max_buffered_bytes); try again later"
    )


class Ending(Protocol):
    """What the read loop uses of its socket's transport."""

    writer: Writer
    closing: ClosingHandshake | None

    @property
    def terminal(self) -> bool:
        """The socket's terminal event is decided."""
        ...

    def send_message(self, data: str | bytes) -> None:
        """Send a data message (unless the socket's end is decided)."""

    def fail(self, code: int, reason: str) -> None:
        """Close with ``code`` and end the socket with an error."""

    def end(self, event: CloseEvent | ErrorEvent) -> None:
        """Decide the socket's terminal event (at most once) and queue it."""


@final
class ReadLoop:
    """The inbound half of an upgraded socket (see the module). ``trailing``: the bytes
    that came after the request, read first."""

    __slots__ = (
        "_channel",
        "_link",
        "_owner",
        "_reader",
        "_record",
        "_resume",
        "_trailing",
        "_transport",
        "_unread",
    )

    def __init__(
        self,
        transport: Ending,
        owner: ConnectionOwner,
        channel: ByteChannel,
        link: ObjectLink,
        record: SocketRecord,
        reader: FrameReader,
        trailing: bytes,
    ) -> None:
        self._transport = transport
        self._owner = owner
        self._channel = channel
        self._link = link
        self._record = record
        self._reader = reader
        self._trailing = trailing
        self._unread: Sequence[ReaderEvent] = ()  # see _read
        self._resume: trio.Event | None = None

    def resume(self) -> None:
        """The object caught up with this socket's queued messages: read again."""
        if self._resume is not None:
            self._resume.set()

    def release(self) -> None:
        """Stop reading: the bytes of a message cut short, and of messages read but not
        acted on, go back to the budget."""
        self._reader.discard()
        unread, self._unread = self._unread, ()
        for event in unread:
            if isinstance(event, str | bytes):
                self._owner.buffers.give(len(event.encode() if isinstance(event, str) else event))

    async def run(self) -> None:
        """Read frames until the socket's terminal event is decided or the peer is gone.
        A message cut short stays counted in the budget (see :meth:`release`).

        A message's turn may run in this task (an inline turn, see ``_activation.py``),
        inside a cancel scope the object's activation cancels when it is reset or the
        host shuts down: then reading goes on in a fresh scope.

        Raises:
            trio.ClosedResourceError: The connection was aborted (its end is decided).
        """
        if self._trailing:
            self._unread = self._reader.feed(self._trailing)
            self._trailing = b""
        while True:
            with trio.CancelScope() as scope:
                if not await self._read(scope):
                    return
            # An inline turn was cancelled with its object (the scope is spent): read on.

    async def _read(self, scope: trio.CancelScope) -> bool:
        """The read loop of :meth:`run`; True when ``scope`` was cancelled and must be
        replaced (an inline turn was cancelled), False when the socket is done."""
        reader = self._reader
        record = self._record
        entry = self._link
        transport = self._transport
        core = entry.core
        owner = self._owner
        channel = self._channel
        limits = owner.limits
        # What one receive completed (and what an inline turn's cancellation left).
        events: Sequence[ReaderEvent] = self._unread
        self._unread = ()
        event: ReaderEvent = b""
        while True:
            for index, event in enumerate(events):
                kind = type(event)
                if kind is str or kind is bytes:
                    assert isinstance(event, str | bytes)
                    if isinstance(event, str):
                        size = len(event) if event.isascii() else len(event.encode())
                    else:
                        size = len(event)
                    # From here the event holds the message's bytes (see _core/budget.py).
                    if transport.terminal:
                        owner.buffers.give(size)  # shutting down: wait for the peer's Close
                    elif isinstance(event, str) and core.is_auto_response(event):
                        owner.buffers.give(size)
                        reply = core.record_auto_response(record, owner.wall_clock())
                        owner.counters.auto_responded()
                        if reply is not None:
                            transport.send_message(reply)
                    elif (turns := entry.inline_turns()) is None:
                        entry.deliver(MessageEvent(record, event, size))
                    else:
                        await turns.run_inline(MessageEvent(record, event, size), scope)
                        turns = None  # it holds the instance, which may hibernate now
                        if scope.cancel_called:
                            self._unread = events[index + 1 :]
                            return True
                elif kind is Ping:
                    assert isinstance(event, Ping)
                    closing = transport.closing
                    if closing is not None and closing.state is _OPEN:
                        transport.writer.write(encode_pong(event.payload))
                elif kind is PeerClose or kind is Violation:
                    assert isinstance(event, PeerClose | Violation)
                    self._ends_with(event)
                    return False
                # Pong: nothing to do.
            events = ()  # nothing keeps the last bytes alive while the socket idles
            event = b""
            if channel.dead:
                # Lost while writing (reset by the peer), or aborted after the end was
                # decided (then this changes nothing): the object must hear of it.
                transport.end(CloseEvent(record, 1006, DROP_REASON, False))
                return False
            if not transport.terminal and should_pause_reading(record, limits):
                # Backpressure: the object is behind; stop reading until it catches up
                # (ObjectCore.pop_event calls resume_reading). Not while shutting down:
                # the object will never catch up then, and the peer's Close must be read.
                self._resume = trio.Event()
                record.set_reading_paused(True)
                await self._resume.wait()
                record.set_reading_paused(False)
                self._resume = None
                continue
            if reader.partial:
                # A message is partly here: it must keep coming, or it is dropped.
                with trio.move_on_after(owner.partial_message_timeout) as stalled:
                    data = await channel.receive()
                if stalled.cancelled_caught:
                    transport.fail(
                        1008,
                        f"message incomplete: no data for {owner.partial_message_timeout:g} s "
                        "(partial_message_timeout)",
                    )
                    return False
            else:
                data = await channel.receive()
            if not data:
                transport.end(CloseEvent(record, 1006, DROP_REASON, False))
                return False
            events = reader.feed(data)
            del data

    def _ends_with(self, event: PeerClose | Violation) -> None:
        """The peer's Close (answered at once if it came first, spec 7, Rule), or its
        violation (closed with its code): the socket's end."""
        transport = self._transport
        closing = transport.closing
        assert closing is not None
        if isinstance(event, Violation):
            reason = event.reason
            if event.code == 1013:
                reason = _over_budget(self._owner.buffers, reason, self._channel.peer())
            transport.fail(event.code, reason)
        else:
            if closing.received_close() is CloseState.REMOTE_CLOSING:
                transport.writer.write(closing.send_close(event.code, event.reason))
            # Else it answered our close().
            transport.end(CloseEvent(self._record, event.code, event.reason, True))
