"""The supervisor's parts: the containment helper, the idle reaper, how a supervisor starts.

Containment is checked twice: directly (what it catches, what it lets through), and
through a host for each kind of application code the runtime runs (constructor, fetch,
each WebSocket handler, a ``ctx.start_soon`` task, the alarm), which must be logged
exactly once, with the object's namespace and id, and leave the host serving.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

import pytest
import trio
from helpers import settle
from trio.testing import MockClock

from trio_hibernate import (
    AlarmInfo,
    App,
    AppContext,
    DurableObject,
    Namespace,
    ObjectContext,
    ObjectId,
    Request,
    Response,
    WebSocket,
)
from trio_hibernate._containment import Containment, run_app_hook
from trio_hibernate._core.events import AlarmEvent
from trio_hibernate._host import runtime_of
from trio_hibernate._reaper import IdleReaper
from trio_hibernate._supervisor import Supervisor
from trio_hibernate.testing import TestHost, open_test_host

#: Bound on every wait (virtual seconds on the autojump clock).
WAIT: Final = 30.0

log = logging.getLogger("trio_hibernate.test_supervisor")


class Boom(Exception):
    """What the application code in these tests raises."""


def crashes(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The records that carry an exception (one per contained crash)."""
    return [record for record in caplog.records if record.exc_info is not None]


# -- Containment, directly -------------------------------------------------------------------


def test_an_exception_is_logged_once_with_its_traceback_and_contained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    after = False
    with Containment(log, "%s of %s raised; carrying on", "hook", "ns"):
        raise Boom("on purpose")
    after = True  # the with statement ended there; the code after it runs
    assert after
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "hook of ns raised; carrying on"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], Boom)
    assert record.exc_info[2] is not None  # with the traceback


def test_an_exception_group_of_exceptions_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    with Containment(log, "raised"):
        raise ExceptionGroup("several", [Boom("a"), Boom("b")])
    [record] = crashes(caplog)
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ExceptionGroup)


@pytest.mark.parametrize(
    "error",
    [
        KeyboardInterrupt(),
        SystemExit(3),
        BaseExceptionGroup("mixed", [KeyboardInterrupt(), Boom()]),
    ],
    ids=["KeyboardInterrupt", "SystemExit", "BaseExceptionGroup"],
)
def test_base_exceptions_pass_through_unchanged(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(type(error)) as raised:
        with Containment(log, "raised"):
            raise error
    assert raised.value is error
    assert caplog.records == []


async def test_a_cancellation_passes_through(caplog: pytest.LogCaptureFixture) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        with Containment(log, "raised"):
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert caplog.records == []


async def test_one_containment_serves_several_tasks_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shared = Containment(log, "task raised")
    entered = 0
    both_in = trio.Event()

    async def crash_once_both_are_in() -> None:
        nonlocal entered
        with shared:
            entered += 1
            if entered == 2:
                both_in.set()
            await both_in.wait()
            raise Boom

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_once_both_are_in)
            nursery.start_soon(crash_once_both_are_in)
    assert [record.getMessage() for record in crashes(caplog)] == ["task raised"] * 2


async def _hook_raises(request: Request) -> Response | None:
    raise Boom("hook")


async def _hook_returns_text(request: Request) -> Response | None:
    return "not a response"  # type: ignore[return-value]


async def _hook_passes(request: Request) -> Response | None:
    return None


async def _hook_with_context(request: Request, ctx: AppContext) -> Response | None:
    return Response(body=f"env={ctx.env}")


class _Bindings:
    env = "bound"
    wall_clock = staticmethod(lambda: 0.0)

    def get_namespace(self, name: str) -> Namespace:
        raise KeyError(name)


@pytest.mark.parametrize(
    ("what", "hook", "status", "logged"),
    [
        ("App.fetch", _hook_raises, 500, "App.fetch raised for GET /x; answering 500"),
        (
            "App.authorize",
            _hook_returns_text,
            500,
            "App.authorize returned 'not a response', not a Response, a Request or None",
        ),
        ("App.fetch", _hook_passes, 500, "App.fetch returned None, not a Response; answering"),
        ("App.authorize", _hook_passes, None, None),
        ("App.fetch", _hook_with_context, 200, None),
    ],
)
async def test_run_app_hook(
    what: str,
    hook: Callable[..., Awaitable[Response | None]],
    status: int | None,
    logged: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = Request(method="GET", url="/x")
    ctx = AppContext(_Bindings())
    response = await run_app_hook(what, hook, request, ctx, may_pass=what == "App.authorize")
    assert not isinstance(response, Request)
    assert (None if response is None else response.status) == status
    if hook is _hook_with_context:
        assert response is not None
        assert response.body == b"env=bound"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == (logged is not None)
    if logged is not None:
        assert messages[0].startswith(logged)


# -- Containment, through a host -------------------------------------------------------------


class Crashy(DurableObject):
    """Raises from whichever piece of application code a test asks for."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        if ctx.id.name == "constructor":
            raise Boom("constructor")

    async def fetch(self, request: Request) -> Response:
        ws = request.websocket
        if ws is not None:
            self.ctx.accept_websocket(ws)
            return Response(status=101, websocket=ws)
        what = request.path.rsplit("/", 1)[1]
        if what == "fetch":
            raise Boom("fetch")
        if what == "start_soon":
            self.ctx.start_soon(self._crash)
        elif what == "alarm":
            await self.ctx.storage.set_alarm(self.ctx.now())
        return Response(body="fine")

    async def _crash(self) -> None:
        await trio.lowlevel.checkpoint()
        raise Boom("start_soon")

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if message == "raise":
            raise Boom("websocket_message")
        ws.send(message)

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        if self.ctx.id.name == "websocket_close":
            raise Boom("websocket_close")

    async def alarm(self, info: AlarmInfo) -> None:
        if not info.is_retry:
            raise Boom("alarm")
        self.env["retried"].set()  # the retry was scheduled and ran


async def _crash_constructor(th: TestHost, env: dict[str, Any]) -> None:
    assert (await th.fetch("crashy", "constructor", "/x")).status == 500


async def _crash_fetch(th: TestHost, env: dict[str, Any]) -> None:
    assert (await th.fetch("crashy", "fetch", "/fetch")).status == 500


async def _crash_message(th: TestHost, env: dict[str, Any]) -> None:
    ws = await th.connect("crashy", "websocket_message")
    await ws.send("raise")
    await ws.send("still open?")
    assert await ws.receive() == "still open?"


async def _crash_close(th: TestHost, env: dict[str, Any]) -> None:
    ws = await th.connect("crashy", "websocket_close")
    await ws.drop()
    await settle()


async def _crash_background(th: TestHost, env: dict[str, Any]) -> None:
    assert (await th.fetch("crashy", "start_soon", "/start_soon")).status == 200
    await settle()


async def _crash_alarm(th: TestHost, env: dict[str, Any]) -> None:
    assert (await th.fetch("crashy", "alarm", "/alarm")).status == 200
    await env["retried"].wait()  # 2 s later on the virtual clock


@pytest.mark.parametrize(
    ("name", "crash", "message"),
    [
        ("constructor", _crash_constructor, "constructor of crashy:{} raised; closing"),
        ("fetch", _crash_fetch, "fetch() of crashy:{} raised"),
        ("websocket_message", _crash_message, "websocket_message handler of crashy:{} raised"),
        ("websocket_close", _crash_close, "websocket_close handler of crashy:{} raised"),
        ("start_soon", _crash_background, "a task started by crashy:{} with ctx.start_soon"),
        ("alarm", _crash_alarm, "alarm() of crashy:{} failed; retry 1 in 2 s"),
    ],
)
async def test_each_kind_of_crash_is_logged_once_with_the_object_and_contained(
    name: str,
    crash: Callable[[TestHost, dict[str, Any]], Awaitable[None]],
    message: str,
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env: dict[str, Any] = {"retried": trio.Event()}
    object_id = ObjectId.from_name("crashy", name)
    with trio.fail_after(WAIT):
        async with open_test_host(App({"crashy": Crashy}, env=env)) as th:
            await crash(th, env)
            # Contained: the host goes on serving, this object included (unless its
            # constructor is what fails).
            assert (await th.fetch("crashy", "another", "/x")).body == b"fine"
            if name != "constructor":
                assert (await th.fetch("crashy", name, "/x")).body == b"fine"
            # Counted by hook for /_metrics (the parameter is the hook's name).
            assert th.host.statistics().handler_errors == {name: 1}
    [record] = crashes(caplog)
    assert record.name == "trio_hibernate.object"
    # Named by its namespace and name (not the 64-hex id), the hook by its method name.
    assert record.getMessage().startswith(message.format(name))
    assert record.__dict__["object"] == f"crashy:{name}"
    assert record.__dict__["namespace"] == "crashy"
    assert record.__dict__["object_id"] == object_id.hex
    assert record.exc_info is not None
    assert repr(record.exc_info[1]) == f"Boom('{name}')"


# -- the supervisor's start ------------------------------------------------------------------


async def test_nursery_start_returns_the_activation(autojump_clock: MockClock) -> None:
    """``run`` reports its activation through ``task_status`` once it is the entry's."""
    done = trio.Event()
    with trio.fail_after(WAIT):
        async with (
            open_test_host(App({"crashy": Crashy}, env={})) as th,
            trio.open_nursery() as nursery,
        ):
            runtime = runtime_of(th.host)
            entry = runtime.entry_for("crashy", ObjectId.from_name("crashy", "x"))
            # No alarm is stored, so the alarm's turn finds it stale and ends at once.
            assert entry.core.enqueue(AlarmEvent(math.inf, 0, done.set))  # a wake
            activation = await nursery.start(Supervisor(runtime, entry).run)
            assert activation is entry.activation
            assert activation is not None
            await done.wait()
            activation.request_stop()
            await activation.stopped.wait()
            assert entry.activation is None


# -- the idle reaper -------------------------------------------------------------------------


class Idle:
    """An activation, as the reaper sees it: records when it was asked to stop."""

    def __init__(self) -> None:
        self.stopped_at: float | None = None
        self.stopped = trio.Event()

    def request_stop(self) -> None:
        assert self.stopped_at is None, "asked to stop twice"
        self.stopped_at = trio.current_time()
        self.stopped.set()


async def test_the_reaper_stops_activations_idle_for_the_timeout_in_order(
    autojump_clock: MockClock,
) -> None:
    reaper = IdleReaper(10.0)
    first, second = Idle(), Idle()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reaper.run)
            start = trio.current_time()
            reaper.idle_from(first)
            await trio.sleep(3)
            reaper.idle_from(second)
            await second.stopped.wait()
            nursery.cancel_scope.cancel()
    assert first.stopped_at == start + 10
    assert second.stopped_at == start + 13
    assert reaper.idle_count == 0


async def test_busy_again_keeps_an_activation_and_idle_from_restarts_its_timer(
    autojump_clock: MockClock,
) -> None:
    reaper = IdleReaper(10.0)
    activation = Idle()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reaper.run)
            start = trio.current_time()
            reaper.idle_from(activation)
            await trio.sleep(9)
            reaper.busy_again(activation)  # an event arrived just in time
            reaper.busy_again(activation)  # harmless when it is not idle
            await trio.sleep(5)
            assert activation.stopped_at is None
            reaper.idle_from(activation)
            await activation.stopped.wait()
            nursery.cancel_scope.cancel()
    assert activation.stopped_at == start + 14 + 10


async def test_the_reaper_waits_for_the_first_idle_activation(autojump_clock: MockClock) -> None:
    """With nothing idle the reaper sleeps until told (no timer, no polling); told
    again after it emptied, it wakes up again."""
    reaper = IdleReaper(1.0)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reaper.run)
            await trio.sleep(10)
            for _ in range(2):
                activation = Idle()
                told = trio.current_time()
                reaper.idle_from(activation)
                await activation.stopped.wait()
                assert activation.stopped_at == told + 1
            nursery.cancel_scope.cancel()
