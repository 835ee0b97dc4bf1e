"""Shutdown: it ends as soon as every client has answered its Close, says what it waits
for, and ``wait_for_shutdown_signal`` gives an embedded server the CLI's signal handling.

Everything runs on the autojump clock (``helpers``): the shutdown timeouts here are long
(60 s), and the assertions say the shutdown took far less than that in virtual time.
The signal tests raise real signals in this process, with the receiver installed.
"""

from __future__ import annotations

import logging
import signal
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Final

import pytest
import trio
from helpers import (
    IO_GRACE_SECONDS,
    WAIT_SECONDS,
    QuotingEcho,
    RawWebSocket,
    ask,
    closed_by_server,
    open_client,
    open_raw_websocket,
    serve,
    settle,
)
from trio.testing import MockClock
from wsproto.events import CloseConnection, TextMessage

from trio_hibernate import (
    App,
    Limits,
    Server,
    WebSocket,
    wait_for_shutdown_signal,
)

#: The grace period of every host here: a shutdown that takes it did not end on time.
CLOSE_TIMEOUT: Final = 60.0
#: How long a shutdown may take when every client answers at once.
PROMPTLY: Final = 5.0
MAX_QUEUED: Final = 2


class Slow(QuotingEcho):
    """Echoes, except ``slow``: its handler takes an hour (the object falls behind)."""

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if message == "slow":
            await trio.sleep(3600)
        await super().websocket_message(ws, message)


APP = App({"slow": Slow})


@pytest.fixture(autouse=True)
def _io_grace(autojump_clock: MockClock) -> None:
    """Every test takes ``autojump_clock`` (pytest-trio only uses a clock the test itself
    asks for), which waits out in-flight I/O (``helpers``)."""
    autojump_clock.autojump_threshold = IO_GRACE_SECONDS


def serve_slow(close_timeout: float = CLOSE_TIMEOUT) -> AbstractAsyncContextManager[Server]:
    """:func:`helpers.serve` for :class:`Slow` objects with ``close_timeout``."""
    limits = Limits(max_queued_messages_per_websocket=MAX_QUEUED)
    return serve(APP, close_timeout=close_timeout, limits=limits)


async def answer_the_close(raw: RawWebSocket) -> CloseConnection:
    """Read (and drop) messages until the server's Close; answer it; read to EOF."""
    while True:
        event = await raw.next_event()
        if isinstance(event, CloseConnection):
            await raw.send(event.response())
            assert await raw.next_event() is None
            return event


async def never_answer(port: int, *, task_status: trio.TaskStatus[trio.Event]) -> None:
    """A client that reads the server's Close and never answers it; the event it starts
    with is set once the Close has arrived."""
    closed = trio.Event()
    async with open_raw_websocket(port, "/slow/a") as raw:
        task_status.started(closed)
        while not isinstance(await raw.next_event(), CloseConnection):
            pass
        closed.set()
        await trio.sleep_forever()


async def echo_client(
    server: Server, closes: list[tuple[int, str | None]], *, task_status: trio.TaskStatus[None]
) -> None:
    """A trio-websocket client (it answers the Close at once); records the Close."""
    async with open_client(server, "/slow/a") as ws:
        assert await ask(ws, "hi") == "echo 'hi'"
        task_status.started()
        closes.append(await closed_by_server(ws))


async def raise_signal(*signums: signal.Signals, between: trio.Event | None = None) -> None:
    """Raise each signal in this process (after ``between`` is set, from the second on).

    Started with ``start_soon`` just before ``wait_for_shutdown_signal``: it runs at the
    helper's first checkpoint, when the helper's receiver is already installed.
    """
    for n, signum in enumerate(signums):
        if n and between is not None:
            await between.wait()
        signal.raise_signal(signum)
    await trio.lowlevel.checkpoint()


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == level]


# -- the shutdown itself ------------------------------------------------------------------


async def test_shutdown_says_how_many_connections_it_waits_for(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_hibernate")
    with trio.fail_after(WAIT_SECONDS):
        async with trio.open_nursery() as clients:
            async with serve_slow(close_timeout=10) as server:
                await clients.start(never_answer, server.port)
                started = trio.current_time()
            took = trio.current_time() - started
            clients.cancel_scope.cancel()
    assert took == pytest.approx(10, abs=0.5)
    waiting = [message for message in messages(caplog) if "still closing" in message]
    assert waiting == ["shutdown: 1 connection(s) still closing"] * 9  # once a second
    assert messages(caplog, logging.WARNING) == [
        "shutdown: 1 connection(s) did not close within 10 s (close_timeout); dropping them"
    ]


async def flood(port: int, *, task_status: trio.TaskStatus[None]) -> None:
    """Keep the object busy (from a second socket: a socket's own slow turn would only
    stop its reading), fill its queue and send more; answer the server's Close only
    once the server has read everything it was going to read."""
    async with (
        open_raw_websocket(port, "/slow/a") as busy,
        open_raw_websocket(port, "/slow/a") as raw,
        trio.open_nursery() as nursery,
    ):
        await busy.send(TextMessage("slow"))
        await settle()  # its turn runs
        nursery.start_soon(answer_the_close, busy)
        for n in range(10):
            await raw.send(TextMessage(f"more {n}"))
        task_status.started()
        while not isinstance(event := await raw.next_event(), CloseConnection):
            pass
        assert event.code == 1001
        await settle()  # else the answer may arrive with the last messages, in one read
        await raw.send(event.response())
        await trio.sleep_forever()  # the server, not this client, must end the connection


async def test_a_client_still_sending_does_not_hold_up_the_shutdown(
    autojump_clock: MockClock,
) -> None:
    """SIGTERM with a client still sending waited for the whole shutdown timeout.

    The object fell behind, so the connection stopped reading (its queue was full).
    ``begin_shutdown`` resumed it once, but the object is cancelled and never drains
    its queue: the next round of the read loop found the queue still full and waited
    on a fresh event nobody sets, so the client's answer to the Close was never read.
    """
    with trio.fail_after(WAIT_SECONDS):
        async with trio.open_nursery() as clients:
            async with serve_slow(close_timeout=20) as server:
                await clients.start(flood, server.port)
                await settle()
                stats = server.host.object_statistics("slow", "a")
                assert stats.queued_events >= MAX_QUEUED  # the connection stopped reading
                started = trio.current_time()
            took = trio.current_time() - started
            clients.cancel_scope.cancel()
    assert took < PROMPTLY


# -- wait_for_shutdown_signal ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "close"),
    [
        (signal.SIGTERM, (1001, "going away")),
        (signal.SIGINT, (1001, "going away")),
        (signal.SIGUSR1, (1012, "service restart")),
    ],
    ids=["SIGTERM", "SIGINT", "SIGUSR1"],
)
async def test_a_signal_closes_every_websocket_and_returns_when_they_answered(
    autojump_clock: MockClock,
    signum: signal.Signals,
    close: tuple[int, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "trio_hibernate")
    closes: list[tuple[int, str | None]] = []
    with trio.fail_after(WAIT_SECONDS):
        async with trio.open_nursery() as clients:
            async with serve_slow() as server:
                await clients.start(echo_client, server, closes)
                await clients.start(echo_client, server, closes)
                clients.start_soon(raise_signal, signum)
                started = trio.current_time()
                assert await wait_for_shutdown_signal(server) is signum
                took = trio.current_time() - started
                assert server.host.statistics().connections == 0  # all answered already
    assert closes == [close, close]
    assert took < PROMPTLY
    assert f"{signum.name}: shutting down (closing 2 connection(s) with {close[0]})" in (
        messages(caplog)
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored


async def shut_down_by_two_signals(second: signal.Signals) -> tuple[float, bool]:
    """Serve a client that never answers; SIGTERM, then ``second`` once it has its
    Close. Returns how long the shutdown took and whether KeyboardInterrupt came out."""
    interrupted = False
    started = trio.current_time()  # starting the server takes no (virtual) time
    async with trio.open_nursery() as clients:
        try:
            async with serve_slow() as server:
                closed = await clients.start(never_answer, server.port)
                clients.start_soon(partial(raise_signal, signal.SIGTERM, second, between=closed))
                await wait_for_shutdown_signal(server)
        except KeyboardInterrupt:  # a plain except: it must leave open_server bare
            interrupted = True
        took = trio.current_time() - started
        clients.cancel_scope.cancel()
    return took, interrupted


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_second_signal_stops_waiting_at_once(
    autojump_clock: MockClock, second: signal.Signals, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_hibernate")
    with trio.fail_after(WAIT_SECONDS):
        took, interrupted = await shut_down_by_two_signals(second)
    assert interrupted
    assert took < PROMPTLY
    assert messages(caplog, logging.WARNING) == [
        f"{second.name} again: exiting now, dropping 1 connection(s)"
    ]
