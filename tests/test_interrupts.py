"""KeyboardInterrupt and errors leave the owning context managers bare (house rule 5).

``open_host``, ``open_server`` and ``open_test_host`` run the caller's code as the body of
a nursery of theirs; what comes out must be what the caller would catch with a plain
``except``: never a one-element ``BaseExceptionGroup``. The tests that deliver a real
Ctrl-C run their own ``trio.run`` (as a program would), so that the interrupt reaches
their main task and not pytest-trio's.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio
from helpers import WAIT_SECONDS, QuotingEcho, ask, closed_by_server, open_client, send
from trio.testing import MockClock

from trio_hibernate import (
    App,
    Server,
    WebSocket,
    open_host,
    open_server,
)
from trio_hibernate._groups import open_owned_nursery
from trio_hibernate.testing import open_test_host


class Interruptible(QuotingEcho):
    """Echoes; ``interrupt`` raises KeyboardInterrupt in the handler (a Ctrl-C landing
    while object code runs)."""

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if message == "interrupt":
            raise KeyboardInterrupt
        await super().websocket_message(ws, message)


APP = App({"echo": Interruptible})


def run(main: Callable[[], Awaitable[Any]]) -> None:
    """``trio.run`` as a program does, on the autojump clock."""
    trio.run(main, clock=MockClock(autojump_threshold=0.05))


# -- open_owned_nursery, the rules one by one --------------------------------------------


async def leave(body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    """Run ``body`` in an ``open_owned_nursery`` that also runs a task sleeping forever."""
    with trio.fail_after(WAIT_SECONDS):
        async with open_owned_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            await body(nursery)


async def test_the_body_error_comes_out_as_itself_with_its_cause() -> None:
    cause = OSError("the cause")

    async def body(nursery: trio.Nursery) -> None:
        raise KeyError("body") from cause

    with pytest.raises(KeyError) as raised:
        await leave(body)
    assert raised.value.__cause__ is cause
    assert raised.value.__context__ is None  # not the group it travelled in


async def test_a_group_raised_by_the_body_is_not_wrapped_again() -> None:
    async def body(nursery: trio.Nursery) -> None:
        async with trio.open_nursery():
            raise KeyError("in the caller's own nursery")

    with pytest.raises(ExceptionGroup) as raised:
        await leave(body)
    assert [type(error) for error in raised.value.exceptions] == [KeyError]


async def test_keyboard_interrupt_in_a_nested_nursery_comes_out_bare() -> None:
    async def body(nursery: trio.Nursery) -> None:
        async with trio.open_nursery():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await leave(body)


async def fail() -> None:
    raise KeyError("a task's")


async def test_one_error_of_a_task_comes_out_bare() -> None:
    async def body(nursery: trio.Nursery) -> None:
        nursery.start_soon(fail)
        await trio.sleep_forever()

    with pytest.raises(KeyError, match="a task's"):
        await leave(body)


async def test_two_errors_stay_a_group() -> None:
    async def body(nursery: trio.Nursery) -> None:
        nursery.start_soon(fail)
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("the body's")  # two errors, on purpose

    with pytest.raises(ExceptionGroup) as raised:
        await leave(body)
    names = sorted(type(error).__name__ for error in raised.value.exceptions)
    assert names == ["KeyError", "ValueError"]


async def test_cancellation_comes_out_bare() -> None:
    async def body(nursery: trio.Nursery) -> None:
        await trio.sleep_forever()

    with trio.move_on_after(1) as scope:
        await leave(body)
    assert scope.cancelled_caught


# -- the owning context managers --------------------------------------------------------


OPENERS: dict[str, Callable[[App], AbstractAsyncContextManager[object]]] = {
    "open_host": open_host,
    "open_server": open_server,
    "open_test_host": open_test_host,
}


@pytest.mark.parametrize("manager", sorted(OPENERS))
def test_keyboard_interrupt_in_a_nested_nursery_leaves_bare(manager: str) -> None:
    async def main() -> None:
        with trio.fail_after(WAIT_SECONDS):
            async with OPENERS[manager](APP), trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(main)


def test_ctrl_c_while_serving_leaves_open_server_bare_and_clients_get_1001() -> None:
    closed: list[int] = []

    async def client(server: Server, task_status: trio.TaskStatus[None]) -> None:
        async with open_client(server, "/echo/a") as ws:
            assert await ask(ws, "hi") == "echo 'hi'"
            task_status.started()
            code, _ = await closed_by_server(ws)
            closed.append(code)

    async def main() -> None:
        with trio.fail_after(WAIT_SECONDS):
            async with trio.open_nursery() as clients:  # outside: they see the shutdown
                try:
                    async with open_server(APP) as server:
                        await clients.start(client, server)
                        # A real SIGINT, from another thread: it reaches the main task
                        # while it waits, as a Ctrl-C does.
                        await trio.to_thread.run_sync(os.kill, os.getpid(), signal.SIGINT)
                        await trio.sleep_forever()
                except KeyboardInterrupt:  # a plain except: a group would not match
                    closed.append(0)

    run(main)
    assert sorted(closed) == [0, 1001]


def test_keyboard_interrupt_in_an_object_task_leaves_open_server_bare() -> None:
    async def main() -> None:
        with trio.fail_after(WAIT_SECONDS):
            async with (
                open_server(APP) as server,
                open_client(server, "/echo/a") as ws,
            ):
                await send(ws, "interrupt")
                await trio.sleep_forever()

    with pytest.raises(KeyboardInterrupt):
        run(main)
