"""The testing toolkit of issue 12: settle, receive timeouts, fixture options, strict."""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from helpers import accept_upgrade

from trio_hibernate import AlarmInfo, App, DurableObject, Request, Response, WebSocket
from trio_hibernate.testing import TestHost, WebSocketClosed, open_test_host

pytest_plugins = ["pytester"]


@asynccontextmanager
async def bounded(app: App, **options: Any) -> AsyncIterator[TestHost]:
    """``open_test_host``, for a test body of at most 120 s of Trio time."""
    with trio.fail_after(120):
        async with open_test_host(app, **options) as th:
            yield th


class Notes(DurableObject):
    """Keeps the last message in storage; its alarm sends it to every socket."""

    async def fetch(self, request: Request) -> Response:
        if request.websocket is None:
            await self.ctx.storage.set_alarm(self.ctx.now() + 60)
            return Response(body="armed")
        return accept_upgrade(self.ctx, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        await self.ctx.storage.put("last", message)

    async def alarm(self, info: AlarmInfo) -> None:
        last = await self.ctx.storage.get("last")
        for ws in self.ctx.get_websockets():
            ws.send(f"last={last}")

    async def last(self) -> object:
        return await self.ctx.storage.get("last")


def notes_app() -> App:
    return App({"notes": Notes})


async def last_seen_by_the_alarm(*, settle: bool) -> str | bytes:
    """The issue's race: a message, then ``run_alarm()`` at once, in strict mode."""
    async with bounded(notes_app(), strict=True) as th:
        ws = await th.connect("notes", "n")
        await th.fetch("notes", "n")
        if settle:
            await ws.send("hello", settle=True)
        else:
            await ws.send("hello")
        await th.run_alarm("notes", "n")
        return await ws.receive()


async def test_send_then_run_alarm_races_without_settle(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The trap of issue 12: a correct object, and the alarm often runs before the
    # message has been handled (Trio's scheduler order is randomised per batch).
    seen = [await last_seen_by_the_alarm(settle=False) for _ in range(40)]
    assert "last=None" in seen
    assert "last=hello" in seen


async def test_send_with_settle_never_races(autojump_clock: trio.abc.Clock) -> None:
    for _ in range(40):
        assert await last_seen_by_the_alarm(settle=True) == "last=hello"


async def test_settle_then_hibernate_keeps_the_message(autojump_clock: trio.abc.Clock) -> None:
    async with bounded(notes_app()) as th:
        ws = await th.connect("notes", "n")
        for n in range(20):
            await ws.send(f"m{n}")
            await th.settle()
            assert th.host.object_statistics("notes", "n").queued_events == 0
            assert await th.hibernate("notes", "n")  # the message was handled: live
            assert await th.host.get_namespace("notes").get_by_name("n").last() == f"m{n}"
        assert trio.current_time() == 0  # settling took no virtual time


class Slow(DurableObject):
    """A turn that waits on the clock before it writes."""

    async def fetch(self, request: Request) -> Response:
        return accept_upgrade(self.ctx, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        await trio.sleep(float(message))
        await self.ctx.storage.put("done", message)

    async def done(self) -> object:
        return await self.ctx.storage.get("done")


async def test_settle_waits_for_a_turn_that_sleeps_and_times_out_clearly(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with bounded(App({"slow": Slow}), idle_timeout=math.inf) as th:
        ws = await th.connect("slow", "s")
        await ws.send("5", settle=True)
        assert trio.current_time() == pytest.approx(5)
        assert await th.host.get_namespace("slow").get_by_name("s").done() == "5"
        await ws.send("50")
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError) as too_slow:
            await th.settle(timeout=2)
        assert trio.current_time() - start == pytest.approx(2)
        message = str(too_slow.value)
        assert "settle() waited 2 s of Trio time" in message
        assert "slow" in message
        assert "a turn is running" in message


async def test_settle_waits_for_commits_in_a_worker_thread(
    autojump_clock: trio.testing.MockClock, tmp_path: object
) -> None:
    # With data_dir, commits run in a thread: the autojump clock may move meanwhile
    # (docs/testing.md, Caveats), so no idle timeout to jump to here.
    async with bounded(notes_app(), data_dir=str(tmp_path), idle_timeout=math.inf) as th:
        ws = await th.connect("notes", "n")
        for n in range(10):
            await ws.send(f"m{n}", settle=True)
            assert th.host.object_statistics("notes", "n").queued_events == 0
            assert await th.host.get_namespace("notes").get_by_name("n").last() == f"m{n}"


# -- receive() timeouts ---------------------------------------------------------------------


async def test_receive_times_out_in_virtual_time_with_a_clear_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with bounded(notes_app()) as th:
        ws = await th.connect("notes", "quiet", "?x=1")
        with pytest.raises(trio.TooSlowError) as too_slow:
            await ws.receive()  # Notes never answers a message
        assert trio.current_time() == pytest.approx(10)  # the default, virtual
        message = str(too_slow.value)
        assert "receive() on <TestWebSocket to '/notes/quiet?x=1'>" in message
        assert "waited 10 s of Trio time" in message
        with pytest.raises(trio.TooSlowError, match=r"waited 0\.5 s"):
            await ws.receive(timeout=0.5)
        with pytest.raises(ValueError, match="timeout must be > 0"):
            await ws.receive(timeout=0)
        th.wait_timeout = 3
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError, match="waited 3 s"):
            await ws.receive()
        assert trio.current_time() - start == pytest.approx(3)
        # The socket still works after a timeout.
        await th.fetch("notes", "quiet")
        await th.run_alarm("notes", "quiet")
        assert await ws.receive() == "last=None"
    async with bounded(notes_app(), wait_timeout=1) as th:
        ws = await th.connect("notes", "quiet")
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError, match="waited 1 s"):
            await ws.receive()
        assert trio.current_time() - start == pytest.approx(1)


# -- closed clients are released ------------------------------------------------------------


class Bye(DurableObject):
    async def fetch(self, request: Request) -> Response:
        return accept_upgrade(self.ctx, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.close(4000, "bye")


async def test_the_host_keeps_only_open_clients(autojump_clock: trio.abc.Clock) -> None:
    async with bounded(App({"bye": Bye})) as th:
        refs: list[weakref.ref[object]] = []
        for n in range(3):
            closed = await th.connect("bye", "b")
            assert await closed.close() == (1000, "")
            dropped = await th.connect("bye", "b")
            await dropped.drop()
            by_server = await th.connect("bye", "b")
            await by_server.send("x")
            with pytest.raises(WebSocketClosed):
                await by_server.receive()
            with pytest.raises(WebSocketClosed):
                await by_server.receive()  # again: the same answer, the socket is gone
            refs += [weakref.ref(closed), weakref.ref(dropped), weakref.ref(by_server)]
            del closed, dropped, by_server
            assert th.open_clients == 0, n
        kept = await th.connect("bye", "b")
        assert th.open_clients == 1
        gc.collect()
        assert [ref() for ref in refs] == [None] * 9
    assert kept.close_code is None  # dropped at exit, without a Close


# -- the pytest plugin: fixture options, strict mode ----------------------------------------

BUGGY_APP = """
import os
import pytest, trio
from trio_hibernate import App, DurableObject, Response

class Buggy(DurableObject):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.count = 0  # lost whenever the object hibernates

    async def fetch(self, request):
        self.ctx.accept_websocket(request.websocket)
        return Response(status=101, websocket=request.websocket)

    async def websocket_message(self, ws, message):
        await self.ctx.storage.put("seen", message)
        self.count += 1
        ws.send(str(self.count))

@pytest.fixture
def hibernate_app():
    return App({"buggy": Buggy})

async def counts(host):
    ws = await host.connect("buggy", "b")
    for expected in ("1", "2", "3"):
        await ws.send("+1")
        assert await ws.receive() == expected
"""


def test_overriding_hibernate_strict_does_not_turn_off_the_flag(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_override=BUGGY_APP
        + """
@pytest.fixture
def hibernate_strict():
    return False  # a module-wide default that must not switch the flag off

@pytest.mark.hibernate_host(strict=False)
async def test_counts(hibernate_host, autojump_clock):
    await counts(hibernate_host)
"""
    )
    pytester.makepyfile(
        test_param=BUGGY_APP
        + """
@pytest.fixture(params=[False, True], ids=["normal", "strict"])
def hibernate_strict(request):
    return request.param

async def test_counts(hibernate_host, autojump_clock):
    await counts(hibernate_host)
"""
    )
    normal = pytester.runpytest_subprocess()
    normal.assert_outcomes(passed=2, failed=1)  # test_param[strict] catches the bug
    strict = pytester.runpytest_subprocess("--hibernate-strict")
    strict.assert_outcomes(failed=3)
    strict.stdout.fnmatch_lines(["trio-hibernate: --hibernate-strict*"])


def test_host_options_from_the_fixture_and_marks(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_options=BUGGY_APP
        + """
@pytest.fixture
def hibernate_host_options():
    return {"idle_timeout": 5, "wait_timeout": 2}

async def test_the_fixture(hibernate_host, autojump_clock):
    ws = await hibernate_host.connect("buggy", "b")
    await ws.send("x", settle=True)
    await trio.sleep(6)
    assert hibernate_host.statistics().live_objects == 0  # idle_timeout 5, not 10
    with pytest.raises(trio.TooSlowError, match="waited 2 s"):
        await ws.receive()
        await ws.receive()

@pytest.mark.hibernate_host(idle_timeout=60)
async def test_a_mark_overrides_the_fixture(hibernate_host, autojump_clock):
    ws = await hibernate_host.connect("buggy", "b")
    await ws.send("x", settle=True)
    await trio.sleep(30)
    assert hibernate_host.statistics().live_objects == 1
    with pytest.raises(trio.TooSlowError, match="waited 2 s"):
        await ws.receive()
        await ws.receive()

@pytest.mark.hibernate_host(data_dir=True)
async def test_a_data_dir_in_tmp_path(hibernate_host, tmp_path):
    ws = await hibernate_host.connect("buggy", "b")
    await ws.send("x", settle=True)
    assert os.listdir(tmp_path / "hibernate-data")

@pytest.mark.hibernate_host(5)
async def test_positional_options_are_refused(hibernate_host):
    pass

@pytest.mark.hibernate_host(no_such_option=1)
async def test_unknown_options_are_refused(hibernate_host):
    pass
"""
    )
    result = pytester.runpytest_subprocess("--strict-markers")
    result.assert_outcomes(passed=3, failed=2)  # pytest-trio runs fixtures in the test
    result.stdout.fnmatch_lines(
        [
            "*takes keyword options only*not (5,)*",
            "*unexpected keyword argument 'no_such_option'*",
        ]
    )


@pytest.mark.parametrize("timeout", [0, -1, math.nan])
async def test_settle_refuses_a_timeout_that_is_not_positive(
    timeout: float, autojump_clock: trio.abc.Clock
) -> None:
    """As receive() does: a clear ValueError, not a TooSlowError with nothing busy."""
    async with open_test_host(notes_app()) as host:
        with pytest.raises(ValueError, match="timeout must be > 0"):
            await host.settle(timeout=timeout)
        await host.settle(timeout=math.inf)
