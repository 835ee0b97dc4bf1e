"""permessage-deflate (RFC 7692): negotiation, round trips with a real client, limits.

The client is the ``websockets`` library's (it offers permessage-deflate by default:
``permessage-deflate; client_max_window_bits``), an implementation independent of the
server's wsproto, over in-memory streams; a raw wsproto client sends what a correct
client would not. The negotiation itself is unit-tested on the sans-IO core.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
import zlib
from typing import Any, cast

import pytest
import trio
from helpers import (
    Echo,
    Probe,
    RawWebSocket,
    WebsocketsClient,
    in_memory_host,
)
from trio.testing import MockClock
from wsproto.events import AcceptConnection, CloseConnection, Request as WSRequest, TextMessage
from wsproto.extensions import PerMessageDeflate

from trio_hibernate import (
    App,
    DurableObject,
    Limits,
    ObjectContext,
    ObjectState,
    Request,
    Response,
    WebSocket,
    WebSocketCompression,
    open_host,
)
from trio_hibernate._core import deflate as deflate_module
from trio_hibernate._core.budget import MemoryBudget
from trio_hibernate._core.deflate import Compression, Inflater, negotiate
from trio_hibernate._net.deflate import DeflateExtension

MAX_MESSAGE_BYTES = 100_000
#: Compresses well: JSON-like, repetitive.
TEXT = '{"user": "ada", "x": 12, "y": 34, "room": "lobby"} ' * 400
DEFAULT = WebSocketCompression()
TAKEOVER = WebSocketCompression(context_takeover=True)


class Reporter(Echo):
    """An echo that tells the probe how its sockets ended."""

    def __init__(self, ctx: ObjectContext, env: Probe) -> None:
        super().__init__(ctx, env)
        env.constructing(self)

    async def websocket_error(self, ws: WebSocket, error: Exception) -> None:
        self.env.record(error)


def deflate_host(compression: WebSocketCompression | None, **options: Any) -> Any:
    probe = Probe()
    options.setdefault("limits", Limits(max_message_bytes=MAX_MESSAGE_BYTES))
    app = App({"echo": Reporter}, env=probe)
    return probe, in_memory_host(app, websocket_compression=compression, **options)


def extensions_header(client: WebsocketsClient) -> list[str]:
    assert client.response is not None
    return client.response.headers.get_all("Sec-WebSocket-Extensions")


# -- round trips with a real client ------------------------------------------------------


@pytest.mark.parametrize("compression", [DEFAULT, TAKEOVER], ids=["default", "takeover"])
async def test_round_trips(autojump_clock: MockClock, compression: WebSocketCompression) -> None:
    probe, host_cm = deflate_host(compression)
    async with host_cm as (host, connect):
        client = await WebsocketsClient.connect(connect(), "/echo/a")
        assert client.accepted
        [header] = extensions_header(client)
        takeover = compression.context_takeover
        assert ("server_no_context_takeover" in header) is not takeover
        assert ("client_no_context_takeover" in header) is not takeover
        assert [type(e).__name__ for e in client.protocol.extensions] == ["PerMessageDeflate"]
        incompressible = os.urandom(50_000)
        messages: list[str | bytes] = [TEXT, TEXT, b"\x00" * 70_000, incompressible, "é" * 300]
        for message in messages:
            before = client.received_bytes
            await client.send(message)
            assert await client.recv() == message
            size = len(message.encode() if isinstance(message, str) else message)
            if message is not incompressible:
                assert client.received_bytes - before < size / 4  # it came compressed
        # A message the client sends in fragments (RSV1 on the first frame only).
        client.protocol.send_text(TEXT[:100].encode(), fin=False)
        client.protocol.send_continuation(TEXT[100:].encode(), fin=True)
        await client.send("ping")  # flushes the fragments, then one more message
        assert await client.recv() == TEXT
        assert await client.recv() == "ping"
        # Compression state outlives the object: it is the connection's.
        assert await host.hibernate("echo", "a")
        for message in [TEXT, TEXT[::-1]]:
            await client.send(message)
            assert await client.recv() == message
        assert probe.constructed == 2
        await client.close()
    assert probe.of(Exception) == []


async def test_short_messages_go_uncompressed(autojump_clock: MockClock) -> None:
    """Below ``min_message_bytes`` the frame is the plain one (2 bytes of header)."""
    _probe, host_cm = deflate_host(WebSocketCompression(min_message_bytes=100))
    async with host_cm as (_host, connect):
        client = await WebsocketsClient.connect(connect(), "/echo/a")
        for message, compressed in (("a" * 99, False), ("a" * 100, True)):
            before = client.received_bytes
            await client.send(message)
            assert await client.recv() == message
            assert (client.received_bytes - before < 100) is compressed
        await client.close()


async def test_a_broadcast_compresses_once(autojump_clock: MockClock) -> None:
    class Room(DurableObject):
        async def fetch(self, request: Request) -> Response:
            ws = request.websocket
            assert ws is not None
            self.ctx.accept_websocket(ws)
            return Response(status=101, websocket=ws)

        async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
            assert self.ctx.broadcast(message) == 3

    async with in_memory_host(App({"room": Room}), websocket_compression=DEFAULT) as (
        _host,
        connect,
    ):
        clients = [await WebsocketsClient.connect(connect(), "/room/r") for _ in range(3)]
        calls = 0
        real = deflate_module.new_compressor

        def counting(bits: int) -> Any:
            nonlocal calls
            calls += 1
            return real(bits)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(deflate_module, "new_compressor", counting)
            await clients[0].send(TEXT)
            for client in clients:
                assert await client.recv() == TEXT
        assert calls == 1
        for client in clients:
            await client.close()


# -- refusing it ----------------------------------------------------------------------------


async def test_off_by_default(autojump_clock: MockClock) -> None:
    _probe, host_cm = deflate_host(None)
    async with host_cm as (_host, connect):
        client = await WebsocketsClient.connect(connect(), "/echo/a")
        assert client.accepted
        assert extensions_header(client) == []
        assert client.protocol.extensions == []
        before = client.received_bytes
        await client.send(TEXT)
        assert await client.recv() == TEXT
        assert client.received_bytes - before == len(TEXT) + 4  # the plain frame
        await client.close()


async def test_an_object_may_refuse_it_for_one_socket(autojump_clock: MockClock) -> None:
    """As on Cloudflare: an empty ``Sec-WebSocket-Extensions`` on the 101; any other
    value is an error (the server negotiates it)."""

    class Plain(Echo):
        async def fetch(self, request: Request) -> Response:
            ws = request.websocket
            assert ws is not None
            with pytest.raises(ValueError, match="may only set it to ''"):
                Response(
                    status=101,
                    websocket=ws,
                    headers={"sec-websocket-extensions": "permessage-deflate"},
                )
            self.ctx.accept_websocket(ws)
            return Response(status=101, websocket=ws, headers={"Sec-WebSocket-Extensions": ""})

    async with in_memory_host(App({"plain": Plain}), websocket_compression=DEFAULT) as (
        _host,
        connect,
    ):
        client = await WebsocketsClient.connect(connect(), "/plain/a")
        assert client.accepted
        assert extensions_header(client) == []  # not even the empty one
        await client.send(TEXT)
        assert await client.recv() == TEXT
        await client.close()


async def test_a_client_that_does_not_offer_it(autojump_clock: MockClock) -> None:
    _probe, host_cm = deflate_host(DEFAULT)
    async with host_cm as (_host, connect):
        client = await WebsocketsClient.connect(connect(), "/echo/a", deflate=False)
        assert extensions_header(client) == []
        await client.send(TEXT)
        assert await client.recv() == TEXT
        await client.close()


# -- limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [DEFAULT, TAKEOVER], ids=["default", "takeover"])
async def test_a_decompression_bomb_gets_1009_without_inflating(
    autojump_clock: MockClock, compression: WebSocketCompression
) -> None:
    """20 MB of zeros compress to ~20 KB: the server inflates no more than the
    message limit (+1 byte) and closes with 1009; memory never holds the 20 MB."""
    probe, host_cm = deflate_host(compression)
    async with host_cm as (host, connect):
        client = await WebsocketsClient.connect(connect(), "/echo/a")
        bomb = b"\x00" * 20_000_000
        client.protocol.send_binary(bomb)
        del bomb
        gc.collect()
        tracemalloc.start()
        try:
            await client._flush()
            assert await client.recv() is None
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert client.close_code == 1009
        assert peak < 2_000_000, peak
        await probe.wait_for(lambda: len(probe.of(Exception)) == 1)
        [error] = probe.of(Exception)
        assert getattr(error, "code", None) == 1009
        assert f"over {MAX_MESSAGE_BYTES} bytes once inflated" in str(error)
        assert host.statistics().buffered_bytes == 0


async def test_inflating_counts_against_the_memory_budget(autojump_clock: MockClock) -> None:
    """The budget is the lower limit here: 1013 (try again later), as for a plain
    message that would take the host over it."""
    limits = Limits(max_message_bytes=10_000_000, max_buffered_bytes=200_000)
    probe, host_cm = deflate_host(DEFAULT, limits=limits)
    async with host_cm as (host, connect):
        client = await WebsocketsClient.connect(connect(), "/echo/a")
        await client.send(b"\x00" * 5_000_000)
        assert await client.recv() is None
        assert client.close_code == 1013
        await probe.wait_for(lambda: len(probe.of(Exception)) == 1)
        assert "memory budget" in str(probe.of(Exception)[0])
        assert host.statistics().buffered_bytes == 0


async def test_a_fragmented_bomb_is_counted_across_its_frames(autojump_clock: MockClock) -> None:
    _probe, host_cm = deflate_host(DEFAULT)
    async with host_cm as (_host, connect):
        client = await WebsocketsClient.connect(connect(), "/echo/a")
        chunk = b"\x00" * 60_000
        client.protocol.send_binary(chunk, fin=False)
        client.protocol.send_continuation(chunk, fin=True)
        await client._flush()
        assert await client.recv() is None
        assert client.close_code == 1009


# -- protocol errors, with a raw client ----------------------------------------------------------


async def raw_deflate_client(stream: trio.abc.Stream) -> RawWebSocket:
    raw = RawWebSocket(cast("trio.SocketStream", stream))
    await raw.send(WSRequest(host="memory", target="/echo/a", extensions=[PerMessageDeflate()]))
    assert isinstance(await raw.next_event(), AcceptConnection)
    return raw


def masked(first: int, payload: bytes) -> bytes:
    """A client frame (mask 0: the payload as it is), ``len(payload) < 126``."""
    return bytes((first, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (masked(0xC9, b""), 1002),  # RSV1 on a Ping
        (masked(0x01, b"ab") + masked(0xC0, b"cd"), 1002),  # RSV1 on a continuation
        (masked(0xC1, b"\xff\xff\xff\xff"), 1007),  # not deflate data
    ],
    ids=["control", "continuation", "garbage"],
)
async def test_bad_compressed_frames(autojump_clock: MockClock, frame: bytes, code: int) -> None:
    probe, host_cm = deflate_host(DEFAULT)
    async with host_cm as (_host, connect):
        raw = await raw_deflate_client(connect())
        await raw.send(TextMessage(data=TEXT))  # a good one first
        echoed = await raw.next_event()
        assert isinstance(echoed, TextMessage)
        await raw.send_raw(frame)
        closed = await raw.next_event()
        assert isinstance(closed, CloseConnection)
        assert closed.code == code
        await probe.wait_for(lambda: len(probe.of(Exception)) == 1)


# -- memory -------------------------------------------------------------------------------------


async def test_no_compression_state_is_kept_between_messages(autojump_clock: MockClock) -> None:
    """Without context takeover an idle socket holds no zlib object (see
    docs/operations.md for the bytes); with it, one compressor and one decompressor."""

    def zlib_objects() -> int:
        """zlib objects the server's sockets hold (zlib objects are not tracked by
        the garbage collector: found through the extensions and inflaters that hold
        them)."""
        gc.collect()
        kinds = {type(zlib.compressobj()), type(zlib.decompressobj())}
        return sum(
            type(held) in kinds
            for holder in gc.get_objects()
            if isinstance(holder, DeflateExtension | Inflater)
            for held in gc.get_referents(holder)
        )

    for compression, kept in ((DEFAULT, 0), (TAKEOVER, 2)):
        _probe, host_cm = deflate_host(compression)
        async with host_cm as (host, connect):
            client = await WebsocketsClient.connect(connect(), "/echo/a")
            await client.send(TEXT)
            assert await client.recv() == TEXT
            assert await host.hibernate("echo", "a")
            assert host.object_statistics("echo", "a").state is ObjectState.HIBERNATED
            assert zlib_objects() == kept
            await client.close()


# -- negotiation (sans-IO) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offer", "takeover", "bits", "answer"),
    [
        # Chrome, Firefox, Safari.
        (
            ["permessage-deflate; client_max_window_bits"],
            False,
            15,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            "client_max_window_bits=15",
        ),
        (
            ["permessage-deflate"],
            False,
            15,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        ),
        (["permessage-deflate"], True, 15, "permessage-deflate"),
        (
            ["permessage-deflate; server_no_context_takeover; client_max_window_bits=10"],
            True,
            15,
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=10",
        ),
        (
            ["permessage-deflate; client_max_window_bits"],
            True,
            12,
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits=12",
        ),
        # The first offer the server can take; 8 bits is beyond zlib's raw deflate.
        (
            [
                "permessage-deflate; server_max_window_bits=8, permessage-deflate; "
                'server_max_window_bits="10"'
            ],
            True,
            15,
            "permessage-deflate; server_max_window_bits=10",
        ),
        (["x-webkit-deflate-frame", "permessage-deflate"], True, 15, "permessage-deflate"),
        # Declined: unknown or repeated parameters, bad values, other extensions only.
        (["permessage-deflate; foo"], False, 15, None),
        (
            ["permessage-deflate; client_no_context_takeover; client_no_context_takeover"],
            False,
            15,
            None,
        ),
        (["permessage-deflate; server_max_window_bits"], False, 15, None),
        (["permessage-deflate; client_max_window_bits=16"], False, 15, None),
        (["permessage-deflate; client_max_window_bits=09"], False, 15, None),
        (["permessage-deflate; server_no_context_takeover=1"], False, 15, None),
        (["x-webkit-deflate-frame"], False, 15, None),
        ([""], False, 15, None),
    ],
)
def test_negotiation(offer: list[str], takeover: bool, bits: int, answer: str | None) -> None:
    params = negotiate(offer, context_takeover=takeover, window_bits=bits)
    assert (params and params.response) == answer


def test_terms_are_interned() -> None:
    offer = ["permessage-deflate; client_max_window_bits"]
    a = negotiate(offer, context_takeover=False, window_bits=15)
    b = negotiate(list(offer), context_takeover=False, window_bits=15)
    assert a is b


def test_the_room_inflating_has() -> None:
    budget = MemoryBudget(1000)
    compression = Compression(WebSocketCompression(), Limits(max_message_bytes=600), budget)
    assert compression.room(0) == 600
    assert compression.room(500) == 100
    assert budget.take(950)
    assert compression.room(0) == 50


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="window_bits must be 9 to 15, got 8"):
        WebSocketCompression(window_bits=8)
    with pytest.raises(TypeError, match="context_takeover must be a bool"):
        WebSocketCompression(context_takeover=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_message_bytes cannot be negative"):
        WebSocketCompression(min_message_bytes=-1)


async def test_open_host_checks_the_option() -> None:
    with pytest.raises(TypeError, match="takes a WebSocketCompression or None"):
        async with open_host(App({"echo": Echo}), websocket_compression=True):  # type: ignore[arg-type]
            pass


def test_the_extension_is_small() -> None:
    """What an idle socket pays for compression, besides the frame protocol's list."""
    budget = MemoryBudget(1000)
    compression = Compression(WebSocketCompression(), Limits(), budget)
    params = negotiate(["permessage-deflate"], context_takeover=False, window_bits=15)
    assert params is not None
    extension = DeflateExtension(compression, params)
    assert not hasattr(extension, "__dict__") or not vars(extension)
