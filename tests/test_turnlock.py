"""The turn lock (``_turnlock.py``): trio.Lock's semantics without its per-call costs."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from trio_hibernate._turnlock import TurnLock


async def test_held_by_one_task_and_handed_over_in_order() -> None:
    lock = TurnLock()
    order: list[str] = []

    async def take(name: str) -> None:
        async with lock:
            order.append(name)
            await trio.lowlevel.checkpoint()

    lock.acquire_nowait()
    assert lock.locked()
    with pytest.raises(trio.WouldBlock):
        lock.acquire_nowait()
    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(take, name)
            await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            lock.acquire_nowait()  # others wait: no barging in, even once released
        lock.release()
    assert order == ["a", "b", "c"]
    assert not lock.locked()


async def test_only_its_holder_releases_it() -> None:
    lock = TurnLock()
    with pytest.raises(RuntimeError, match="does not hold it"):
        lock.release()
    await lock.acquire()

    async def other() -> None:
        with pytest.raises(RuntimeError, match="does not hold it"):
            lock.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
    lock.release()


async def test_a_cancelled_waiter_leaves_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    lock = TurnLock()
    lock.acquire_nowait()
    with trio.move_on_after(1) as waited:
        await lock.acquire()
    assert waited.cancelled_caught
    lock.release()
    assert not lock.locked()
    lock.acquire_nowait()  # nobody left waiting
    lock.release()


async def test_acquire_is_a_checkpoint() -> None:
    lock = TurnLock()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await lock.acquire()
    assert not lock.locked()
    with trio.testing.assert_checkpoints():
        await lock.acquire()
    lock.release()
