"""Stub calls between objects: re-entrant calls are refused at once; calls time out.

Every test runs on the autojump clock: a call that deadlocks shows up as the test's own
``fail_after`` expiring, in no real time.
"""

from __future__ import annotations

import math
from typing import Any, Final

import pytest
import trio
from helpers import accept_upgrade
from trio.testing import wait_all_tasks_blocked

from trio_hibernate import (
    App,
    DurableObject,
    Host,
    ObjectContext,
    ObjectId,
    ObjectStub,
    ReentrantCallError,
    Request,
    Response,
    Storage,
    WebSocket,
    open_host,
)
from trio_hibernate.testing import open_test_host

#: Bound on every test (virtual seconds).
WAIT: Final = 30.0


class Node(DurableObject):
    """Calls itself and its peers in the ways the tests need."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        self.env: dict[str, Any] = env

    def _stub(self, name: str | None = None) -> ObjectStub:
        return self.ctx.get_namespace("node").get_by_name(name or self.ctx.id.name or "")

    async def fetch(self, request: Request) -> Response:
        if request.websocket is None:
            return Response(body="fetched")
        return accept_upgrade(self.ctx, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        try:
            await self._stub().ping()
        except ReentrantCallError as exc:
            ws.send(f"refused: {exc}")

    async def ping(self) -> str:
        return "pong"

    async def slow(self, seconds: float) -> str:
        await trio.sleep(seconds)
        self.env["slow_done_at"] = trio.current_time()
        self.env["done"].set()
        return "slow"

    async def call_self(self) -> str:
        result: str = await self._stub().ping()
        return result

    async def fetch_self(self) -> int:
        return (await self._stub().fetch("/node/x")).status

    async def call_self_from_a_child_task(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stub().ping)

    async def via(self, peer: str) -> str:
        """A's turn calls B, whose turn calls A back."""
        result: str = await self._stub(peer).call_back(self.ctx.id.name)
        return result

    async def call_back(self, name: str) -> str:
        result: str = await self._stub(name).ping()
        return result

    async def ask(self, peer: str) -> str:
        """A -> B -> C, no cycle."""
        result: str = await self._stub(peer).call_back("third")
        return result

    async def in_background(self) -> str:
        async def call_own_stub() -> None:
            self.env["background"] = await self._stub().ping()
            self.env["done"].set()

        self.ctx.start_soon(call_own_stub)
        return "started"

    async def in_background_transaction(self) -> str:
        async def transaction(storage: Storage) -> None:
            await storage.put("k", 1)
            await self._stub().ping()

        async def run() -> None:
            try:
                await self.ctx.storage.transaction(transaction)
            except ReentrantCallError as exc:
                self.env["transaction"] = exc
            self.env["done"].set()

        self.ctx.start_soon(run)
        return "started"


def node_app() -> App:
    return App({"node": Node}, env={"done": trio.Event()})


def x_id() -> ObjectId:
    return ObjectId.from_name("node", "x")


async def test_an_object_calling_itself_in_a_turn_is_refused_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(WAIT):
        async with open_test_host(node_app()) as th:
            stub = th.host.get_namespace("node").get_by_name("x")
            with pytest.raises(ReentrantCallError) as info:
                await stub.call_self()
            assert info.value.chain == (("node", x_id()), ("node", x_id()))
            message = str(info.value)
            assert "ping() of node/x" in message
            assert "(node/x -> node/x)" in message
            with pytest.raises(ReentrantCallError, match=r"fetch\(\) of node/x"):
                await stub.fetch_self()
            with pytest.raises(ExceptionGroup) as group:
                await stub.call_self_from_a_child_task()
            assert group.group_contains(ReentrantCallError)
            assert await stub.ping() == "pong"  # the object carries on
            assert th.statistics().wakes == 1


async def test_a_socket_event_turn_calling_its_own_object_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(WAIT):
        async with open_test_host(node_app()) as th:
            ws = await th.connect("node", "x")
            await ws.send("go")
            reply = await ws.receive()
            assert isinstance(reply, str)
            assert reply.startswith("refused: re-entrant stub call refused: ping() of node/x")


async def test_a_cycle_between_objects_is_refused_in_the_object_closing_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(WAIT):
        async with open_test_host(node_app()) as th:
            a = th.host.get_namespace("node").get_by_name("a")
            with pytest.raises(ReentrantCallError) as info:
                await a.via("b")  # a's turn -> b.call_back -> a.ping: refused in b
            ids = [object_id.name for _, object_id in info.value.chain]
            assert ids == ["a", "b", "a"]
            assert "(node/a -> node/b -> node/a)" in str(info.value)
            # A chain without a cycle is fine, and so is calling b from outside.
            assert await a.ask("b") == "pong"
            assert await th.host.get_namespace("node").get_by_name("b").ping() == "pong"


async def test_a_background_task_may_call_its_own_object(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Not part of a turn: the call queues behind the current one, no deadlock."""
    app = node_app()
    with trio.fail_after(WAIT):
        async with open_test_host(app) as th:
            stub = th.host.get_namespace("node").get_by_name("x")
            assert await stub.in_background() == "started"
            await app.env["done"].wait()
    assert app.env["background"] == "pong"


async def test_a_background_transaction_calling_its_own_object_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A transaction holds the object like a turn: its self-call could never run."""
    app = node_app()
    with trio.fail_after(WAIT):
        async with open_test_host(app) as th:
            stub = th.host.get_namespace("node").get_by_name("x")
            assert await stub.in_background_transaction() == "started"
            await app.env["done"].wait()
    assert isinstance(app.env["transaction"], ReentrantCallError)


# -- timeouts ------------------------------------------------------------------------------


async def test_a_stub_call_times_out_after_call_timeout_and_stays_queued(
    autojump_clock: trio.abc.Clock,
) -> None:
    app = node_app()
    with trio.fail_after(1000):
        async with open_test_host(app) as th:  # the default call_timeout, 30 s
            stub = th.host.get_namespace("node").get_by_name("x")
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError) as info:
                await stub.slow(100)
            assert trio.current_time() - start == pytest.approx(30)
            assert str(info.value) == (
                "slow() of node/x got no answer within call_timeout=30 s; "
                "it stays queued and will still run"
            )
            # Not withdrawn: the slow turn runs to its end.
            await app.env["done"].wait()
            assert app.env["slow_done_at"] == pytest.approx(start + 100)
            assert await stub.ping() == "pong"


async def test_a_stub_fetch_times_out_too(autojump_clock: trio.abc.Clock) -> None:
    async def slow_call(stub: ObjectStub) -> None:
        with pytest.raises(trio.TooSlowError):
            await stub.slow(10)

    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            async with open_test_host(node_app(), call_timeout=5) as th:
                stub = th.host.get_namespace("node").get_by_name("x")
                nursery.start_soon(slow_call, stub)
                await wait_all_tasks_blocked()  # the object is in the slow turn
                with pytest.raises(trio.TooSlowError, match=r"fetch\(\) of node/x .*=5 s"):
                    await stub.fetch("/node/x")
                assert trio.current_time() == pytest.approx(5)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan])
async def test_call_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match=f"call_timeout must be positive.*got {bad}"):
        async with open_host(node_app(), call_timeout=bad):
            pass  # pragma: no cover


async def test_a_caller_that_gave_up_no_longer_counts_as_waiting(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A's call to a busy B is cancelled and A's turn ends; when B runs that call later
    and calls A back, A is idle: the call goes through (the chain was stale)."""
    seen: list[str] = []
    b_busy = trio.Event()
    b_called_back = trio.Event()

    class A(DurableObject):
        async def call_b(self) -> str:
            with trio.move_on_after(1):  # A stops waiting (cancelled), its turn ends
                await self.ctx.get_namespace("b").get_by_name("b").work()
                return "answered"
            return "gave up"

        async def ping(self) -> str:
            return "pong"

    class B(DurableObject):
        async def hold(self) -> None:
            b_busy.set()
            await trio.sleep(10)  # B is busy; A's call waits behind this turn

        async def work(self) -> None:
            try:
                seen.append(await self.ctx.get_namespace("a").get_by_name("a").ping())
            except ReentrantCallError as exc:
                seen.append(f"refused: {exc}")
            b_called_back.set()

    async def hold_b(host: Host) -> None:
        with pytest.raises(trio.TooSlowError):  # call_timeout: hold() runs on anyway
            await host.get_namespace("b").get_by_name("b").hold()

    async with open_host(App({"a": A, "b": B}), call_timeout=5) as host:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold_b, host)
                await b_busy.wait()
                assert await host.get_namespace("a").get_by_name("a").call_b() == "gave up"
            await b_called_back.wait()
    assert seen == ["pong"]
