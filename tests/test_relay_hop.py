"""The internal hop between cluster hosts (issue 14), without PostgreSQL: two servers in
one test, host A relaying to host B, which owns every object.

A's app routes nothing by path: its ``App.fetch`` relays every ``/room/<name>`` request
to B with :func:`relay_fetch` (with a context, as an ``App.authorize`` would attach).
B's objects answer as for a local client; a WebSocket is spliced on A to B's
connection, so the socket lives on B (its tags, attachment, broadcasts, hibernation,
auto-response, close codes). B learns the cluster key through its runtime, as the
cluster setup does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import pytest
import trio
from helpers import (
    WAIT_SECONDS,
    Probe,
    RawWebSocket,
    ask,
    closed_by_server,
    http_exchange,
    open_client,
    recv_text,
    refused_upgrade,
    send,
    serve,
    settle,
)
from trio.testing import MockClock
from wsproto.events import (
    AcceptConnection,
    Request as WSRequest,
    TextMessage,
)

from trio_hibernate import (
    App,
    AppContext,
    DurableObject,
    ObjectContext,
    ObjectId,
    ObjectState,
    RemoteCallError,
    Request,
    Response,
    Server,
    WebSocket,
    WebSocketRequestResponsePair,
)
from trio_hibernate._cluster.relay import RelayTarget, relay_call, relay_fetch
from trio_hibernate._host import runtime_of

pytestmark = pytest.mark.integration

KEY: Final = "the-cluster-key-for-tests"
CONTEXT: Final = {"user": "alice", "roles": ["admin"]}
#: Host A's close_timeout in the shutdown test: how long it would wait for a connection.
GRACE: Final = 100.0


@attrs.frozen
class Closed:
    """B's object saw a socket close."""

    code: int
    reason: str


class Room(DurableObject):
    """Answers plain requests with what it got, accepts upgrades (tagged with the
    context's user), and takes commands over its sockets."""

    def __init__(self, ctx: ObjectContext, env: Probe) -> None:
        super().__init__(ctx, env)
        env.constructing(self)

    async def fetch(self, request: Request) -> Response:
        if request.path.endswith("/locked"):
            return Response(status=403, body="locked\n")
        if request.websocket is None:
            seen = {
                "method": request.method,
                "url": request.url,
                "body": request.body.decode(),
                "context": request.context,
                "headers": [name for name, _ in request.headers],
            }
            return Response(status=201, headers={"x-room": "b"}, body=json.dumps(seen))
        ws = request.websocket
        user = request.context["user"] if isinstance(request.context, dict) else "direct"
        self.ctx.accept_websocket(ws, [user])
        ws.serialize_attachment({"url": ws.url, "context": request.context})
        if request.query_params.get("greet"):
            ws.send("welcome")  # before the 101: B sends it right after its head
        return Response(status=101, websocket=ws)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        assert isinstance(message, str)
        command, _, argument = message.partition(" ")
        if command == "tags":
            ws.send(json.dumps(self.ctx.get_tags(ws)))
        elif command == "attachment":
            ws.send(json.dumps(ws.deserialize_attachment()))
        elif command == "broadcast":
            self.ctx.broadcast(argument, exclude=ws)
        elif command == "close":
            ws.close(int(argument), "bye")
        elif command == "autorespond":
            self.ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
            ws.send("set")
        else:
            ws.send(f"echo: {message}")

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self.env.record(Closed(code, reason))

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def fail(self) -> None:
        raise ValueError("boom")


def relaying_app(target: RelayTarget, probe: Probe) -> App:
    """Host A's app: every ``/room/<name>`` request relayed to ``target``."""

    async def fetch(request: Request, ctx: AppContext) -> Response:
        name = request.path.removeprefix("/room/")
        object_id = ObjectId.from_name("room", name)
        return await relay_fetch(target, "room", object_id, request.with_context(CONTEXT))

    return App({"room": Room}, env=probe, route_by_path=False, fetch=fetch)


@attrs.frozen
class Pair:
    """Host A (relaying), host B (owning), and what their objects reported."""

    a: Server
    b: Server
    probe_a: Probe
    probe_b: Probe
    target: RelayTarget


@asynccontextmanager
async def two_hosts(
    *, key: str = KEY, b_key: str | None = KEY, **b_options: Any
) -> AsyncIterator[Pair]:
    """Servers B (owning, with ``b_key``) then A (relaying to B with ``key``)."""
    probe_a, probe_b = Probe(), Probe()
    async with serve(App({"room": Room}, env=probe_b), **b_options) as b:
        runtime_of(b.host).relay_key = b_key
        target = RelayTarget(f"127.0.0.1:{b.port}", key, timeout=WAIT_SECONDS)
        async with serve(relaying_app(target, probe_a)) as a:
            yield Pair(a, b, probe_a, probe_b, target)


async def test_a_plain_request_is_relayed_with_its_context(autojump_clock: MockClock) -> None:
    async with two_hosts() as hosts:
        reply = await http_exchange(
            hosts.a.port,
            b"POST /room/lobby?x=1 HTTP/1.1\r\nhost: a\r\nx-custom: yes\r\n"
            b"x-trio-hibernate-relay-key: forged\r\ncontent-length: 5\r\n\r\nhello",
        )
        assert reply.status == 201
        assert reply.headers["x-room"] == "b"
        seen = json.loads(reply.body)
        assert seen["method"] == "POST"
        assert seen["url"] == "/room/lobby?x=1"
        assert seen["body"] == "hello"
        assert seen["context"] == CONTEXT
        assert "x-custom" in seen["headers"]
        assert not [name for name in seen["headers"] if name.startswith("x-trio-hibernate")]
        assert hosts.probe_a.constructed == 0
        assert hosts.probe_b.constructed == 1


async def test_a_refusal_comes_back(autojump_clock: MockClock) -> None:
    async with two_hosts() as hosts:
        refusal = await refused_upgrade(hosts.a.port, "/room/locked")
        assert (refusal.status, refusal.body) == (403, b"locked\n")
        reply = await http_exchange(hosts.a.port, b"GET /room/locked HTTP/1.1\r\nhost: a\r\n\r\n")
        assert (reply.status, reply.body) == (403, b"locked\n")
        assert hosts.b.host.statistics().websockets == 0


async def test_a_relayed_websocket_lives_on_the_owner(autojump_clock: MockClock) -> None:
    async with (
        two_hosts() as hosts,
        open_client(hosts.a, "/room/chat") as relayed,
        open_client(hosts.b, "/room/chat") as direct,
    ):
        assert await ask(relayed, "hi") == "echo: hi"
        assert json.loads(await ask(relayed, "tags")) == ["alice"]
        assert json.loads(await ask(direct, "tags")) == ["direct"]
        assert json.loads(await ask(relayed, "attachment")) == {
            "url": "/room/chat",
            "context": CONTEXT,
        }
        await send(direct, "broadcast from B")
        assert await recv_text(relayed) == "from B"
        await send(relayed, "broadcast from A")
        assert await recv_text(direct) == "from A"
        assert hosts.b.host.statistics().websockets == 2
        assert hosts.a.host.statistics().websockets == 0
        assert hosts.probe_a.constructed == 0

        # B hibernates the object: the relayed socket stays, auto-response included.
        assert await ask(relayed, "autorespond") == "set"
        assert await hosts.b.host.hibernate("room", "chat") is True
        constructed = hosts.probe_b.constructed
        assert await ask(relayed, "ping") == "pong"
        await settle()
        assert hosts.probe_b.constructed == constructed
        assert hosts.b.host.object_statistics("room", "chat").state is ObjectState.HIBERNATED
        assert await ask(relayed, "wake up") == "echo: wake up"
        assert hosts.probe_b.constructed == constructed + 1


async def test_close_codes_pass_both_ways(autojump_clock: MockClock) -> None:
    async with two_hosts() as hosts:
        async with open_client(hosts.a, "/room/c") as ws:
            await send(ws, "close 4002")
            assert await closed_by_server(ws) == (4002, "bye")
        async with open_client(hosts.a, "/room/c") as ws:
            assert await ask(ws, "hi") == "echo: hi"
            with trio.fail_after(WAIT_SECONDS):
                await ws.aclose(4001, "client leaves")
        await hosts.probe_b.wait_for(lambda: Closed(4001, "client leaves") in hosts.probe_b.events)


async def test_bytes_sent_right_after_the_upgrade_request_are_not_lost(
    autojump_clock: MockClock,
) -> None:
    async with two_hosts() as hosts:
        with trio.fail_after(WAIT_SECONDS):
            stream = await trio.open_tcp_stream("127.0.0.1", hosts.a.port)
        async with stream:
            raw = RawWebSocket(stream)
            request = raw.conn.send(WSRequest(host="a", target="/room/early?greet=1"))
            # A masked text frame "early" (mask 0), in the same write as the request.
            frame = bytes((0x81, 0x80 | 5, 0, 0, 0, 0)) + b"early"
            await raw.send_raw(request + frame)
            assert isinstance(await raw.next_event(), AcceptConnection)
            first = await raw.next_event()
            assert isinstance(first, TextMessage)
            assert first.data == "welcome"  # B's first frame, sent just after its 101
            echo = await raw.next_event()
            assert isinstance(echo, TextMessage)
            assert echo.data == "echo: early"


async def test_host_a_shutting_down_closes_the_spliced_socket(autojump_clock: MockClock) -> None:
    probe_a, probe_b = Probe(), Probe()
    async with serve(App({"room": Room}, env=probe_b)) as b:
        runtime_of(b.host).relay_key = KEY
        target = RelayTarget(f"127.0.0.1:{b.port}", KEY, timeout=WAIT_SECONDS)
        stream: trio.SocketStream | None = None
        try:
            async with serve(relaying_app(target, probe_a), close_timeout=GRACE) as a:
                with trio.fail_after(WAIT_SECONDS):
                    stream = await trio.open_tcp_stream("127.0.0.1", a.port)
                raw = RawWebSocket(stream)
                await raw.send(WSRequest(host="a", target="/room/s"))
                assert isinstance(await raw.next_event(), AcceptConnection)
                await raw.send(TextMessage("hi"))
                echo = await raw.next_event()
                assert isinstance(echo, TextMessage)
                assert echo.data == "echo: hi"
                assert a.host.statistics().connections == 1
                exiting = trio.current_time()
            # A's shutdown did not wait for its close_timeout: the splice ended at once.
            assert trio.current_time() - exiting < GRACE / 2
            assert await raw.next_event() is None
            await probe_b.wait_for(lambda: bool(probe_b.of(Closed)))
            assert probe_b.of(Closed)[0].code == 1006  # B sees its hop dropped
        finally:
            if stream is not None:
                await stream.aclose()


async def test_a_relay_without_the_key_is_refused_and_wakes_nothing(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with two_hosts(key="a-wrong-key") as hosts:
        reply = await http_exchange(hosts.a.port, b"GET /room/x HTTP/1.1\r\nhost: a\r\n\r\n")
        assert reply.status == 403
        refusal = await refused_upgrade(hosts.a.port, "/room/x")
        assert refusal.status == 403
        # Straight to B, with no key at all.
        reply = await http_exchange(
            hosts.b.port,
            b"GET /_cluster/relay HTTP/1.1\r\nhost: b\r\nx-trio-hibernate-relay-namespace: room\r\n"
            b"x-trio-hibernate-relay-id: " + ObjectId.from_name("room", "x").hex.encode() + b"\r\n"
            b"x-trio-hibernate-relay-url: /room/x\r\n\r\n",
        )
        assert reply.status == 403
        with pytest.raises(RemoteCallError) as info:
            await relay_call(
                hosts.target, "room", ObjectId.from_name("room", "x"), "add", (1, 2), {}
            )
        assert info.value.remote_type == "HTTP 403"
        assert hosts.probe_b.constructed == 0
        assert hosts.b.host.statistics().refusals["relay_key"] == 4
    assert "cluster key" in caplog.text


async def test_a_host_without_a_key_does_not_serve_relays(autojump_clock: MockClock) -> None:
    async with two_hosts(b_key=None) as hosts:
        reply = await http_exchange(hosts.a.port, b"GET /room/x HTTP/1.1\r\nhost: a\r\n\r\n")
        assert reply.status == 404
        assert hosts.probe_b.constructed == 0


async def test_relay_call(autojump_clock: MockClock) -> None:
    async with two_hosts() as hosts:
        object_id = ObjectId.from_name("room", "calc")
        assert await relay_call(hosts.target, "room", object_id, "add", (1, 2), {}) == 3
        assert await relay_call(hosts.target, "room", object_id, "add", (1,), {"b": 5}) == 6
        with pytest.raises(RemoteCallError) as info:
            await relay_call(hosts.target, "room", object_id, "fail", (), {})
        assert (info.value.remote_type, info.value.message) == ("ValueError", "boom")
        with pytest.raises(AttributeError, match="nothing"):
            await relay_call(hosts.target, "room", object_id, "nothing", (), {})
        with pytest.raises(AttributeError, match="fetch"):
            await relay_call(hosts.target, "room", object_id, "fetch", (), {})
        with pytest.raises(RemoteCallError) as info:
            await relay_call(hosts.target, "nowhere", object_id, "add", (1, 2), {})
        assert info.value.remote_type == "HTTP 404"
        assert hosts.probe_b.constructed == 1
        assert hosts.probe_a.constructed == 0
        assert hosts.b.host.statistics().relayed == 6
        assert hosts.a.host.statistics().relayed == 0


async def test_a_context_that_is_not_data_answers_500(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()
    async with serve(App({"room": Room}, env=probe)) as b:
        runtime_of(b.host).relay_key = KEY
        target = RelayTarget(f"127.0.0.1:{b.port}", KEY)

        async def fetch(request: Request) -> Response:
            return await relay_fetch(
                target, "room", ObjectId.from_name("room", "x"), request.with_context(object())
            )

        app = App({"room": Room}, env=Probe(), route_by_path=False, fetch=fetch)
        async with serve(app) as a:
            with caplog.at_level(logging.ERROR, logger="trio_hibernate.cluster"):
                reply = await http_exchange(a.port, b"GET /room/x HTTP/1.1\r\nhost: a\r\n\r\n")
        assert reply.status == 500
        assert "contexts must be data in cluster mode" in caplog.text
        assert probe.constructed == 0


async def test_an_owner_that_cannot_be_reached_answers_502_or_what_the_caller_says() -> None:
    with trio.socket.socket() as sock:  # a port with no listener: the connection is refused
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = RelayTarget(f"127.0.0.1:{port}", KEY, timeout=WAIT_SECONDS)
    object_id = ObjectId.from_name("room", "x")
    request = Request(method="GET", url="/room/x", headers={"host": "a"})
    with trio.fail_after(WAIT_SECONDS):
        assert (await relay_fetch(target, "room", object_id, request)).status == 502
        busy = Response(status=503, headers={"retry-after": "1"})
        assert (
            await relay_fetch(target, "room", object_id, request, unreachable=lambda: busy) is busy
        )
        with pytest.raises(OSError, match="connect"):
            await relay_call(target, "room", object_id, "add", (1, 2), {})


def test_a_relayed_call_raises_the_runtime_errors_as_their_own_classes() -> None:
    from trio_hibernate import ObjectUnavailableError, RemoteCallError, StorageCommitError
    from trio_hibernate._cluster.relay import remote_error

    assert type(remote_error("AttributeError", "no")) is AttributeError
    assert type(remote_error("ClusterCommitError", "lost")) is StorageCommitError
    unavailable = remote_error("ObjectUnavailableError", "owner gone")
    assert isinstance(unavailable, ObjectUnavailableError)
    assert unavailable.retry_after == 1
    other = remote_error("KeyError", "'k'")
    assert isinstance(other, RemoteCallError)
    assert (other.remote_type, str(other)) == ("KeyError", "KeyError: 'k'")


async def test_a_spliced_hop_has_tcp_keepalives() -> None:
    import socket

    from trio_hibernate._cluster.relay import _keep_alive

    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    with listener, trio.fail_after(5):
        stream = await trio.open_tcp_stream(*listener.getsockname()[:2])
        async with stream:
            _keep_alive(stream, patience=10.0)
            assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
