"""No client can take the server down (issue 9): each row of the attack table, asserted.

Every test keeps a *witness*: a WebSocket connected before the attack, which must still
get its echo afterwards. A crash of the process (or of the host nursery) would end it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import helpers
import pytest
import trio
from helpers import (
    WAIT_SECONDS,
    RawWebSocket,
    accept_upgrade,
    ask,
    http_exchange,
    open_client,
    open_raw_websocket,
    settle,
)
from trio_websocket import WebSocketConnection

from trio_hibernate import App, ObjectContext, Request, Response, WebSocket
from trio_hibernate._core.lifecycle import ObjectCore
from trio_hibernate._host import runtime_of
from trio_hibernate._net.connection import ServerConnection
from trio_hibernate._net.gatekeeper import Gatekeeper
from trio_hibernate._net.http import HttpExchange
from trio_hibernate._server import Server, open_server

UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)
GOOD_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class Echo(helpers.Echo):
    """Echoes messages; its fetch misbehaves on request (see the paths below)."""

    async def fetch(self, request: Request) -> Response:
        if request.path.endswith("/snowman-header"):
            return Response(headers={"x-weather": "☃"})
        if request.path.endswith("/crlf-header"):
            return Response(headers={"x-a": "1\r\nset-cookie: stolen=1"})
        if request.path.endswith("/hang"):
            await trio.sleep_forever()
        if request.websocket is None:
            return Response(body="hello")
        return await super().fetch(request)


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[Server, WebSocketConnection]]:
    """A server for the echo app, and a witness WebSocket connected to it."""
    app = App({"echo": Echo})
    async with open_server(app, **options) as server:
        async with open_client(server, "/echo/witness") as witness:
            await witness_alive(witness)
            yield server, witness


async def witness_alive(witness: WebSocketConnection) -> None:
    assert await ask(witness, "still there?") == "still there?"


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes (or resets) the connection, or
    just the head of a 101 (the connection then stays open as a WebSocket)."""
    received = bytearray()
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(data)
                while chunk := await stream.receive_some(65536):
                    received += chunk
                    if received.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in received:
                        break
            except trio.BrokenResourceError:
                pass  # reset: whatever was received before it is the answer
    return bytes(received)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n", 404),  # a path: no namespace ""
        (b"GET http://[::1/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET //x]/ HTTP/1.1\r\nHost: x\r\n\r\n", 404),  # a path: no namespace "x]"
        (b"GET x HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # neither origin- nor absolute-form
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),  # a TLS hello, say
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n", 431),
    ],
    ids=[
        "ipv6-bracket",
        "absolute-bad-ipv6",
        "bracket-path",
        "bare-word",
        "garbage",
        "no-host",
        "100kb-header",
        "10k-headers",
    ],
)
async def test_malformed_requests_get_4xx_and_harm_nobody(
    request_bytes: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_hibernate")
    async with serving() as (server, witness):
        response = await raw_exchange(server.port, request_bytes)
        assert status_of(response) == status, response[:300]
        await witness_alive(witness)
        if status != 404:
            assert server.host.statistics().bad_requests == 1
            assert "refused a request from 127.0.0.1:" in caplog.text
        assert server.host.statistics().internal_errors == 0


@pytest.mark.parametrize(
    ("key", "status"),
    [
        ("\xe9", 400),
        ("", 400),
        ("c2hvcnQ=", 400),  # base64, but 5 bytes
        ("not base64 at all!!!!!==", 400),
        (GOOD_KEY, 101),
    ],
)
async def test_upgrade_key_is_checked(key: str, status: int) -> None:
    async with serving() as (server, witness):
        request = UPGRADE.format(path="/echo/a", host="x", key=key, extra="")
        response = await raw_exchange(server.port, request.encode("latin-1"))
        assert status_of(response) == status
        await witness_alive(witness)


@pytest.mark.parametrize("path", ["/echo/a/snowman-header", "/echo/a/crlf-header"])
async def test_a_response_header_that_cannot_be_sent_is_a_500(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving() as (server, witness):
        reply = await http_exchange(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert reply.status == 500
        assert "set-cookie" not in reply.headers
        await witness_alive(witness)
    assert "fetch() of echo" in caplog.text  # contained as a handler error, with the cause
    assert "must be Latin-1 text" in caplog.text


def test_response_headers_are_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="Latin-1"):
        Response(headers={"x": "☃"})
    with pytest.raises(ValueError, match="control characters"):
        Response(headers=[("x", "a\nb")])
    with pytest.raises(ValueError, match="header name"):
        Response(headers=[("bad name", "v")])
    assert Response(headers={"x-ok": "caf\xe9 \t!"}).headers == (("x-ok", "caf\xe9 \t!"),)


def test_request_path_never_raises() -> None:
    assert Request(method="GET", url="//[").path == "//["
    assert Request(method="GET", url="//x/y?q=1").path == "//x/y"
    assert Request(method="GET", url="//x/y?q=1").query == "q=1"
    assert Request(method="GET", url="http://[::1/x").path == ""
    assert Request(method="GET", url="http://h:1/a/b?c").path == "/a/b"
    assert Request(method="GET", url="http://h").path == "/"
    assert Request(method="OPTIONS", url="*").path == ""


async def test_a_fetch_that_never_answers_gets_504(autojump_clock: trio.abc.Clock) -> None:
    async with serving(request_timeout=7) as (server, witness):
        start = trio.current_time()
        reply = await http_exchange(server.port, b"GET /echo/b/hang HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.status == 504
        assert trio.current_time() - start == pytest.approx(7, abs=0.5)
        await witness_alive(witness)


async def test_an_upgrade_accepted_after_the_timeout_is_let_go(
    autojump_clock: trio.abc.Clock,
) -> None:
    release = trio.Event()

    class Slow(Echo):
        async def fetch(self, request: Request) -> Response:
            await release.wait()
            return await super().fetch(request)

    app = App({"echo": Slow})
    async with open_server(app, request_timeout=3) as server:
        request = UPGRADE.format(path="/echo/slow", host="x", key=GOOD_KEY, extra="")
        response = await raw_exchange(server.port, request.encode())
        assert status_of(response) == 504
        release.set()
        await settle()  # the object accepts the socket and answers, too late
        assert server.host.object_statistics("echo", "slow").websockets == 0
        assert server.host.statistics().hibernated_objects == 0


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "status"),
    [
        ("https://evil.example", "127.0.0.1", None, 403),
        ("null", "127.0.0.1", None, 403),
        ("http://127.0.0.1:{port}", "127.0.0.1:{port}", None, 101),
        ("HTTP://LOCALHOST", "localhost:80", None, 101),
        ("https://app.example", "app.example", None, 101),
        ("https://app.example:8443", "app.example", None, 403),
        ("https://evil.example", "127.0.0.1", ["https://evil.example"], 101),
        ("https://evil.example", "127.0.0.1", ["https://good.example"], 403),
        ("https://evil.example", "127.0.0.1", ["*"], 101),
        (None, "127.0.0.1", None, 101),  # not a browser
    ],
)
async def test_cross_site_upgrades_are_refused_by_default(
    origin: str | None, host: str, allowed: list[str] | None, status: int
) -> None:
    async with serving(allowed_origins=allowed) as (server, witness):
        extra = "" if origin is None else f"Origin: {origin.format(port=server.port)}\r\n"
        request = UPGRADE.format(
            path="/echo/a", host=host.format(port=server.port), key=GOOD_KEY, extra=extra
        )
        response = await raw_exchange(server.port, request.encode())
        assert status_of(response) == status
        if status == 403:
            assert b"allowed_origins" in response
        await witness_alive(witness)


async def test_an_internal_error_in_the_http_phase_is_contained(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Gatekeeper, request: Request) -> None:
        raise RuntimeError("a bug of ours")

    async with serving() as (server, witness):
        monkeypatch.setattr(Gatekeeper, "gatekeep", broken)
        reply = await http_exchange(server.port, b"GET /echo/a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.status == 500
        await witness_alive(witness)
        assert server.host.statistics().internal_errors == 1
        monkeypatch.undo()
        metrics = await http_exchange(server.port, b"GET /_metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"trio_hibernate_internal_errors_total 1" in metrics.body
    assert "internal error serving 127.0.0.1:" in caplog.text
    assert "RuntimeError: a bug of ours" in caplog.text  # with the traceback


async def test_an_internal_error_in_the_websocket_phase_closes_1011(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from wsproto.events import CloseConnection, TextMessage

    from trio_hibernate._core.lifecycle import ObjectCore

    def broken(self: ObjectCore, text: str) -> bool:
        raise RuntimeError("a bug of ours")

    async with serving() as (server, witness):
        async with open_raw_websocket(server.port, "/echo/victim") as raw:
            monkeypatch.setattr(ObjectCore, "is_auto_response", broken)
            await raw.send(TextMessage(data="boom"))
            event = await raw.next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 1011
            monkeypatch.undo()
        await witness_alive(witness)
        assert server.host.statistics().internal_errors == 1
    assert "a bug of ours" in caplog.text


# -- bounded memory -----------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame (mask 0, so the payload is sent as it is)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def proc_status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


async def test_unfinished_messages_are_bounded_by_the_memory_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from wsproto.events import CloseConnection

    from trio_hibernate import Limits

    limits = Limits(max_buffered_bytes=32 * 2**20, max_message_bytes=16 * 2**20)
    # The first 8 MiB of a message that never ends (one buffer shared by every client).
    frame = client_frame(0x2, b"x" * (8 * 2**20), fin=False)
    codes: list[int | None] = []
    before = proc_status_bytes("VmRSS")
    reset_peak_rss()
    async with serving(limits=limits) as (server, witness):
        async with trio.open_nursery() as nursery:
            peak = 0

            async def hold(i: int) -> None:
                nonlocal peak
                async with open_raw_websocket(server.port, f"/echo/holder{i}") as raw:
                    with contextlib.suppress(trio.BrokenResourceError):  # closed mid-send
                        await raw.send_raw(frame)
                    with trio.move_on_after(2) as waiting:  # held: no answer expected
                        event = await raw.next_event()
                        assert isinstance(event, CloseConnection)
                        codes.append(event.code)
                    peak = max(peak, server.host.statistics().buffered_bytes)
                    if waiting.cancelled_caught:
                        codes.append(None)

            for i in range(16):
                nursery.start_soon(hold, i)
        assert peak <= limits.max_buffered_bytes
        assert codes.count(1013) >= 12  # 4 fit in 32 MiB, the others are refused
        assert codes.count(None) <= 4
        # 128 MiB were sent, at most 32 held: the peak RSS shows it (it was 128 + more).
        growth = proc_status_bytes("VmHWM") - before
        assert growth < 80 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"
        await witness_alive(witness)
        await settle()
        assert server.host.statistics().buffered_bytes == 0
    assert "over its memory budget" in caplog.text


async def test_a_stalled_message_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    from wsproto.events import CloseConnection

    async with serving(partial_message_timeout=20) as (server, witness):
        async with open_raw_websocket(server.port, "/echo/staller") as raw:
            await raw.send_raw(client_frame(0x2, b"y" * 1000, fin=False))
            start = trio.current_time()
            event = await raw.next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 1008
            assert "partial_message_timeout" in (event.reason or "")
            assert trio.current_time() - start == pytest.approx(20, abs=1)
        await witness_alive(witness)
        assert server.host.statistics().buffered_bytes == 0


def busy_app(release: trio.Event, received: list[bytes]) -> App:
    """``/echo/<name>`` objects whose handler waits for ``release``, then notes the
    first 4 bytes of the (binary) message in ``received``."""

    class Busy(Echo):
        async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
            await release.wait()
            assert isinstance(message, bytes)
            received.append(message[:4])

    return App({"echo": Busy})


async def test_messages_queued_for_a_busy_object_are_bounded_in_bytes() -> None:
    from trio_hibernate import Limits

    release = trio.Event()
    received: list[bytes] = []
    app = busy_app(release, received)
    limits = Limits(max_queued_bytes_per_websocket=2**20)
    message = b"m" * (256 * 1024)
    async with open_server(app, limits=limits) as server:
        async with (
            open_raw_websocket(server.port, "/echo/busy") as busy,
            open_raw_websocket(server.port, "/echo/busy") as raw,
        ):
            # The object is busy with another socket's message (a socket's own busy turn
            # only stops its reading: see the next test).
            await busy.send_raw(client_frame(0x2, b"busy"))
            await settle()
            async with trio.open_nursery() as nursery:
                # 64 x 256 KiB = 16 MiB offered; the kernel buffers some, we hold ~1 MiB.
                nursery.start_soon(
                    raw.send_raw,
                    b"".join(client_frame(0x2, b"%04d" % i + message[4:]) for i in range(64)),
                )
                await settle()
                held = server.host.statistics().buffered_bytes
                assert held <= limits.max_queued_bytes_per_websocket + 2 * len(message)
                assert held >= limits.max_queued_bytes_per_websocket
                release.set()
            with trio.fail_after(WAIT_SECONDS):
                while len(received) < 65:
                    await settle()
            # Nothing lost, in order.
            assert received == [b"busy"] + [b"%04d" % i for i in range(64)]
            assert server.host.statistics().buffered_bytes == 0


async def test_a_socket_whose_turn_is_slow_is_not_read_meanwhile() -> None:
    """A message's turn runs in its connection's task when the object is idle (an
    inline turn): while it runs, that socket is not read, so nothing queues for it (the
    peer's bytes wait in the kernel), and its messages still run in order."""
    from trio_hibernate import Limits

    release = trio.Event()
    received: list[bytes] = []
    app = busy_app(release, received)
    limits = Limits(max_queued_bytes_per_websocket=2**20)
    message = b"m" * (256 * 1024)
    async with open_server(app, limits=limits) as server:
        async with open_raw_websocket(server.port, "/echo/busy") as raw:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    raw.send_raw,
                    b"".join(client_frame(0x2, b"%04d" % i + message[4:]) for i in range(16)),
                )
                await settle()
                stats = server.host.object_statistics("echo", "busy")
                assert stats.queued_events == 0
                # The message being handled, plus at most one read's worth of the next.
                assert server.host.statistics().buffered_bytes <= 2 * len(message)
                release.set()
            with trio.fail_after(WAIT_SECONDS):
                while len(received) < 16:
                    await settle()
            assert received == [b"%04d" % i for i in range(16)]
            assert server.host.statistics().buffered_bytes == 0


async def test_slow_readers_are_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    from trio_hibernate import Limits

    errors: list[BaseException] = []

    class Flood(Echo):
        async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
            for peer in self.ctx.get_websockets("reader"):
                if peer.ready_state == 1:
                    peer.send(b"z" * 65536)

        async def fetch(self, request: Request) -> Response:
            return accept_upgrade(self.ctx, request, ["reader"] if "reader" in request.path else [])

        async def websocket_error(self, ws: WebSocket, error: Exception) -> None:
            errors.append(error)

    limits = Limits(max_send_buffer_bytes=2**20, max_buffered_bytes=4 * 2**20)
    app = App({"echo": Flood})
    async with open_server(app, limits=limits) as server:
        streams = []
        for i in range(8):  # they complete the upgrade and then never read
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            streams.append(stream)
            await stream.send_all(
                UPGRADE.format(
                    path=f"/echo/room/reader{i}", host="x", key=GOOD_KEY, extra=""
                ).encode()
            )
        await settle()
        peak = 0
        async with open_client(server, "/echo/room") as flooder:
            for _ in range(200):
                await flooder.send_message("go")
                peak = max(peak, server.host.statistics().buffered_bytes)
                if len(errors) == 8:
                    break
                await settle()
            assert len(errors) == 8
            assert peak <= limits.max_buffered_bytes
        for stream in streams:
            await stream.aclose()
        await settle()
        assert server.host.statistics().buffered_bytes == 0
    assert "disconnected: the peer is not reading" in caplog.text or (
        "disconnected: the server is over its memory budget" in caplog.text
    )


# -- closing without a reset -----------------------------------------------------------


async def test_a_peer_still_sending_gets_the_close_and_no_reset(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Found by test_fuzz: a client sends a burst before it reads, and the burst breaks the
    protocol while the server still holds most of an echo for it. The client gets the
    whole echo, the Close 1002 and EOF. (Closed at once, with the rest of the burst unread
    or still arriving, the server's kernel reset the connection and threw away what the
    client had not received yet.)"""
    from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request as WSRequest

    echo = b"e" * 60_000
    async with serving() as (server, witness):
        sock = trio.socket.socket()
        # A small receive window: most of the echo waits on the server's side until we read.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with trio.fail_after(WAIT_SECONDS):
            await sock.connect(("127.0.0.1", server.port))
        async with trio.SocketStream(sock) as stream:
            raw = RawWebSocket(stream)
            await raw.send(WSRequest(host="x", target="/echo/burst"))
            assert isinstance(await raw.next_event(), AcceptConnection)
            await raw.send_raw(client_frame(0x2, echo))
            with trio.fail_after(WAIT_SECONDS):
                received = bytearray(await stream.receive_some(1))  # the echo has begun
            # RSV1 with no extension negotiated (a protocol error), then 256 KiB more.
            burst = client_frame(0x40 | 0x2, b"r" * 2**18)
            resets = []
            with trio.fail_after(WAIT_SECONDS):
                try:
                    await stream.send_all(burst)
                except trio.BrokenResourceError as exc:
                    resets.append(f"sending: {exc.__cause__!r}")
                try:  # what reached us before a reset can still be read
                    while chunk := await stream.receive_some(65536):
                        received += chunk
                except trio.BrokenResourceError as exc:
                    resets.append(f"receiving: {exc.__cause__!r}")
        raw.conn.receive_data(bytes(received))
        events = list(raw.conn.events())
        assert not resets, f"reset ({resets}) after {len(received)} bytes: {events!r:.200}"
        assert len(events) == 2, f"{len(received)} bytes: {events!r:.200}"
        message, close = events
        assert isinstance(message, BytesMessage)
        assert message.data == echo
        assert isinstance(close, CloseConnection)
        assert close.code == 1002
        await witness_alive(witness)
        assert server.host.statistics().internal_errors == 0


async def test_a_lingering_connection_holds_no_budget(autojump_clock: trio.abc.Clock) -> None:
    """After a 1009 the server waits for the client's EOF; the cut message is no longer
    counted in the memory budget meanwhile."""
    from wsproto.events import CloseConnection

    from trio_hibernate import Limits

    async with serving(limits=Limits(max_message_bytes=2**16)) as (server, witness):
        async with open_raw_websocket(server.port, "/echo/big") as raw:
            await raw.send_raw(client_frame(0x2, b"b" * 2**17))
            event = await raw.next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 1009
            assert await raw.next_event() is None  # the server's EOF; ours is not sent yet
            stats = server.host.statistics()
            assert stats.connections == 2  # the witness, and this one lingering
            assert stats.buffered_bytes == 0
        await witness_alive(witness)


# -- forgotten objects cost nothing -------------------------------------------------------


async def test_rooms_visited_once_are_forgotten(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The chat room sets an auto-response; that once kept every room ever visited in
    the host's memory (~2 KB each, forever). Now the count goes back to zero and what
    the library allocated stays flat."""
    from wsproto.events import CloseConnection, TextMessage

    from trio_hibernate._cli import load_app

    chat_app, _ = load_app(str(Path(__file__).parents[1] / "examples" / "chat.py"))
    async with open_server(chat_app, data_dir=tmp_path, idle_timeout=5) as server:

        async def visit(first: int, count: int) -> None:
            for i in range(first, first + count):
                async with open_raw_websocket(server.port, f"/chat/room{i}?nick=ada") as ws:
                    event = await ws.next_event()
                    assert isinstance(event, TextMessage)
                    assert event.data == "* ada joined"
                    await ws.send(CloseConnection(code=1000))
                    assert isinstance(await ws.next_event(), CloseConnection)
            await trio.sleep(6)  # on the mock clock: every room goes idle and hibernates
            stats = server.host.statistics()
            assert (stats.live_objects, stats.hibernated_objects, stats.connections) == (0, 0, 0)

        # Warm-up: caches, the thread pool, and the host's tables at their high-water
        # mark (dicts keep their size after deletions; that is bounded by how many
        # objects are awake at once, not by how many were ever visited).
        await visit(0, 200)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot().filter_traces(OUR_CODE)
            await visit(200, 200)
            gc.collect()
            after = tracemalloc.take_snapshot().filter_traces(OUR_CODE)
        finally:
            tracemalloc.stop()
        diff = after.compare_to(before, "lineno")
        growth = sum(stat.size_diff for stat in diff)
        # A leak of ~2 KB per room would be ~400 KB; what remains is the host's dict
        # tables being rebuilt (at the same size) as keys come and go.
        assert growth < 64_000, f"{growth} bytes kept after 200 rooms: {diff[:5]}"
    gc.collect()
    kept = [o for o in gc.get_objects() if isinstance(o, ObjectCore | ServerConnection)]
    assert kept == []


#: Allocations made by the library itself (Trio keeps stale deadlines of finished
#: cancel scopes in its heap for a while: bounded, and not ours to measure).
OUR_CODE: Final = [tracemalloc.Filter(True, "*/trio_hibernate/*")]


async def test_settings_of_a_forgotten_object_come_back_with_it() -> None:
    """Spec 1: the auto-response pair and event timeout survive the last socket, though
    the host keeps nothing in memory for the object meanwhile."""
    from wsproto.events import CloseConnection, TextMessage

    from trio_hibernate import WebSocketRequestResponsePair

    class Configurable(Echo):
        async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
            if message == "configure":
                self.ctx.set_websocket_auto_response(WebSocketRequestResponsePair("hi", "yo"))
                self.ctx.set_hibernatable_websocket_event_timeout(4000)
            pair = self.ctx.get_websocket_auto_response()
            timeout = self.ctx.get_hibernatable_websocket_event_timeout()
            ws.send(f"{pair and (pair.request, pair.response)} {timeout}")

    app = App({"echo": Configurable})
    async with open_server(app) as server:
        host = server.host
        async with open_raw_websocket(server.port, "/echo/cfg") as ws:
            await ws.send(TextMessage(data="configure"))
            event = await ws.next_event()
            assert isinstance(event, TextMessage)
            assert event.data == "('hi', 'yo') 4000"
            await ws.send(CloseConnection(code=1000))
            assert isinstance(await ws.next_event(), CloseConnection)
        await settle()
        assert await host.hibernate("echo", "cfg")
        stats = host.statistics()
        assert (stats.live_objects, stats.hibernated_objects) == (0, 0)  # forgotten
        assert len(runtime_of(host).settings) == 1
        async with open_raw_websocket(server.port, "/echo/cfg") as ws:
            await ws.send(TextMessage(data="hi"))  # answered by the runtime
            event = await ws.next_event()
            assert isinstance(event, TextMessage)
            assert event.data == "yo"
            await ws.send(TextMessage(data="show"))
            event = await ws.next_event()
            assert isinstance(event, TextMessage)
            assert event.data == "('hi', 'yo') 4000"
        assert len(runtime_of(host).settings) == 0  # taken back by the awake object


def test_the_settings_index() -> None:
    from trio_hibernate import WebSocketRequestResponsePair
    from trio_hibernate._storage.settings import SettingsIndex

    index = SettingsIndex()
    try:
        assert index.take("ns", "a") is None
        pair = WebSocketRequestResponsePair("ping", "pong")
        index.keep("ns", "a", (pair, None))
        index.keep("ns", "b", (None, 250))
        index.keep("ns", "a", (pair, 10))  # replaces
        assert len(index) == 2
        assert index.take("ns", "a") == (pair, 10)
        assert index.take("ns", "a") is None
        assert index.take("other", "b") is None
        assert index.take("ns", "b") == (None, 250)
        assert len(index) == 0
    finally:
        index.close()


# -- review findings -----------------------------------------------------------------------


async def test_a_socket_lost_while_paused_gets_its_close(autojump_clock: trio.abc.Clock) -> None:
    """The peer resets while its connection is paused (backpressure) and the object's
    reply hits the reset: the object must still get websocket_close (1006) and the
    socket must leave get_websockets (it stayed listed forever)."""
    import socket
    import struct

    from wsproto.events import TextMessage

    from trio_hibernate import Limits

    ends: list[int] = []
    ended = trio.Event()
    slow = trio.Event()

    class Slow(Echo):
        async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
            await slow.wait()
            ws.send(message * 1000)

        async def websocket_close(
            self, ws: WebSocket, code: int, reason: str, was_clean: bool
        ) -> None:
            ends.append(code)
            ended.set()

    limits = Limits(max_queued_messages_per_websocket=2)
    async with open_server(App({"echo": Slow}), limits=limits) as server:
        async with open_raw_websocket(server.port, "/echo/room") as raw:
            for i in range(5):
                await raw.send(TextMessage(data=f"m{i}"))
            await settle()  # the connection is paused: 2 queued, the object is busy
            sock = raw.stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
            slow.set()
            await settle()
        with trio.fail_after(WAIT_SECONDS):
            await ended.wait()
        assert ends == [1006]
        assert server.host.object_statistics("echo", "room").websockets == 0
        assert server.host.statistics().buffered_bytes == 0


async def test_an_upgrade_that_fails_after_the_accept_is_undone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: HttpExchange, *args: object) -> None:
        raise RuntimeError("a bug of ours while answering the upgrade")

    async with serving() as (server, witness):
        monkeypatch.setattr(HttpExchange, "upgrade", broken)
        request = UPGRADE.format(path="/echo/victim", host="x", key=GOOD_KEY, extra="")
        response = await raw_exchange(server.port, request.encode())
        assert status_of(response) == 500
        monkeypatch.undo()
        await settle()
        assert server.host.object_statistics("echo", "victim").websockets == 0
        assert server.host.statistics().internal_errors == 1
        await witness_alive(witness)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"headers": {"content-length": "3"}}, "sets the 'content-length' header itself"),
        ({"headers": {"Transfer-Encoding": "gzip"}}, "header itself"),
        ({"headers": {"connection": "keep-alive"}}, "header itself"),
        ({"headers": {"x-a": "a "}}, "leading or trailing whitespace"),
        ({"headers": {"x-a": "\ta"}}, "leading or trailing whitespace"),
        ({"status": 100}, "101 \\(an upgrade\\) or an int from 200 to 599"),
        ({"status": 199}, "from 200 to 599"),
        ({"status": 600}, "from 200 to 599"),
        ({"status": True}, "from 200 to 599"),
    ],
)
def test_responses_the_server_could_not_send_are_refused_when_built(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Response(**kwargs)


async def test_a_namespace_removed_by_a_code_update_is_not_built_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Review finding: messages queued for an object whose namespace a live code update
    removed made the host construct the removed class again, with the new env."""
    from wsproto.events import CloseConnection, TextMessage

    built: list[object] = []
    busy = trio.Event()

    class Removed(Echo):
        def __init__(self, ctx: ObjectContext, env: Any) -> None:
            super().__init__(ctx, env)
            built.append(env)

        async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
            busy.set()
            await trio.sleep(1)

    async with open_server(App({"gone": Removed, "echo": Echo}, env="old")) as server:
        async with open_raw_websocket(server.port, "/gone/room") as raw:
            for _ in range(3):
                await raw.send(TextMessage(data="m"))
            with trio.fail_after(WAIT_SECONDS):
                await busy.wait()
            await settle()  # two messages are queued behind the running one
            await server.host.replace_app(App({"echo": Echo}, env="new"))
            event = await raw.next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 1012
        await trio.sleep(5)  # on the mock clock: anything queued would have run by now
        assert built == ["old"]
        stats = server.host.statistics()
        assert (stats.live_objects, stats.hibernated_objects, stats.buffered_bytes) == (0, 0, 0)
