"""The reconnecting client (``trio_hibernate.client``) against a real server on 127.0.0.1.

Everything runs on the autojump clock (with the I/O grace of ``helpers``), so backoff
waits pass in virtual time and can be checked to the digit. Servers are started and
stopped under a running client: the first on port 0, the next on the port it got.
"""

from __future__ import annotations

import itertools
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
from helpers import (
    IO_GRACE_SECONDS,
    NEVER,
    WAIT_SECONDS,
    Probe,
    accept_upgrade,
    open_client as open_plain_client,
    send,
    serve,
)
from trio.testing import MockClock
from trio_websocket import WebSocketConnection, open_websocket_url

from trio_hibernate import (
    App,
    DurableObject,
    LimitExceededError,
    Request,
    Response,
    Server,
    WebSocket,
    serve_objects,
)
from trio_hibernate.client import (
    Backoff,
    ClientClosedError,
    ClientEvent,
    ClientState,
    ReconnectingWebSocket,
    deliver_once,
    open_client,
)
from trio_hibernate.client._wire import encode_ack, encode_op


@pytest.fixture(autouse=True)
def _io_grace(autojump_clock: MockClock) -> None:
    autojump_clock.autojump_threshold = IO_GRACE_SECONDS


@attrs.frozen
class Joined:
    id: str


class Door(DurableObject):
    """Accepts upgrades (403 for ``/door/locked``), reports each socket's id, echoes, and
    closes with the code a ``close <code>`` message names. Ops go through deliver_once
    (keeping 2 ids); the first ``abort`` resets the object after handling it, which rolls
    back its write and drops its ack."""

    async def fetch(self, request: Request) -> Response:
        if self.ctx.id.name == "locked":
            return Response(status=403, body="no\n")
        response = accept_upgrade(self.ctx, request)
        assert request.websocket is not None
        self.env.record(Joined(request.websocket.id))
        return response

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        handled = await deliver_once(self.ctx.storage, ws, message, keep=2)
        if handled is None:
            return
        if isinstance(handled, str) and handled.startswith("close "):
            ws.close(int(handled.split()[1]), "asked to")
            return
        count = await self.ctx.storage.get("handled")
        await self.ctx.storage.put("handled", (count if isinstance(count, int) else 0) + 1)
        self.env.record(handled)
        if handled == "abort" and self.env.events.count("abort") == 1:  # the first time
            self.ctx.abort("the test asks for a reset")
        ws.send(handled)


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def app(probe: Probe) -> App:
    return App({"door": Door}, env=probe)


@asynccontextmanager
async def running(app: App, **options: object) -> AsyncIterator[Server]:
    """A server on 127.0.0.1:0 for a test body of bounded (virtual) length."""
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            yield await start_server(nursery, app, 0, **options)
            nursery.cancel_scope.cancel()


async def start_server(nursery: trio.Nursery, app: App, port: int, **options: object) -> Server:
    """Start a server in ``nursery``; ``stop(server)`` ends it (its shutdown included).
    The server's cancel scope is kept on the Server object (nothing global holds it)."""

    async def run(*, task_status: trio.TaskStatus[Server]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                server: Server = await inner.start(
                    partial(serve_objects, app, "127.0.0.1", port, idle_timeout=NEVER, **options)  # type: ignore[arg-type]
                )
                server.test_scope = scope  # type: ignore[attr-defined]
                task_status.started(server)

    server: Server = await nursery.start(run)
    return server


def stop(server: Server) -> None:
    scope: trio.CancelScope = server.test_scope  # type: ignore[attr-defined]
    scope.cancel()


def unused_port() -> int:
    """A port nothing listens on (bound to 0, then released): connects are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[float, ClientEvent]] = []
        self._changed = trio.Event()

    def __call__(self, event: ClientEvent) -> None:
        self.seen.append((trio.current_time(), event))
        self._changed.set()
        self._changed = trio.Event()

    def states(self) -> list[ClientState]:
        return [event.state for _, event in self.seen]

    async def wait_for(self, state: ClientState) -> ClientEvent:
        with trio.fail_after(WAIT_SECONDS):
            while True:
                for _, event in self.seen:
                    if event.state is state:
                        self.seen.remove((_, event))
                        return event
                await self._changed.wait()


async def receive(client: ReconnectingWebSocket) -> str | bytes:
    with trio.fail_after(WAIT_SECONDS):
        return await client.receive()


# -- reconnect, or not ----------------------------------------------------------------------


async def test_a_restart_with_1012_reconnects_with_the_same_client_id(
    app: App, probe: Probe, autojump_clock: MockClock
) -> None:
    events = Events()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            first = await start_server(nursery, app, 0, shutdown_close_code=1012)
            async with open_client(first.url("/door/a"), on_event=events) as client:
                await client.send("one")
                assert await receive(client) == "one"
                stop(first)
                gone = await events.wait_for(ClientState.RECONNECTING)
                assert gone.close_code == 1012
                await client.send("two")  # buffered while the server is away
                await trio.sleep(5)  # virtual: some connects are refused meanwhile
                assert client.state is ClientState.RECONNECTING
                refused = await events.wait_for(ClientState.RECONNECTING)
                assert refused.error is not None
                assert "connect failed" in refused.error
                second = await start_server(nursery, app, first.port)
                assert await receive(client) == "two"
                assert client.client_id == probe.of(Joined)[0].id
                stop(second)
    assert [joined.id for joined in probe.of(Joined)] == [client.client_id] * 2


@pytest.mark.parametrize("code", [1001, 1012, 1013])
async def test_closes_that_mean_come_back_reconnect(
    app: App, probe: Probe, code: int, autojump_clock: MockClock
) -> None:
    events = Events()
    async with (
        running(app) as server,
        open_client(server.url("/door/a"), on_event=events) as client,
    ):
        await client.send(f"close {code}")
        gone = await events.wait_for(ClientState.RECONNECTING)
        assert (gone.close_code, gone.attempt) == (code, 1)
        await client.send("back")
        assert await receive(client) == "back"
    assert len(probe.of(Joined)) == 2


@pytest.mark.parametrize("code", [1000, 1008, 4001])
async def test_closes_that_mean_stop_close_for_good(
    app: App, probe: Probe, code: int, autojump_clock: MockClock
) -> None:
    events = Events()
    async with (
        running(app) as server,
        open_client(server.url("/door/a"), on_event=events) as client,
    ):
        await client.send(f"close {code}")
        with pytest.raises(ClientClosedError) as closed:
            await receive(client)
        assert closed.value.code == code
        assert f"closed with code {code}" in str(closed.value)
        assert client.state is ClientState.CLOSED
        with pytest.raises(ClientClosedError):
            await client.send("more")
    assert events.states() == [ClientState.CONNECTED, ClientState.CLOSED]
    assert len(probe.of(Joined)) == 1


async def test_a_403_is_final(app: App, autojump_clock: MockClock) -> None:
    async with running(app) as server, open_client(server.url("/door/locked")) as client:
        with pytest.raises(ClientClosedError) as closed, trio.fail_after(WAIT_SECONDS):
            await client.wait_connected()
        assert closed.value.status == 403


async def test_a_503_at_the_connection_limit_is_retried(
    app: App, autojump_clock: MockClock
) -> None:
    async with running(app, max_connections=1) as server:
        async with open_plain_client(server, "/door/first") as first:
            await send(first, "hold the only slot")
            events = Events()
            async with open_client(server.url("/door/a"), on_event=events) as client:
                refused = await events.wait_for(ClientState.RECONNECTING)
                assert refused.status == 503
                await first.aclose()
                await client.send("in")
                assert await receive(client) == "in"


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_grows_to_its_cap_and_jitters_below_the_base() -> None:
    backoff = Backoff(initial_seconds=1, max_seconds=10, multiplier=3, jitter=0.5)
    assert [backoff.base_seconds(n) for n in range(1, 6)] == [1, 3, 9, 10, 10]
    rng = random.Random(7)
    for n in range(1, 50):
        delay = backoff.delay_seconds(n, rng)
        assert backoff.base_seconds(n) * 0.5 <= delay <= backoff.base_seconds(n)
    assert Backoff(jitter=0).delay_seconds(2, rng) == 1.0
    assert not Backoff(max_retries=2).gives_up(2)
    assert Backoff(max_retries=2).gives_up(3)
    assert not Backoff().gives_up(10**9)


@pytest.mark.parametrize(
    "options",
    [
        {"initial_seconds": 0},
        {"jitter": 1.5},
        {"multiplier": 0.5},
        {"max_retries": -1},
        {"initial_seconds": 5, "max_seconds": 1},
    ],
)
def test_backoff_refuses_nonsense(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(**options)  # type: ignore[arg-type]


async def test_the_backoff_schedule_and_giving_up(app: App, autojump_clock: MockClock) -> None:
    backoff = Backoff(initial_seconds=1, max_seconds=4, max_retries=4)
    events = Events()
    start = trio.current_time()
    url = f"ws://127.0.0.1:{unused_port()}/door/a"
    async with open_client(url, backoff=backoff, rng=random.Random(42), on_event=events) as client:
        with pytest.raises(ClientClosedError) as closed, trio.fail_after(WAIT_SECONDS):
            await client.wait_connected()
    assert "gave up after 4 failed reconnect attempts" in str(closed.value)
    expected = random.Random(42)
    delays = [backoff.delay_seconds(n, expected) for n in range(1, 5)]
    waits = [event for _, event in events.seen if event.state is ClientState.RECONNECTING]
    assert [event.delay_seconds for event in waits] == delays
    assert [event.attempt for event in waits] == [1, 2, 3, 4]
    # Each attempt came right after its wait (a refused connect takes at most a few
    # milliseconds of virtual time: the clock moves in steps while I/O is in flight).
    times = [when - start for when, _ in events.seen]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps == pytest.approx(delays, abs=0.05)
    assert events.states()[-1] is ClientState.CLOSED


# -- buffering --------------------------------------------------------------------------------


async def test_messages_sent_while_disconnected_wait_up_to_the_bound(
    app: App, autojump_clock: MockClock
) -> None:
    port = unused_port()
    url = f"ws://127.0.0.1:{port}/door/a"
    async with trio.open_nursery() as nursery, open_client(url, max_buffered_messages=3) as client:
        for n in range(3):
            await client.send(f"m{n}")
        with pytest.raises(LimitExceededError) as full:
            await client.send("m3")
        assert (full.value.limit, full.value.value) == (3, 4)
        assert "max_buffered_messages is 3" in str(full.value)
        assert client.buffered == 3
        await trio.sleep(10)
        server = await start_server(nursery, app, port)
        assert [await receive(client) for _ in range(3)] == ["m0", "m1", "m2"]
        with trio.fail_after(WAIT_SECONDS):
            await client.flush()
        stop(server)


async def test_nothing_runs_after_the_block_and_receive_says_why(
    app: App, autojump_clock: MockClock
) -> None:
    async with running(app) as server:
        async with open_client(server.url("/door/a")) as client:
            await client.send("hi")
            assert await receive(client) == "hi"
        with pytest.raises(ClientClosedError, match="async with block ended"):
            await client.receive()
        assert client.state is ClientState.CLOSED


async def test_client_ids_are_checked_before_connecting(autojump_clock: MockClock) -> None:
    with pytest.raises(ValueError, match="_pk"):
        async with open_client("ws://127.0.0.1:1/door/a?_pk=a", client_id="b"):
            pass
    with pytest.raises(ValueError, match="connection id"):
        async with open_client("ws://127.0.0.1:1/door/a", client_id="not ok"):
            pass


# -- at-least-once delivery -------------------------------------------------------------------


async def test_reliable_ops_are_acknowledged_and_handled_once(
    app: App, probe: Probe, autojump_clock: MockClock
) -> None:
    async with running(app) as server:
        async with open_client(server.url("/door/a"), reliable=True) as client:
            for n in range(3):
                await client.send(f"op{n}")
            with trio.fail_after(WAIT_SECONDS):
                await client.flush()
            assert client.buffered == 0
            assert [await receive(client) for _ in range(3)] == ["op0", "op1", "op2"]
            with pytest.raises(TypeError, match="text ops"):
                await client.send(b"bytes")
        # A resend of an op already handled (its ack was lost) is acknowledged again only.
        async with open_plain_client(server, "/door/b") as raw:
            await send(raw, encode_op("same-id", "once"))
            await send(raw, encode_op("same-id", "once"))
            with trio.fail_after(WAIT_SECONDS):
                got = [await raw.get_message() for _ in range(3)]
        assert got == [encode_ack("same-id"), "once", encode_ack("same-id")]
    assert probe.events.count("once") == 1


async def test_an_unacknowledged_op_is_resent_after_a_reconnect(
    app: App, probe: Probe, autojump_clock: MockClock
) -> None:
    events = Events()
    async with (
        running(app) as server,
        open_client(server.url("/door/a"), reliable=True, on_event=events) as client,
    ):
        await client.send("abort")  # handled, then the reset drops the write and the ack
        gone = await events.wait_for(ClientState.RECONNECTING)
        assert gone.close_code == 1011
        await client.send("after")
        with trio.fail_after(WAIT_SECONDS):
            await client.flush()
    # The resend was handled again (the first handling was rolled back with its ack).
    assert probe.events.count("abort") == 2
    assert probe.events.count("after") == 1


async def test_the_server_remembers_a_bounded_number_of_ids(
    app: App, probe: Probe, autojump_clock: MockClock
) -> None:
    async with running(app) as server:
        async with open_plain_client(server, "/door/a") as raw:
            for n in range(5):
                await send(raw, encode_op(f"id{n}", f"m{n}"))
            await send(raw, encode_op("id0", "m0"))  # forgotten (keep=2): handled again
            await send(raw, encode_op("id4", "m4"))  # remembered: acknowledged only
            with trio.fail_after(WAIT_SECONDS):
                while probe.events.count("m0") < 2:
                    await raw.get_message()
    assert probe.events.count("m4") == 1


def test_the_client_surface_is_pinned() -> None:
    import trio_hibernate.client as client

    assert set(client.__all__) == {
        "RETRY_CLOSE_CODES",
        "RETRY_STATUSES",
        "Backoff",
        "ClientClosedError",
        "ClientEvent",
        "ClientState",
        "ReconnectingWebSocket",
        "deliver_once",
        "open_client",
    }
    for name in client.__all__:
        obj = getattr(client, name)
        if not name.startswith("RETRY_"):
            assert obj.__module__ == "trio_hibernate.client", name
            assert obj.__doc__, name


# -- a real server process, restarted under a connected client ----------------------------

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def chat_server(port: int, data_dir: Path) -> AsyncIterator[trio.Process]:
    """``python -m trio_hibernate serve examples/chat.py:app`` on ``port``, listening."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "trio_hibernate",
            "serve",
            "examples/chat.py:app",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    try:
        output = b""
        while b"listening on" not in output:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"the server exited early: {output!r}"
            output += chunk
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()
        await process.stdout.aclose()


async def test_a_restarted_server_process_gets_every_line_exactly_once(tmp_path: Path) -> None:
    port = unused_port()
    url = f"ws://127.0.0.1:{port}/chat/lobby?nick=ada"
    quick = Backoff(initial_seconds=0.05, max_seconds=0.2)
    events = Events()
    with trio.fail_after(60):  # real time: two server processes start
        async with (
            chat_server(port, tmp_path) as first,
            open_client(url, reliable=True, backoff=quick, on_event=events) as client,
        ):
            assert await receive(client) == "* ada joined"
            await client.send("one")
            assert await receive(client) == "ada: one"
            await client.send("two")  # in flight, or not yet sent, when the restart comes
            first.send_signal(signal.SIGUSR1)
            gone = await events.wait_for(ClientState.RECONNECTING)
            assert gone.close_code == 1012
            assert await first.wait() == 0
            await client.send("three")  # the server is down: buffered
            await client.send("four")
            async with chat_server(port, tmp_path):
                await client.flush()  # every op acknowledged, so stored
                async with open_plain_client_at(port, "/chat/lobby?nick=bob") as bob:
                    history = []
                    while (line := await bob.get_message()) != "* bob joined":
                        history.append(line)
    assert history == ["ada: one", "ada: two", "ada: three", "ada: four"]


@asynccontextmanager
async def open_plain_client_at(port: int, target: str) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(f"ws://127.0.0.1:{port}{target}") as ws:
        yield ws


# -- trio-hibernate connect -------------------------------------------------------------------


async def run_connect(
    *args: str, stdin: bytes, until: bytes | None = None
) -> tuple[int, bytes, bytes]:
    """Run ``trio-hibernate connect ARGS`` with ``stdin`` (kept open until ``until``
    shows on stdout, if given); its status, stdout and stderr."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_hibernate", "connect", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = b"", b""

    async def read_err() -> None:
        nonlocal err
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some(4096):
            err += chunk

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_err)
            await process.stdin.send_all(stdin)
            if until is None:
                await process.stdin.aclose()
            while chunk := await process.stdout.receive_some(4096):
                out += chunk
                if until is not None and until in out:
                    await process.stdin.aclose()
                    until = None
        return await process.wait(), out, err
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            await process.stdout.aclose()
            await process.stderr.aclose()


async def test_connect_sends_lines_and_prints_messages(app: App, probe: Probe) -> None:
    with trio.fail_after(60):  # real time: a client process starts
        async with running(app) as server:
            status, out, err = await run_connect(
                server.url("/door/a"),
                "--reliable",
                "--client-id",
                "me",
                stdin=b"one\ntwo\n",
                until=b"two\n",
            )
    assert status == 0, err
    assert out == b"one\ntwo\n"
    assert b"* client id me" in err
    assert b"* connected" in err
    assert [joined.id for joined in probe.of(Joined)] == ["me"]


async def test_connect_reconnects_then_gives_up_as_told(app: App) -> None:
    with trio.fail_after(60):
        async with running(app) as server:
            status, _out, err = await run_connect(
                server.url("/door/a"),
                "--reliable",
                stdin=b"close 1012\nclose 4001\n",
                until=b"stdin stays open: the client must end by itself",
            )
    assert status == 1, err
    assert b"* reconnecting in" in err
    assert b"(closed with 1012)" in err
    assert b"closed for good: the server said not to retry" in err
    assert b"4001" in err


async def test_connect_to_a_refusing_server_exits_1(app: App) -> None:
    with trio.fail_after(60):
        async with running(app) as server:
            status, _, err = await run_connect(server.url("/door/locked"), stdin=b"")
    assert status == 1
    assert b"HTTP 403" in err


def _recorded(probe: Probe, event: object) -> bool:
    return event in probe.events


class _Sink(DurableObject):
    async def fetch(self, request: Request) -> Response:
        return accept_upgrade(self.ctx, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        self.env.record(message)


async def test_flush_waits_for_the_write_of_the_last_plain_message(
    autojump_clock: MockClock,
) -> None:
    """flush() then the block's end keeps the last message (found by review: flush()
    returned once the writer had taken the message, before it was written, and the
    block's end cancelled the write). Depends on scheduling: 40 rounds."""
    autojump_clock.autojump_threshold = IO_GRACE_SECONDS
    probe = Probe()
    async with serve(App({"sink": _Sink}, env=probe)) as server:
        for n in range(40):
            async with open_client(server.url(f"/sink/a{n}")) as client:
                with trio.fail_after(WAIT_SECONDS):
                    await client.wait_connected()
                await client.send(f"last{n}")
                with trio.fail_after(WAIT_SECONDS):
                    await client.flush()
            await probe.wait_for(partial(_recorded, probe, f"last{n}"), seconds=5)


class _AcceptThenBusy(DurableObject):
    """Accepts, then at once closes with 1013 (try again later)."""

    async def fetch(self, request: Request) -> Response:
        assert request.websocket is not None
        response = accept_upgrade(self.ctx, request)
        request.websocket.close(1013, "try again later")
        return response


async def test_a_server_that_accepts_then_closes_at_once_is_backed_off(
    autojump_clock: MockClock,
) -> None:
    """A connection shorter than min_uptime_seconds does not reset the retry count: the
    waits grow and max_retries ends it (found by review: every accepted upgrade reset
    the count, so such a server was retried forever at the first delay)."""
    autojump_clock.autojump_threshold = IO_GRACE_SECONDS
    delays: list[float] = []

    def on_event(event: ClientEvent) -> None:
        if event.state is ClientState.RECONNECTING:
            delays.append(event.delay_seconds)

    backoff = Backoff(initial_seconds=1, max_seconds=8, jitter=0, max_retries=3)
    async with serve(App({"busy": _AcceptThenBusy})) as server:
        async with open_client(server.url("/busy/a"), backoff=backoff, on_event=on_event) as c:
            with trio.fail_after(WAIT_SECONDS), pytest.raises(ClientClosedError, match="gave up"):
                await _receive_until_closed(c)
    assert delays == [1, 2, 4]


async def _receive_until_closed(client: ReconnectingWebSocket) -> None:
    while True:
        await client.receive()
