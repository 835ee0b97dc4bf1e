"""Closing a host while work is in flight: commits in worker threads, queued events.

Each test pins one race of the shutdown path, made deterministic rather than repeated
until it shows: a commit is held in its worker thread until the host starts closing, or
events are queued where shutdown will find them.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any, Final

import outcome
import pytest
import trio
from helpers import RawWebSocket, accept_upgrade, settle
from wsproto.events import AcceptConnection, CloseConnection, Request as WSRequest

from trio_hibernate import (
    App,
    DurableObject,
    Host,
    ObjectContext,
    ObjectId,
    ObjectStub,
    Request,
    Response,
)
from trio_hibernate._core.events import CallEvent, Reply
from trio_hibernate._host import runtime_of
from trio_hibernate._runtime import Runtime
from trio_hibernate._storage.alarms import AlarmIndex
from trio_hibernate._storage.sqlite import SqliteDatabase
from trio_hibernate.testing import TestHost, open_test_host

#: Bound on every wait (virtual seconds on the autojump clock; real ones in the commit test,
#: whose worker thread the mock clock would jump over).
WAIT: Final = 30.0
#: An alarm time that never comes within a test.
FAR: Final = 4_000_000_000.0


class Alarmed(DurableObject):
    """Sets and deletes its alarm when a stub asks; accepts WebSockets; can hang a turn."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        env["built"] += 1

    async def fetch(self, request: Request) -> Response:
        if request.websocket is None:
            return Response(body="fetched")
        return accept_upgrade(self.ctx, request)

    async def arm(self) -> None:
        await self.ctx.storage.set_alarm(FAR)

    async def disarm(self) -> None:
        await self.ctx.storage.delete_alarm()

    async def ping(self) -> str:
        return "pong"

    async def hang(self) -> None:
        self.env["hanging"].set()
        await trio.sleep_forever()


def alarmed_app() -> App:
    return App({"a": Alarmed}, env={"hanging": trio.Event(), "built": 0})


async def raw_client(host: Host, target: str) -> RawWebSocket:
    """A WebSocket served by ``host`` over a socket pair, which answers nothing by itself
    (so the host's shutdown waits for it)."""
    server_end, client_end = socket.socketpair()
    host.serve_socket(server_end)
    raw = RawWebSocket(trio.SocketStream(trio.socket.from_stdlib_socket(client_end)))
    await raw.send(WSRequest(host="test", target=target))
    assert isinstance(await raw.next_event(), AcceptConnection)
    return raw


# -- events that reach a closing host are answered --------------------------------------


async def test_stub_calls_made_during_shutdown_are_answered_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A client that has not answered its Close keeps the host in shutdown; meanwhile a
    call, a fetch and an alarm reach it: each is answered, and shutdown ends as soon as
    the client answers (not after the grace period)."""
    grace = 1000.0
    answered: list[object] = []

    async def while_shutting_down(th: TestHost, stub: ObjectStub, raw: RawWebSocket) -> None:
        close = await raw.next_event()  # shutdown has begun
        assert isinstance(close, CloseConnection)
        assert close.code == 1001
        with pytest.raises(RuntimeError, match=r"host is shutting down.*ping\(\)") as info:
            await stub.ping()
        answered.append(info.value)
        answered.append((await stub.fetch("/a/x")).status)
        await th.run_alarm("a", "x")  # returns once the alarm's event is answered
        answered.append("alarm")
        await raw.send(close.response())

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            async with open_test_host(alarmed_app(), close_timeout=grace) as th:
                stub = th.host.get_namespace("a").get_by_name("x")
                await stub.arm()
                raw = await raw_client(th.host, "/a/x")
                nursery.start_soon(while_shutting_down, th, stub, raw)
                began = trio.current_time()
            assert trio.current_time() - began < grace
        await raw.stream.aclose()
    assert answered[1:] == [503, "alarm"]


async def test_events_queued_when_shutdown_cancels_an_object_are_answered(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An object's turn hangs; a call, a fetch and an alarm queue behind it. Shutdown
    cancels the turn; every queued event is answered rather than lost."""
    app = alarmed_app()
    answered: dict[str, object] = {}

    async def record(what: str, call: Any) -> None:
        try:
            answered[what] = await call()
        except Exception as exc:
            answered[what] = exc

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            async with open_test_host(app) as th:
                stub = th.host.get_namespace("a").get_by_name("x")
                await stub.arm()
                nursery.start_soon(record, "hang", stub.hang)
                await app.env["hanging"].wait()
                nursery.start_soon(record, "ping", stub.ping)
                nursery.start_soon(record, "fetch", lambda: stub.fetch("/a/x"))
                nursery.start_soon(record, "alarm", lambda: th.run_alarm("a", "x"))
                await settle()
                assert th.host.object_statistics("a", "x").queued_events == 3
    assert isinstance(answered["hang"], RuntimeError)
    assert "shut down" in str(answered["hang"])
    assert isinstance(answered["ping"], RuntimeError)
    assert "host is shutting down" in str(answered["ping"])
    fetched = answered["fetch"]
    assert isinstance(fetched, Response)
    assert (fetched.status, fetched.body) == (503, b"the server is shutting down\n")
    assert answered["alarm"] is None


async def test_an_object_woken_just_before_shutdown_is_not_constructed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A call queued for a hibernated object right before shutdown: its supervisor first
    runs once the host is closing, constructs nothing, and answers the call."""
    app = alarmed_app()
    replies: list[outcome.Outcome[object]] = []
    with trio.fail_after(WAIT):
        async with open_test_host(app) as th:
            entry = runtime_of(th.host).entry_for("a", ObjectId.from_name("a", "x"))
            entry.deliver(CallEvent("ping", (), {}, Reply(replies.append)))
            # No checkpoint before the block ends: shutdown begins before the supervisor.
    assert app.env["built"] == 0
    [result] = replies
    with pytest.raises(RuntimeError, match="host is shutting down"):
        result.unwrap()
    assert th.statistics().live_objects == th.statistics().hibernated_objects == 0


# -- the alarm index and commits still running at close ----------------------------------


class CommitHeldUntilShutdown:
    """Patches ``SqliteDatabase.flush`` (a commit's worker-thread part): once
    :attr:`armed`, a flush waits until the host begins to shut down, then goes on.
    :attr:`entered` is set (in Trio) when such a flush starts waiting."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.entered = trio.Event()
        self.resumed = False
        shutting_down = threading.Event()
        real_flush = SqliteDatabase.flush
        real_shutdown = Runtime.shutdown

        def flush(db: SqliteDatabase) -> bool:
            if self.armed:
                self.armed = False
                trio.from_thread.run_sync(self.entered.set)
                self.resumed = shutting_down.wait(WAIT)
            return real_flush(db)

        async def shutdown(runtime: Runtime, grace: float) -> None:
            shutting_down.set()
            await real_shutdown(runtime, grace)

        monkeypatch.setattr(SqliteDatabase, "flush", flush)
        monkeypatch.setattr(Runtime, "shutdown", shutdown)


async def test_the_alarm_index_outlives_a_commit_still_running_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = CommitHeldUntilShutdown(monkeypatch)
    outcomes: list[object] = []

    async def disarm(stub: Any) -> None:
        try:
            outcomes.append(await stub.disarm())
        except Exception as exc:
            outcomes.append(exc)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            async with open_test_host(alarmed_app(), data_dir=str(tmp_path)) as th:
                stub = th.host.get_namespace("a").get_by_name("x")
                await stub.arm()
                held.armed = True
                nursery.start_soon(disarm, stub)
                await held.entered.wait()
                # Leaving the block closes the host while the commit that deletes the
                # alarm is in its worker thread; the deletion reaches the index after it.
    assert held.resumed
    assert outcomes == [None]
    index = AlarmIndex(tmp_path / "_alarms.sqlite3")
    try:
        assert index.load() == []
    finally:
        index.close()


@pytest.mark.parametrize("durable", [True, False])
def test_alarm_index_refuses_records_after_close(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "_alarms.sqlite3"
    index = AlarmIndex(path if durable else None)
    index.close()
    with pytest.raises(sqlite3.ProgrammingError, match=r"alarm index .* is closed.*a/x"):
        index.record(("a", "ff" * 32, "x"), 1.0)
    with pytest.raises(sqlite3.ProgrammingError, match="is closed"):
        index.load()
    index.close()  # idempotent
