"""The public async API keeps Trio's promise: every call is a checkpoint.

A checkpoint both checks for cancellation and lets other tasks run
(``trio.testing.assert_checkpoints`` checks both). Trio's convention is that every async
function is one, also when it has nothing to wait for; the docstrings here say so for
``Host.hibernate`` ("A checkpoint."), ``Storage`` ("Every method is a checkpoint") and
``TestWebSocket`` ("Every method is a checkpoint"). The fast paths are where a missing
checkpoint hides: hibernating an object that is not in memory, reading an empty batch,
a transaction that does nothing, a message the client already has in its buffer.

Storage is used from object code, so the checks of ``Storage`` run in the object's
turn (or in a ``ctx.start_soon`` task) and a failed check propagates to the test
through the stub call that ran it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import trio
from helpers import WAIT_SECONDS, Echo, accept_upgrade
from trio.testing import MockClock, assert_checkpoints, wait_all_tasks_blocked

from trio_hibernate import (
    AlarmInfo,
    App,
    DurableObject,
    ObjectContext,
    Request,
    Response,
    Storage,
    WebSocket,
)
from trio_hibernate.testing import TestHost, WebSocketClosed, open_test_host

#: Bound on a whole test (virtual seconds).
TEST_SECONDS: Final = 60.0


class Checked(DurableObject):
    """Runs the checkpoint checks of ``Storage`` in its turns; answers WebSockets."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        self.env: dict[str, Any] = env

    async def fetch(self, request: Request) -> Response:
        if request.websocket is None:
            return Response(body="fetched")
        return accept_upgrade(self.ctx, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if message == "two":
            ws.send("one")
            ws.send("two")
        elif message == "bye":
            ws.close(4000, "bye")
        else:
            ws.send(message)

    async def alarm(self, info: AlarmInfo) -> None:
        self.env["alarms"] += 1

    async def ping(self) -> str:
        return "pong"

    async def fail(self) -> None:
        raise ValueError("failing on purpose")

    async def arm(self) -> None:
        await self.ctx.storage.set_alarm(self.ctx.now() + 3600)

    async def storage_in_a_turn(self) -> None:
        await check_every_storage_method(self.ctx.storage)

    async def storage_in_a_task(self) -> None:
        """The same checks from a ``ctx.start_soon`` task: writes commit on their own."""
        done = trio.Event()
        failure: list[BaseException] = []

        async def task() -> None:
            try:
                await check_every_storage_method(self.ctx.storage)
            except Exception as exc:  # reported to the test through env
                failure.append(exc)
            finally:
                done.set()

        self.ctx.start_soon(task)
        self.env["task_done"] = done
        self.env["task_failure"] = failure


async def checkpoints(call: Callable[[], Awaitable[object]]) -> Any:
    """``await call()`` under ``assert_checkpoints``; its result."""
    with assert_checkpoints():
        return await call()


async def check_every_storage_method(storage: Storage) -> None:
    """Every public method of ``storage``, with the fast paths: empty batches, absent
    keys, a transaction that does nothing, ``sync()`` with nothing to write."""
    await checkpoints(storage.sync)  # nothing written yet
    await checkpoints(lambda: storage.put("k", 1))
    await checkpoints(lambda: storage.put({"a": 1, "b": 2}))
    await checkpoints(lambda: storage.put({}))
    assert await checkpoints(lambda: storage.get("k")) == 1
    assert await checkpoints(lambda: storage.get("absent")) is None
    assert await checkpoints(lambda: storage.get(["a", "absent"])) == {"a": 1}
    assert await checkpoints(lambda: storage.get([])) == {}
    assert list(await checkpoints(storage.list)) == ["a", "b", "k"]
    assert await checkpoints(lambda: storage.list(prefix="none")) == {}
    assert await checkpoints(lambda: storage.delete("a")) is True
    assert await checkpoints(lambda: storage.delete("a")) is False
    assert await checkpoints(lambda: storage.delete(["b", "absent"])) == 1
    assert await checkpoints(lambda: storage.delete([])) == 0
    await checkpoints(storage.sync)

    async def nothing(txn: Storage) -> str:
        return "done"

    async def nested(txn: Storage) -> str:
        await txn.put("in", "txn")
        result: str = await checkpoints(lambda: txn.transaction(nothing))
        return result

    assert await checkpoints(lambda: storage.transaction(nothing)) == "done"
    assert await checkpoints(lambda: storage.transaction(nested)) == "done"
    assert await checkpoints(storage.get_alarm) is None
    await checkpoints(lambda: storage.set_alarm(4_000_000_000.0))
    assert await checkpoints(storage.get_alarm) is not None
    await checkpoints(storage.delete_alarm)
    await checkpoints(storage.delete_alarm)  # none set
    await checkpoints(storage.delete_all)
    await checkpoints(storage.delete_all)  # nothing left


def checked_app() -> App:
    return App({"checked": Checked, "echo": Echo}, env={"alarms": 0})


@asynccontextmanager
async def checked_host(data_dir: Path | None = None) -> AsyncIterator[TestHost]:
    """A test host for :func:`checked_app`, for a test body of :data:`TEST_SECONDS`."""
    with trio.fail_after(TEST_SECONDS):
        async with open_test_host(
            checked_app(), data_dir=None if data_dir is None else str(data_dir)
        ) as th:
            yield th


# -- Host -------------------------------------------------------------------------------------


async def test_hibernate_is_a_checkpoint_on_every_path(autojump_clock: MockClock) -> None:
    async with checked_host() as th:
        host = th.host
        with assert_checkpoints():
            assert await host.hibernate("checked", "never-used") is False  # not in memory
        assert await host.get_namespace("checked").get_by_name("a").ping() == "pong"
        with assert_checkpoints():
            assert await host.hibernate("checked", "a") is True  # live
        with assert_checkpoints():
            assert await host.hibernate("checked", "a") is False  # hibernated already


async def test_replace_app_is_a_checkpoint_with_and_without_objects(
    autojump_clock: MockClock,
) -> None:
    async with checked_host() as th:
        with assert_checkpoints():
            await th.host.replace_app(checked_app())  # nothing in memory
        assert await th.host.get_namespace("checked").get_by_name("a").ping() == "pong"
        with assert_checkpoints():
            await th.host.replace_app(checked_app())  # one live object to stop
        assert th.statistics().live_objects == 0


# -- stubs ------------------------------------------------------------------------------------


async def test_stub_call_and_fetch_are_checkpoints(autojump_clock: MockClock) -> None:
    async with checked_host() as th:
        stub = th.host.get_namespace("checked").get_by_name("a")
        with assert_checkpoints():
            assert await stub.call("ping") == "pong"  # wakes the object
        with assert_checkpoints():
            assert await stub.ping() == "pong"  # live already
        with assert_checkpoints():
            response = await stub.fetch("/checked/a")
        assert response.body == b"fetched"
        with assert_checkpoints():
            response = await stub.fetch(Request(method="POST", url="/checked/a"))
        assert response.status == 200
        # A method that raises: the call still waited for the object's turn.
        with assert_checkpoints(), pytest.raises(ValueError, match="on purpose"):
            await stub.fail()


# -- Storage ----------------------------------------------------------------------------------


async def test_every_storage_method_is_a_checkpoint_in_a_turn(
    autojump_clock: MockClock,
) -> None:
    async with checked_host() as th:
        await th.host.get_namespace("checked").get_by_name("a").storage_in_a_turn()


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
async def test_every_storage_method_is_a_checkpoint_in_a_background_task(
    clock: MockClock, tmp_path: Path, durable: bool
) -> None:
    async with checked_host(tmp_path if durable else None) as th:
        await th.host.get_namespace("checked").get_by_name("a").storage_in_a_task()
        env = th.host.app.env
        with trio.fail_after(WAIT_SECONDS):
            await env["task_done"].wait()
        assert env["task_failure"] == []


async def test_every_storage_method_is_a_checkpoint_on_a_durable_host(
    clock: MockClock, tmp_path: Path
) -> None:
    async with checked_host(tmp_path) as th:
        await th.host.get_namespace("checked").get_by_name("a").storage_in_a_turn()


# -- TestHost ---------------------------------------------------------------------------------


async def test_test_host_helpers_are_checkpoints(autojump_clock: MockClock) -> None:
    async with checked_host() as th:
        with assert_checkpoints():
            ws = await th.connect("checked", "a")
        with assert_checkpoints():
            response = await th.fetch("checked", "a", method="POST", body="x")
        assert response.body == b"fetched"
        with assert_checkpoints():
            assert await th.hibernate("checked", "a") is True
        with assert_checkpoints():
            assert await th.hibernate("checked", "a") is False  # fast path
        await th.host.get_namespace("checked").get_by_name("a").arm()
        with assert_checkpoints():
            await th.run_alarm("checked", "a")
        assert th.host.app.env["alarms"] == 1
        await ws.aclose()


# -- TestWebSocket ----------------------------------------------------------------------------


async def test_test_websocket_send_receive_ping_are_checkpoints(
    autojump_clock: MockClock,
) -> None:
    async with checked_host() as th:
        ws = await th.connect("checked", "a")
        with assert_checkpoints():
            await ws.send("hello")
        with assert_checkpoints():
            assert await ws.receive() == "hello"
        with assert_checkpoints():
            await ws.send(b"bytes")
        with assert_checkpoints():
            assert await ws.receive() == b"bytes"
        with assert_checkpoints():
            await ws.ping(b"are you there")
        await ws.aclose()


async def test_test_websocket_receive_of_a_buffered_message_is_a_checkpoint(
    autojump_clock: MockClock,
) -> None:
    """The object sends two messages in one turn; once both are in the client's socket,
    the first receive() reads both and the second finds its message in the buffer."""
    async with checked_host() as th:
        ws = await th.connect("checked", "a")
        await ws.send("two")
        await wait_all_tasks_blocked()
        assert await ws.receive() == "one"
        with assert_checkpoints():
            assert await ws.receive() == "two"
        await ws.aclose()


async def test_test_websocket_close_drop_and_aclose_are_checkpoints(
    autojump_clock: MockClock,
) -> None:
    async with checked_host() as th:
        first = await th.connect("checked", "a")
        with assert_checkpoints():
            assert await first.close(4001, "done") == (4001, "done")
        with assert_checkpoints():
            await first.aclose()  # closed already

        second = await th.connect("checked", "a")
        await second.send("bye")
        with pytest.raises(WebSocketClosed):
            await second.receive()  # the server's Close, answered
        with assert_checkpoints():
            assert await second.close() == (4000, "bye")  # nothing left to send

        third = await th.connect("checked", "a")
        with assert_checkpoints():
            await third.aclose()  # open: closes cleanly

        fourth = await th.connect("checked", "a")
        with assert_checkpoints():
            await fourth.drop()
