"""A pull-based WebSocket test client over an in-process socket pair."""

from __future__ import annotations

from typing import final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from .._errors import UpgradeRejected, WebSocketClosed

__all__ = ["TestWebSocket", "handshake"]

_RECV_BYTES = 65536


@final
class TestWebSocket:
    """A client WebSocket connected to an object of a test host.

    Pull-based: nothing runs in the background, so what a test sees is exactly what it
    asked for. Every method is a checkpoint; wrap waits in ``trio.fail_after``.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, stream: trio.SocketStream, protocol: WSConnection) -> None:
        # Made by TestHost.connect().
        self._stream = stream
        self._ws = protocol
        self._events: list[Event] = []
        self._parts: list[str | bytes] = []
        self.close_code: int | None = None
        """The code of the server's Close frame once it arrived (1006 if dropped)."""
        self.close_reason = ""
        """The reason of the server's Close frame."""

    async def _pump(self) -> bool:
        """Read more from the server into events. False at EOF."""
        data = await self._stream.receive_some(_RECV_BYTES)
        if not data:
            self._ws.receive_data(None)
            self._events.extend(self._ws.events())
            return False
        self._ws.receive_data(data)
        self._events.extend(self._ws.events())
        return True

    async def _next_event(self) -> Event:
        if self._events:
            await trio.lowlevel.checkpoint()  # every method is a checkpoint, buffered or not
        while not self._events:
            if not await self._pump() and not self._events:
                raise WebSocketClosed(1006, "connection dropped")
        return self._events.pop(0)

    async def _write(self, event: Event) -> None:
        await self._stream.send_all(self._ws.send(event))

    async def send(self, message: str | bytes) -> None:
        """Send a text (``str``) or binary (``bytes``) message."""
        if isinstance(message, str):
            await self._write(Message(data=message))
        else:
            await self._write(Message(data=bytes(message)))

    async def receive(self) -> str | bytes:
        """The next message from the object.

        Raises:
            WebSocketClosed: the server closed (its Close is answered) or dropped.
        """
        while True:
            event = await self._next_event()
            if isinstance(event, TextMessage | BytesMessage):
                data = event.data
                self._parts.append(data if isinstance(data, str) else bytes(data))
                if event.message_finished:
                    parts, self._parts = self._parts, []
                    if isinstance(parts[0], str):
                        return "".join(p for p in parts if isinstance(p, str))
                    return b"".join(bytes(p) for p in parts if not isinstance(p, str))
            elif isinstance(event, Ping):
                await self._write(event.response())
            elif isinstance(event, CloseConnection):
                self.close_code, self.close_reason = int(event.code), event.reason or ""
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._write(event.response())
                raise WebSocketClosed(self.close_code, self.close_reason)

    async def ping(self, payload: bytes = b"ping") -> None:
        """Send a protocol ping and wait for its pong (other events are kept)."""
        await self._write(Ping(payload=payload))
        kept: list[Event] = []
        while True:
            event = await self._next_event()
            if isinstance(event, Pong) and event.payload == payload:
                break
            kept.append(event)
        self._events[:0] = kept

    async def close(self, code: int | None = 1000, reason: str = "") -> tuple[int, str]:
        """Close (``code=None`` sends a Close without a code) and wait for the reply.

        Returns the server's (code, reason). Messages still in flight are discarded.
        """
        if self._ws.state is ConnectionState.OPEN:
            close_code = CloseReason.NO_STATUS_RCVD if code is None else code
            await self._write(CloseConnection(code=close_code, reason=reason))
        while self.close_code is None:
            event = await self._next_event()
            if isinstance(event, CloseConnection):
                self.close_code, self.close_reason = int(event.code), event.reason or ""
        await self._stream.aclose()
        return self.close_code, self.close_reason

    async def drop(self) -> None:
        """Drop the connection without a Close frame (the object sees 1006)."""
        await self._stream.aclose()

    async def aclose(self) -> None:
        """Close cleanly if still open, then release the socket."""
        if self._ws.state is ConnectionState.OPEN:
            with trio.move_on_after(5):
                await self.close()
        await self._stream.aclose()


async def handshake(
    stream: trio.SocketStream, target: str, headers: list[tuple[str, str]]
) -> TestWebSocket:
    """Run the client side of the upgrade on ``stream``."""
    protocol = WSConnection(ConnectionType.CLIENT)
    encoded = [(k.encode(), v.encode()) for k, v in headers]
    await stream.send_all(protocol.send(Request(host="test", target=target, extra_headers=encoded)))
    status = 0
    body = b""
    while True:
        data = await stream.receive_some(_RECV_BYTES)
        protocol.receive_data(data or None)
        for event in protocol.events():
            if isinstance(event, AcceptConnection):
                client = TestWebSocket(stream, protocol)
                client._events.extend(protocol.events())
                return client
            if isinstance(event, RejectConnection):
                status = event.status_code
                if not event.has_body:
                    raise UpgradeRejected(status, body)
            elif isinstance(event, RejectData):
                body += event.data
                if event.body_finished:
                    raise UpgradeRejected(status, body)
        if not data:
            raise UpgradeRejected(status, body)
