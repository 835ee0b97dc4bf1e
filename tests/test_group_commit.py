"""Group commit (``_storage/commit.py``): turns run while the previous commit is flushed,
their writes share the next commit, and every output waits for the writes made before it.

Through a real server (127.0.0.1:0, trio-websocket clients) with a durable host, on the
real clock: each test holds the flushes (the worker-thread part of a commit, which makes
it durable) with :class:`HeldFlushes` and lets them through one at a time, so what runs
while a commit is in flight is exact. "Nothing arrives" is checked over a short real
interval, as in ``test_storage.py``'s output-gate test.

The :class:`~test_storage.Store` object runs the script a message names (see
``test_storage.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
import trio
from helpers import WAIT_SECONDS, recv_text, send
from test_storage import NAMESPACE, Probe, Store, connect, nothing_arrives, open_db, serve_store
from trio_websocket import WebSocketConnection

from trio_hibernate import ObjectState, Server, WebSocket
from trio_hibernate._core.codec import decode_data
from trio_hibernate._core.gate import OutputGate
from trio_hibernate._storage.alarms import AlarmIndex
from trio_hibernate._storage.sqlite import SqliteDatabase

pytestmark = pytest.mark.integration

#: Bound on a whole test and on every wait (real seconds).
WAIT: Final = WAIT_SECONDS
HIBERNATED: Final = ObjectState.HIBERNATED
#: How long "nothing arrives" is watched for (real seconds).
QUIET: Final = 0.3


class HeldFlushes:
    """Patches ``SqliteDatabase.flush`` so that each flush waits, in its worker thread,
    until the test lets it through (:meth:`allow`); :attr:`fail_next` makes the next one
    let through raise instead, as a failing ``fsync`` would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._turnstile = threading.Semaphore(0)
        self._entered = threading.Condition()
        self.started = 0
        self.fail_next = False
        self._closed = False
        real_flush = SqliteDatabase.flush

        def flush(db: SqliteDatabase) -> bool:
            with self._entered:
                self.started += 1
                self._entered.notify_all()
            if not self._turnstile.acquire(timeout=WAIT) and not self._closed:
                raise AssertionError("the test never let the flush through")
            if self.fail_next:
                self.fail_next = False
                raise OSError(5, "Input/output error (injected)")
            return real_flush(db)

        monkeypatch.setattr(SqliteDatabase, "flush", flush)

    async def wait_started(self, count: int) -> None:
        """Wait until ``count`` flushes have started (each then waits to be let through)."""

        def wait() -> None:
            with self._entered:
                if not self._entered.wait_for(lambda: self.started >= count, timeout=WAIT):
                    raise AssertionError(f"{self.started} flush(es) started, not {count}")

        await trio.to_thread.run_sync(wait)

    def allow(self, count: int = 1) -> None:
        """Let ``count`` flushes through (now or when they come)."""
        self._turnstile.release(count)

    def close(self) -> None:
        """Let every flush through from now on (never leave a worker thread waiting)."""
        self._closed = True
        self._turnstile.release(1000)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldFlushes]:
    flushes = HeldFlushes(monkeypatch)
    try:
        yield flushes
    finally:
        flushes.close()


@pytest.fixture
def probe() -> Probe:
    return Probe()


def register_put_scripts(probe: Probe, count: int) -> None:
    """Scripts ``put0`` .. ``put<count-1>``: ``put`` the key ``k<i>``, answer ``ack <i>``."""
    for number in range(count):

        async def put(store: Store, ws: WebSocket, number: int = number) -> None:
            probe.record(f"put {number}")
            await store.storage.put(f"k{number}", number)
            ws.send(f"ack {number}")

        probe.scripts[f"put{number}"] = put


async def ran(probe: Probe, *events: str) -> None:
    """Wait until the object has recorded ``events`` (its turns ran)."""
    await probe.wait_for(lambda: all(event in probe.events for event in events), WAIT)


async def hibernated(server: Server) -> None:
    """Wait until the object's instance is gone. The failure that resets it comes from a
    worker thread, which no Trio event reports to a test: poll the object's state."""
    with trio.fail_after(WAIT):
        while server.host.object_statistics(NAMESPACE, "obj").state is not HIBERNATED:  # noqa: ASYNC110
            await trio.sleep(0.01)  # no event to wait for (see above)


async def replies(ws: WebSocketConnection, count: int) -> list[str]:
    return [await recv_text(ws) for _ in range(count)]


async def test_turns_during_a_flush_share_the_next_commit(
    probe: Probe, tmp_path: Path, held: HeldFlushes
) -> None:
    register_put_scripts(probe, 5)
    async with serve_store(probe, tmp_path, test_seconds=WAIT) as server, connect(server) as ws:
        await send(ws, "put0")
        await held.wait_started(1)  # turn 0's commit is being flushed
        for number in range(1, 5):
            await send(ws, f"put{number}")
        # The four turns ran without waiting for the disk; their acks are held.
        await ran(probe, "put 1", "put 2", "put 3", "put 4")
        await nothing_arrives(ws, QUIET)
        held.allow()
        assert await recv_text(ws) == "ack 0"
        await held.wait_started(2)  # one commit for turns 1-4
        await nothing_arrives(ws, QUIET)
        held.allow()
        assert await replies(ws, 4) == ["ack 1", "ack 2", "ack 3", "ack 4"]
        assert server.host.statistics().storage_commits == 2
        assert held.started == 2
    with open_db(tmp_path) as db:
        assert db.get_many([f"k{n}" for n in range(5)]).keys() == {f"k{n}" for n in range(5)}


async def test_a_reply_waits_for_the_commit_of_every_write_before_it(
    probe: Probe, tmp_path: Path, held: HeldFlushes
) -> None:
    """A turn that writes waits for its own commit; a turn that only reads waits for the
    commit of the writes made before it, by earlier turns, still in flight."""

    @probe.script
    async def first(store: Store, ws: WebSocket) -> None:
        await store.storage.put("a", 1)
        ws.send("first")

    @probe.script
    async def second(store: Store, ws: WebSocket) -> None:
        probe.record("second")
        await store.storage.put("b", 2)
        ws.send("second")

    @probe.script
    async def reader(store: Store, ws: WebSocket) -> None:
        probe.record("reader")
        ws.send(f"reader sees {await store.storage.get(['a', 'b'])}")

    async with serve_store(probe, tmp_path, test_seconds=WAIT) as server, connect(server) as ws:
        await send(ws, "first")
        await held.wait_started(1)
        await send(ws, "second")
        await send(ws, "reader")
        await ran(probe, "second", "reader")
        await nothing_arrives(ws, QUIET)
        held.allow()  # commit 1 ("first") is durable: only its reply goes
        assert await recv_text(ws) == "first"
        await held.wait_started(2)  # commit 2 carries "second"'s write
        await nothing_arrives(ws, QUIET)  # "reader" wrote nothing, but read "b"
        held.allow()
        assert await replies(ws, 2) == ["second", "reader sees {'a': 1, 'b': 2}"]


async def test_reads_see_the_writes_of_turns_whose_commit_is_in_flight(
    probe: Probe, tmp_path: Path, held: HeldFlushes
) -> None:
    @probe.script
    async def write(store: Store, ws: WebSocket) -> None:
        storage = store.storage
        storage.sql.exec("CREATE TABLE notes (n INTEGER)")
        storage.sql.exec("INSERT INTO notes VALUES (1)")
        await storage.put("count", 1)
        ws.send("written")

    @probe.script
    async def increment(store: Store, ws: WebSocket) -> None:
        storage = store.storage
        count = await storage.get("count")
        assert isinstance(count, int)
        await storage.put("count", count + 1)
        storage.sql.exec("INSERT INTO notes VALUES (?)", count + 1)
        notes = [n for (n,) in storage.sql.exec("SELECT n FROM notes ORDER BY n").raw()]
        probe.record(f"incremented to {count + 1}")
        ws.send(f"count {count + 1}, notes {notes}, listed {await storage.list()}")

    async with serve_store(probe, tmp_path, test_seconds=WAIT) as server, connect(server) as ws:
        await send(ws, "write")
        await held.wait_started(1)
        await send(ws, "increment")
        await send(ws, "increment")
        await ran(probe, "incremented to 3")
        held.allow(2)
        assert await replies(ws, 3) == [
            "written",
            "count 2, notes [1, 2], listed {'count': 2}",
            "count 3, notes [1, 2, 3], listed {'count': 3}",
        ]
    with open_db(tmp_path) as db:
        count = decode_data(db.get_many(["count"])["count"])
        rows = db.execute_user("SELECT n FROM notes ORDER BY n").fetchall()
    assert (count, rows) == (3, [(1,), (2,), (3,)])


async def test_a_failed_group_commit_drops_every_held_output_and_resets_the_object(
    probe: Probe, tmp_path: Path, held: HeldFlushes, caplog: pytest.LogCaptureFixture
) -> None:
    register_put_scripts(probe, 3)

    @probe.script
    async def reader(store: Store, ws: WebSocket) -> None:
        probe.record("reader")
        ws.send("reader")

    @probe.script
    async def check(store: Store, ws: WebSocket) -> None:
        later = await store.storage.get(["k1", "k2"])
        ws.send(f"constructed={probe.constructed} later={later}")

    async with serve_store(probe, tmp_path, test_seconds=WAIT) as server, connect(server) as ws:
        await send(ws, "put0")
        await held.wait_started(1)
        for message in ("put1", "reader", "put2"):
            await send(ws, message)
        await ran(probe, "put 1", "reader", "put 2")
        held.fail_next = True
        held.allow()  # commit 1 fails: every output held (for it or later) is dropped
        held.allow(10)
        await hibernated(server)  # the failure reached the object: it was reset
        # The next reply is the answer to "check", from a new instance: put1 and put2
        # (never committed, made after the failed write) were rolled back. (put0's write
        # was committed but not known to be durable: it may or may not be there.)
        await send(ws, "check")
        assert await recv_text(ws) == "constructed=2 later={}"
        assert ws.closed is None
        assert server.host.object_statistics(NAMESPACE, "obj").activations == 2
    failed = [r for r in caplog.records if "storage commit" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].levelno == logging.ERROR
    assert "4 held message(s) dropped" in failed[0].getMessage()
    assert failed[0].exc_info is not None
    assert isinstance(failed[0].exc_info[1], OSError)


async def test_an_alarm_set_while_a_commit_is_in_flight_fires(
    probe: Probe, tmp_path: Path, held: HeldFlushes
) -> None:
    @probe.script
    async def write(store: Store, ws: WebSocket) -> None:
        await store.storage.put("k", 1)
        ws.send("written")

    @probe.script
    async def arm(store: Store, ws: WebSocket) -> None:
        await store.storage.set_alarm(store.ctx.now() + 0.2)
        probe.record("armed")
        ws.send("armed")

    async with serve_store(probe, tmp_path, test_seconds=WAIT) as server, connect(server) as ws:
        await send(ws, "write")
        await held.wait_started(1)
        await send(ws, "arm")
        await ran(probe, "armed")
        # The new alarm is in the index before the commit that stores it is made.
        index = AlarmIndex(tmp_path / "_alarms.sqlite3")
        try:
            assert index.load() == []  # not yet: its commit waits for commit 1's flush
        finally:
            index.close()
        held.allow(10)
        assert await replies(ws, 2) == ["written", "armed"]
        await probe.wait_for(lambda: len(probe.alarm_runs) == 1, WAIT)
        assert probe.alarm_runs[0].retry_count == 0
    with open_db(tmp_path) as db:
        assert db.get_alarm() is None  # fired once and deleted


# -- the output gate, sans-IO ---------------------------------------------------------------


def test_the_gate_releases_each_action_with_the_commit_of_the_writes_before_it() -> None:
    gate = OutputGate()
    sent: list[str] = []
    gate.hold(lambda: sent.append("before any write"))
    gate.wrote()
    gate.hold(lambda: sent.append("after write 1"))
    assert gate.commit_started() == 1  # in flight; the next writes join commit 2
    gate.hold(lambda: sent.append("read-only turn"))  # waits for commit 1 too
    gate.wrote()
    gate.hold(lambda: sent.append("after write 2"))
    assert sent == ["before any write"]
    gate.open(1)
    assert sent == ["before any write", "after write 1", "read-only turn"]
    assert gate.closed
    assert gate.commit_started() == 2
    gate.open(2)
    assert sent[-1] == "after write 2"
    assert not gate.closed


def test_the_gate_drops_the_uncommitted_tail_or_everything_on_failure() -> None:
    gate = OutputGate()
    dropped: list[str] = []
    gate.wrote()
    gate.hold(lambda: None, lambda: dropped.append("for 1"))
    gate.commit_started()
    gate.wrote()
    gate.hold(lambda: None, lambda: dropped.append("for 2"))
    assert gate.drop(gate.next_commit) == 1  # a reset: commit 1 is still in flight
    assert dropped == ["for 2"]
    assert gate.closed  # what is held for commit 1 still waits
    assert gate.fail() == 1  # commit 1 failed
    assert dropped == ["for 2", "for 1"]
    gate.hold(lambda: None, lambda: dropped.append("after the failure"))
    assert dropped[-1] == "after the failure"
    assert gate.closed


def test_a_flush_syncs_the_folder_of_a_new_log_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first flush after the write-ahead log appears also syncs its folder (the new
    file's name must survive a power loss, as SQLite does for a log it creates); later
    flushes of the same log sync the log only."""
    import os

    from trio_hibernate import ObjectId
    from trio_hibernate._storage.sqlite import SqliteBackend

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    db = SqliteBackend(tmp_path).open("w", ObjectId.from_name("w", "a"))
    try:
        for value in (b"1", b"2"):
            db.begin()
            db.put_many([("k", value)])
            db.commit()
            db.flush()
    finally:
        db.close()
    log = [path for path in synced if path.endswith("-wal")]
    folders = [path for path in synced if os.path.isdir(path)]
    assert len(log) == 2
    assert len(folders) == 1
    assert log[0].startswith(folders[0])
