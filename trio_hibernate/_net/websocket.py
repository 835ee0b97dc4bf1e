"""The WebSocket transport of one connection: frames in, events out, frames back.

The read loop reassembles messages (within ``Limits.max_message_bytes`` and the host's
memory budget) and delivers them to the object, answers what needs no object itself
(protocol pings, the auto-response, the reply to a peer's Close), stops reading while
the object is behind (backpressure), and decides the socket's terminal event: a
``CloseEvent`` or an ``ErrorEvent``, exactly once. It holds no object state, which is
why it keeps running while the object hibernates.

Object code reaches it synchronously, as the record's
:class:`~trio_hibernate._core.sockets.Transport`: a send is a write, a close sends our
Close frame and starts a watchdog for the peer's answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, final

import trio
from wsproto.connection import Connection as WSConnection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from .._containment import object_label
from .._core.events import CloseEvent, ErrorEvent, MessageEvent
from .._core.sockets import should_pause_reading
from .._errors import WebSocketProtocolError
from .writer import Writer

if TYPE_CHECKING:
    from .._core.budget import MemoryBudget
    from .._core.sockets import SocketRecord
    from .channel import ByteChannel
    from .deflate import DeflateExtension
    from .owner import ConnectionOwner, ObjectLink

__all__ = ["WebSocketTransport"]

log = logging.getLogger("trio_hibernate.connection")

_DROP_REASON: Final = "WebSocket disconnected without sending Close frame."


def _join(parts: list[str | bytes]) -> str | bytes:
    if isinstance(parts[0], str):
        return "".join(p for p in parts if isinstance(p, str))
    return b"".join(p for p in parts if isinstance(p, bytes))


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


def _answer_close(
    ws: WSConnection,
    record: SocketRecord,
    event: CloseConnection,
    owner: ConnectionOwner,
    peer: Callable[[], str],
) -> tuple[bytes | None, CloseEvent | ErrorEvent]:
    """What a Close frame from the peer calls for: our Close frame to send (or None), and
    the socket's terminal event."""
    state = ws.state
    code, reason = int(event.code), event.reason or ""
    if state is ConnectionState.REMOTE_CLOSING:
        # The peer started: answer at once (spec 7, Rule), then tell the object.
        return ws.send(event.response()), CloseEvent(record, code, reason, True)
    if state is ConnectionState.CLOSED:
        return None, CloseEvent(record, code, reason, True)  # the answer to our close()
    # wsproto reports a protocol violation as a CloseConnection it did not receive. It
    # sets no size limit: 1009 and 1013 come from permessage-deflate refusing to inflate
    # a message past Limits.max_message_bytes or the memory budget (_net/deflate.py).
    if code == 1009:
        limit = owner.limits.max_message_bytes
        reason = f"Message is too large: over {limit} bytes once inflated"
    elif code == 1013:
        reason = _over_budget(owner.buffers, "inflating a compressed message", peer())
    reply = None
    if state is ConnectionState.OPEN:
        reply = ws.send(CloseConnection(code=code, reason=reason[:120]))
    return reply, ErrorEvent(record, WebSocketProtocolError(code, reason))


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
        "_owner",
        "_pending_close",
        "_record",
        "_resume",
        "_terminal",
        "_watchdog",
        "_ws",
        "ended",
        "held",
        "writer",
    )

    def __init__(self, owner: ConnectionOwner, channel: ByteChannel) -> None:
        self._owner = owner
        self._channel = channel
        self.writer = Writer(owner, channel, self)
        """The connection's outbound half (this transport hears its failures)."""
        self._ws: WSConnection | None = None
        self._encode = owner.frame_encoder  # the host's (shared), or the socket's deflate
        self._entry: ObjectLink | None = None
        self._record: SocketRecord | None = None
        self._pending_close: tuple[int | None, str] | None = None
        self.held = 0
        """Bytes of a message being reassembled, counted in the host's memory budget."""
        self._resume: trio.Event | None = None
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

    def upgraded(self, ws: WSConnection, deflate: DeflateExtension | None = None) -> None:
        """The 101 went out; ``ws`` carries the frames, compressed with ``deflate`` if
        negotiated. A close the object asked for before is sent now."""
        self._ws = ws
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
        return self._record is not None and self._ws is not None

    @property
    def handshake_done(self) -> bool:
        """Both Close frames went: the peer will send nothing more."""
        return self._ws is not None and self._ws.state is ConnectionState.CLOSED

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
        """Give back to the budget the bytes of a message that was cut short."""
        self._owner.buffers.give(self.held)
        self.held = 0

    # -- the read loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Read frames until the socket's terminal event is decided or the peer is gone.
        A message cut short stays counted in ``held`` (see :meth:`release_held`).

        A message's turn may run in this task (an inline turn, see ``_activation.py``),
        inside a cancel scope the object's activation cancels when it is reset or the
        host shuts down: then reading goes on in a fresh scope.

        Raises:
            trio.ClosedResourceError: The connection was aborted (its end is decided).
        """
        while True:
            with trio.CancelScope() as scope:
                if not await self._read(scope):
                    return
            # An inline turn was cancelled with its object (the scope is spent): read on.

    async def _read(self, scope: trio.CancelScope) -> bool:
        """The read loop of :meth:`run`; True when ``scope`` was cancelled and must be
        replaced (an inline turn was cancelled), False when the socket is done."""
        ws = self._ws
        record = self._record
        entry = self._entry
        assert ws is not None
        assert record is not None
        assert entry is not None
        core = entry.core
        owner = self._owner
        channel = self._channel
        deliver = entry.deliver
        budget = owner.buffers
        counters = owner.counters
        limits = owner.limits
        max_bytes = limits.max_message_bytes
        parts: list[str | bytes] = []
        while True:
            for event in ws.events():
                kind = type(event)
                if kind is TextMessage or kind is BytesMessage:
                    assert isinstance(event, TextMessage | BytesMessage)
                    if self._terminal:
                        continue  # shutting down: discard, wait for the peer's Close
                    payload = event.data
                    chunk: str | bytes
                    if isinstance(payload, str):
                        chunk = payload
                        added = len(payload) if payload.isascii() else len(payload.encode())
                    else:
                        chunk = payload if type(payload) is bytes else bytes(payload)
                        added = len(chunk)
                    size = self.held + added
                    if size > max_bytes:
                        self.fail(1009, f"Message is too large: {size} > {max_bytes}")
                        return False
                    if not budget.take(added):
                        self.fail(
                            1013, _over_budget(budget, f"a {size}-byte message", channel.peer())
                        )
                        return False
                    self.held = size
                    if not event.message_finished:
                        parts.append(chunk)
                        continue
                    message = chunk
                    if parts:
                        parts.append(chunk)
                        message = _join(parts)
                        parts = []
                    self.held = 0  # from here the event holds the bytes (see _core/budget.py)
                    if isinstance(message, str) and core.is_auto_response(message):
                        budget.give(size)
                        reply = core.record_auto_response(record, owner.wall_clock())
                        counters.auto_responded()
                        if reply is not None:
                            self.send_message(reply)
                        continue
                    turns = entry.inline_turns()
                    if turns is None:
                        deliver(MessageEvent(record, message, size))
                        continue
                    await turns.run_inline(MessageEvent(record, message, size), scope)
                    turns = None  # it holds the instance, which may hibernate now
                    if scope.cancel_called:
                        return True
                elif kind is Ping:
                    assert isinstance(event, Ping)
                    if ws.state is ConnectionState.OPEN:
                        self.writer.write(ws.send(event.response()))
                elif kind is CloseConnection:
                    assert isinstance(event, CloseConnection)
                    frame, end = _answer_close(ws, record, event, owner, channel.peer)
                    if frame is not None:
                        self.writer.write(frame)
                    self._end(end)
                    return False
                # Pong: nothing to do.
            if channel.dead:
                # Lost while writing (reset by the peer), or aborted after the end was
                # decided (then this changes nothing): the object must hear of it.
                self._end(CloseEvent(record, 1006, _DROP_REASON, False))
                return False
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
            if parts:
                # A message is partly here: it must keep coming, or it is dropped.
                with trio.move_on_after(owner.partial_message_timeout) as stalled:
                    data = await channel.receive()
                if stalled.cancelled_caught:
                    self.fail(
                        1008,
                        f"message incomplete: no data for {owner.partial_message_timeout:g} s "
                        "(partial_message_timeout)",
                    )
                    return False
            else:
                data = await channel.receive()
            if not data:
                self._end(CloseEvent(record, 1006, _DROP_REASON, False))
                return False
            ws.receive_data(data)

    def fail(self, code: int, reason: str) -> None:
        """Close with ``code`` (the peer's fault, or ours: 1011) and end with an error."""
        ws = self._ws
        record = self._record
        assert ws is not None
        assert record is not None
        if ws.state is ConnectionState.OPEN:
            self.writer.write(ws.send(CloseConnection(code=code, reason=reason)))
        self._end(ErrorEvent(record, WebSocketProtocolError(code, reason)))

    def _end(self, event: CloseEvent | ErrorEvent) -> None:
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
        ws = self._ws
        if ws is None:
            self._pending_close = (code, reason)
            return
        if self._channel.dead or ws.state is not ConnectionState.OPEN:
            return
        # wsproto sends an empty Close only for the enum member, not the int 1005.
        close_code = CloseReason.NO_STATUS_RCVD if code is None else code
        self.writer.write(ws.send(CloseConnection(code=close_code, reason=reason)))
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
        self.ended = self.ended or (code, "server")
        self.resume_reading()
        ws = self._ws
        if ws is None and not self._channel.dead:
            return
        if ws is not None and ws.state is ConnectionState.OPEN and not self._channel.dead:
            self.writer.write(ws.send(CloseConnection(code=code, reason=reason)))
            if self._record is not None and not decided:
                self._record.decide_end()
        else:
            self.abort()

    @property
    def is_upgraded(self) -> bool:
        """The 101 went out."""
        return self._ws is not None

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
            self._end(ErrorEvent(self._record, WebSocketProtocolError(1011, reason)))
        self.abort()
