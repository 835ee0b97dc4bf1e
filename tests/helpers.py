"""Test helpers for the end-to-end tests: a server and its clients, small test objects,
a probe that objects report to, raw clients.

Everything here runs under Trio's mock clock in the tests: waits are bounded with
``trio.fail_after`` (virtual seconds), and "let things settle" means
``wait_all_tasks_blocked``, which returns once every task (server and client) has been
blocked for :data:`IO_GRACE_SECONDS` with no socket ready, never a sleep on the clock.

Why a grace and not zero: the tests talk over real loopback sockets, and the runtime
commits storage in a worker thread. Bytes in flight (when the kernel defers loopback
delivery to ``ksoftirqd``) or a thread still running look exactly like "everyone is
blocked", so with ``autojump_threshold = 0`` the mock clock could jump over a timeout
while a reply is on its way. Trio's ``MockClock`` documentation says to set the threshold
"to the smallest value that lets you reliably avoid false alarms where some I/O is in
flight"; the grace is that value. It costs real time only when every task is blocked.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import attrs
import pytest
import trio
from trio.testing import memory_stream_pair, wait_all_tasks_blocked
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response as WsResponse
from websockets.typing import Subprotocol
from websockets.uri import parse_uri
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    Event as WSEvent,
    RejectConnection,
    RejectData,
    Request as WSRequest,
)

from trio_hibernate import (
    App,
    DurableObject,
    Host,
    ObjectContext,
    Request,
    Response,
    Server,
    WebSocket,
    open_host,
    open_server,
)
from trio_hibernate._host import runtime_of

__all__ = [
    "EMPTY_CLOSE_FRAME",
    "IO_GRACE_SECONDS",
    "NEVER",
    "TEST_SECONDS",
    "WAIT_SECONDS",
    "Echo",
    "HttpReply",
    "Probe",
    "QuotingEcho",
    "RawWebSocket",
    "Refusal",
    "WebsocketsClient",
    "accept_upgrade",
    "ask",
    "closed_by_server",
    "http_exchange",
    "in_memory_host",
    "open_client",
    "open_raw_websocket",
    "recv",
    "recv_text",
    "refused_upgrade",
    "send",
    "serve",
    "settle",
]

T = TypeVar("T")

#: Bound on every single wait (virtual seconds under the autojump clock).
WAIT_SECONDS: Final = 30.0
#: Bound on a whole test that :func:`serve` runs (virtual seconds).
TEST_SECONDS: Final = 600.0
#: An idle timeout (or close timeout) that never expires within a test.
NEVER: Final = 1e9
#: Real seconds every task must stay blocked before the mock clock jumps or ``settle``
#: returns (see the module docstring).
IO_GRACE_SECONDS: Final = 0.05

#: A client Close frame with an empty payload (FIN + opcode 8; masked, length 0; mask 0).
EMPTY_CLOSE_FRAME: Final = bytes((0x88, 0x80, 0, 0, 0, 0))


async def settle() -> None:
    """Wait until every task (server and clients) is blocked and no socket has data ready.

    Takes no virtual time: ``wait_all_tasks_blocked`` has priority over the autojump.
    """
    with trio.fail_after(WAIT_SECONDS):
        await wait_all_tasks_blocked(cushion=IO_GRACE_SECONDS)


@attrs.define(eq=False)
class Probe:
    """The ``env`` of the test apps: objects count their constructions and log events here.

    It keeps only weak references to instances, so it never keeps an evicted one alive.
    """

    constructed: int = 0
    events: list[object] = attrs.Factory(list)
    instances: list[weakref.ref[object]] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    def constructing(self, instance: object) -> None:
        """Called by every test object's constructor."""
        self.constructed += 1
        self.instances.append(weakref.ref(instance))

    def record(self, event: object) -> None:
        """Append ``event`` and wake whoever waits in :meth:`wait_for`."""
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def of(self, kind: type[T]) -> list[T]:
        """The recorded events of type ``kind``, in order."""
        return [event for event in self.events if isinstance(event, kind)]

    async def wait_for(self, predicate: Callable[[], bool], seconds: float = WAIT_SECONDS) -> None:
        """Wait (at most ``seconds``) until ``predicate()`` holds after a record."""
        with trio.fail_after(seconds):
            while not predicate():
                await self._changed.wait()


# -- a server and its clients -----------------------------------------------------------------


@asynccontextmanager
async def serve(
    app: App, *, test_seconds: float = TEST_SECONDS, **options: Any
) -> AsyncIterator[Server]:
    """``open_server(app, **options)`` on 127.0.0.1:0, for a test body of at most
    ``test_seconds`` (the ``async with`` block is under a ``trio.fail_after``).

    Objects never hibernate on their own unless the test passes ``idle_timeout``.
    """
    options.setdefault("idle_timeout", NEVER)
    with trio.fail_after(test_seconds):
        async with open_server(app, "127.0.0.1", 0, **options) as server:
            yield server


@asynccontextmanager
async def open_client(server: Server, target: str) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client of ``server`` for ``target``; both handshakes are bounded
    by :data:`WAIT_SECONDS`."""
    url = server.url(target)
    async with open_websocket_url(
        url, connect_timeout=WAIT_SECONDS, disconnect_timeout=WAIT_SECONDS
    ) as ws:
        yield ws


async def send(ws: WebSocketConnection, message: str | bytes) -> None:
    """Send ``message``, within :data:`WAIT_SECONDS`."""
    with trio.fail_after(WAIT_SECONDS):
        await ws.send_message(message)


async def recv(ws: WebSocketConnection) -> str | bytes:
    """The next message, within :data:`WAIT_SECONDS`."""
    with trio.fail_after(WAIT_SECONDS):
        return await ws.get_message()


async def recv_text(ws: WebSocketConnection) -> str:
    """The next message, which must be text."""
    message = await recv(ws)
    assert isinstance(message, str), message
    return message


async def ask(ws: WebSocketConnection, message: str | bytes) -> str:
    """Send ``message`` and return the next message received, which must be text."""
    await send(ws, message)
    return await recv_text(ws)


async def closed_by_server(ws: WebSocketConnection) -> tuple[int, str | None]:
    """Wait for the server's Close; return its (code, reason)."""
    with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as info:
        await ws.get_message()
    reason = info.value.reason
    assert reason is not None
    return reason.code, reason.reason


# -- small test objects ------------------------------------------------------------------------


def accept_upgrade(ctx: ObjectContext, request: Request, tags: Iterable[str] = ()) -> Response:
    """Accept ``request``'s WebSocket with ``tags``; the 101 answer to return from fetch."""
    ws = request.websocket
    assert ws is not None, f"{request.method} {request.url} is not a WebSocket upgrade"
    ctx.accept_websocket(ws, tags)
    return Response(status=101, websocket=ws)


class Echo(DurableObject):
    """Accepts every WebSocket upgrade and answers every message with :meth:`reply`;
    answers plain HTTP with 200 and ``"<method> <body length> bytes"``."""

    async def fetch(self, request: Request) -> Response:
        if request.websocket is None:
            return Response(body=f"{request.method} {len(request.body)} bytes\n")
        return accept_upgrade(self.ctx, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.send(self.reply(message))

    def reply(self, message: str | bytes) -> str | bytes:
        """The answer to ``message``: the message itself."""
        return message


class QuotingEcho(Echo):
    """An :class:`Echo` that answers ``hi`` with ``echo 'hi'`` (and ``b"hi"`` with
    ``echo b'hi'``)."""

    def reply(self, message: str | bytes) -> str | bytes:
        return f"echo {message!r}"


# -- raw clients -------------------------------------------------------------------------------


class RawWebSocket:
    """A minimal WebSocket client on wsproto, for what trio-websocket will not do:
    send an empty Close frame, drop the TCP connection without a Close, withhold the
    answer to the server's Close, or break the protocol."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = WSConnection(ConnectionType.CLIENT)
        self._events: deque[WSEvent] = deque()

    async def send(self, event: WSEvent) -> None:
        """Encode ``event`` with wsproto and send it."""
        with trio.fail_after(WAIT_SECONDS):
            await self.stream.send_all(self.conn.send(event))

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are, bypassing wsproto's state machine."""
        with trio.fail_after(WAIT_SECONDS):
            await self.stream.send_all(data)

    async def next_event(self) -> WSEvent | None:
        """The next wsproto event from the server, or None on EOF."""
        with trio.fail_after(WAIT_SECONDS):
            while not self._events:
                self._events.extend(self.conn.events())
                if self._events:
                    break
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.conn.receive_data(data)
            return self._events.popleft()

    async def drop(self) -> None:
        """Close the TCP connection without any Close frame."""
        with trio.fail_after(WAIT_SECONDS):
            await self.stream.aclose()


@asynccontextmanager
async def _ask_for_upgrade(
    port: int, target: str
) -> AsyncIterator[tuple[RawWebSocket, WSEvent | None]]:
    """Connect to 127.0.0.1:``port`` and ask for an upgrade to ``target``; the client
    and the server's first answer (None: EOF). The connection closes on exit."""
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        raw = RawWebSocket(stream)
        await raw.send(WSRequest(host=f"127.0.0.1:{port}", target=target))
        yield raw, await raw.next_event()


@asynccontextmanager
async def open_raw_websocket(port: int, target: str) -> AsyncIterator[RawWebSocket]:
    """Connect to 127.0.0.1:``port``, complete the upgrade for ``target``; close on exit."""
    async with _ask_for_upgrade(port, target) as (raw, event):
        if not isinstance(event, AcceptConnection):
            raise AssertionError(f"the upgrade to {target} was refused: {event!r}")
        yield raw


@attrs.frozen
class Refusal:
    """A refused WebSocket upgrade: the HTTP status and body."""

    status: int
    body: bytes


async def refused_upgrade(port: int, target: str) -> Refusal:
    """Ask for an upgrade to ``target`` that the server must refuse; return the refusal.

    Done with wsproto rather than trio-websocket because trio-websocket 0.12.2 never
    closes its TCP stream when the server refuses the upgrade (a ResourceWarning, which
    this suite turns into an error).
    """
    async with _ask_for_upgrade(port, target) as (raw, event):
        if isinstance(event, AcceptConnection):
            raise AssertionError(f"the upgrade to {target} was accepted")
        assert isinstance(event, RejectConnection), event
        body = bytearray()
        finished = not event.has_body
        while not finished:
            data = await raw.next_event()
            assert isinstance(data, RejectData), data
            body += data.data
            finished = data.body_finished
        return Refusal(event.status_code, bytes(body))


@attrs.frozen
class HttpReply:
    """A parsed HTTP/1.1 response."""

    status: int
    headers: dict[str, str]
    body: bytes


async def http_exchange(port: int, request: bytes) -> HttpReply:
    """Send a hand-written HTTP request, read to EOF, and parse the response by hand."""
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
    head, separator, body = bytes(received).partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {bytes(received)!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body), (headers, body)
    return HttpReply(int(status), headers, body)


@asynccontextmanager
async def in_memory_host(
    app: App, **options: Any
) -> AsyncIterator[tuple[Host, Callable[[], trio.abc.Stream]]]:
    """``open_host(app, **options)`` and ``connect()``: a new client stream the host
    serves over ``trio.testing`` memory streams (no socket: the autojump clock needs no
    grace). Objects never hibernate on their own unless the test passes
    ``idle_timeout``."""
    options.setdefault("idle_timeout", NEVER)
    async with open_host(app, **options) as host:
        runtime = runtime_of(host)

        def connect() -> trio.abc.Stream:
            client, server = memory_stream_pair()
            runtime.serve_stream(server)
            return client

        yield host, connect


class WebsocketsClient:
    """A WebSocket client on the ``websockets`` library's sans-I/O protocol, over any
    Trio stream: an implementation independent of the server's wsproto, which offers
    permessage-deflate by default and subprotocols when asked. Made by
    :meth:`connect`; counts the bytes it receives (:attr:`received_bytes`), so a test
    can tell compressed frames from plain ones."""

    def __init__(self, stream: trio.abc.Stream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.response: WsResponse | None = None
        """The server's answer to the upgrade (its status, headers and body)."""
        self.received_bytes = 0
        self._frames: deque[Frame] = deque()

    @classmethod
    async def connect(
        cls,
        stream: trio.abc.Stream,
        target: str,
        *,
        deflate: bool = True,
        subprotocols: list[str] | None = None,
    ) -> WebsocketsClient:
        """Ask for an upgrade to ``target`` on ``stream``; the client, whether the server
        accepted (see :attr:`response`) or refused it."""
        extensions = [ClientPerMessageDeflateFactory()] if deflate else None
        protocol = ClientProtocol(
            parse_uri(f"ws://memory{target}"),
            extensions=extensions,
            subprotocols=[Subprotocol(p) for p in subprotocols or []] or None,
            max_size=None,
        )
        client = cls(stream, protocol)
        protocol.send_request(protocol.connect())
        await client._flush()
        with trio.fail_after(WAIT_SECONDS):
            while client.response is None:
                await client._receive()
        return client

    @property
    def accepted(self) -> bool:
        """The server answered 101 (and the handshake is valid)."""
        return (
            self.protocol.handshake_exc is None
            and self.response is not None
            and (self.response.status_code == 101)
        )

    async def _flush(self) -> None:
        with trio.fail_after(WAIT_SECONDS):
            for data in self.protocol.data_to_send():
                if data:
                    await self.stream.send_all(data)

    async def _receive(self) -> bool:
        """Read once from the stream; False at EOF."""
        data = await self.stream.receive_some(65536)
        if data:
            self.received_bytes += len(data)
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, WsResponse):
                self.response = event
            elif isinstance(event, Frame):
                self._frames.append(event)
        await self._flush()
        return bool(data)

    async def send(self, message: str | bytes) -> None:
        """Send a text or binary message (compressed if permessage-deflate is on)."""
        if isinstance(message, str):
            self.protocol.send_text(message.encode())
        else:
            self.protocol.send_binary(message)
        await self._flush()

    async def recv(self) -> str | bytes | None:
        """The next data message, reassembled; None once the server closed (see
        :attr:`close_code`) or the stream ended."""
        parts: list[bytes] = []
        kind = None
        with trio.fail_after(WAIT_SECONDS):
            while True:
                while not self._frames:
                    if not await self._receive() and not self._frames:
                        return None
                frame = self._frames.popleft()
                if frame.opcode is Opcode.CLOSE:
                    return None
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                    kind = kind or frame.opcode
                    parts.append(bytes(frame.data))
                    if frame.fin:
                        data = b"".join(parts)
                        return data.decode() if kind is Opcode.TEXT else data

    @property
    def close_code(self) -> int | None:
        """The code of the server's Close frame (None: none yet)."""
        received = self.protocol.close_rcvd
        return None if received is None else int(received.code)

    async def close(self, code: int = 1000) -> None:
        """Send a Close frame and read until the server's answer (or EOF)."""
        self.protocol.send_close(code)
        await self._flush()
        while await self.recv() is not None:
            pass
