"""The testing toolkit: in-process clients, virtual time for alarms, strict mode."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from helpers import accept_upgrade

from trio_hibernate import (
    AlarmInfo,
    App,
    DurableObject,
    ObjectContext,
    Request,
    Response,
    WebSocket,
    WebSocketRequestResponsePair,
)
from trio_hibernate.testing import (
    EPOCH,
    TestHost,
    UpgradeRejected,
    WebSocketClosed,
    open_test_host,
)

pytest_plugins = ["pytester"]


class Room(DurableObject):
    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
        self.closes: list[tuple[int, str, bool]] = env["closes"]

    async def fetch(self, request: Request) -> Response:
        if request.websocket is None:
            return Response(body=f"hi {request.method}")
        if request.query == "refuse":
            return Response(status=403, body="no")
        return accept_upgrade(self.ctx, request, ["member"])

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if message == "bye":
            ws.close(4000, "see you")
        else:
            ws.send(message)

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self.closes.append((code, reason, was_clean))


def room_app() -> tuple[App, list[tuple[int, str, bool]]]:
    closes: list[tuple[int, str, bool]] = []
    return App({"room": Room}, env={"closes": closes}), closes


async def test_client_roundtrip_close_and_drop(autojump_clock: trio.abc.Clock) -> None:
    app, closes = room_app()
    with trio.fail_after(60):
        async with open_test_host(app) as th:
            ws = await th.connect("room", "a")
            await ws.send("hello")
            assert await ws.receive() == "hello"
            await ws.send(b"\x00\x01")
            assert await ws.receive() == b"\x00\x01"
            assert await ws.close(4001, "done") == (4001, "done")  # the runtime echoes
            other = await th.connect("room", "a")
            await other.drop()
            third = await th.connect("room", "a")
            await third.send("bye")
            with pytest.raises(WebSocketClosed) as closed:
                await third.receive()
            assert (closed.value.code, closed.value.reason) == (4000, "see you")
            await th.settle()  # the object has run all three close handlers
    assert sorted(closes) == [
        (1006, "WebSocket disconnected without sending Close frame.", False),
        (4000, "see you", True),  # the client echoed the object's close
        (4001, "done", True),
    ]


async def test_upgrade_rejected_and_fetch(autojump_clock: trio.abc.Clock) -> None:
    app, _ = room_app()
    async with open_test_host(app) as th:
        with pytest.raises(UpgradeRejected) as rejected:
            await th.connect("room", "a", "?refuse")
        assert rejected.value.status == 403
        assert rejected.value.body == b"no"
        response = await th.fetch("room", "a", method="POST")
        assert response.body == b"hi POST"


async def test_hibernated_object_answers_ping_and_auto_response_without_waking(
    autojump_clock: trio.abc.Clock,
) -> None:
    app, _ = room_app()
    async with open_test_host(app, idle_timeout=5) as th:
        ws = await th.connect("room", "p")
        await trio.sleep(6)
        assert th.statistics().live_objects == 0
        with th.assert_not_woken():
            await ws.ping(b"are you there")
            await ws.send("ping")
            assert await ws.receive() == "pong"
        assert th.statistics().auto_responses == 1
        await ws.send("wake up")
        assert await ws.receive() == "wake up"
        checker = th.assert_not_woken()
        checker.__enter__()
        await th.hibernate("room", "p")
        await ws.send("again")
        assert await ws.receive() == "again"
        with pytest.raises(AssertionError, match="1 object"):
            checker.__exit__(None, None, None)


class Ticker(DurableObject):
    """Sets an alarm every minute and counts the ticks in storage."""

    async def fetch(self, request: Request) -> Response:
        await self.ctx.storage.set_alarm(self.ctx.now() + 60)
        return Response(body="started")

    async def alarm(self, info: AlarmInfo) -> None:
        ticks = await self.ctx.storage.get("ticks")
        await self.ctx.storage.put("ticks", (ticks if isinstance(ticks, int) else 0) + 1)
        await self.ctx.storage.set_alarm(self.ctx.now() + 60)

    async def count(self) -> object:
        return await self.ctx.storage.get("ticks")


async def test_an_hour_of_alarms_runs_in_virtual_time(autojump_clock: trio.abc.Clock) -> None:
    started = time.perf_counter()
    async with open_test_host(App({"ticker": Ticker}), idle_timeout=1) as th:
        assert th.now() == EPOCH
        await th.fetch("ticker", "t")
        await trio.sleep(3600 + 1)
        ticks = await th.host.get_namespace("ticker").get_by_name("t").count()
        assert th.statistics().wakes >= 60  # hibernated between ticks (idle_timeout 1 s)
    assert ticks == 60
    # The issue asks for "an hour of virtual time in well under a second"; the bound
    # here is loose so that a loaded CI machine cannot make it flaky.
    assert time.perf_counter() - started < 5


async def test_run_alarm_fires_now(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_host(App({"ticker": Ticker})) as th:
        with pytest.raises(LookupError, match="no alarm"):
            await th.run_alarm("ticker", "t")
        await th.fetch("ticker", "t")
        await th.run_alarm("ticker", "t")
        assert trio.current_time() < 60  # did not wait for the minute
        assert await th.host.get_namespace("ticker").get_by_name("t").count() == 1


def test_strict_mode_catches_state_kept_in_memory(pytester: pytest.Pytester) -> None:
    """A deliberately buggy object passes normally and fails under --hibernate-strict."""
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_buggy="""
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
                self.count += 1
                ws.send(str(self.count))

        @pytest.fixture
        def hibernate_app():
            return App({"buggy": Buggy})

        async def test_counts(hibernate_host, autojump_clock):
            ws = await hibernate_host.connect("buggy", "b")
            for expected in ("1", "2", "3"):
                await ws.send("+1")
                assert await ws.receive() == expected
        """
    )
    normal = pytester.runpytest_subprocess()  # the plugin is registered by its entry point
    normal.assert_outcomes(passed=1)
    strict = pytester.runpytest_subprocess("--hibernate-strict")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*assert '1' == '2'*"])


async def test_test_host_strict_switch(autojump_clock: trio.abc.Clock) -> None:
    app, _ = room_app()
    async with open_test_host(app) as th:
        ws = await th.connect("room", "s")
        th.strict = True
        assert th.strict
        before = th.statistics().wakes
        for _ in range(3):
            await ws.send("x")
            assert await ws.receive() == "x"
        # The instance alive at the switch handles the first message, then every
        # message needs a new one.
        assert th.statistics().wakes - before == 2


def test_test_host_is_not_collected() -> None:
    assert TestHost.__test__ is False
