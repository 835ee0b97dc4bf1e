"""Closing a host while work is in flight: commits in worker threads, queued events.

Each test pins one race of the shutdown path, made deterministic rather than repeated
until it shows: a commit is held in its worker thread until the host starts closing, or
events are queued where shutdown will find them.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from trio_hibernate import App, DurableObject
from trio_hibernate._storage.alarms import AlarmIndex
from trio_hibernate._storage.sqlite import SqliteDatabase
from trio_hibernate.testing import open_test_host

#: Bound on every wait (real seconds: these tests hold worker threads).
WAIT: Final = 30.0
#: An alarm time that never comes within a test.
FAR: Final = 4_000_000_000.0


class Alarmed(DurableObject):
    """Sets and deletes its alarm when a stub asks."""

    async def arm(self) -> None:
        await self.ctx.storage.set_alarm(FAR)

    async def disarm(self) -> None:
        await self.ctx.storage.delete_alarm()


class CommitHeldUntilShutdown:
    """Patches ``SqliteDatabase.commit``: once :attr:`armed`, a commit in a worker thread
    waits until the Trio task that runs it is cancelled (the host shutting down), then
    goes on. :attr:`entered` is set (in Trio) when such a commit starts waiting."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.entered = trio.Event()
        self.resumed = False
        real_commit = SqliteDatabase.commit

        def commit(db: SqliteDatabase) -> None:
            if self.armed and threading.current_thread() is not threading.main_thread():
                self.armed = False
                trio.from_thread.run_sync(self.entered.set)
                try:
                    # Runs in the task that waits for this thread, so the host's
                    # cancellation of that task (at shutdown) ends the wait.
                    trio.from_thread.run(trio.sleep_forever)
                except trio.Cancelled:
                    self.resumed = True
            real_commit(db)

        monkeypatch.setattr(SqliteDatabase, "commit", commit)


async def test_the_alarm_index_outlives_a_commit_still_running_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = CommitHeldUntilShutdown(monkeypatch)
    outcomes: list[object] = []

    async def disarm(stub: Any) -> None:
        try:
            outcomes.append(await stub.disarm())
        except Exception as exc:
            outcomes.append(exc)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            async with open_test_host(App({"a": Alarmed}), data_dir=str(tmp_path)) as th:
                stub = th.host.get_namespace("a").get_by_name("x")
                await stub.arm()
                held.armed = True
                nursery.start_soon(disarm, stub)
                await held.entered.wait()
                # Leaving the block closes the host while the commit that deletes the
                # alarm is in its worker thread; the deletion reaches the index after it.
    assert held.resumed
    assert outcomes == [None]
    index = AlarmIndex(tmp_path / "_alarms.sqlite3")
    try:
        assert index.load() == []
    finally:
        index.close()


@pytest.mark.parametrize("durable", [True, False])
def test_alarm_index_refuses_records_after_close(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "_alarms.sqlite3"
    index = AlarmIndex(path if durable else None)
    index.close()
    with pytest.raises(sqlite3.ProgrammingError, match=r"alarm index .* is closed.*a/x"):
        index.record(("a", "ff" * 32, "x"), 1.0)
    with pytest.raises(sqlite3.ProgrammingError, match="is closed"):
        index.load()
    index.close()  # idempotent
