"""A WebSocket spliced to the host that owns its object (cluster mode).

A host that relays an upgrade to the owner of its object (``_cluster/relay.py``) gets
the owner's 101 over its own connection to that host, the *upstream*. The client's
connection then completes the upgrade with the owner's bytes: it writes the owner's
101 head verbatim (with whatever the owner sent after it), sends the owner the bytes
the client sent after its request, and from then on copies bytes both ways without
reading them. The frames, the closing handshake and the socket's object all live on
the owner; this host keeps no record of the socket.

Each direction holds at most one read of :data:`SPLICE_CHUNK_BYTES` and reads again
only once it is sent (backpressure: a peer that does not read stalls the other side's
reads, never this host's memory). The splice ends when either side closes or breaks,
or when the host shuts down (the connection aborts its channel); the other side is
then closed: the client's connection ends with a lingering close, the upstream is
closed at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, final

import attrs
import trio

if TYPE_CHECKING:
    from .channel import ByteChannel

__all__ = ["SPLICE_CHUNK_BYTES", "SplicePipe", "SplicedUpgrade"]

#: Bytes read at most from either side before they are sent on (the pipe's buffer).
SPLICE_CHUNK_BYTES: Final = 65536


@attrs.frozen(eq=False)
class SplicedUpgrade:
    """An upgrade the owning host answered 101: its connection, and what it sent so far.

    ``head`` holds the owner's 101 head as it was received and any bytes that came
    after it (its first frames). Whoever holds this owns ``upstream``: the splice
    closes it when it ends; a request answered otherwise closes it unused.
    """

    head: bytes
    upstream: trio.abc.Stream


@final
class SplicePipe:
    """The bytes of one client connection copied to and from the owning host's (see
    the module). ``early`` are the bytes the client sent after its request."""

    __slots__ = ("_channel", "_early", "_spliced")

    def __init__(self, spliced: SplicedUpgrade, channel: ByteChannel, early: bytes) -> None:
        self._spliced = spliced
        self._channel = channel
        self._early = early

    async def run(self) -> None:
        """Copy bytes both ways until either side closes; then close the upstream.

        Cancellation: the upstream is closed (forcefully) on the way out.
        """
        upstream = self._spliced.upstream
        try:
            async with trio.open_nursery() as nursery:
                done = nursery.cancel_scope
                nursery.start_soon(self._downstream, done)
                nursery.start_soon(self._upstream, done)
        finally:
            await trio.aclose_forcefully(upstream)

    async def _downstream(self, done: trio.CancelScope) -> None:
        """The owner's bytes to the client, its 101 head first."""
        upstream, channel = self._spliced.upstream, self._channel
        try:
            await _send_to_client(channel, self._spliced.head)
            while data := await upstream.receive_some(SPLICE_CHUNK_BYTES):
                await _send_to_client(channel, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # either side is gone: the splice ends
        finally:
            done.cancel()

    async def _upstream(self, done: trio.CancelScope) -> None:
        """The client's bytes to the owner, those read with its request first."""
        upstream, channel = self._spliced.upstream, self._channel
        try:
            if self._early:
                await upstream.send_all(self._early)
            while data := await channel.receive():
                await upstream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # either side is gone (or the host shuts down): the splice ends
        finally:
            done.cancel()


async def _send_to_client(channel: ByteChannel, data: bytes | bytearray) -> None:
    """Send all of ``data`` to the client, as fast as it reads."""
    pending = bytearray(data)
    while pending:
        sent = await channel.send_some(pending)
        del pending[:sent]
