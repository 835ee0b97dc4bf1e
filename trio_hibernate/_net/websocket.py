"""The WebSocket transport of one connection: frames in, events out, frames back.

Its read loop (``reading.py``) feeds what it receives to the socket's frame reader
(``_core/wsreader.py``: messages reassembled within ``Limits.max_message_bytes`` and the
host's memory budget, protocol violations refused) and acts on what comes out; the
transport keeps the closing handshake (``_core/wsevents.py``) and decides the socket's
terminal event: a ``CloseEvent`` or an ``ErrorEvent``, exactly once. It holds no object
state, which is why it keeps running while the object hibernates.

Object code reaches it synchronously, as the record's
:class:`~trio_hibernate._core.sockets.Transport`: a send is a write, a close sends our
Close frame and starts a watchdog for the peer's answer.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Final, final

import trio

from .._containment import object_label
from .._core.events import CloseEvent, ErrorEvent
from .._core.wsevents import CloseState, ClosingHandshake
from .._core.wsreader import FrameReader
from .._errors import WebSocketProtocolError
from .reading import DROP_REASON, ReadLoop
from .writer import Writer

if TYPE_CHECKING:
    from .._core.sockets import SocketRecord
    from .channel import ByteChannel
    from .deflate import DeflateExtension
    from .owner import ConnectionOwner, ObjectLink

__all__ = ["WebSocketTransport"]

log = logging.getLogger("trio_hibernate.connection")

_OPEN: Final = CloseState.OPEN


def _where(channel: ByteChannel, link: ObjectLink | None) -> str:
    """The peer, and the object its socket belongs to (``namespace:name``), for the log."""
    if link is None:
        return channel.peer()
    return f"{channel.peer()} ({object_label(link.namespace, link.object_id)})"


def _how_it_ended(event: CloseEvent | ErrorEvent) -> tuple[int, str]:
    """For the log line of the socket's end: its close code and who closed it (``peer``,
    ``server``, or ``dropped``: the connection was lost with no Close frame)."""
    if isinstance(event, ErrorEvent):  # we closed with the error's code
        error = event.error
        return (error.code if isinstance(error, WebSocketProtocolError) else 1011, "server")
    if not event.was_clean:
        return (event.code, "dropped")
    # The peer's Close, or its answer to the object's own close() (decided just after).
    return (event.code, "server" if event.record.server_closed else "peer")


@final
class WebSocketTransport:
    """The transport of a connection's WebSocket (see the module). It exists from the
    request on: frames the object sends before the 101 wait in the :attr:`writer`."""

    __slots__ = (
        "_channel",
        "_encode",
        "_entry",
        "_loop",
        "_owner",
        "_pending_close",
        "_record",
        "_terminal",
        "_watchdog",
        "closing",
        "ended",
        "writer",
    )

    def __init__(self, owner: ConnectionOwner, channel: ByteChannel) -> None:
        self._owner = owner
        self._channel = channel
        self.writer = Writer(owner, channel, self)
        """The connection's outbound half (this transport hears its failures)."""
        self._loop: ReadLoop | None = None  # set by upgraded(), as closing
        self.closing: ClosingHandshake | None = None
        """The closing handshake, once upgraded."""
        self._encode = owner.frame_encoder  # the host's (shared), or the socket's deflate
        self._entry: ObjectLink | None = None
        self._record: SocketRecord | None = None
        self._pending_close: tuple[int | None, str] | None = None
        self._watchdog: trio.CancelScope | None = None
        self._terminal = False  # the terminal event is decided; no other may follow
        self.ended: tuple[int, str] | None = None  # for the log: see _how_it_ended

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
        record, link = self._record, self._entry
        assert record is not None
        assert link is not None
        inflater = None if deflate is None else deflate.inflater
        reader = FrameReader(owner.buffers, owner.limits.max_message_bytes, inflater)
        self._loop = ReadLoop(self, owner, self._channel, link, record, reader, trailing)
        self.closing = ClosingHandshake()
        if deflate is not None:
            self._encode = deflate
        if self._pending_close is not None:
            self.start_close(*self._pending_close)

    def end_exchange(self) -> None:
        """The request was answered without an upgrade: nothing may be sent any more."""
        self._terminal = True

    @property
    def terminal(self) -> bool:
        """The socket's terminal event is decided: nothing more goes to the object."""
        return self._terminal

    @property
    def is_open(self) -> bool:
        """The upgrade went through (frames can be exchanged)."""
        return self._record is not None and self.closing is not None

    @property
    def handshake_done(self) -> bool:
        """Both Close frames went: the peer will send nothing more (unless it already
        sent more after its Close: a broken client, to be lingered for)."""
        closing, loop = self.closing, self._loop
        return (
            closing is not None
            and closing.state is CloseState.CLOSED
            and not (loop is not None and loop.more_after_close)
        )

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
        # Nothing more is read or written: let go of what points back here, so that the
        # connection's objects are freed as soon as unused, not by the cycle collector.
        self._loop = None
        self._record = None
        self.writer.detach()

    def release_held(self) -> None:
        """Stop reading: what is held of what was read goes back to the budget."""
        if self._loop is not None:
            self._loop.release()

    # -- the read loop ---------------------------------------------------------------------

    def run(self) -> Coroutine[Any, Any, None]:
        """Read frames until the socket's terminal event is decided or the peer is gone
        (see :class:`~trio_hibernate._net.reading.ReadLoop`): the read loop itself, to
        await (no coroutine frame of this method stays on every idle socket's stack).

        Raises:
            trio.ClosedResourceError: The connection was aborted (its end is decided).
        """
        assert self._loop is not None
        return self._loop.run()

    def fail(self, code: int, reason: str) -> None:
        """Close with ``code`` (the peer's fault, or ours: 1011) and end with an error."""
        closing = self.closing
        record = self._record
        assert closing is not None
        assert record is not None
        if closing.state is _OPEN:
            self.writer.write(closing.send_close(code, reason))
        self.end(ErrorEvent(record, WebSocketProtocolError(code, reason)))

    def end(self, event: CloseEvent | ErrorEvent) -> None:
        """Decide the socket's terminal event (at most once) and queue it for the object."""
        if self._terminal:
            return
        self._terminal = True
        self.ended = _how_it_ended(event)
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
            self._owner.counters.messages_out += 1  # a plain int: the hot path
            self.writer.write(self._encode(data))

    def start_close(self, code: int | None, reason: str) -> None:
        """Send our Close frame; the peer's answer ends the socket (or the watchdog does)."""
        closing = self.closing
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
        if self._loop is not None:
            self._loop.resume()

    async def _close_watchdog(self) -> None:
        if self._terminal:
            return  # the peer answered before this task even started
        with trio.CancelScope() as scope:
            self._watchdog = scope
            await trio.sleep(self._owner.close_timeout)
            if self._record is not None:
                self.end(CloseEvent(self._record, 1006, DROP_REASON, False))
            self.abort()

    def begin_shutdown(self, code: int, reason: str) -> None:
        """Close with ``code``, no handler runs (host shutdown, object reset). Before
        the upgrade nothing is written: the fetch's answer (a 500) must still go out."""
        decided, self._terminal = self._terminal, True
        self.ended = self.ended or (code, "server")
        self.resume_reading()
        closing = self.closing
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
        return self.closing is not None

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
        log.warning("%s: disconnected: %s", _where(self._channel, self._entry), reason)
        if self._record is not None:
            self.end(ErrorEvent(self._record, WebSocketProtocolError(1011, reason)))
        self.abort()
