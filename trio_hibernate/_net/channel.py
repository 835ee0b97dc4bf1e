"""The byte channel under a connection: an OS socket, or any ``trio.abc.Stream``.

A connection reads with :meth:`ByteChannel.receive` and writes synchronously with
``send_nowait``: object code sends without awaiting. Over a socket that is the kernel's
non-blocking ``send``, which takes the bytes at once unless its buffer is full; only then
does the writer start a flusher task that awaits :meth:`ByteChannel.send_some`. A stream
has no synchronous send: its ``send_nowait`` takes nothing, so every write goes to the
writer's backlog and the flusher's ``await stream.send_all``. The socket is the fast
path that serves clients; the stream lets tests drive a real connection over
``trio.testing`` memory streams, with the mock clock and no real I/O.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Final, Protocol, final

import trio

__all__ = ["ByteChannel", "SocketChannel", "StreamChannel"]

#: Bytes asked for per read.
_RECV_BYTES: Final = 65536


class ByteChannel(Protocol):
    """Bytes to and from one client.

    ``dead`` is true once the channel is unusable: :meth:`abort` was called, or a write
    found the peer gone (the writer sets it). Nothing is read or written then.
    """

    dead: bool

    #: Send what can go out at once, synchronously: returns how many bytes went. Raises
    #: ``OSError`` if the peer is gone (``BlockingIOError`` or ``InterruptedError``
    #: mean that nothing went).
    send_nowait: Callable[[bytes | bytearray], int]

    async def receive(self) -> bytes:
        """The next bytes from the peer; ``b""`` on EOF, a transport error, or when dead.

        Raises:
            trio.ClosedResourceError: :meth:`abort` was called while waiting.
        """
        ...

    async def send_some(self, data: bytearray) -> int:
        """Wait until the peer can take some of ``data``, send it; return how much went.

        Raises:
            trio.BrokenResourceError: The peer is gone.
            trio.ClosedResourceError: :meth:`abort` was called while waiting.
        """
        ...

    async def send_eof(self) -> None:
        """Send EOF after what was sent (if the peer is gone, nothing happens)."""

    def discard_unread(self) -> bool:
        """Read and drop what the peer has sent and nobody read, without waiting; True if
        there was any. (Closing a socket with unread bytes resets the connection, and a
        reset may destroy what the peer has not read yet of ours.)"""
        ...

    def abort(self) -> None:
        """Make the channel dead; a task waiting in ``receive`` or ``send_some`` gets
        ``trio.ClosedResourceError``. Does nothing if already dead."""

    async def aclose(self) -> None:
        """Abort, and close the underlying socket or stream (never blocks)."""

    def peer(self) -> str:
        """Who is at the other end, for log lines."""
        ...


#: How many reads :meth:`SocketChannel.discard_unread` makes at most (a peer that keeps
#: sending is lingered for instead: see ``Writer.linger``).
_LINGER_READS: Final = 16


@final
class SocketChannel:
    """A connected non-blocking OS socket (see :class:`ByteChannel`).

    Not a checkpoint: :meth:`send_eof` and :meth:`aclose` (they never block).
    """

    __slots__ = ("_sock", "dead", "send_nowait")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.dead = False
        self.send_nowait: Callable[[bytes | bytearray], int] = sock.send

    async def receive(self) -> bytes:
        """See :meth:`ByteChannel.receive`."""
        sock = self._sock
        while True:
            if self.dead:
                return b""
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return b""

    async def send_some(self, data: bytearray) -> int:
        """See :meth:`ByteChannel.send_some` (may return 0: the wait was spurious)."""
        sock = self._sock
        await trio.lowlevel.wait_writable(sock)
        try:
            return sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"sending to {self.peer()} failed: {exc}") from exc

    async def send_eof(self) -> None:
        """See :meth:`ByteChannel.send_eof`: EOF after the bytes the kernel holds."""
        with contextlib.suppress(OSError):  # already reset by the peer
            self._sock.shutdown(socket.SHUT_WR)

    def discard_unread(self) -> bool:
        """See :meth:`ByteChannel.discard_unread` (at most ``_LINGER_READS`` reads)."""
        found = False
        for _ in range(_LINGER_READS):
            try:
                data = self._sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
            except OSError:  # nothing there (BlockingIOError), or reset
                return found
            if not data:
                return found
            found = True
        return found

    def abort(self) -> None:
        """See :meth:`ByteChannel.abort`."""
        if not self.dead:
            self.dead = True
            trio.lowlevel.notify_closing(self._sock)

    async def aclose(self) -> None:
        """See :meth:`ByteChannel.aclose`."""
        self.dead = True
        trio.lowlevel.notify_closing(self._sock)  # wakes a flusher still waiting on it
        self._sock.close()

    def peer(self) -> str:
        """See :meth:`ByteChannel.peer`."""
        try:
            address = self._sock.getpeername()
        except OSError:
            return "a client"
        return f"{address[0]}:{address[1]}"


def _nothing_now(data: bytes | bytearray) -> int:
    return 0


@final
class StreamChannel:
    """Any ``trio.abc.Stream`` (see :class:`ByteChannel`): every write goes through the
    writer's flusher task, which awaits ``send_all``. EOF is sent only on a
    ``trio.abc.HalfCloseableStream``."""

    __slots__ = ("_receiving", "_sending", "_stream", "dead", "send_nowait")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self.dead = False
        self.send_nowait: Callable[[bytes | bytearray], int] = _nothing_now
        self._receiving: trio.CancelScope | None = None
        self._sending: trio.CancelScope | None = None

    async def receive(self) -> bytes:
        """See :meth:`ByteChannel.receive`."""
        if self.dead:
            await trio.lowlevel.checkpoint()
            return b""
        with trio.CancelScope() as self._receiving:
            try:
                data = await self._stream.receive_some(_RECV_BYTES)
                return data if type(data) is bytes else bytes(data)
            except trio.BrokenResourceError:
                return b""
            finally:
                self._receiving = None
        raise trio.ClosedResourceError("the connection was aborted")

    async def send_some(self, data: bytearray) -> int:
        """See :meth:`ByteChannel.send_some`: sends all of ``data`` as it is now."""
        chunk = bytes(data)  # send_all may keep a view of it, and ``data`` keeps growing
        with trio.CancelScope() as self._sending:
            try:
                await self._stream.send_all(chunk)
            finally:
                self._sending = None
            return len(chunk)
        raise trio.ClosedResourceError("the connection was aborted")

    async def send_eof(self) -> None:
        """See :meth:`ByteChannel.send_eof`."""
        stream = self._stream
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope() as self._sending:
            try:
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer is gone, or we closed it: there is nothing to end
            finally:
                self._sending = None

    def discard_unread(self) -> bool:
        """See :meth:`ByteChannel.discard_unread`: a stream cannot be read without
        waiting, so nothing is read here (False)."""
        return False

    def abort(self) -> None:
        """See :meth:`ByteChannel.abort`."""
        if not self.dead:
            self.dead = True
            self._cancel_waits()

    def _cancel_waits(self) -> None:
        if self._receiving is not None:
            self._receiving.cancel()
        if self._sending is not None:
            self._sending.cancel()

    async def aclose(self) -> None:
        """See :meth:`ByteChannel.aclose`."""
        self.dead = True
        self._cancel_waits()
        await trio.aclose_forcefully(self._stream)

    def peer(self) -> str:
        """See :meth:`ByteChannel.peer`."""
        stream = self._stream
        if isinstance(stream, trio.SocketStream):
            with contextlib.suppress(OSError):
                address = stream.socket.getpeername()
                return f"{address[0]}:{address[1]}"
        return f"a client ({type(stream).__name__})"
