"""Inline turns: a message's turn runs in its connection's task when the object is live
and idle (``_activation.py``), with the same containment, event timeout, cancellation,
commit, output gate and event order as a turn the supervisor runs."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import accept_upgrade
from trio.testing import MockClock

from trio_hibernate import App, DurableObject, ObjectContext, Request, Response, WebSocket
from trio_hibernate._storage.api import StorageState
from trio_hibernate.testing import TestHost, TestWebSocket, WebSocketClosed, open_test_host

NS = "probe"


def in_supervisor() -> bool:
    """Whether the current task is an object's supervisor (else: a connection's task)."""
    return "Supervisor" in trio.lowlevel.current_task().name


class Probe(DurableObject):
    """Records each message with the task kind that ran it; a few scripted messages."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        self.env: dict[str, Any] = env
        env["constructed"] = env.get("constructed", 0) + 1

    async def fetch(self, request: Request) -> Response:
        return accept_upgrade(self.ctx, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        assert isinstance(message, str)
        env = self.env
        env["log"].append((message, "supervisor" if in_supervisor() else "inline"))
        if message.startswith("wait"):
            try:
                await env["release"].wait()
            except trio.Cancelled:
                env["cancelled"].append(message)
                raise
        elif message.startswith("nursery"):
            async with trio.open_nursery() as nursery:  # a scope of the turn's own
                nursery.start_soon(env["release"].wait)
        elif message.startswith("within"):
            with trio.move_on_after(100):  # a scope of the turn's own
                await env["release"].wait()
        elif message == "stubborn":
            try:
                await env["release"].wait()
            finally:
                ws.send("from the old instance")  # after the reset: dropped
        elif message == "boom":
            raise RuntimeError("boom (raised on purpose)")
        elif message == "sleep":
            await trio.sleep(3600)
        elif message == "write":
            await self.ctx.storage.put("k", env["value"])
        elif message == "read":
            ws.send(f"k={await self.ctx.storage.get('k')}")
            return
        elif message == "timeout":
            self.ctx.set_hibernatable_websocket_event_timeout(1000)
        elif message == "abort-soon":

            async def abort_later() -> None:
                await trio.sleep(1)
                self.ctx.abort("aborted from a task")

            self.ctx.start_soon(abort_later)
        ws.send(f"done {message}")


def probe_app() -> tuple[App, dict[str, Any]]:
    env: dict[str, Any] = {"log": [], "cancelled": [], "release": trio.Event(), "value": 1}
    return App({NS: Probe}, env=env), env


async def warm(th: TestHost, name: str = "a") -> TestWebSocket:
    """A socket to a live, idle object (its first message woke it in the supervisor)."""
    ws = await th.connect(NS, name)
    await ws.send("warm")
    assert await ws.receive() == "done warm"
    await th.settle()
    return ws


async def reset_during(ws: TestWebSocket, message: str) -> int:
    """Have the object reset itself (``ctx.abort()`` from a task, 1 s later) while
    ``message``'s turn runs; the close code the client then gets."""
    await ws.send("abort-soon")
    assert await ws.receive() == "done abort-soon"
    await ws.send(message)
    with pytest.raises(WebSocketClosed) as closed:
        await ws.receive()
    return closed.value.code


async def test_a_message_to_an_idle_live_object_runs_in_its_connection_task(
    autojump_clock: MockClock,
) -> None:
    app, env = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        for n in range(3):
            await ws.send(f"m{n}")
            assert await ws.receive() == f"done m{n}"
        # Connecting woke the object (its fetch ran in the supervisor); every message
        # found it live and idle.
        assert env["log"] == [
            ("warm", "inline"),
            ("m0", "inline"),
            ("m1", "inline"),
            ("m2", "inline"),
        ]
        assert th.statistics().wakes == 1


async def test_strict_mode_runs_every_turn_in_the_supervisor(autojump_clock: MockClock) -> None:
    app, env = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        th.strict = True
        await ws.send("m")
        assert await ws.receive() == "done m"
        assert env["log"][-1] == ("m", "supervisor")


async def test_a_handler_raising_inline_is_contained(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, env = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        await ws.send("boom")
        await ws.send("after")
        assert await ws.receive() == "done after"  # the socket stays open
        assert env["log"][1:] == [("boom", "inline"), ("after", "inline")]
        assert th.statistics().wakes == 1  # the instance is kept
    raised = [r for r in caplog.records if r.exc_info and "boom" in str(r.exc_info[1])]
    assert len(raised) == 1


async def test_the_event_timeout_cancels_an_inline_turn_and_drops_the_instance(
    autojump_clock: MockClock,
) -> None:
    app, env = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        await ws.send("timeout")  # sets a 1 s event timeout
        assert await ws.receive() == "done timeout"
        await th.settle()
        start = trio.current_time()
        await ws.send("sleep", settle=True)
        assert trio.current_time() - start == pytest.approx(1, abs=0.1)
        assert env["log"][-1] == ("sleep", "inline")
        assert th.statistics().hibernations == 1  # the instance was dropped
        await ws.send("next")  # the socket stays connected; a new instance answers
        assert await ws.receive() == "done next"
        assert env["constructed"] == 2


async def test_a_long_inline_turn_is_not_idle_time(autojump_clock: MockClock) -> None:
    """The reaper does not count a turn as idle time: the object hibernates
    ``idle_timeout`` after the turn ends, not during it."""
    app, env = probe_app()
    async with open_test_host(app, idle_timeout=10) as th:
        ws = await warm(th)
        await ws.send("wait 1")
        await trio.sleep(30)  # three idle timeouts while the turn waits
        assert th.statistics().hibernations == 0
        env["release"].set()
        assert await ws.receive() == "done wait 1"
        await th.settle()
        await trio.sleep(9.5)
        assert th.statistics().hibernations == 0
        await trio.sleep(1)
        assert th.statistics().hibernations == 1


async def test_events_arriving_during_an_inline_turn_run_after_it_in_order(
    autojump_clock: MockClock,
) -> None:
    app, env = probe_app()
    async with open_test_host(app) as th:
        a = await warm(th)
        b = await th.connect(NS, "a")
        await a.send("wait a1", settle=False)
        await trio.sleep(1)
        assert env["log"][-1] == ("wait a1", "inline")
        await b.send("b1")
        await b.send("b2")
        await trio.sleep(1)
        await a.send("a2")  # read only once a1's turn is over
        await trio.sleep(1)
        assert [m for m, _ in env["log"]] == ["warm", "wait a1"]  # all wait for a1
        env["release"].set()
        assert await a.receive() == "done wait a1"
        assert await b.receive() == "done b1"
        assert await b.receive() == "done b2"
        assert await a.receive() == "done a2"
        assert [m for m, _ in env["log"]] == ["warm", "wait a1", "b1", "b2", "a2"]
        # b1 and b2 were queued while a1 ran: the supervisor ran them, after it.
        assert env["log"][2:4] == [("b1", "supervisor"), ("b2", "supervisor")]


async def test_settle_waits_for_an_inline_turn(autojump_clock: MockClock) -> None:
    app, env = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        await ws.send("wait")
        with pytest.raises(trio.TooSlowError, match="a turn is running"):
            await th.settle(timeout=5)
        env["release"].set()
        await th.settle(timeout=5)
        assert await ws.receive() == "done wait"


async def test_a_reset_cancels_an_inline_turn(autojump_clock: MockClock) -> None:
    """``ctx.abort()`` from a ``ctx.start_soon`` task while a connection runs a turn:
    the turn is cancelled with the rest of the activation, the socket closes with 1011,
    and the connection goes on reading (its Close is answered)."""
    app, env = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        assert await reset_during(ws, "wait r") == 1011
        assert env["cancelled"] == ["wait r"]
        assert env["log"][-1] == ("wait r", "inline")
        await th.settle()
        again = await th.connect(NS, "a")
        await again.send("fresh")
        assert await again.receive() == "done fresh"
        assert env["constructed"] == 2


async def test_shutdown_cancels_an_inline_turn(autojump_clock: MockClock) -> None:
    app, env = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        await ws.send("wait s")
        await trio.sleep(1)
        assert env["log"][-1] == ("wait s", "inline")
        started = trio.current_time()
    assert env["cancelled"] == ["wait s"]
    assert trio.current_time() - started < 5


async def test_an_inline_turns_reply_waits_for_its_commit_and_a_failed_commit_drops_it(
    autojump_clock: MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The output gate and the commit of an inline turn: a durable host (commits are
    flushed in a worker thread) whose commit fails once: the reply of the writing turn
    is dropped, the object is reset, nothing is stored; the next turn sees the old value."""
    failures = 1
    real_commit = StorageState.commit_sync

    def commit(state: StorageState) -> None:  # the COMMIT of writes (not of a read)
        nonlocal failures
        if failures:
            failures -= 1
            raise sqlite3.OperationalError("disk I/O error (injected)")
        real_commit(state)

    monkeypatch.setattr(StorageState, "commit_sync", commit)
    app, env = probe_app()
    async with open_test_host(app, data_dir=tmp_path) as th:
        ws = await warm(th)
        env["value"] = 1
        # settle=True: a commit runs in a worker thread, which the autojump clock
        # does not wait for (settle does).
        await ws.send("write", settle=True)  # its commit fails
        await ws.send("read", settle=True)
        assert await ws.receive() == "k=None"  # "done write" was dropped with the commit
        assert env["log"][1] == ("write", "inline")
        assert env["constructed"] == 2
        await ws.send("write", settle=True)
        assert await ws.receive() == "done write"
        await ws.send("read", settle=True)
        assert await ws.receive() == "k=1"
    failed = [r for r in caplog.records if "storage commit" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].levelno == logging.ERROR
    assert "1 held message(s) dropped" in failed[0].getMessage()


async def test_a_reset_cancels_a_turn_blocked_in_a_scope_of_its_own(
    autojump_clock: MockClock,
) -> None:
    """The connection's scope encloses the whole turn: a turn blocked inside its own
    ``move_on_after`` (or nursery, or a stub call's timeout) is cancelled too."""
    app, env = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        assert await reset_during(ws, "within") == 1011
        assert env["log"][-1] == ("within", "inline")
        assert trio.current_time() < 50  # cancelled, not ended by its own 100 s timeout


async def test_turns_blocking_in_scopes_of_their_own_run_inline(autojump_clock: MockClock) -> None:
    app, env = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        await ws.send("nursery")
        await trio.sleep(1)
        env["release"].set()
        assert await ws.receive() == "done nursery"
        env["release"] = trio.Event()
        await ws.send("within")
        await trio.sleep(1)
        env["release"].set()
        assert await ws.receive() == "done within"
        assert env["log"][1:] == [("nursery", "inline"), ("within", "inline")]


def cancel_scopes() -> int:
    import gc

    gc.collect()
    return sum(1 for thing in gc.get_objects() if isinstance(thing, trio.CancelScope))


async def test_a_hibernated_objects_sockets_hold_no_cancel_scope(autojump_clock: MockClock) -> None:
    """A connection reads in a cancel scope only while it runs the live object's turns:
    the object's hibernation lets it go (a scope costs ~800 bytes per socket)."""
    app, env = probe_app()
    async with open_test_host(app, idle_timeout=10) as th:
        sockets = [await th.connect(NS, "a") for _ in range(20)]
        await th.settle()
        before = cancel_scopes()
        for ws in sockets:
            await ws.send("m")
            assert await ws.receive() == "done m"
        assert {kind for _, kind in env["log"]} == {"inline"}
        assert cancel_scopes() >= before + 20  # each reads in a scope of the activation's
        await trio.sleep(11)
        await th.settle()
        assert th.statistics().hibernated_objects == 1
        assert cancel_scopes() <= before
        await sockets[0].send("again")  # and reading goes on outside any scope
        assert await sockets[0].receive() == "done again"


async def test_nothing_a_reset_instance_still_sends_reaches_the_client(
    autojump_clock: MockClock,
) -> None:
    """A reset seals the output gate: what the old instance's code sends afterwards (a
    ``finally`` block of a cancelled turn) is dropped; the client gets the 1011."""
    app, _ = probe_app()
    async with open_test_host(app) as th:
        ws = await warm(th)
        assert await reset_during(ws, "stubborn") == 1011
