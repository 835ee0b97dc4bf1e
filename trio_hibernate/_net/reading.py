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

import contextlib
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
    from .owner import ConnectionOwner, InlineTurns, ObjectLink
    from .writer import Writer

__all__ = ["DROP_REASON", "Ending", "ReadLoop"]

log = logging.getLogger("trio_hibernate.connection")

#: The reason of the 1006 an object hears when the peer went without a Close.
DROP_REASON: Final = "WebSocket disconnected without sending Close frame."
_OPEN: Final = CloseState.OPEN
#: Reading outside any cancel scope (no inline turn runs: see ReadLoop.run).
_NO_SCOPE: Final = contextlib.nullcontext(None)


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

    @property
    def more_after_close(self) -> bool:
        """The peer sent bytes after its Close frame (see ``Writer.linger``)."""
        return self._reader.more_after_close

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

        A message's turn may run in this task (an inline turn, see ``_activation.py``).
        Then this task reads inside a cancel scope the object's activation holds: it is
        cancelled with the activation (a reset, the host's shutdown: the turn is
        cancelled) and when the activation ends; reading goes on outside any scope
        until the next inline turn. One function, not two: a coroutine frame less for
        every idle socket.

        Raises:
            trio.ClosedResourceError: The connection was aborted (its end is decided).
        """
        reader = self._reader
        record = self._record
        link = self._link
        transport = self._transport
        core = link.core
        owner = self._owner
        limits = owner.limits
        channel = self._channel
        if self._trailing:
            self._unread = reader.feed(self._trailing)
            self._trailing = b""
        runner: InlineTurns | None = None  # whose turns this task runs, in ``scope``
        while True:
            switch_to: InlineTurns | None = None
            with _NO_SCOPE if runner is None else trio.CancelScope() as scope:
                if runner is not None:
                    assert scope is not None
                    runner.adopt(scope)
                try:
                    # What one receive completed (and what a cancellation left).
                    events: Sequence[ReaderEvent] = self._unread
                    self._unread = ()
                    event: ReaderEvent = b""
                    while switch_to is None:
                        for index, event in enumerate(events):
                            kind = type(event)
                            if kind is str or kind is bytes:
                                assert isinstance(event, str | bytes)
                                if isinstance(event, str):
                                    size = len(event) if event.isascii() else len(event.encode())
                                else:
                                    size = len(event)
                                # From here the event holds the message's bytes (_core/budget.py).
                                if transport.terminal:
                                    owner.buffers.give(size)  # shutting down: await the Close
                                elif isinstance(event, str) and core.is_auto_response(event):
                                    owner.buffers.give(size)
                                    reply = core.record_auto_response(record, owner.wall_clock())
                                    owner.counters.auto_responded()
                                    if reply is not None:
                                        transport.send_message(reply)
                                elif (turns := link.inline_turns()) is None:
                                    link.deliver(MessageEvent(record, event, size))
                                elif turns is not runner:
                                    # Its turn runs in a scope of its activation's: read
                                    # on in one, from this message. (A scope of an
                                    # activation that ended or was cancelled belongs to a
                                    # runner that runs no inline turn any more.)
                                    self._unread = events[index:]
                                    switch_to = turns
                                    break
                                else:
                                    try:
                                        await turns.run_inline(MessageEvent(record, event, size))
                                    except trio.Cancelled:
                                        self._unread = events[index + 1 :]
                                        raise
                                turns = None  # it holds the instance, which may hibernate
                            elif kind is Ping:
                                assert isinstance(event, Ping)
                                closing = transport.closing
                                if closing is not None and closing.state is _OPEN:
                                    transport.writer.write(encode_pong(event.payload))
                            elif kind is PeerClose or kind is Violation:
                                assert isinstance(event, PeerClose | Violation)
                                self._ends_with(event)
                                return
                            # Pong: nothing to do.
                        else:
                            events = ()  # nothing keeps the last bytes alive while idle
                            event = b""
                            # Inline, not a method: a coroutine frame less per idle socket.
                            if channel.dead:
                                # Lost while writing (reset by the peer), or aborted after
                                # the end was decided (then this changes nothing).
                                transport.end(CloseEvent(record, 1006, DROP_REASON, False))
                                return
                            if not transport.terminal and should_pause_reading(record, limits):
                                await self._paused(record)
                                continue
                            if reader.partial:
                                # A message is partly here: it must keep coming, or is dropped.
                                with trio.move_on_after(owner.partial_message_timeout) as stalled:
                                    data = await channel.receive()
                                if stalled.cancelled_caught:
                                    self._stalled()
                                    return
                            else:
                                data = await channel.receive()
                            if not data:
                                transport.end(CloseEvent(record, 1006, DROP_REASON, False))
                                return
                            events = reader.feed(data)
                            del data
                finally:
                    if runner is not None:
                        assert scope is not None
                        runner.disown(scope)
            # Left: to run another activation's turns (``switch_to``), or cancelled (the
            # activation ended, or cancelled the turn with it): read on outside a scope.
            runner = switch_to

    async def _paused(self, record: SocketRecord) -> None:
        """Backpressure: the object is behind; stop reading until it catches up
        (ObjectCore.pop_event calls resume_reading). Not while shutting down: the object
        will never catch up then, and the peer's Close must be read."""
        self._resume = trio.Event()
        record.set_reading_paused(True)
        try:
            await self._resume.wait()
        finally:
            record.set_reading_paused(False)
            self._resume = None

    def _stalled(self) -> None:
        timeout = self._owner.partial_message_timeout
        self._transport.fail(
            1008, f"message incomplete: no data for {timeout:g} s (partial_message_timeout)"
        )

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
