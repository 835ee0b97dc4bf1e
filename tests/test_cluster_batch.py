"""The cross-object commit batcher (``_cluster/batch.py``): threads take turns as the
leader; every commit gets its own outcome, in a batch with those that waited."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest

from trio_hibernate._cluster.batch import CommitBatcher


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (in this thread, at most ``seconds``) until ``condition()`` holds: the
    batcher's threads tell no one when they queue."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        time.sleep(0.001)


def test_commits_that_wait_for_a_batch_share_the_next_one() -> None:
    release = threading.Event()
    batches: list[list[int]] = []

    def run(items: Sequence[int]) -> list[bool]:
        batches.append(list(items))
        if len(batches) == 1:
            assert release.wait(10)  # the first batch runs while the others queue
        return [item % 2 == 0 for item in items]

    batcher: CommitBatcher[int] = CommitBatcher(run)
    results: dict[int, bool] = {}

    def commit(item: int) -> None:
        results[item] = batcher.commit(item)

    first = threading.Thread(target=commit, args=(0,))
    first.start()
    wait_until(lambda: bool(batches))  # the first commit leads its own batch
    others = [threading.Thread(target=commit, args=(i,)) for i in range(1, 9)]
    for thread in others:
        thread.start()
    while len(batcher._queue) < 8:
        threading.Event().wait(0.001)
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    assert batches == [[0], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert results == {i: i % 2 == 0 for i in range(9)}
    assert (batcher.batches, batcher.committed) == (2, 9)


def test_a_failed_batch_fails_each_of_its_commits() -> None:
    def run(items: Sequence[int]) -> list[bool]:
        raise OSError("connection lost")

    batcher: CommitBatcher[int] = CommitBatcher(run)
    with pytest.raises(OSError, match="connection lost"):
        batcher.commit(1)
    with pytest.raises(OSError, match="connection lost"):
        batcher.commit(2)  # the lead was handed back: the next commit leads again
