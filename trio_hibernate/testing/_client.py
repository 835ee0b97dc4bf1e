"""A pull-based WebSocket test client over an in-process socket pair."""

from __future__ import annotations

import math
from typing import Protocol, final

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

__all__ = ["ClientOwner", "TestWebSocket", "handshake"]

_RECV_BYTES = 65536


class ClientOwner(Protocol):
    """What a client asks of the test host that connected it."""

    @property
    def wait_timeout(self) -> float:
        """Trio seconds a wait on the server lasts before it raises ``TooSlowError``."""
        ...

    async def settle(self, *, timeout: float | None = None) -> None:
        """Wait until every event delivered so far has been handled."""


@final
class TestWebSocket:
    """A client WebSocket connected to an object of a test host.

    Pull-based: nothing runs in the background, so what a test sees is exactly what it
    asked for. Every method is a checkpoint. The methods that wait for the server
    (:meth:`receive`, :meth:`ping`, :meth:`close`) give up after ``timeout`` seconds of
    Trio time (the host's :attr:`TestHost.wait_timeout <trio_hibernate.testing.TestHost>`
    unless given) and raise :class:`trio.TooSlowError` saying what they waited for.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        stream: trio.SocketStream,
        protocol: WSConnection,
        target: str,
        owner: ClientOwner,
        holding: dict[TestWebSocket, None],
    ) -> None:
        # Made by TestHost.connect(). ``holding``: the host's clients that still hold
        # their socket (closed at its exit); this one leaves it when it lets go.
        self._stream = stream
        self._ws = protocol
        self._owner = owner
        self._holding = holding
        self._events: list[Event] = []
        self._parts: list[str | bytes] = []
        self.target = target
        """The request target this socket was opened to (``/room/a?nick=ada``)."""
        self.close_code: int | None = None
        """The code of the server's Close frame once it arrived (1006 if dropped)."""
        self.close_reason = ""
        """The reason of the server's Close frame."""

    def __repr__(self) -> str:
        return f"<TestWebSocket to {self.target!r}>"

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
                if self.close_code is None:
                    self.close_code, self.close_reason = 1006, "connection dropped"
                await self._release()
                raise WebSocketClosed(1006, "connection dropped")
        return self._events.pop(0)

    async def _write(self, event: Event) -> None:
        # Shielded: a timeout must not cut a frame in half (a socket pair takes a small
        # frame at once, so this does not block).
        with trio.CancelScope(shield=True):
            await self._stream.send_all(self._ws.send(event))

    def _seconds(self, timeout: float | None) -> float:
        seconds = self._owner.wait_timeout if timeout is None else timeout
        if not seconds > 0:
            raise ValueError(f"timeout must be > 0 seconds (math.inf: no limit), not {seconds!r}")
        return seconds

    def _too_slow(self, what: str, seconds: float) -> trio.TooSlowError:
        return trio.TooSlowError(
            f"{what} on {self!r} waited {seconds:g} s of Trio time (virtual under the "
            "autojump clock) and nothing came; pass timeout= to wait longer, or check "
            "that the object sends what the test expects"
        )

    async def send(self, message: str | bytes, *, settle: bool = False) -> None:
        """Send a text (``str``) or binary (``bytes``) message.

        Returns once the bytes are written, usually before the object has handled
        them. ``settle=True`` then waits (:meth:`TestHost.settle
        <trio_hibernate.testing.TestHost.settle>`) until every event delivered so far,
        this message included, has been handled and its writes committed: do so before
        ``run_alarm()``, ``hibernate()`` or a look at storage, which would otherwise race
        with the message.

        Raises:
            trio.TooSlowError: ``settle=True`` and the objects were still busy after the
                host's ``wait_timeout``.
        """
        if isinstance(message, str):
            await self._write(Message(data=message))
        else:
            await self._write(Message(data=bytes(message)))
        if settle:
            await self._owner.settle()

    async def receive(self, *, timeout: float | None = None) -> str | bytes:
        """The next message from the object.

        Args:
            timeout: Trio seconds to wait (default: the host's ``wait_timeout``, 10 s
                unless set; ``math.inf`` waits forever). Under the autojump clock this is
                virtual time, so a message that never comes fails fast.

        Raises:
            WebSocketClosed: the server closed (its Close is answered) or dropped.
            trio.TooSlowError: no message within ``timeout``; a message whose frames
                had begun to arrive is kept for the next call.
        """
        seconds = self._seconds(timeout)
        with trio.move_on_after(seconds) as scope:
            return await self._receive()
        assert scope.cancelled_caught
        raise self._too_slow("receive()", seconds)

    async def _receive(self) -> str | bytes:
        if self.close_code is not None:
            await trio.lowlevel.checkpoint()
            raise WebSocketClosed(self.close_code, self.close_reason)
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
                # The closing handshake is over: release the socket now.
                await self._release()
                raise WebSocketClosed(self.close_code, self.close_reason)

    async def ping(self, payload: bytes = b"ping", *, timeout: float | None = None) -> None:
        """Send a protocol ping and wait for its pong (other events are kept).

        Raises:
            trio.TooSlowError: no pong within ``timeout`` (see :meth:`receive`).
        """
        seconds = self._seconds(timeout)
        await self._write(Ping(payload=payload))
        kept: list[Event] = []
        try:
            with trio.move_on_after(seconds) as scope:
                while True:
                    event = await self._next_event()
                    if isinstance(event, Pong) and event.payload == payload:
                        return
                    kept.append(event)
        finally:
            self._events[:0] = kept
        assert scope.cancelled_caught
        raise self._too_slow(f"ping({payload!r}) waiting for its pong", seconds)

    async def close(
        self, code: int | None = 1000, reason: str = "", *, timeout: float | None = None
    ) -> tuple[int, str]:
        """Close (``code=None`` sends a Close without a code) and wait for the reply.

        Returns the server's (code, reason). Messages still in flight are discarded.
        The socket is released either way.

        Raises:
            trio.TooSlowError: the server did not answer within ``timeout``.
        """
        seconds = self._seconds(timeout)
        try:
            if self._ws.state is ConnectionState.OPEN:
                close_code = CloseReason.NO_STATUS_RCVD if code is None else code
                await self._write(CloseConnection(code=close_code, reason=reason))
            with trio.move_on_after(seconds):
                while self.close_code is None:
                    event = await self._next_event()
                    if isinstance(event, CloseConnection):
                        self.close_code, self.close_reason = int(event.code), event.reason or ""
        finally:
            await self._release()
        if self.close_code is None:
            raise self._too_slow("close() waiting for the server's Close", seconds)
        return self.close_code, self.close_reason

    async def drop(self) -> None:
        """Drop the connection without a Close frame (the object sees 1006)."""
        await self._release()

    async def aclose(self) -> None:
        """Close cleanly if still open (waiting at most 5 s), then release the socket."""
        if self._ws.state is ConnectionState.OPEN:
            with trio.move_on_after(5):
                await self.close(timeout=math.inf)
        await self._release()

    async def _release(self) -> None:
        self._holding.pop(self, None)
        await self._stream.aclose()


async def handshake(
    stream: trio.SocketStream,
    target: str,
    headers: list[tuple[str, str]],
    owner: ClientOwner,
    holding: dict[TestWebSocket, None],
) -> TestWebSocket:
    """Run the client side of the upgrade on ``stream``; the client then joins
    ``holding`` (until it releases its socket)."""
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
                client = TestWebSocket(stream, protocol, target, owner, holding)
                client._events.extend(protocol.events())
                holding[client] = None
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
