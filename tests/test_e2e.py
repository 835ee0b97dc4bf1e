"""End-to-end tests: real trio-websocket clients against ``open_server`` on 127.0.0.1:0.

Every test runs on Trio's autojump clock, so idle timeouts and close timeouts pass in
virtual time and a hang fails fast instead of stalling the suite. Each test body is under a
``trio.fail_after`` (``helpers.serve``) and every single wait has its own bound. Nothing
sleeps on the wall clock: "let things settle" is ``wait_all_tasks_blocked``. The clock
jumps only after every task has been blocked for ``IO_GRACE_SECONDS`` of real time, so it
never jumps over a reply still in a loopback socket or a storage commit in its thread
(``helpers`` explains why, with Trio's own advice).

The test object, :class:`Room`, counts its constructor runs in the app's ``env`` (a
:class:`~helpers.Probe`) and keeps an in-memory list, so hibernation is observable from the
outside: the count rises and the list starts empty again.
"""

from __future__ import annotations

import gc
import json
import logging
import runpy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, quote

import attrs
import pytest
import trio
from helpers import (
    EMPTY_CLOSE_FRAME,
    IO_GRACE_SECONDS,
    NEVER,
    TEST_SECONDS,
    WAIT_SECONDS,
    Probe,
    RawWebSocket,
    accept_upgrade,
    ask,
    closed_by_server,
    http_exchange,
    open_client,
    open_raw_websocket,
    recv,
    refused_upgrade,
    send,
    serve,
    settle,
)
from trio.testing import MockClock
from trio_websocket import (
    WebSocketConnection,
    connect_websocket_url,
)
from wsproto.events import BytesMessage, CloseConnection, TextMessage

from trio_hibernate import (
    App,
    DurableObject,
    LimitExceededError,
    Limits,
    ObjectContext,
    ObjectId,
    ObjectState,
    ReadyState,
    Request,
    Response,
    WebSocket,
    WebSocketProtocolError,
    WebSocketRequestResponsePair,
    WebSocketStateError,
)

pytestmark = pytest.mark.integration

#: The wall clock handed to the host, so auto-response timestamps are predictable.
STAMP: Final = 1_700_000_000.5
DROP_REASON: Final = "WebSocket disconnected without sending Close frame."
CHAT_EXAMPLE: Final = Path(__file__).resolve().parent.parent / "examples" / "chat.py"


# -- what the test object reports ---------------------------------------------------------


@attrs.frozen
class Handled:
    """``websocket_message`` ran for ``data``."""

    url: str
    data: str | bytes


@attrs.frozen
class Overlap:
    """A message handler started while another one of the same object was running."""

    data: str | bytes


@attrs.frozen
class Closed:
    """``websocket_close`` ran; what it saw."""

    url: str
    code: int
    reason: str
    was_clean: bool
    tags: tuple[str, ...]
    ready_state: ReadyState
    attachment: object
    close_again: str  # "no-op", or what ws.close() raised inside the handler


@attrs.frozen
class Errored:
    """``websocket_error`` ran."""

    url: str
    error: Exception


@attrs.frozen
class SendRefused:
    """``ws.send()`` right after ``ws.close()`` raised."""

    url: str
    ready_state: ReadyState
    message: str


def terminal_events(probe: Probe, url: str) -> list[Closed | Errored]:
    """The close and error events recorded for the socket connected to ``url``."""
    return [e for e in probe.events if isinstance(e, Closed | Errored) and e.url == url]


# -- the test object ----------------------------------------------------------------------


class Room(DurableObject):
    """Accepts every upgrade (tags from ``?tag=``) and obeys text commands.

    ``mem X`` appends to an in-memory list and answers it with the constructor count;
    the other commands exercise one API each (see :meth:`command`). Anything else is
    echoed as ``echo: <message>``.
    """

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        assert isinstance(env, Probe)
        self.probe = env
        self.probe.constructing(self)
        self.memory: list[str] = []
        self.handles: dict[str, WebSocket] = {}
        self.busy = False

    async def fetch(self, request: Request) -> Response:
        ws = request.websocket
        if ws is None:
            return Response(
                status=200,
                body=f"{request.method} {request.url} body={request.body.decode()} "
                f"constructed={self.probe.constructed}",
                headers=[("x-object-id", self.ctx.id.hex)],
            )
        query = parse_qsl(request.query, keep_blank_values=True)
        tags = [value for name, value in query if name == "tag"]
        try:
            return accept_upgrade(self.ctx, request, tags)
        except LimitExceededError as exc:
            if exc.limit_name == "max_websockets_per_object":
                raise  # the runtime refuses the upgrade itself (503)
            return Response(status=400, body=f"{exc} [sockets: {len(self.ctx.get_websockets())}]")

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if self.busy:
            self.probe.record(Overlap(message))
        self.busy = True
        try:
            self.probe.record(Handled(ws.url, message))
            await self.command(ws, message)
        finally:
            self.busy = False

    async def command(self, ws: WebSocket, message: str | bytes) -> None:
        if isinstance(message, bytes):
            ws.send(message[::-1])
            return
        verb, _, rest = message.partition(" ")
        if verb == "mem":
            self.memory.append(rest)
            ws.send(json.dumps({"memory": self.memory, "constructed": self.probe.constructed}))
        elif verb == "tags":
            ws.send(json.dumps(self.ctx.get_tags(ws)))
        elif verb == "attach":
            try:
                ws.serialize_attachment(json.loads(rest))
            except LimitExceededError as exc:
                ws.send(f"refused: {exc}")
            else:
                ws.send("attached")
        elif verb == "attachment":
            ws.send(json.dumps(ws.deserialize_attachment()))
        elif verb == "broadcast":
            tag, _, text = rest.partition(" ")
            peers = self.ctx.get_websockets(tag)
            for peer in peers:
                peer.send(text)
            ws.send(f"sent to {len(peers)}")
        elif verb == "autorespond":
            request, _, response = rest.partition(" ")
            try:
                self.ctx.set_websocket_auto_response(
                    WebSocketRequestResponsePair(request, response)
                )
            except LimitExceededError as exc:
                ws.send(f"refused: {exc}")
            else:
                ws.send("set")
        elif verb == "autorespond-clear":
            self.ctx.set_websocket_auto_response()
            ws.send("cleared")
        elif verb == "identity":
            # Spec 3: within one activation one handle stands for one socket everywhere.
            listed = [peer for peer in self.ctx.get_websockets() if peer.url == ws.url]
            before = self.handles.get(ws.url)
            self.handles[ws.url] = ws
            ws.send(
                json.dumps(
                    {
                        "listed_is_ws": len(listed) == 1 and listed[0] is ws,
                        "same_as_before": None if before is None else before is ws,
                    }
                )
            )
        elif verb == "autoresponse":
            pair = self.ctx.get_websocket_auto_response()
            stamp = self.ctx.get_websocket_auto_response_timestamp(ws)
            ws.send(
                json.dumps(
                    {
                        "pair": None if pair is None else [pair.request, pair.response],
                        "timestamp": None if stamp is None else stamp.isoformat(),
                    }
                )
            )
        elif verb == "close":
            code, _, reason = rest.partition(" ")
            ws.close(int(code), reason)
            try:
                ws.send("sent after close")
            except WebSocketStateError as exc:
                self.probe.record(SendRefused(ws.url, ws.ready_state, str(exc)))
        elif verb == "list":
            sockets = self.ctx.get_websockets()
            ws.send(json.dumps([[peer.url, peer.ready_state.name] for peer in sockets]))
        elif verb == "seq":
            # Yield inside the turn (twice, so queued work gets scheduled in between): no
            # other event of this object may start before this handler returns.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            ws.send(f"ack {rest}")
        elif verb == "raise":
            raise RuntimeError(f"boom: {rest}")
        elif verb == "timeout":
            self.ctx.set_hibernatable_websocket_event_timeout(int(rest))
            ws.send("timeout set")
        elif verb == "sleep":
            await trio.sleep(float(rest))
            ws.send("slept")
        else:
            ws.send(f"echo: {message}")

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        ready_state = ws.ready_state
        try:
            ws.close(1000, "closing again")  # spec 7: harmless once the runtime echoed
        except Exception as exc:
            close_again = repr(exc)
        else:
            close_again = "no-op"
        self.probe.record(
            Closed(
                url=ws.url,
                code=code,
                reason=reason,
                was_clean=was_clean,
                tags=tuple(self.ctx.get_tags(ws)),
                ready_state=ready_state,
                attachment=ws.deserialize_attachment(),
                close_again=close_again,
            )
        )

    async def websocket_error(self, ws: WebSocket, error: Exception) -> None:
        self.probe.record(Errored(ws.url, error))


# -- small helpers ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _io_grace(autojump_clock: MockClock) -> None:
    """Every test runs on the autojump clock, which waits out in-flight I/O (``helpers``)."""
    autojump_clock.autojump_threshold = IO_GRACE_SECONDS


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def app(probe: Probe) -> App:
    """The app under test: one namespace, ``room``, reporting to ``probe``."""
    return App({"room": Room}, env=probe)


async def ask_json(ws: WebSocketConnection, message: str) -> Any:
    return json.loads(await ask(ws, message))


async def next_close(raw: RawWebSocket) -> CloseConnection:
    event = await raw.next_event()
    assert isinstance(event, CloseConnection), event
    return event


# -- hibernation ------------------------------------------------------------------------


async def test_idle_object_hibernates_with_sockets_open_and_wakes_fresh(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    async with serve(app, idle_timeout=5) as server:
        host = server.host
        async with open_client(server, "/room/a?id=1") as ws:
            assert await ask_json(ws, "mem x") == {"memory": ["x"], "constructed": 1}

            await trio.sleep(4)  # virtual time: not yet idle for 5 s
            assert host.object_statistics("room", "a").state is ObjectState.LIVE
            assert host.statistics().live_objects == 1

            await trio.sleep(2)
            stats = host.statistics()
            assert stats.live_objects == 0
            assert stats.hibernated_objects == 1
            assert stats.websockets == 1
            assert stats.hibernations == 1
            assert stats.wakes == 1
            one = host.object_statistics("room", "a")
            assert one.state is ObjectState.HIBERNATED
            assert one.websockets == 1
            assert one.activations == 1
            assert ws.closed is None  # the client is still connected
            assert probe.constructed == 1

            # The next message re-runs the constructor; in-memory state starts over.
            assert await ask_json(ws, "mem y") == {"memory": ["y"], "constructed": 2}
            assert host.object_statistics("room", "a").activations == 2
            assert host.statistics().wakes == 2


async def test_tags_and_attachment_survive_hibernation(
    autojump_clock: MockClock, app: App, probe: Probe
) -> None:
    async with (
        serve(app) as server,
        open_client(server, "/room/b?id=red&tag=red") as red,
        open_client(server, "/room/b?id=both&tag=red&tag=blue&tag=red") as both,
    ):
        assert await ask(red, 'attach {"nick": "r", "seen": [1, 2]}') == "attached"
        assert await ask(both, 'attach {"nick": "b"}') == "attached"
        assert await server.host.hibernate("room", "b") is True
        constructed = probe.constructed

        assert await ask_json(red, "tags") == ["red"]
        assert probe.constructed == constructed + 1  # woke once
        assert await ask_json(both, "tags") == ["red", "blue"]  # duplicates collapsed
        assert await ask_json(red, "attachment") == {"nick": "r", "seen": [1, 2]}
        assert await ask_json(both, "attachment") == {"nick": "b"}
        assert probe.constructed == constructed + 1


async def test_broadcast_by_tag_after_wake_reaches_exactly_the_tagged(
    autojump_clock: MockClock,
    app: App,
) -> None:
    async with (
        serve(app) as server,
        open_client(server, "/room/c?id=red&tag=red") as red,
        open_client(server, "/room/c?id=both&tag=red&tag=blue") as both,
        open_client(server, "/room/c?id=blue&tag=blue") as blue,
    ):
        assert await ask(red, "hello") == "echo: hello"
        assert await server.host.hibernate("room", "c") is True
        first = await ask_json(red, "identity")
        assert first == {"listed_is_ws": True, "same_as_before": None}
        again = await ask_json(red, "identity")
        assert again == {"listed_is_ws": True, "same_as_before": True}
        assert await server.host.hibernate("room", "c") is True
        # After a wake the handles are new objects (and the old dict is gone with it).
        assert await ask_json(red, "identity") == first

        # blue carries no "red" tag: its next message is the answer, not the broadcast.
        assert await ask(blue, "broadcast red to the reds") == "sent to 2"
        assert await recv(red) == "to the reds"
        assert await recv(both) == "to the reds"

        assert await server.host.hibernate("room", "c") is True
        await send(both, "broadcast blue to the blues")
        assert await recv(both) == "to the blues"
        assert await recv(both) == "sent to 2"
        assert await recv(blue) == "to the blues"

        assert await ask(red, "broadcast nobody x") == "sent to 0"
        # Nothing else is pending anywhere: each next message answers its own request.
        for ws in (red, both, blue):
            assert await ask(ws, "last") == "echo: last"


# -- auto-response and ping ---------------------------------------------------------------


async def test_auto_response_answered_while_hibernated_without_waking(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    async with (
        serve(app, wall_clock=lambda: STAMP) as server,
        open_client(server, "/room/auto?id=1") as ws,
    ):
        host = server.host
        assert await ask(ws, "autorespond ping pong") == "set"
        assert await ask_json(ws, "autoresponse") == {
            "pair": ["ping", "pong"],
            "timestamp": None,
        }
        assert await host.hibernate("room", "auto") is True
        constructed = probe.constructed
        handled = len(probe.of(Handled))
        served = host.statistics().auto_responses

        assert await ask(ws, "ping") == "pong"
        assert await ask(ws, "ping") == "pong"
        await settle()
        assert probe.constructed == constructed
        assert len(probe.of(Handled)) == handled
        assert host.object_statistics("room", "auto").state is ObjectState.HIBERNATED
        assert host.statistics().auto_responses == served + 2

        # Only an exact match is answered by the runtime; this one wakes the object.
        assert await ask(ws, "ping ") == "echo: ping "
        assert probe.constructed == constructed + 1

        # After the wake the pair is still set and the timestamp is recorded.
        stamp = datetime.fromtimestamp(STAMP, UTC).isoformat()
        assert await ask_json(ws, "autoresponse") == {
            "pair": ["ping", "pong"],
            "timestamp": stamp,
        }

        # Clearing the pair keeps the timestamp; "ping" then reaches the object.
        assert await ask(ws, "autorespond-clear") == "cleared"
        assert await ask_json(ws, "autoresponse") == {"pair": None, "timestamp": stamp}
        assert await ask(ws, "ping") == "echo: ping"


async def test_protocol_ping_answered_while_hibernated_without_waking(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    async with (
        serve(app) as server,
        open_client(server, "/room/ping?id=1") as ws,
    ):
        host = server.host
        assert await ask_json(ws, "mem a") == {"memory": ["a"], "constructed": 1}
        assert await host.hibernate("room", "ping") is True
        wakes = host.statistics().wakes

        with trio.fail_after(WAIT_SECONDS):
            await ws.ping(b"are you there")
            await ws.ping()
        await settle()
        assert probe.constructed == 1
        assert host.statistics().wakes == wakes
        assert host.object_statistics("room", "ping").state is ObjectState.HIBERNATED
        assert len(probe.of(Handled)) == 1


# -- close codes --------------------------------------------------------------------------


async def test_client_close_with_code_reaches_handler_and_is_echoed(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    closer_url = "/room/close?id=closer&tag=t1"
    async with (
        serve(app) as server,
        open_client(server, "/room/close?id=observer") as observer,
    ):
        host = server.host
        async with open_client(server, closer_url) as ws:
            assert await ask(ws, 'attach {"who": "closer"}') == "attached"
            assert await host.hibernate("room", "close") is True  # close while asleep
            with trio.fail_after(WAIT_SECONDS):
                await ws.aclose(4001, "done for today")
            # trio-websocket records the code of the Close frame the server answered
            # with; had the server not echoed, it would not be 4001.
            assert ws.closed is not None
            assert (ws.closed.code, ws.closed.reason) == (4001, "done for today")

        await probe.wait_for(lambda: bool(terminal_events(probe, closer_url)))
        assert terminal_events(probe, closer_url) == [
            Closed(
                url=closer_url,
                code=4001,
                reason="done for today",
                was_clean=True,
                tags=("t1",),
                ready_state=ReadyState.CLOSED,
                attachment={"who": "closer"},
                close_again="no-op",
            )
        ]
        # The socket left get_websockets once its handler ran.
        assert await ask_json(observer, "list") == [["/room/close?id=observer", "OPEN"]]
        await settle()
        assert host.object_statistics("room", "close").websockets == 1
        assert len(terminal_events(probe, closer_url)) == 1
        assert not probe.of(Errored)


async def test_client_close_without_code_gives_1005(
    autojump_clock: MockClock, app: App, probe: Probe
) -> None:
    url = "/room/nocode?id=raw"
    async with serve(app) as server, open_raw_websocket(server.port, url) as raw:
        await raw.send(TextMessage("hello"))
        assert await raw.next_event() == TextMessage("echo: hello")

        await raw.send_raw(EMPTY_CLOSE_FRAME)
        echo = await next_close(raw)  # the runtime answers the Close itself
        assert (echo.code, echo.reason) == (1005, "")
        assert await raw.next_event() is None  # then the server ends the TCP connection

        await probe.wait_for(lambda: bool(terminal_events(probe, url)))
        [closed] = terminal_events(probe, url)
        assert isinstance(closed, Closed)
        assert (closed.code, closed.reason, closed.was_clean) == (1005, "", True)
        await settle()
        assert len(terminal_events(probe, url)) == 1
        assert server.host.object_statistics("room", "nocode").websockets == 0


async def test_transport_drop_gives_1006(autojump_clock: MockClock, app: App, probe: Probe) -> None:
    live_url = "/room/drop?id=while-live"
    asleep_url = "/room/drop?id=while-hibernated"
    async with (
        serve(app) as server,
        open_client(server, "/room/drop?id=observer") as observer,
        open_raw_websocket(server.port, live_url) as while_live,
        open_raw_websocket(server.port, asleep_url) as while_asleep,
    ):
        host = server.host

        await while_live.drop()
        await probe.wait_for(lambda: bool(terminal_events(probe, live_url)))
        assert await host.hibernate("room", "drop") is True
        constructed = probe.constructed
        await while_asleep.drop()
        await probe.wait_for(lambda: bool(terminal_events(probe, asleep_url)))
        assert probe.constructed == constructed + 1  # the close event woke it

        for url in (live_url, asleep_url):
            [closed] = terminal_events(probe, url)
            assert isinstance(closed, Closed)
            assert (closed.code, closed.reason, closed.was_clean) == (1006, DROP_REASON, False)
            assert closed.close_again == "no-op"
        assert await ask_json(observer, "list") == [["/room/drop?id=observer", "OPEN"]]
        await settle()
        assert len(terminal_events(probe, live_url)) == 1
        assert len(terminal_events(probe, asleep_url)) == 1
        assert not probe.of(Errored)


async def test_object_close_reaches_client_and_handler_runs_on_answer(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    url = "/room/objclose?id=1"
    async with serve(app) as server:
        async with open_client(server, url) as ws:
            await send(ws, "close 4000 bye")
            assert await closed_by_server(ws) == (4000, "bye")

        # trio-websocket answered the Close with the same code; then the handler ran.
        await probe.wait_for(lambda: bool(terminal_events(probe, url)))
        [closed] = terminal_events(probe, url)
        assert isinstance(closed, Closed)
        assert (closed.code, closed.reason, closed.was_clean) == (4000, "bye", True)
        assert probe.of(SendRefused) == [
            SendRefused(url, ReadyState.CLOSING, "Can't call WebSocket send() after close().")
        ]
        await settle()
        assert len(terminal_events(probe, url)) == 1


async def test_object_closed_socket_stays_listed_until_the_peer_answers(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    url = "/room/closing?id=raw"
    async with (
        serve(app, close_timeout=NEVER) as server,
        open_client(server, "/room/closing?id=observer") as observer,
        open_raw_websocket(server.port, url) as raw,
    ):
        await raw.send(TextMessage("close 4000 bye"))
        close = await next_close(raw)
        assert (close.code, close.reason) == (4000, "bye")

        # The peer has not answered: no handler yet, and the socket is listed CLOSING,
        # also after a hibernation.
        await settle()
        assert not terminal_events(probe, url)
        assert await server.host.hibernate("room", "closing") is True
        assert await ask_json(observer, "list") == [  # newest first, as in workerd
            [url, "CLOSING"],
            ["/room/closing?id=observer", "OPEN"],
        ]

        await raw.send(close.response())
        await probe.wait_for(lambda: bool(terminal_events(probe, url)))
        [closed] = terminal_events(probe, url)
        assert isinstance(closed, Closed)
        assert (closed.code, closed.reason, closed.was_clean) == (4000, "bye", True)
        assert await raw.next_event() is None
        assert await ask_json(observer, "list") == [["/room/closing?id=observer", "OPEN"]]


async def test_object_close_unanswered_ends_with_1006_after_close_timeout(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    url = "/room/unanswered?id=raw"
    async with (
        serve(app, close_timeout=7) as server,
        open_raw_websocket(server.port, url) as raw,
    ):
        await raw.send(TextMessage("close 4000 bye"))
        await next_close(raw)
        before = trio.current_time()
        await probe.wait_for(lambda: bool(terminal_events(probe, url)))
        assert trio.current_time() - before >= 7
        [closed] = terminal_events(probe, url)
        assert isinstance(closed, Closed)
        assert (closed.code, closed.reason, closed.was_clean) == (1006, DROP_REASON, False)
        assert await raw.next_event() is None  # the runtime dropped the connection


# -- ordering and handler failures --------------------------------------------------------


async def test_pipelined_messages_handled_in_order_one_turn_at_a_time(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    count = 200
    async with (
        serve(app) as server,
        open_client(server, "/room/pipe?id=1") as ws,
    ):
        assert await server.host.hibernate("room", "pipe") is True
        # All sent before any answer is read; the first wakes the object, the others
        # arrive while it is waking or busy and must be kept, in order.
        for i in range(count):
            await send(ws, f"seq {i}")
        replies = [await recv(ws) for _ in range(count)]
        assert replies == [f"ack {i}" for i in range(count)]
        assert [event.data for event in probe.of(Handled)] == [f"seq {i}" for i in range(count)]
        assert probe.of(Overlap) == []
        assert probe.constructed == 2  # the upgrade's activation, then one wake


async def test_fragmented_text_and_binary_messages_arrive_whole(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    url = "/room/frag?id=raw"
    async with serve(app) as server, open_raw_websocket(server.port, url) as raw:
        assert await server.host.hibernate("room", "frag") is True
        await raw.send(TextMessage("echo", message_finished=False))
        await raw.send(TextMessage(" in ", message_finished=False))
        await raw.send(TextMessage("three", message_finished=True))
        assert await raw.next_event() == TextMessage("echo: echo in three")
        await raw.send(BytesMessage(b"\x00\x01", message_finished=False))
        await raw.send(BytesMessage(b"\x02", message_finished=True))
        assert await raw.next_event() == BytesMessage(b"\x02\x01\x00")
        assert [event.data for event in probe.of(Handled)] == [
            "echo in three",
            b"\x00\x01\x02",
        ]


async def test_handler_exception_is_logged_and_socket_stays_open(
    autojump_clock: MockClock, app: App, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    url = "/room/crash?id=1"
    async with (
        serve(app) as server,
        open_client(server, url) as ws,
    ):
        assert await ask_json(ws, "mem a") == {"memory": ["a"], "constructed": 1}
        with caplog.at_level(logging.ERROR, logger="trio_hibernate"):
            await send(ws, "raise on purpose")
            assert await ask(ws, "still there?") == "echo: still there?"
        [logged] = [record for record in caplog.records if record.exc_info is not None]
        assert logged.levelno == logging.ERROR
        assert logged.exc_info is not None
        assert repr(logged.exc_info[1]) == "RuntimeError('boom: on purpose')"
        assert "room:crash" in logged.getMessage()  # named, not by its 64-hex id
        assert logged.__dict__["object_id"] == ObjectId.from_name("room", "crash").hex

        assert ws.closed is None
        assert await ask(ws, "and later?") == "echo: and later?"
        assert probe.of(Errored) == []
        assert terminal_events(probe, url) == []


async def test_event_timeout_cancels_a_slow_handler_and_survives_hibernation(
    autojump_clock: MockClock, app: App, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        serve(app) as server,
        open_client(server, "/room/slow?id=1") as ws,
    ):
        assert await ask(ws, "timeout 100") == "timeout set"
        assert await server.host.hibernate("room", "slow") is True
        with caplog.at_level(logging.ERROR, logger="trio_hibernate"):
            await send(ws, "sleep 1")
            # "slept" never comes: the handler was cancelled after 100 ms (virtual).
            assert await ask_json(ws, "mem a") == {"memory": ["a"], "constructed": 3}
        assert any("event timeout of 100 ms" in r.getMessage() for r in caplog.records)
        assert ws.closed is None
        assert probe.of(Errored) == []


# -- limits -------------------------------------------------------------------------------


async def test_eleven_tags_refused(autojump_clock: MockClock, app: App) -> None:
    async with serve(app) as server:
        # A repeat before the tenth distinct tag is dropped (workerd counts per element).
        ten = "&".join(f"tag=t{i}" for i in [0, 0, *range(1, 10)])
        async with open_client(server, f"/room/tags?{ten}") as ws:
            assert await ask_json(ws, "tags") == [f"t{i}" for i in range(10)]

        eleven = "&".join(f"tag=t{i}" for i in range(11))
        refusal = await refused_upgrade(server.port, f"/room/tags?{eleven}")
        assert refusal.status == 400
        assert b"cannot have more than 10 tags" in refusal.body
        assert b"[sockets: 0]" in refusal.body  # the failed accept left nothing behind


@pytest.mark.parametrize(
    ("tag", "size"),
    [("x" * 257, 257), ("\u00e9" * 129, 258)],
    ids=["ascii", "utf8-bytes"],
)
async def test_tag_over_256_bytes_refused(
    autojump_clock: MockClock, app: App, tag: str, size: int
) -> None:
    async with serve(app) as server:
        async with open_client(server, f"/room/tag?tag={'y' * 256}") as ws:
            assert await ask_json(ws, "tags") == ["y" * 256]

        refusal = await refused_upgrade(server.port, f"/room/tag?tag={quote(tag)}")
        assert refusal.status == 400
        body = refusal.body.decode()
        assert f'"{tag}" is longer than the max tag length (256' in body
        assert str(size) in body


async def test_oversize_attachment_refused_and_previous_kept(
    autojump_clock: MockClock, app: App
) -> None:
    async with (
        serve(app) as server,
        open_client(server, "/room/attach?id=1") as ws,
    ):
        assert await ask(ws, 'attach {"keep": "me"}') == "attached"
        reply = await ask(ws, "attach " + json.dumps("x" * 3000))
        assert reply.startswith("refused: ")
        assert "cannot be larger than 2048 bytes" in reply
        assert "3003 bytes" in reply  # the encoded size of the offered value
        assert await ask_json(ws, "attachment") == {"keep": "me"}
        assert await server.host.hibernate("room", "attach") is True
        assert await ask_json(ws, "attachment") == {"keep": "me"}


async def test_oversize_auto_response_refused(autojump_clock: MockClock, app: App) -> None:
    async with (
        serve(app) as server,
        open_client(server, "/room/autolimit?id=1") as ws,
    ):
        assert await ask(ws, "autorespond hi there") == "set"
        reply = await ask(ws, f"autorespond {'q' * 2049} pong")
        assert reply.startswith("refused: Request cannot be larger than 2048 bytes.")
        assert "A request of size 2049 was provided" in reply
        reply = await ask(ws, f"autorespond ping {'r' * 2049}")
        assert reply.startswith("refused: Response cannot be larger than 2048 bytes.")
        assert "A response of size 2049 was provided" in reply
        assert (await ask_json(ws, "autoresponse"))["pair"] == ["hi", "there"]
        assert await ask(ws, "hi") == "there"
        assert await ask(ws, "autorespond " + "\u00e9" * 1024 + " ok") == "set"  # 2048 B


async def test_max_websockets_per_object_refuses_upgrade_with_503(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    async with (
        serve(app, limits=Limits(max_websockets_per_object=2)) as server,
        open_client(server, "/room/full?id=1") as first,
        open_client(server, "/room/full?id=2") as second,
    ):
        refusal = await refused_upgrade(server.port, "/room/full?id=3")
        assert refusal.status == 503
        assert b"only 2 websockets can be accepted on a single Durable Object" in refusal.body

        # Nothing else was disturbed.
        assert await ask(first, "one") == "echo: one"
        assert await ask(second, "two") == "echo: two"
        assert server.host.object_statistics("room", "full").websockets == 2
        assert probe.of(Closed) == []
        assert probe.of(Errored) == []
        # Another object is not affected by this one's count.
        async with open_client(server, "/room/other?id=3") as third:
            assert await ask(third, "three") == "echo: three"


async def test_oversize_message_closes_1009_and_calls_websocket_error(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    url = "/room/big?id=1"
    async with serve(app, limits=Limits(max_message_bytes=1024)) as server:
        async with open_client(server, url) as ws:
            at_limit = "echo " + "z" * 1019
            assert await ask(ws, at_limit) == f"echo: {at_limit}"
            await send(ws, "z" * 1025)
            code, reason = await closed_by_server(ws)
            assert code == 1009
            assert reason is not None
            assert "1024" in reason

        await probe.wait_for(lambda: bool(terminal_events(probe, url)))
        [errored] = terminal_events(probe, url)
        assert isinstance(errored, Errored)
        assert isinstance(errored.error, WebSocketProtocolError)
        assert errored.error.code == 1009
        await settle()
        assert len(terminal_events(probe, url)) == 1
        assert server.host.object_statistics("room", "big").websockets == 0


async def test_protocol_violation_closes_1002_and_calls_websocket_error(
    autojump_clock: MockClock,
    app: App,
    probe: Probe,
) -> None:
    url = "/room/violation?id=raw"
    async with serve(app) as server, open_raw_websocket(server.port, url) as raw:
        await raw.send_raw(b"\x81\x02hi")  # a client frame must be masked
        close = await next_close(raw)
        assert close.code == 1002
        await probe.wait_for(lambda: bool(terminal_events(probe, url)))
        [errored] = terminal_events(probe, url)
        assert isinstance(errored, Errored)
        assert isinstance(errored.error, WebSocketProtocolError)
        assert errored.error.code == 1002
        await raw.drop()
        await settle()
        assert len(terminal_events(probe, url)) == 1


# -- test hooks and strict mode -----------------------------------------------------------


async def test_strict_mode_constructs_for_every_event(
    autojump_clock: MockClock, app: App, probe: Probe
) -> None:
    url = "/room/strict?id=1"
    async with serve(app, hibernate_after_every_event=True) as server:
        async with open_client(server, url) as ws:
            assert probe.constructed == 1  # for the upgrade's fetch
            for i, word in enumerate(["a", "b", "c"]):
                expected = {"memory": [word], "constructed": 2 + i}
                assert await ask_json(ws, f"mem {word}") == expected
            await settle()
            stats = server.host.statistics()
            assert stats.live_objects == 0
            assert stats.wakes == stats.hibernations == 4

        await probe.wait_for(lambda: bool(terminal_events(probe, url)))
        assert probe.constructed == 5  # and once more for the close event


async def test_hibernate_hook(autojump_clock: MockClock, app: App) -> None:
    async with serve(app) as server:
        host = server.host
        assert await host.hibernate("room", "never-used") is False
        async with open_client(server, "/room/hook?id=1") as ws:
            assert await ask_json(ws, "mem a") == {"memory": ["a"], "constructed": 1}
            assert await host.hibernate("room", "hook") is True
            assert host.object_statistics("room", "hook").state is ObjectState.HIBERNATED
            assert host.object_statistics("room", "hook").websockets == 1
            assert await host.hibernate("room", "hook") is False  # not live any more
            assert ws.closed is None
            assert await ask_json(ws, "mem b") == {"memory": ["b"], "constructed": 2}
            assert await host.hibernate("room", ObjectId.from_name("room", "hook"))  # by id too


async def test_evicted_instance_is_garbage_collected(
    autojump_clock: MockClock, app: App, probe: Probe
) -> None:
    async with (
        serve(app, idle_timeout=5) as server,
        open_client(server, "/room/gc?id=1") as ws,
    ):
        assert await ask_json(ws, "mem a") == {"memory": ["a"], "constructed": 1}
        first = probe.instances[-1]
        assert first() is not None
        await trio.sleep(6)  # idle eviction
        assert server.host.statistics().live_objects == 0
        gc.collect()
        assert first() is None

        assert await ask_json(ws, "mem b") == {"memory": ["b"], "constructed": 2}
        second = probe.instances[-1]
        assert second() is not None
        assert await server.host.hibernate("room", "gc") is True  # eviction by the hook
        gc.collect()
        assert second() is None


# -- shutdown -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "code"),
    [({}, 1001), ({"shutdown_close_code": 1012}, 1012)],
    ids=["default-1001", "restart-1012"],
)
async def test_leaving_open_server_closes_sockets_and_runs_no_handler(
    autojump_clock: MockClock, app: App, probe: Probe, options: dict[str, Any], code: int
) -> None:
    with trio.fail_after(TEST_SECONDS):
        async with trio.open_nursery() as nursery:
            async with serve(app, **options) as server:
                live = await connect_websocket_url(nursery, server.url("/room/live?id=1"))
                asleep = await connect_websocket_url(nursery, server.url("/room/asleep?id=2"))
                assert await ask(live, "a") == "echo: a"
                assert await ask(asleep, "b") == "echo: b"
                assert await server.host.hibernate("room", "asleep") is True
                constructed = probe.constructed

            for ws in (live, asleep):
                assert (await closed_by_server(ws))[0] == code
                await ws.aclose()
        assert probe.constructed == constructed  # the hibernated object was not woken
        assert probe.of(Closed) == []
        assert probe.of(Errored) == []


# -- plain HTTP ---------------------------------------------------------------------------


async def test_plain_http_reaches_fetch(autojump_clock: MockClock, app: App) -> None:
    async with serve(app) as server:
        reply = await http_exchange(
            server.port, b"GET /room/web/hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        assert reply.status == 200
        assert reply.body == b"GET /room/web/hello?x=1 body= constructed=1"
        assert reply.headers["x-object-id"] == ObjectId.from_name("room", "web").hex

        reply = await http_exchange(
            server.port,
            b"POST /room/web/submit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
        )
        assert reply.status == 200
        assert reply.body == b"POST /room/web/submit body=hello constructed=1"


async def test_unknown_namespace_is_404(autojump_clock: MockClock, app: App, probe: Probe) -> None:
    async with serve(app) as server:
        reply = await http_exchange(
            server.port, b"GET /nosuch/web HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        assert reply.status == 404
        assert b"nosuch" in reply.body

        refusal = await refused_upgrade(server.port, "/nosuch/web")
        assert refusal.status == 404
        assert probe.constructed == 0


# -- the example app ----------------------------------------------------------------------


async def test_chat_example(autojump_clock: MockClock) -> None:
    chat_app = runpy.run_path(str(CHAT_EXAMPLE))["app"]
    assert isinstance(chat_app, App)
    async with serve(chat_app, idle_timeout=10) as server:
        host = server.host
        async with open_client(server, "/chat/lobby?nick=alice") as alice:
            assert await recv(alice) == "* alice joined"
            async with open_client(server, "/chat/lobby?nick=bob") as bob:
                assert await recv(bob) == "* bob joined"
                assert await recv(alice) == "* bob joined"
                refusal = await refused_upgrade(server.port, "/chat/lobby?nick=bob")
                assert refusal.status == 409

                await send(alice, "hello")
                assert await recv(alice) == "alice: hello"
                assert await recv(bob) == "alice: hello"

                await trio.sleep(11)  # the room hibernates; both stay connected
                stats = host.statistics()
                assert (stats.live_objects, stats.hibernated_objects) == (0, 1)
                assert stats.websockets == 2
                wakes = stats.wakes

                assert await ask(bob, "ping") == "pong"  # heartbeat without waking
                assert host.statistics().wakes == wakes

                assert await ask(bob, "/who") == "* here: alice, bob"
                assert host.statistics().wakes == wakes + 1
                await send(alice, "/msg bob psst")
                assert await recv(bob) == "(whisper) alice: psst"
            assert await recv(alice) == "* bob left"


# -- house rule 5 -------------------------------------------------------------------------
# Last in the file on purpose: it fails today, and ``pytest -x`` should run the rest first.


async def test_open_server_lets_an_exception_through_unwrapped(
    autojump_clock: MockClock, app: App
) -> None:
    """style.md rule 5: no one-element ExceptionGroup leaks out of an owning context
    manager. An error in the ``async with open_server(...)`` body must come out as itself.
    """
    with pytest.raises(KeyError, match="the body's own error"):
        async with serve(app):
            raise KeyError("the body's own error")
