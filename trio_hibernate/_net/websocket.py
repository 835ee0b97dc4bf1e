"""The WebSocket transport of one connection: frames in, events out, frames back.

The read loop feeds what it receives to the socket's frame reader (``_core/wsreader.py``,
which reassembles messages within ``Limits.max_message_bytes`` and the host's memory
budget and refuses what breaks the protocol), delivers the messages to the object,
answers what needs no object itself (protocol pings, the auto-response, the reply to a
peer's Close: ``_core/wsevents.py`` keeps the closing handshake), stops reading while
the object is behind (backpressure), and decides the socket's terminal event: a
``CloseEvent`` or an ``ErrorEvent``, exactly once. It holds no object state, which is
why it keeps running while the object hibernates.

Object code reaches it synchronously, as the record's
:class:`~trio_hibernate._core.sockets.Transport`: a send is a write, a close sends our
Close frame and starts a watchdog for the peer's answer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, final

import trio

from .._core.events import CloseEvent, ErrorEvent, MessageEvent
from .._core.frames import encode_pong
from .._core.sockets import should_pause_reading
from .._core.wsevents import CloseState, ClosingHandshake, PeerClose, Ping, Violation
from .._core.wsreader import FrameReader
from .._errors import WebSocketProtocolError
from .writer import Writer

if TYPE_CHECKING:
    from .._core.budget import MemoryBudget
    from .._core.sockets import SocketRecord
    from .._core.wsevents import ReaderEvent
    from .channel import ByteChannel
    from .deflate import DeflateExtension
    from .owner import ConnectionOwner, ObjectLink

__all__ = ["WebSocketTransport"]

log = logging.getLogger("trio_hibernate.connection")

_DROP_REASON: Final = "WebSocket disconnected without sending Close frame."
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


@final
class WebSocketTransport:
    """The transport of a connection's WebSocket (see the module). It exists from the
    request on: frames the object sends before the 101 wait in the :attr:`writer`."""

    __slots__ = (
        "_channel",
        "_closing",
        "_encode",
        "_entry",
        "_owner",
        "_pending_close",
        "_reader",
        "_record",
        "_resume",
        "_terminal",
        "_trailing",
        "_watchdog",
        "writer",
    )

    def __init__(self, owner: ConnectionOwner, channel: ByteChannel) -> None:
        self._owner = owner
        self._channel = channel
        self.writer = Writer(owner, channel, self)
        """The connection's outbound half (this transport hears its failures)."""
        self._reader: FrameReader | None = None  # set by upgraded(), as _closing
        self._closing: ClosingHandshake | None = None
        self._trailing = b""  # bytes that came after the request, before run()
        self._encode = owner.frame_encoder  # the host's (shared), or the socket's deflate
        self._entry: ObjectLink | None = None
        self._record: SocketRecord | None = None
        self._pending_close: tuple[int | None, str] | None = None
        self._resume: trio.Event | None = None
        self._watchdog: trio.CancelScope | None = None
        self._terminal = False  # the terminal event is decided; no other may follow

    # -- set up by the connection ----------------------------------------------------------

    def accept(self, link: ObjectLink, record: SocketRecord) -> None:
        """The object ``link`` accepted the upgrade as ``record``."""
        self._entry = link
        self._record = record

    def undo_accept(self) -> None:
        """The upgrade could not be completed: release the accepted socket, no event."""
        record, entry = self._record, self._entry
        if record is not None and entry is not None:
            self._record = None
            entry.core.release(record)
            entry.forget_if_unused()

    def upgraded(self, trailing: bytes, deflate: DeflateExtension | None = None) -> None:
        """The 101 went out; ``trailing`` are the bytes the client sent after its
        request, frames compressed with ``deflate`` if negotiated. A close the object
        asked for before is sent now."""
        owner = self._owner
        self._reader = FrameReader(
            owner.buffers,
            owner.limits.max_message_bytes,
            None if deflate is None else deflate.inflater,
        )
        self._closing = ClosingHandshake()
        self._trailing = trailing
        if deflate is not None:
            self._encode = deflate
        if self._pending_close is not None:
            self.start_close(*self._pending_close)

    def end_exchange(self) -> None:
        """The request was answered without an upgrade: nothing may be sent any more."""
        self._terminal = True

    @property
    def is_open(self) -> bool:
        """The upgrade went through (frames can be exchanged)."""
        return self._record is not None and self._closing is not None

    @property
    def handshake_done(self) -> bool:
        """Both Close frames went: the peer will send nothing more."""
        return self._closing is not None and self._closing.state is CloseState.CLOSED

    def connection_over(self) -> None:
        """The connection task is ending: stop the watchdog, give back what is held, and
        if it was cancelled before the socket's end was decided (host shutdown), decide
        it now, with no event."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.release_held()
        if not self._terminal and self._record is not None:
            self._terminal = True
            self._record.decide_end()

    def release_held(self) -> None:
        """Stop reading frames: the bytes of a message cut short go back to the budget."""
        if self._reader is not None:
            self._reader.discard()

    # -- the read loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Read frames until the socket's terminal event is decided or the peer is gone.
        A message cut short stays counted in the budget (see :meth:`release_held`).

        Raises:
            trio.ClosedResourceError: The connection was aborted (its end is decided).
        """
        reader = self._reader
        record = self._record
        assert reader is not None
        assert record is not None
        owner = self._owner
        channel = self._channel
        limits = owner.limits
        data, self._trailing = self._trailing, b""
        while True:
            if data:
                ended = self._handle(reader.feed(data))
                data = b""  # nothing keeps the last bytes alive while the socket idles
                if ended:
                    return
            if channel.dead:
                # Lost while writing (reset by the peer), or aborted after the end was
                # decided (then this changes nothing): the object must hear of it.
                self._end(CloseEvent(record, 1006, _DROP_REASON, False))
                return
            if not self._terminal and should_pause_reading(record, limits):
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
                    self.fail(
                        1008,
                        f"message incomplete: no data for {owner.partial_message_timeout:g} s "
                        "(partial_message_timeout)",
                    )
                    return
            else:
                data = await channel.receive()
            if not data:
                self._end(CloseEvent(record, 1006, _DROP_REASON, False))
                return

    def _handle(self, events: list[ReaderEvent]) -> bool:
        """Act on what one receive completed; True once the socket's end is decided."""
        record = self._record
        entry = self._entry
        assert record is not None
        assert entry is not None
        owner = self._owner
        core = entry.core
        for event in events:
            kind = type(event)
            if kind is str or kind is bytes:
                assert isinstance(event, str | bytes)
                if isinstance(event, str):
                    size = len(event) if event.isascii() else len(event.encode())
                else:
                    size = len(event)
                # From here the event holds the message's bytes (see _core/budget.py).
                if self._terminal:
                    owner.buffers.give(size)  # shutting down: wait for the peer's Close
                elif isinstance(event, str) and core.is_auto_response(event):
                    owner.buffers.give(size)
                    reply = core.record_auto_response(record, owner.wall_clock())
                    owner.counters.auto_responded()
                    if reply is not None:
                        self.send_message(reply)
                else:
                    entry.deliver(MessageEvent(record, event, size))
            elif kind is Ping:
                assert isinstance(event, Ping)
                closing = self._closing
                if closing is not None and closing.state is _OPEN:
                    self.writer.write(encode_pong(event.payload))
            elif kind is PeerClose:
                assert isinstance(event, PeerClose)
                closing = self._closing
                assert closing is not None
                if closing.received_close() is CloseState.REMOTE_CLOSING:
                    # The peer started: answer at once (spec 7, Rule), then tell the object.
                    self.writer.write(closing.send_close(event.code, event.reason))
                # Else it answered our close().
                self._end(CloseEvent(record, event.code, event.reason, True))
                return True
            elif kind is Violation:
                assert isinstance(event, Violation)
                reason = event.reason
                if event.code == 1013:
                    reason = _over_budget(owner.buffers, reason, self._channel.peer())
                self.fail(event.code, reason)
                return True
            # Pong: nothing to do.
        return False

    def fail(self, code: int, reason: str) -> None:
        """Close with ``code`` (the peer's fault, or ours: 1011) and end with an error."""
        closing = self._closing
        record = self._record
        assert closing is not None
        assert record is not None
        if closing.state is _OPEN:
            self.writer.write(closing.send_close(code, reason))
        self._end(ErrorEvent(record, WebSocketProtocolError(code, reason)))

    def _end(self, event: CloseEvent | ErrorEvent) -> None:
        """Decide the socket's terminal event (at most once) and queue it for the object."""
        if self._terminal:
            return
        self._terminal = True
        event.record.decide_end()
        if self._watchdog is not None:
            self._watchdog.cancel()
        assert self._entry is not None
        self._entry.deliver(event)

    # -- Transport (called synchronously by object code) ----------------------------------

    def send_message(self, data: str | bytes) -> None:
        """Queue one data message (see :class:`~trio_hibernate._core.sockets.Transport`)."""
        # Nothing may follow a Close frame. (A dead channel: the writer drops it.)
        if not self._terminal:
            self.writer.write(self._encode(data))

    def start_close(self, code: int | None, reason: str) -> None:
        """Send our Close frame; the peer's answer ends the socket (or the watchdog does)."""
        closing = self._closing
        if closing is None:
            self._pending_close = (code, reason)
            return
        if self._channel.dead or closing.state is not _OPEN:
            return
        self.writer.write(closing.send_close(code, reason))
        if not self._terminal:
            self._owner.spawn(self._close_watchdog)

    def resume_reading(self) -> None:
        """The object caught up with this socket's queued messages: read again."""
        if self._resume is not None:
            self._resume.set()

    async def _close_watchdog(self) -> None:
        if self._terminal:
            return  # the peer answered before this task even started
        with trio.CancelScope() as scope:
            self._watchdog = scope
            await trio.sleep(self._owner.close_timeout)
            if self._record is not None:
                self._end(CloseEvent(self._record, 1006, _DROP_REASON, False))
            self.abort()

    def begin_shutdown(self, code: int, reason: str) -> None:
        """Close with ``code``, no handler runs (host shutdown, object reset). Before
        the upgrade nothing is written: the fetch's answer (a 500) must still go out."""
        decided, self._terminal = self._terminal, True
        self.resume_reading()
        closing = self._closing
        if closing is None and not self._channel.dead:
            return
        if closing is not None and closing.state is _OPEN and not self._channel.dead:
            self.writer.write(closing.send_close(code, reason))
            if self._record is not None and not decided:
                self._record.decide_end()
        else:
            self.abort()

    @property
    def is_upgraded(self) -> bool:
        """The 101 went out."""
        return self._closing is not None

    def abort(self) -> None:
        """Drop the connection now; its task wakes up and ends."""
        self.resume_reading()
        self._channel.abort()

    # -- WriteFailures (called by the writer) ------------------------------------------------

    def lost(self) -> None:
        """Writing failed (the peer reset the connection): the read loop, even if paused
        for backpressure, wakes up and reports the drop (1006)."""
        self.resume_reading()

    def drop_slow_reader(self, reason: str) -> None:
        """Outbound bytes cannot be buffered for this peer: drop the connection (a Close
        frame would wait behind the bytes it is not reading)."""
        log.warning("%s: disconnected: %s", self._channel.peer(), reason)
        if self._record is not None:
            self._end(ErrorEvent(self._record, WebSocketProtocolError(1011, reason)))
        self.abort()
