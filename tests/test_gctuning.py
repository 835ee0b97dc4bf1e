"""The cycle-collector policy of ``serve`` (``_gctuning.py``), and the property it rests
on: the runtime makes no reference cycles, so frozen objects are freed by reference
counting alone."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from helpers import accept_upgrade
from trio.testing import MockClock

from trio_hibernate import App, DurableObject, Request, Response, WebSocket
from trio_hibernate._gctuning import tune_gc
from trio_hibernate.testing import open_test_host


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generation of every collection that runs during the test."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


async def test_the_policy_freezes_and_runs_full_collections_on_its_schedule(
    autojump_clock: MockClock, collections: list[int]
) -> None:
    before = gc.get_threshold()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: tune_gc(freeze_every=10, full_every=60, task_status=task_status)
        )
        assert gc.get_freeze_count() > 0  # start-up: everything frozen
        assert gc.get_threshold()[:2] == before[:2]
        assert gc.get_threshold()[2] > 10**9  # no automatic full collection
        collections.clear()
        await trio.sleep(55)  # five freezes, no full collection
        assert collections
        assert 2 not in collections
        await trio.sleep(10)  # the full collection, after 60 s
        assert collections.count(2) == 1
        nursery.cancel_scope.cancel()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_the_intervals_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        await tune_gc(freeze_every=0)
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        await tune_gc(full_every=float("nan"))


class Room(DurableObject):
    async def fetch(self, request: Request) -> Response:
        return accept_upgrade(self.ctx, request, ["member"])

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        await self.ctx.storage.put("last", message)
        ws.serialize_attachment({"last": message})
        self.ctx.broadcast(message)

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        ws.close(code, reason)


def server_garbage() -> Counter[str]:
    """What the collector finds unreachable now, of the runtime's own types (the test
    client's objects, in ``trio_hibernate.testing``, are left out)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = Counter(
            f"{type(thing).__module__}.{type(thing).__qualname__}"
            for thing in gc.garbage
            if type(thing).__module__.startswith("trio_hibernate")
            and not type(thing).__module__.startswith("trio_hibernate.testing")
        )
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    return found


async def test_the_runtime_makes_no_reference_cycles(autojump_clock: MockClock) -> None:
    """Connect, message (storage, attachment, broadcast), hibernate, wake, close: with the
    collector off, nothing of the runtime's is left for it to find."""
    app = App({"room": Room})
    async with open_test_host(app, idle_timeout=5) as th:
        warm = await th.connect("room", "warm")  # the host's own start-up objects
        await warm.send("hello", settle=True)
        await warm.close()
        gc.collect()
        gc.disable()
        try:
            for round_ in range(3):
                sockets = [await th.connect("room", f"r{round_}") for _ in range(5)]
                for ws in sockets:
                    await ws.send(f"m{round_}")
                for ws in sockets:
                    for _ in sockets:
                        await ws.receive()
                await trio.sleep(6)  # hibernates; the next message wakes it
                await sockets[0].send("again", settle=True)
                for ws in sockets:
                    await ws.close()
                await th.settle()
            garbage = server_garbage()
        finally:
            gc.enable()
    assert garbage == Counter(), dict(garbage)
