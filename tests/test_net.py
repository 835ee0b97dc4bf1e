"""The real connection layer (``_net``) driven over ``trio.testing`` memory streams.

A host serves clients through ``Runtime.serve_stream``: no socket, no real I/O, so Trio's
mock clock jumps exactly when every task waits, with no grace for bytes in flight (see
``tests/helpers.py`` for why the loopback tests need one). The property test at the end
runs a host under a drawn sequence of client actions and checks what the clients receive,
and what the objects hear, against a small model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, cast

import attrs
import pytest
import trio
from helpers import WAIT_SECONDS, Probe, RawWebSocket
from hypothesis import event, given, strategies as st
from strategies import PEER_CLOSE_CODES, UTF8_BOUNDARY_CHARS
from trio.testing import (
    MockClock,
    lockstep_stream_pair,
    memory_stream_pair,
    wait_all_tasks_blocked,
)
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    Request as WSRequest,
    TextMessage,
)

from trio_hibernate import (
    App,
    DurableObject,
    Host,
    Limits,
    ObjectContext,
    Request,
    Response,
    WebSocket,
    WebSocketRequestResponsePair,
    open_host,
)
from trio_hibernate._host import runtime_of

#: Inbound messages larger than this get Close 1009 (small, so examples reach it).
MAX_MESSAGE_BYTES: Final = 100_000
AUTO_REQUEST: Final = "?"
AUTO_RESPONSE: Final = "!"


@attrs.frozen
class Constructed:
    room: str


@attrs.frozen
class Ended:
    """A socket's terminal event, as its object heard it."""

    client: str
    code: int
    clean: bool


class Room(DurableObject):
    """Echoes; answers ``?`` with ``!`` without waking (the auto-response); reports its
    constructions and its sockets' ends to the probe. A socket is tagged with the last
    segment of its path, the client's name."""

    def __init__(self, ctx: ObjectContext, env: Probe) -> None:
        super().__init__(ctx, env)
        env.record(Constructed(ctx.id.name or ""))
        ctx.set_websocket_auto_response(WebSocketRequestResponsePair(AUTO_REQUEST, AUTO_RESPONSE))

    async def fetch(self, request: Request) -> Response:
        ws = request.websocket
        if ws is None:
            return Response(body=f"hello from {request.path}")
        self.ctx.accept_websocket(ws, tags=[request.path.rsplit("/", 1)[1]])
        return Response(status=101, websocket=ws)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.send(message)

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self.env.record(Ended(self.ctx.get_tags(ws)[0], code, was_clean))

    async def websocket_error(self, ws: WebSocket, error: Exception) -> None:
        self.env.record(Ended(self.ctx.get_tags(ws)[0], getattr(error, "code", 0), False))


StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


@asynccontextmanager
async def memory_host(
    pair: StreamPair = memory_stream_pair, limits: Limits | None = None, **options: Any
) -> AsyncIterator[tuple[Host, Probe, Callable[[], trio.abc.Stream]]]:
    """A host for the room app, its probe, and ``connect()``: a new client stream that
    the host serves (the other end of a ``pair()``)."""
    probe = Probe()
    limits = limits or Limits(max_message_bytes=MAX_MESSAGE_BYTES)
    async with open_host(App({"room": Room}, env=probe), limits=limits, **options) as host:
        runtime = runtime_of(host)

        def connect() -> trio.abc.Stream:
            client, server = pair()
            runtime.serve_stream(server)
            return client

        yield host, probe, connect


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    received = bytearray()
    with trio.fail_after(WAIT_SECONDS):
        while chunk := await stream.receive_some():
            received += chunk
    return bytes(received)


async def upgrade(stream: trio.abc.Stream, target: str) -> RawWebSocket:
    """A WebSocket client for ``target`` over ``stream``, upgraded."""
    # RawWebSocket is typed for TCP, but only uses what every stream has.
    raw = RawWebSocket(cast("trio.SocketStream", stream))
    await raw.send(WSRequest(host="memory", target=target))
    event = await raw.next_event()
    assert isinstance(event, AcceptConnection), event
    return raw


async def next_message(raw: RawWebSocket) -> str | bytes | Ping | Pong | CloseConnection | None:
    """The next whole message (reassembled), or the next other event (None: EOF)."""
    parts: list[Any] = []
    while True:
        event = await raw.next_event()
        if not isinstance(event, Message):
            assert not parts, f"{event!r} in the middle of a message"
            assert event is None or isinstance(event, Ping | Pong | CloseConnection), event
            return event
        parts.append(event.data)
        if event.message_finished:
            if isinstance(event, TextMessage):
                return "".join(parts)
            return b"".join(parts)


# -- examples --------------------------------------------------------------------------------


async def test_an_http_request(autojump_clock: MockClock) -> None:
    async with memory_host() as (host, _probe, connect):
        async with connect() as stream:
            await stream.send_all(b"GET /room/a HTTP/1.1\r\nHost: memory\r\n\r\n")
            reply = await read_to_eof(stream)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
        assert reply.endswith(b"\r\n\r\nhello from /room/a")
        await wait_all_tasks_blocked()  # exact: no bytes are ever in flight here
        assert host.statistics().connections == 0


async def test_a_malformed_request_gets_400(autojump_clock: MockClock) -> None:
    async with memory_host() as (host, _probe, connect):
        async with connect() as stream:
            await stream.send_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
            reply = await read_to_eof(stream)
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply
        assert host.statistics().bad_requests == 1


@pytest.mark.parametrize("pair", [memory_stream_pair, lockstep_stream_pair])
async def test_upgrade_echo_and_the_close_handshake(
    autojump_clock: MockClock, pair: StreamPair
) -> None:
    """Over a buffered stream, and over one whose ``send_all`` waits for the reader."""
    async with memory_host(pair) as (host, probe, connect):
        async with connect() as stream:
            raw = await upgrade(stream, "/room/a/alice")
            await raw.send(TextMessage(data="héllo"))
            assert await next_message(raw) == "héllo"
            await raw.send(BytesMessage(data=b"\x00" * 70_000))
            assert await next_message(raw) == b"\x00" * 70_000
            await raw.send(Ping(payload=b"p"))
            assert await next_message(raw) == Pong(payload=b"p")
            await raw.send(CloseConnection(code=4000, reason="bye"))
            closed = await next_message(raw)
            assert isinstance(closed, CloseConnection)
            assert (closed.code, closed.reason) == (4000, "bye")
            assert await next_message(raw) is None  # then EOF, at once
        await probe.wait_for(lambda: probe.of(Ended) == [Ended("alice", 4000, True)])
        assert host.object_statistics("room", "a").websockets == 0


async def read_close_answer(raw: RawWebSocket) -> bytes:
    """What the server sends until EOF, as bytes: for a Close wsproto's client refuses
    (1014, which it does not know)."""
    received = b""
    with trio.fail_after(WAIT_SECONDS):
        while data := await raw.stream.receive_some(65536):
            received += data
    return received


async def test_a_peer_close_with_1014_is_echoed(autojump_clock: MockClock) -> None:
    """1014 (Bad Gateway, registered in 2016) may travel in a Close: echoed, and the
    object hears it. (wsproto refuses it, so the answer is read as bytes.)"""
    async with memory_host(memory_stream_pair) as (_host, probe, connect):
        async with connect() as stream:
            raw = await upgrade(stream, "/room/a/alice")
            await raw.send(CloseConnection(code=1014, reason="gw"))
            assert await read_close_answer(raw) == b"\x88\x04\x03\xf6gw"
        await probe.wait_for(lambda: probe.of(Ended) == [Ended("alice", 1014, True)])


async def test_an_unanswered_close_ends_after_close_timeout(autojump_clock: MockClock) -> None:
    """The object closes; the client never answers: the watchdog drops the connection
    after ``close_timeout`` (virtual seconds) and the object hears 1006."""

    class Closer(Room):
        async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
            ws.close(4001, "go")

    probe = Probe()
    async with open_host(App({"room": Closer}, env=probe), close_timeout=5) as host:
        client, server = memory_stream_pair()
        runtime_of(host).serve_stream(server)
        async with client:
            raw = await upgrade(client, "/room/a/bob")
            await raw.send(TextMessage(data="close me"))
            closed = await next_message(raw)
            assert isinstance(closed, CloseConnection)
            assert closed.code == 4001
            start = trio.current_time()
            assert await next_message(raw) is None  # dropped, without our answer
            assert trio.current_time() - start == 5
        await probe.wait_for(lambda: probe.of(Ended) == [Ended("bob", 1006, False)])


async def test_a_peer_that_does_not_read_is_dropped(autojump_clock: MockClock) -> None:
    """Over a stream whose ``send_all`` waits for the reader, echoes pile up in the
    writer's backlog until ``max_send_buffer_bytes``: the object hears 1011."""
    limits = Limits(max_send_buffer_bytes=10_000)
    async with memory_host(lockstep_stream_pair, limits) as (host, probe, connect):
        async with connect() as stream:
            raw = await upgrade(stream, "/room/a/carol")
            for _ in range(3):  # 3 echoes of 4,004 bytes go past 10,000
                await raw.send(BytesMessage(data=b"x" * 4_000))
            await probe.wait_for(lambda: probe.of(Ended) == [Ended("carol", 1011, False)])
        assert host.statistics().buffered_bytes == 0


async def test_serve_stream_after_shutdown_closes_the_stream(autojump_clock: MockClock) -> None:
    async with memory_host() as (host, _probe, connect):
        await runtime_of(host).shutdown(1)
        async with connect() as stream:
            assert await read_to_eof(stream) == b""


# -- the property -----------------------------------------------------------------------------

ROOMS: Final = ("a", "b")
ACTIONS: Final = ("connect", "message", "fragments", "ping", "auto", "close", "eof", "hibernate")
#: A client's Close reason: empty, short, at the 123-byte limit (in UTF-8).
CLOSE_REASONS: Final = st.sampled_from(["", "bye", "a" * 123, "é" * 61])
#: Around the boundaries: wsproto's 16-bit length, a read (65,536), the message limit.
SIZES: Final = st.integers(0, 200) | st.integers(65_530, 65_540) | st.integers(99_990, 100_010)


def draw_message(data: st.DataObject) -> str | bytes:
    size = data.draw(SIZES, label="size in bytes (about)")
    if data.draw(st.booleans(), label="binary"):
        return bytes([data.draw(st.integers(0, 255), label="byte")]) * size
    char = data.draw(st.sampled_from(UTF8_BOUNDARY_CHARS), label="character")
    return char * (size // len(char.encode()))


def as_event(part: str | bytes, *, finished: bool) -> TextMessage | BytesMessage:
    if isinstance(part, str):
        return TextMessage(data=part, message_finished=finished)
    return BytesMessage(data=part, message_finished=finished)


def size_of(message: str | bytes) -> int:
    return len(message.encode()) if isinstance(message, str) else len(message)


@attrs.define
class Client:
    name: str
    room: str
    raw: RawWebSocket


@attrs.define
class Session:
    """A host under drawn client actions, next to a model of what must come of them:
    which objects are live, how often each was constructed, how each socket ended."""

    host: Host
    probe: Probe
    connect: Callable[[], trio.abc.Stream]
    clients: list[Client] = attrs.Factory(list)
    opened: int = 0
    live: set[str] = attrs.Factory(set)
    constructed: Counter[str] = attrs.Factory(Counter)
    ends: list[Ended] = attrs.Factory(list)

    def event_for(self, room: str) -> None:
        """An event reaches ``room``'s object: it is constructed unless live."""
        if room not in self.live:
            self.live.add(room)
            self.constructed[room] += 1

    async def step(self, data: st.DataObject) -> None:
        """One drawn action; then the objects' constructions and the sockets' ends must
        match the model."""
        action = data.draw(st.sampled_from(ACTIONS), label="action")
        event(action)  # counted by --hypothesis-show-statistics
        if action == "hibernate":
            room = data.draw(st.sampled_from(ROOMS), label="room")
            assert await self.host.hibernate("room", room) == (room in self.live)
            self.live.discard(room)
        elif action == "connect" or not self.clients:
            room = data.draw(st.sampled_from(ROOMS), label="room")
            self.opened += 1
            name = f"client{self.opened}"
            raw = await upgrade(self.connect(), f"/room/{room}/{name}")
            self.event_for(room)  # the fetch
            self.clients.append(Client(name, room, raw))
        else:
            client = data.draw(st.sampled_from(self.clients), label="client")
            if await self.act(data, action, client):
                self.clients.remove(client)
                await client.raw.stream.aclose()
        probe = self.probe
        await probe.wait_for(lambda: len(probe.of(Ended)) == len(self.ends))
        assert probe.of(Ended) == self.ends
        assert Counter(c.room for c in probe.of(Constructed)) == self.constructed

    async def act(self, data: st.DataObject, action: str, client: Client) -> bool:
        """``action`` by ``client``, checking what it receives. True if it has ended."""
        raw = client.raw
        if action in ("message", "fragments"):
            message = draw_message(data)
            cut = 0
            if action == "fragments":
                cut = data.draw(st.integers(0, len(message)), label="cut")
                await raw.send(as_event(message[:cut], finished=False))
            await raw.send(as_event(message[cut:], finished=True))
            self.event_for(client.room)
            if size_of(message) <= MAX_MESSAGE_BYTES:
                assert await next_message(raw) == message
                return False
            closed = await next_message(raw)
            assert isinstance(closed, CloseConnection), closed
            assert closed.code == 1009
            await raw.send(closed.response())
            assert await next_message(raw) is None
            self.ends.append(Ended(client.name, 1009, False))
            return True
        if action == "ping":
            ping = data.draw(st.binary(max_size=125), label="ping payload")
            await raw.send(Ping(payload=ping))
            assert await next_message(raw) == Pong(payload=ping)
            return False
        if action == "auto":  # answered without an event: no object wakes
            await raw.send(TextMessage(AUTO_REQUEST))
            assert await next_message(raw) == AUTO_RESPONSE
            return False
        self.event_for(client.room)
        if action == "eof":
            self.ends.append(Ended(client.name, 1006, False))
            return True
        assert action == "close"
        code = data.draw(st.sampled_from(sorted(PEER_CLOSE_CODES)), label="close code")
        reason = data.draw(CLOSE_REASONS, label="close reason")
        await raw.send(CloseConnection(code=code, reason=reason))
        if code == 1014:  # wsproto's client refuses it: the answer as bytes, then EOF
            encoded = reason.encode()
            answer = bytes((0x88, 2 + len(encoded))) + code.to_bytes(2, "big") + encoded
            assert await read_close_answer(raw) == answer
        else:
            closed = await next_message(raw)
            assert isinstance(closed, CloseConnection), closed
            assert (closed.code, closed.reason) == (code, reason)
            assert await next_message(raw) is None  # EOF right after the handshake
        self.ends.append(Ended(client.name, code, True))
        return True


@given(st.data())
def test_client_actions_against_a_model(data: st.DataObject) -> None:
    """Clients connect, send text and binary messages of drawn sizes (whole or in two
    fragments, some over the limit), ping, use the auto-response, close with a drawn
    code or drop the connection, while objects are hibernated: every client gets its
    echo, pong or Close, and every object hears each socket's end once, with the right
    code, constructed only when an event finds it hibernated."""

    async def main() -> None:
        with trio.fail_after(10 * WAIT_SECONDS):
            async with memory_host(idle_timeout=1e9) as (host, probe, connect):
                session = Session(host, probe, connect)
                for _ in range(data.draw(st.integers(1, 12), label="steps")):
                    await session.step(data)
                for client in session.clients:
                    await client.raw.stream.aclose()

    trio.run(main, clock=MockClock(autojump_threshold=0))
