"""The one-shot answer of an event: _core.events.Reply and its Trio side, OneShot."""

from __future__ import annotations

import outcome
import pytest
import trio
import trio.testing

from trio_hibernate._core.events import Reply
from trio_hibernate._oneshot import OneShot


def test_a_reply_is_answered_exactly_once() -> None:
    got: list[outcome.Outcome[int]] = []
    reply: Reply[int] = Reply(got.append)
    reply.send(1)
    assert reply.settled
    with pytest.raises(RuntimeError, match="answered twice"):
        reply.fail(ValueError("late"))
    assert got == [outcome.Value(1)]


async def test_the_waiter_gets_the_answer() -> None:
    answer: OneShot[str] = OneShot()

    async def answer_later() -> None:
        await trio.testing.wait_all_tasks_blocked()
        answer.reply.send("hi")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_later)
        assert (await answer.wait()).unwrap() == "hi"
    failed: OneShot[str] = OneShot()
    failed.reply.fail(KeyError("k"))
    with pytest.raises(KeyError):
        (await failed.wait()).unwrap()


async def test_an_answer_after_the_waiter_gave_up_is_late() -> None:
    late: list[outcome.Outcome[str]] = []
    answer: OneShot[str] = OneShot(on_late=late.append)
    with trio.move_on_after(1) as scope:
        await answer.wait()
    assert scope.cancelled_caught
    answer.reply.send("too late")
    assert late == [outcome.Value("too late")]


async def test_an_answer_that_races_the_cancellation_is_late_not_lost() -> None:
    """Answered, then cancelled at the checkpoint of ``wait``: the answer went nowhere
    before (a socket accepted as its request timed out stayed registered)."""
    late: list[outcome.Outcome[str]] = []
    answer: OneShot[str] = OneShot(on_late=late.append)
    answer.reply.send("accepted")
    with trio.CancelScope() as scope:
        scope.cancel()
        await answer.wait()
    assert scope.cancelled_caught
    assert late == [outcome.Value("accepted")]


async def test_waiting_is_a_checkpoint() -> None:
    answer: OneShot[int] = OneShot()
    answer.reply.send(3)
    with trio.testing.assert_checkpoints():
        assert (await answer.wait()).unwrap() == 3
