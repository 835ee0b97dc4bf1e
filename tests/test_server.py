"""The server around the objects: guards, operations endpoints, stubs, live code updates."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel
from helpers import QuotingEcho, accept_upgrade
from trio_websocket import ConnectionRejected, open_websocket_url

from trio_hibernate import (
    App,
    DataCloneError,
    DurableObject,
    ObjectContext,
    Request,
    Response,
    WebSocket,
    open_host,
    open_server,
)


class Counter(QuotingEcho):
    """Counts constructor runs in env["built"]; accepts sockets; offers stub methods."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        env["built"].append(ctx.id.name)
        self.calls = 0

    async def fetch(self, request: Request) -> Response:
        if request.websocket is None:
            return Response(body=f"hello from {self.ctx.id.name} via {request.method}")
        return await super().fetch(request)

    async def add(self, a: int, b: int) -> int:
        self.calls += 1
        return a + b

    async def remember(self, value: object) -> None:
        await self.ctx.storage.put("value", value)

    async def recall(self) -> object:
        return await self.ctx.storage.get("value")

    async def fail(self) -> None:
        raise ValueError("failing on purpose")

    async def ask_peer(self, name: str) -> int:
        peer = self.ctx.get_namespace("counter").get_by_name(name)
        result: int = await peer.add(20, 22)
        return result


def make_app(**options: Any) -> tuple[App, list[str | None]]:
    built: list[str | None] = []
    return App({"counter": Counter}, env={"built": built}, **options), built


async def http(port: int, request: bytes) -> bytes:
    """Send a raw HTTP request; read the response until the server closes, or just the
    head of a 101 (the connection then stays open as a WebSocket)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
            if data.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in data:
                break
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


# -- guards: each refuses before any object wakes ---------------------------------------


async def test_authorize_refuses_before_any_object_wakes() -> None:
    async def authorize(request: Request) -> Response | None:
        if request.header("authorization") != "Bearer good":
            return Response(status=401, body="who are you?")
        return None

    app, built = make_app(authorize=authorize)
    with trio.fail_after(10):
        async with open_server(app) as server:
            refused = await http(server.port, UPGRADE.format(path="/counter/a", extra="").encode())
            assert status_of(refused) == 401
            assert refused.endswith(b"who are you?")
            plain = await http(server.port, b"GET /counter/a HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(plain) == 401
            assert built == []
            allowed = await http(
                server.port,
                UPGRADE.format(path="/counter/a", extra="Authorization: Bearer good\r\n").encode(),
            )
            assert status_of(allowed) == 101
            assert built == ["a"]


async def test_authorize_that_raises_answers_500_and_wakes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def authorize(request: Request) -> Response | None:
        raise RuntimeError("auth backend down")

    app, built = make_app(authorize=authorize)
    with trio.fail_after(10):
        async with open_server(app) as server:
            response = await http(server.port, b"GET /counter/a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 500
    assert b"auth backend down" not in response
    assert built == []
    assert "App.authorize raised" in caplog.text


async def test_origin_allow_list() -> None:
    app, built = make_app()
    with trio.fail_after(10):
        async with open_server(app, allowed_origins=["https://good.example"]) as server:
            bad = UPGRADE.format(path="/counter/a", extra="Origin: https://evil.example\r\n")
            response = await http(server.port, bad.encode())
            assert status_of(response) == 403
            assert b"evil.example" in response
            assert built == []
            good = UPGRADE.format(path="/counter/a", extra="Origin: https://good.example\r\n")
            assert status_of(await http(server.port, good.encode())) == 101
            assert built == ["a"]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/counter/" + "x" * 257, 400),  # name too long
        ("/counter/bad%0Aname", 400),  # control character
        ("/counter/", 400),  # no name
        ("/nope/a", 404),  # unknown namespace, no App.fetch
    ],
)
async def test_bad_paths_are_refused_without_waking(path: str, status: int) -> None:
    app, built = make_app()
    with trio.fail_after(10):
        async with open_server(app) as server:
            response = await http(server.port, UPGRADE.format(path=path, extra="").encode())
    assert status_of(response) == status
    assert built == []


async def test_bad_websocket_version_gets_426() -> None:
    app, built = make_app()
    request = UPGRADE.format(path="/counter/a", extra="").replace("Version: 13", "Version: 8")
    with trio.fail_after(10):
        async with open_server(app) as server:
            response = await http(server.port, request.encode())
    assert status_of(response) == 426
    assert b"sec-websocket-version: 13" in response.lower()
    assert built == []


async def test_handshake_timeout_closes_silent_clients(autojump_clock: trio.abc.Clock) -> None:
    app, built = make_app()
    with trio.fail_after(60):
        async with open_server(app, handshake_timeout=5) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                start = trio.current_time()
                assert await stream.receive_some(100) == b""  # closed by the server
                assert trio.current_time() - start == pytest.approx(5, abs=0.5)
    assert built == []


async def test_request_body_limit_gets_413() -> None:
    from trio_hibernate import Limits

    app, built = make_app()
    body = b"x" * 2000
    request = b"POST /counter/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + body
    with trio.fail_after(10):
        async with open_server(app, limits=Limits(max_request_body_bytes=1000)) as server:
            response = await http(server.port, request)
    assert status_of(response) == 413
    assert b"max_request_body_bytes" in response
    assert built == []


# -- operations ---------------------------------------------------------------------------


async def test_health_and_metrics() -> None:
    app, _ = make_app()
    with trio.fail_after(10):
        async with open_server(app) as server:
            health = await http(server.port, b"GET /_health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(health) == 200
            assert health.endswith(b"ok\n")
            async with open_websocket_url(server.url("/counter/m")) as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "echo 'hi'"
                metrics = await http(server.port, b"GET /_metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(metrics) == 200
    text = metrics.decode()
    assert "text/plain; version=0.0.4" in text
    assert 'trio_hibernate_objects{state="live"} 1.0' in text
    assert "\ntrio_hibernate_websockets 1.0\n" in text
    assert "\ntrio_hibernate_wakes_total 1.0\n" in text
    assert "# TYPE trio_hibernate_hibernations_total counter" in text


async def test_app_fetch_answers_paths_outside_namespaces() -> None:
    async def page(request: Request) -> Response:
        return Response(body=f"page {request.path}")

    app, built = make_app(fetch=page)
    with trio.fail_after(10):
        async with open_server(app) as server:
            response = await http(server.port, b"GET /about HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 200
    assert response.endswith(b"page /about")
    assert built == []


# -- stubs --------------------------------------------------------------------------------


async def test_stub_calls_methods_and_fetch(autojump_clock: trio.abc.Clock) -> None:
    app, built = make_app()
    with trio.fail_after(60):
        async with open_host(app, idle_timeout=1) as host:
            stub = host.get_namespace("counter").get_by_name("s")
            assert await stub.add(2, 3) == 5
            assert await stub.call("add", a=1, b=1) == 2
            response = await stub.fetch("/counter/s/x", method="POST")
            assert response.body == b"hello from s via POST"
            assert built == ["s"]
            await trio.sleep(2)  # virtual time: the object hibernates
            assert host.statistics().live_objects == 0
            assert await stub.add(1, 2) == 3  # wakes it
            assert built == ["s", "s"]


async def test_stub_errors_propagate_and_arguments_are_copied() -> None:
    app, _ = make_app()
    with trio.fail_after(10):
        async with open_host(app) as host:
            stub = host.get_namespace("counter").get_by_name("e")
            with pytest.raises(ValueError, match="failing on purpose"):
                await stub.fail()
            with pytest.raises(AttributeError, match="no public method"):
                await stub.call("nonexistent")
            for reserved in ("fetch", "websocket_message", "_private", "alarm"):
                with pytest.raises(AttributeError):
                    await stub.call(reserved)
            with pytest.raises(DataCloneError):
                await stub.remember(lambda: 1)
            value = {"list": [1, 2]}
            await stub.remember(value)
            value["list"].append(3)  # the object stored a copy
            assert await stub.recall() == {"list": [1, 2]}
            with pytest.raises(KeyError, match="unknown namespace"):
                host.get_namespace("nope")


async def test_objects_call_each_other() -> None:
    app, built = make_app()
    with trio.fail_after(10):
        async with open_host(app) as host:
            first = host.get_namespace("counter").get_by_name("first")
            assert await first.ask_peer("second") == 42
    assert sorted(n or "" for n in built) == ["first", "second"]


async def test_namespace_ids() -> None:
    app, _ = make_app()
    async with open_host(app) as host:
        ns = host.get_namespace("counter")
        assert ns.id_from_name("x") == ns.id_from_name("x")
        assert ns.id_from_name("x") != ns.id_from_name("y")
        unique = ns.new_unique_id()
        assert ns.id_from_string(str(unique)) == unique
        with pytest.raises(ValueError, match="64 lowercase hex"):
            ns.id_from_string("not-an-id")


# -- live code update, in process ---------------------------------------------------------


class CounterV2(Counter):
    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.send(f"v2 {message!r}")


async def test_replace_app_keeps_sockets_and_uses_new_code() -> None:
    app, built = make_app()
    with trio.fail_after(10):
        async with open_server(app) as server:
            async with open_websocket_url(server.url("/counter/r")) as ws:
                await ws.send_message("a")
                assert await ws.get_message() == "echo 'a'"
                await server.host.replace_app(App({"counter": CounterV2}, env={"built": built}))
                assert server.host.statistics().live_objects == 0
                await ws.send_message("b")
                assert await ws.get_message() == "v2 'b'"
                assert not ws.closed
    assert built == ["r", "r"]


async def test_replace_app_closes_sockets_of_a_removed_namespace_with_1012() -> None:
    app, _ = make_app()
    with trio.fail_after(10):
        async with open_server(app) as server:
            async with open_websocket_url(server.url("/counter/gone")) as ws:
                await ws.send_message("a")
                await ws.get_message()

                class Other(DurableObject):
                    pass

                await server.host.replace_app(App({"other": Other}))
                with pytest.raises(Exception):  # noqa: B017, PT011 - ConnectionClosed
                    await ws.get_message()
                assert ws.closed is not None
                assert ws.closed.code == 1012


async def test_rejected_upgrade_is_reported_to_the_client() -> None:
    class Picky(DurableObject):
        async def fetch(self, request: Request) -> Response:
            return Response(status=409, body="taken")

    with trio.fail_after(10):
        async with open_server(App({"p": Picky})) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(server.url("/p/x")):
                    pass
    assert info.value.status_code == 409
    assert info.value.body == b"taken"


async def test_server_closes_every_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every socket the server accepted is closed once its client is gone, whether the
    client closed cleanly, dropped, or never finished the handshake."""
    import socket as stdlib_socket

    from trio_hibernate import Host

    accepted: list[stdlib_socket.socket] = []
    original = Host.serve_socket

    def recording(self: Host, sock: stdlib_socket.socket) -> None:
        accepted.append(sock)
        original(self, sock)

    monkeypatch.setattr(Host, "serve_socket", recording)
    app, _ = make_app()
    with trio.fail_after(20):
        async with open_server(app) as server:
            clients = []
            for i in range(30):
                sock = stdlib_socket.create_connection(("127.0.0.1", server.port))
                if i % 3 == 0:
                    sock.sendall(b"GET /counter/x HTTP/1.1\r\nHost: x\r\n")  # unfinished
                else:
                    sock.sendall(UPGRADE.format(path=f"/counter/fd{i % 4}", extra="").encode())
                    head = await trio.to_thread.run_sync(sock.recv, 4096)
                    assert head.startswith(b"HTTP/1.1 101 "), head
                clients.append(sock)
            for n, sock in enumerate(clients):
                if n % 3 == 1:
                    sock.sendall(b"\x88\x80\x00\x00\x00\x00")  # a Close without a code
                sock.close()
            # The host exposes the count only as a statistic: poll it (bounded above).
            while server.host.statistics().connections:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert len(accepted) == 30
            assert all(sock.fileno() == -1 for sock in accepted)


async def test_replace_app_while_messages_stream_loses_none() -> None:
    """Regression: hibernating by cancelling the object's scope could cancel the
    supervisor between taking an event off the mailbox and running it; the message was
    lost and its sender waited forever. Swap the code at many points of a stream."""
    app, built = make_app()
    with trio.fail_after(30):
        for delay in range(12):
            async with open_server(app) as server:
                async with open_websocket_url(server.url("/counter/stream")) as ws:

                    async def swap(delay: int = delay, server: Any = server) -> None:
                        for _ in range(delay):
                            await trio.lowlevel.checkpoint()
                        await server.host.replace_app(
                            App({"counter": CounterV2}, env={"built": built})
                        )

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(swap)
                        reply: str | bytes = "echo"
                        while isinstance(reply, str) and reply.startswith("echo"):
                            await ws.send_message("m")
                            reply = await ws.get_message()
                    assert reply == "v2 'm'"


async def test_object_logs_carry_namespace_and_object_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(DurableObject):
        async def fetch(self, request: Request) -> Response:
            raise RuntimeError("broken on purpose")

    with trio.fail_after(10):
        async with open_host(App({"broken": Broken})) as host:
            stub = host.get_namespace("broken").get_by_name("b")
            response = await stub.fetch("/broken/b")
    assert response.status == 500
    (record,) = [r for r in caplog.records if r.name == "trio_hibernate.object"]
    assert record.__dict__["namespace"] == "broken"
    assert record.__dict__["object_id"] == stub.id.hex
    assert record.exc_info is not None
    assert "broken on purpose" in str(record.exc_info[1])


async def test_invalid_utf8_text_is_closed_with_1007_and_reported() -> None:
    errors: list[Exception] = []

    class Strict(DurableObject):
        async def fetch(self, request: Request) -> Response:
            return accept_upgrade(self.ctx, request)

        async def websocket_error(self, ws: WebSocket, error: Exception) -> None:
            errors.append(error)

    from trio_hibernate import WebSocketProtocolError

    with trio.fail_after(10):
        async with open_server(App({"s": Strict})) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(UPGRADE.format(path="/s/x", extra="").encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(4096)
                assert head.startswith(b"HTTP/1.1 101 ")
                # A masked text frame (zero mask) carrying bytes that are not UTF-8.
                await stream.send_all(b"\x81\x82\x00\x00\x00\x00\xff\xfe")
                reply = b""
                while chunk := await stream.receive_some(4096):
                    reply += chunk
            assert reply[:1] == b"\x88"  # a Close frame
            assert int.from_bytes(reply[2:4], "big") == 1007
            while not errors:  # noqa: ASYNC110 - the handler runs after the Close is sent
                await trio.sleep(0.01)
    (error,) = errors
    assert isinstance(error, WebSocketProtocolError)
    assert error.code == 1007


async def test_connections_past_the_limit_get_503_and_nobody_else_is_disturbed() -> None:
    app, _ = make_app()
    with trio.fail_after(10):
        async with open_server(app, max_connections=2) as server:
            async with (
                open_websocket_url(server.url("/counter/a")) as first,
                open_websocket_url(server.url("/counter/b")) as second,
            ):
                refused = await http(server.port, b"GET /counter/c HTTP/1.1\r\nHost: x\r\n\r\n")
                assert status_of(refused) == 503
                assert b"connection limit" in refused
                for ws in (first, second):
                    await ws.send_message("still here")
                    assert await ws.get_message() == "echo 'still here'"
            # Room again once they left.
            while server.host.statistics().connections:  # noqa: ASYNC110
                await trio.sleep(0.01)
            response = await http(server.port, b"GET /counter/c HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(response) == 200


async def test_a_failing_constructor_answers_stub_calls_instead_of_hanging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Fragile(DurableObject):
        def __init__(self, ctx: ObjectContext, env: Any) -> None:
            raise RuntimeError("cannot start")

        async def ping(self) -> str:
            return "pong"

    with trio.fail_after(10):
        async with open_host(App({"f": Fragile})) as host:
            stub = host.get_namespace("f").get_by_name("x")
            with pytest.raises(RuntimeError, match="constructor of Fragile raised"):
                await stub.ping()
            response = await stub.fetch("/f/x")
    assert response.status == 500
    assert "constructor of f" in caplog.text
