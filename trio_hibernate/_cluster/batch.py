"""Group commit across objects: the fenced commits of several objects in one
PostgreSQL transaction, so that they share one ``fsync`` of PostgreSQL's log.

Each object's flush already runs in a worker thread of its own (``_storage/commit.py``)
and waits there for its commit. Here those threads take turns as the *leader*: the first
to arrive commits everything queued so far (its own commit and every one that came
while the previous batch ran) in one transaction, then hands the lead to the first
commit that arrived meanwhile, if any, and returns. So under load a batch carries every
commit that waited for the previous one, and alone a commit costs what it did before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["CommitBatcher"]

T = TypeVar("T")


class _Slot(Generic[T]):
    """One commit waiting in the batcher: its item, then its outcome."""

    __slots__ = ("error", "item", "lead", "result", "woken")

    def __init__(self, item: T) -> None:
        self.item = item
        self.woken = threading.Event()
        self.lead = False
        self.result = False
        self.error: BaseException | None = None

    def outcome(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.result


class CommitBatcher(Generic[T]):
    """Runs ``run(items)`` (one transaction; a bool per item, in order) for batches of
    the items that :meth:`commit` is given from many threads (see the module)."""

    def __init__(self, run: Callable[[Sequence[T]], list[bool]]) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._queue: list[_Slot[T]] = []
        self._leading = False
        self.batches = 0
        """Transactions run so far."""
        self.committed = 0
        """Items committed so far (over ``batches``: how much batching saved)."""

    @property
    def waiting(self) -> int:
        """Commits queued for the next batch."""
        with self._lock:
            return len(self._queue)

    def commit(self, item: T) -> bool:
        """Commit ``item`` with whatever else is queued (a worker thread; blocks until
        its batch has run). Raises what ``run`` raised for its batch."""
        slot = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            lead = not self._leading
            self._leading = True
        if not lead:
            slot.woken.wait()
            if not slot.lead:
                return slot.outcome()
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            results = self._run([queued.item for queued in batch])
        except BaseException as exc:  # every commit of the batch failed the same way
            for queued in batch:
                queued.error = exc
        else:
            self.batches += 1
            self.committed += len(batch)
            for queued, result in zip(batch, results, strict=True):
                queued.result = result
        with self._lock:
            if self._queue:  # the next leader: the first that came while this one ran
                self._queue[0].lead = True
                self._queue[0].woken.set()
            else:
                self._leading = False
        for queued in batch:
            if queued is not slot:
                queued.woken.set()
        return slot.outcome()
