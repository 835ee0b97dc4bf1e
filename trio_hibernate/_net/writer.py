"""Writing to a client: synchronous writes, a backlog with a flusher, a lingering close.

Writes never block (object code calls ``ws.send`` without awaiting). Until the response
goes out, bytes are held (the object may send its first messages before the 101). Then
each write goes straight to the channel's ``send_nowait``; whatever it does not take
goes to a backlog, counted in the host's memory budget, and a flusher task sends it as
the peer reads. A peer that lets the backlog grow past ``Limits.max_send_buffer_bytes``
(or the budget run out) is dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, Protocol, final

import trio

if TYPE_CHECKING:
    from .._core.budget import MemoryBudget
    from .channel import ByteChannel
    from .owner import ConnectionOwner

__all__ = ["REFUSAL_LINGER_SECONDS", "WriteFailures", "Writer", "over_budget_text"]

log = logging.getLogger("trio_hibernate.connection")

#: Closing a socket with unread bytes, or getting bytes after closing it, makes the
#: kernel send a reset, which throws away whatever the peer has not received yet: the end
#: of a response, the last frames, our Close frame. So a connection that sent something
#: ends with a lingering close (:meth:`Writer.linger`): our bytes go out, then EOF, while
#: what the peer still sends is read and discarded until its EOF; for at most
#: ``close_timeout`` (this long after a refused request) and :data:`_LINGER_BYTES`
#: bytes. Past either bound the socket is closed as it is, and the peer gets a reset.
REFUSAL_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 1024 * 1024


def over_budget_text(budget: MemoryBudget) -> str:
    """Why bytes cannot be held for a client: the host-wide budget is spent."""
    return (
        f"the server is over its memory budget ({budget.used} of {budget.limit} bytes "
        "in use, Limits.max_buffered_bytes)"
    )


class WriteFailures(Protocol):
    """Who hears that a connection's bytes cannot go out (its WebSocket transport)."""

    def lost(self) -> None:
        """Writing failed: the peer reset the connection (the channel is dead)."""

    def drop_slow_reader(self, reason: str) -> None:
        """Outbound bytes cannot be buffered for this peer: drop the connection."""


@final
class _NoFailures:
    """The failure listener of a writer whose connection is over: nothing to tell."""

    __slots__ = ()

    def lost(self) -> None:
        """See :meth:`WriteFailures.lost`."""

    def drop_slow_reader(self, reason: str) -> None:
        """See :meth:`WriteFailures.drop_slow_reader`."""


_NO_FAILURES: Final = _NoFailures()


@final
class Writer:
    """The outbound half of one connection (see the module)."""

    __slots__ = (
        "_backlog",
        "_channel",
        "_closing",
        "_failures",
        "_flushed",
        "_owner",
        "_pending",
        "_send_nowait",
    )

    def __init__(
        self, owner: ConnectionOwner, channel: ByteChannel, failures: WriteFailures
    ) -> None:
        self._owner = owner
        self._channel = channel
        self._send_nowait = channel.send_nowait
        self._failures: WriteFailures = failures
        # Bytes written before the response went out; None afterwards.
        self._pending: list[bytes] | None = []
        self._backlog: bytearray | None = None
        self._flushed: trio.Event | None = None
        self._closing = False  # lingering: writes are dropped, the backlog still goes out

    @property
    def responded(self) -> bool:
        """The response (or the 101) has started to go out."""
        return self._pending is None

    def start_response(self) -> list[bytes]:
        """From now on writes go to the peer. Returns what was written before (frames the
        object sent before the 101), for the caller to write after the response head."""
        pending = self._pending or []
        self._pending = None
        return pending

    def detach(self) -> None:
        """The connection is over: stop reporting failures (to the transport, which
        points back here: a cycle the collector would otherwise have to find)."""
        self._failures = _NO_FAILURES

    def write(self, data: bytes | bytearray) -> None:
        """Send ``data`` now, or as soon as the peer reads it. Never blocks.

        Dropped while lingering or once the channel is dead. Past the send buffer limit
        or the memory budget, the connection is dropped (``WriteFailures``).
        """
        if self._pending is not None:
            self._pending.append(bytes(data))
            return
        if self._channel.dead or self._closing:
            return
        backlog = self._backlog
        if backlog is not None:
            owner = self._owner
            limit = owner.limits.max_send_buffer_bytes
            if len(backlog) + len(data) > limit:
                self._failures.drop_slow_reader(
                    f"the peer is not reading: over {limit} bytes buffered "
                    "(Limits.max_send_buffer_bytes)"
                )
            elif not owner.buffers.take(len(data)):
                self._failures.drop_slow_reader(over_budget_text(owner.buffers))
            else:
                backlog += data
            return
        try:
            sent = self._send_nowait(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._lost()
            return
        if sent < len(data):
            # One write may leave more than max_send_buffer_bytes behind (a big message):
            # the cap applies to what piles up on top while the peer does not read.
            owner = self._owner
            if owner.buffers.take(len(data) - sent):
                self._backlog = bytearray(memoryview(data)[sent:])
                owner.spawn(self._flush)
            else:
                self._failures.drop_slow_reader(over_budget_text(owner.buffers))

    def _lost(self) -> None:
        self._channel.dead = True
        self._failures.lost()

    async def _flush(self) -> None:
        channel = self._channel
        buffers = self._owner.buffers
        backlog = self._backlog
        assert backlog is not None
        try:
            while backlog and not channel.dead:
                try:
                    sent = await channel.send_some(backlog)
                except trio.BrokenResourceError:
                    self._lost()
                    break
                del backlog[:sent]
                buffers.give(sent)
            if self._closing and not channel.dead:
                await channel.send_eof()  # the EOF that linger() left to follow the backlog
        except trio.ClosedResourceError:
            pass  # aborted; nothing more can be written
        finally:
            buffers.give(len(backlog))
            self._backlog = None
            if self._flushed is not None:
                self._flushed.set()

    async def linger(self, seconds: float, *, handshake_done: bool) -> None:
        """End the connection without a reset (see :data:`REFUSAL_LINGER_SECONDS`): what
        we buffered goes out, then EOF, while what the peer still sends is read and
        discarded until its EOF. Returns then, after ``seconds``, or once the peer has
        sent ``_LINGER_BYTES`` more, whichever comes first; nothing more is written from
        the start.

        A peer that sends a burst before it reads needs this: after a protocol error or a
        refusal in the middle of the burst, it reads our last bytes only once its own
        sending is done, so we keep reading until then. After a complete closing handshake
        (``handshake_done``) the peer sends nothing more and the server closes at once
        (RFC 6455 section 7.1.1): only our buffered bytes are waited for.

        Raises:
            trio.ClosedResourceError: The connection was aborted meanwhile.
        """
        channel = self._channel
        if channel.dead:
            return
        self._closing = True
        if self._backlog is None:
            await channel.send_eof()
        # Else the flusher sends EOF once the backlog is out.
        if handshake_done and channel.discard_unread():
            # The peer sent more after its Close (a broken client): it may still be
            # sending, and closing on its unread bytes would reset the connection before
            # it has read ours. Linger as for any peer still sending.
            handshake_done = False
        discarded = 0
        with trio.move_on_after(seconds):
            while not handshake_done and (data := await channel.receive()):
                discarded += len(data)
                if discarded > _LINGER_BYTES:
                    return  # the peer does not stop: closing now resets it
            if self._backlog is not None:  # the peer may still be reading
                self._flushed = trio.Event()
                await self._flushed.wait()
