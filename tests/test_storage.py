"""``ctx.storage`` and alarms through a real server: trio-websocket clients on 127.0.0.1:0.

The test object, :class:`Store`, runs whatever *script* a message names: each test
writes its turns as small async functions (``Script``) and registers them in the app's
``env`` (a :class:`Probe`), so one object class serves every test and each test reads
top to bottom. The probe also counts constructor runs, which is how hibernation and
resets are observed, and records every ``alarm()`` run with its virtual time.

Clocks. Commits of a host with a ``data_dir`` run in a worker thread (in-memory ones run
on the event loop), and Trio's autojump clock treats a task waiting for a thread as idle:
left alone, it would leap to the next deadline (the test's own ``fail_after``) in the
middle of a commit. The :func:`clock` fixture therefore stops autojumping while a worker
thread runs, so virtual time passes only when the program is really idle, and the alarm
times below are exact. The output-gate test, which needs a commit that stays blocked while
the test looks at the client, runs on the real clock.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import helpers
import pytest
import trio
from helpers import WAIT_SECONDS, accept_upgrade, ask, open_client, recv_text, serve
from trio.testing import MockClock
from trio_websocket import WebSocketConnection

from trio_hibernate import (
    AlarmInfo,
    App,
    DataCloneError,
    DurableObject,
    LimitExceededError,
    ObjectContext,
    ObjectId,
    Request,
    Response,
    Server,
    Storage,
    WebSocket,
)
from trio_hibernate._storage.sqlite import SqliteBackend, SqliteDatabase

pytestmark = pytest.mark.integration

T = TypeVar("T")

#: Bound on every single wait (virtual seconds, except in the real-clock test).
WAIT: Final = WAIT_SECONDS
#: Bound on a whole test, in virtual seconds (the longest alarm test needs ~640).
TEST_SECONDS: Final = 1000.0
#: The host's wall clock at virtual time 0; ``wall()`` follows the Trio clock from there.
EPOCH: Final = 1_000_000.0
NAMESPACE: Final = "store"


def wall() -> float:
    """The wall clock given to the hosts: moves with Trio's (virtual) clock."""
    return EPOCH + trio.current_time()


# -- the probe and the test object ---------------------------------------------------------

Script = Callable[["Store", WebSocket], Awaitable[None]]
AlarmScript = Callable[["Store", AlarmInfo], Awaitable[None]]


@attrs.frozen
class AlarmRun:
    """``alarm()`` ran: when (virtual seconds), with what, in which construction."""

    at: float
    retry_count: int
    is_retry: bool
    constructed: int


@attrs.define(eq=False)
class Probe(helpers.Probe):
    """The ``env`` of the test app: scripts to run, and what the objects report (in
    ``events``, which :meth:`alarm_ran` also records)."""

    scripts: dict[str, Script] = attrs.Factory(dict)
    alarm_script: AlarmScript | None = None
    alarm_runs: list[AlarmRun] = attrs.Factory(list)

    def script(self, fn: Script) -> Script:
        """Decorator: register ``fn`` under its name (the message that runs it)."""
        self.scripts[fn.__name__] = fn
        return fn

    def alarm_ran(self, run: AlarmRun) -> None:
        self.alarm_runs.append(run)
        self.record(run)


class Store(DurableObject):
    """Accepts every upgrade; a text message names the probe script to run."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        assert isinstance(env, Probe)
        self.probe = env
        self.probe.constructing(self)
        self.storage: Storage = ctx.storage
        self.state: dict[str, Any] = {}  # in memory: lost on hibernation

    async def fetch(self, request: Request) -> Response:
        return accept_upgrade(self.ctx, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        assert isinstance(message, str)
        try:
            await self.probe.scripts[message](self, ws)
        except Exception as exc:
            # An assertion in a script would otherwise only be logged, and the test would
            # time out waiting for the reply: report it to the client instead.
            self.probe.record(exc)
            ws.send(f"script {message!r} failed: {exc!r}")

    async def alarm(self, info: AlarmInfo) -> None:
        self.probe.alarm_ran(
            AlarmRun(trio.current_time(), info.retry_count, info.is_retry, self.probe.constructed)
        )
        if self.probe.alarm_script is not None:
            await self.probe.alarm_script(self, info)


def serve_store(
    probe: Probe, data_dir: Path | None, **options: Any
) -> AbstractAsyncContextManager[Server]:
    """:func:`helpers.serve` for the app of :class:`Store` objects, on :func:`wall`."""
    options.setdefault("wall_clock", wall)
    options.setdefault("test_seconds", TEST_SECONDS)
    return serve(App({NAMESPACE: Store}, env=probe), data_dir=data_dir, **options)


def connect(server: Server, name: str = "obj") -> AbstractAsyncContextManager[WebSocketConnection]:
    """A client for the object ``name``."""
    return open_client(server, f"/{NAMESPACE}/{name}")


@contextmanager
def open_db(data_dir: Path, name: str = "obj") -> Iterator[SqliteDatabase]:
    """The object's database as the next host would open it (not through a host)."""
    db = SqliteBackend(data_dir).open(NAMESPACE, ObjectId.from_name(NAMESPACE, name))
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def probe() -> Probe:
    return Probe()


# -- key-value ------------------------------------------------------------------------------


async def test_put_get_delete_and_list_in_utf8_order(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    keys = ["b", "a", "é", "z", "\U0001f600", "ab", "a\x00", "\uffff"]  # UTF-8 byte order:
    ordered = ["a", "a\x00", "ab", "b", "z", "é", "\uffff", "\U0001f600"]

    @probe.script
    async def fill(store: Store, ws: WebSocket) -> None:
        storage = store.storage
        for index, key in enumerate(keys):
            await storage.put(key, {"n": index})
        assert await storage.get("a") == {"n": 1}
        assert await storage.get("missing") is None
        found = await storage.get(["z", "missing", "a", "é"])
        assert list(found.items()) == [("a", {"n": 1}), ("z", {"n": 3}), ("é", {"n": 2})]
        ws.send("filled")

    @probe.script
    async def listing(store: Store, ws: WebSocket) -> None:
        storage = store.storage
        assert list(await storage.list()) == ordered
        assert list(await storage.list(reverse=True)) == ordered[::-1]
        assert list(await storage.list(prefix="a")) == ["a", "a\x00", "ab"]
        assert list(await storage.list(start="ab", end="é")) == ["ab", "b", "z"]
        assert list(await storage.list(start="b", reverse=True, limit=2)) == [
            "\U0001f600",
            "\uffff",
        ]
        assert list(await storage.list(prefix="a", reverse=True, limit=1)) == ["ab"]
        assert (await storage.list(prefix="\U0001f600")) == {"\U0001f600": {"n": 4}}
        assert (await storage.list(prefix="nothing")) == {}
        with pytest.raises(ValueError, match="at least 1"):
            await storage.list(limit=0)
        ws.send("listed")

    @probe.script
    async def deleting(store: Store, ws: WebSocket) -> None:
        storage = store.storage
        assert await storage.delete("a") is True
        assert await storage.delete("a") is False
        assert await storage.delete(["b", "z", "missing", "b"]) == 2
        assert await storage.get("a") is None
        ws.send(",".join(await storage.list()))

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "fill") == "filled"
        assert await ask(ws, "listing") == "listed"
        assert await ask(ws, "deleting") == ",".join(["a\x00", "ab", "é", "\uffff", "\U0001f600"])
    with open_db(tmp_path) as db:
        stored = [
            key for key, _ in db.list(prefix=None, start=None, end=None, reverse=False, limit=None)
        ]
    assert stored == ["a\x00", "ab", "é", "\uffff", "\U0001f600"]


async def test_delete_all_removes_keys_alarm_and_every_sql_table(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    """``delete_all`` promises to delete every table the object made with SQL.

    The names here are ordinary table names; "others" and "sqlitefans" happen to match the
    LIKE patterns ``'_th_%'`` and ``'sqlite_%'`` (``_`` is a LIKE wildcard) and "Other"
    matches ``'_th_%'`` case-insensitively.
    """
    tables = ["notes", "others", "Other", "sqlitefans", "method"]

    @probe.script
    async def fill(store: Store, ws: WebSocket) -> None:
        await store.storage.put({"a": 1, "b": 2})
        for table in tables:
            store.storage.sql.exec(f'CREATE TABLE "{table}" (x)')
        await store.storage.set_alarm(wall() + 100)
        ws.send("filled")

    @probe.script
    async def wipe(store: Store, ws: WebSocket) -> None:
        await store.storage.delete_all()
        ws.send("wiped")

    @probe.script
    async def inspect(store: Store, ws: WebSocket) -> None:
        names = store.storage.sql.exec(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT IN "
            "('_th_kv', '_th_meta') ORDER BY name"
        ).rows
        store.probe.record((await store.storage.list(), await store.storage.get_alarm()))
        ws.send(",".join(str(name) for (name,) in names))

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "fill") == "filled"
        assert await ask(ws, "wipe") == "wiped"
        await server.host.hibernate(NAMESPACE, "obj")
        leftover_tables = await ask(ws, "inspect")
        await trio.sleep(200)
    assert probe.events == [({}, None)]
    assert probe.alarm_runs == []  # the alarm went with everything else
    assert leftover_tables == ""


async def test_reads_see_the_turns_own_writes_and_the_next_turn_sees_the_commit(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    @probe.script
    async def write(store: Store, ws: WebSocket) -> None:
        await store.storage.put("k", "v1")
        first = await store.storage.get("k")
        await store.storage.put("k", "v2")
        ws.send(f"{first} {await store.storage.get('k')}")

    @probe.script
    async def read(store: Store, ws: WebSocket) -> None:
        ws.send(str(await store.storage.get("k")))

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "write") == "v1 v2"
        with open_db(tmp_path) as db:  # a second connection sees only committed data
            assert db.get_many(["k"]).keys() == {"k"}
        assert await ask(ws, "read") == "v2"


async def test_transaction_undoes_only_its_own_writes_and_propagates(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    class Refused(Exception):
        pass

    @probe.script
    async def turn(store: Store, ws: WebSocket) -> None:
        storage = store.storage
        await storage.put({"before": 1, "doomed": 1})

        async def failing(txn: Storage) -> None:
            await txn.put("inside", 2)
            await txn.delete("doomed")
            await txn.set_alarm(wall() + 5)
            assert await txn.get("inside") == 2  # visible inside the transaction
            raise Refused("no")

        with pytest.raises(Refused, match="no"):
            await storage.transaction(failing)
        assert await storage.get(["before", "doomed", "inside"]) == {"before": 1, "doomed": 1}
        assert await storage.get_alarm() is None

        async def nested(txn: Storage) -> str:
            await txn.put("outer", 3)

            async def inner(txn: Storage) -> None:
                await txn.put("inner", 4)
                raise Refused("inner")

            with pytest.raises(Refused):
                await txn.transaction(inner)
            return "outer kept"

        assert await storage.transaction(nested) == "outer kept"
        await storage.put("after", 5)
        ws.send("done")

    @probe.script
    async def read(store: Store, ws: WebSocket) -> None:
        ws.send(repr(await store.storage.list()))

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "turn") == "done"
        await server.host.hibernate(NAMESPACE, "obj")
        expected = {"after": 5, "before": 1, "doomed": 1, "outer": 3}
        assert await ask(ws, "read") == repr(expected)
        await trio.sleep(10)
    assert probe.alarm_runs == []  # the alarm set in the failed transaction never existed


async def test_values_are_copies(clock: MockClock, probe: Probe) -> None:
    @probe.script
    async def turn(store: Store, ws: WebSocket) -> None:
        storage = store.storage
        value: dict[str, Any] = {"list": [1, 2], "nested": {"x": "y"}}
        await storage.put("v", value)
        value["list"].append(3)  # changing the original after put changes nothing stored
        value["nested"]["x"] = "changed"
        first = await storage.get("v")
        second = await storage.get("v")
        assert first == second == {"list": [1, 2], "nested": {"x": "y"}}
        assert first is not second
        assert isinstance(first, dict)
        first["list"].append(99)  # nor does changing what get returned
        assert await storage.get("v") == {"list": [1, 2], "nested": {"x": "y"}}
        listed = (await storage.list())["v"]
        assert isinstance(listed, dict)
        listed["nested"]["x"] = "again"
        assert (await storage.get(["v"]))["v"] == {"list": [1, 2], "nested": {"x": "y"}}
        shared = [1]
        await storage.put("shared", {"a": shared, "b": shared})  # shared references survive
        back = await storage.get("shared")
        assert isinstance(back, dict)
        assert back["a"] is back["b"]
        ws.send("copies")

    async with serve_store(probe, None) as server, connect(server) as ws:
        assert await ask(ws, "turn") == "copies"


async def test_limits_refuse_the_whole_call_and_write_nothing(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    big_value = "x" * (128 * 1024)  # its encoding is a few bytes over 128 KiB

    @probe.script
    async def turn(store: Store, ws: WebSocket) -> None:
        storage = store.storage
        await storage.put("existing", 0)
        await storage.put("k" * 2048, "a key of exactly 2048 bytes is fine")

        long_key = "é" * 1025  # 2050 UTF-8 bytes, 1025 characters
        with pytest.raises(LimitExceededError) as key_error:
            await storage.put(long_key, 1)
        assert key_error.value.limit_name == "max_storage_key_bytes"
        assert (key_error.value.limit, key_error.value.value) == (2048, 2050)
        assert "2048" in str(key_error.value)
        assert "2050" in str(key_error.value)
        with pytest.raises(LimitExceededError):
            await storage.get(long_key)
        with pytest.raises(LimitExceededError):
            await storage.delete(long_key)

        with pytest.raises(LimitExceededError) as value_error:
            await storage.put("big", big_value)
        assert value_error.value.limit_name == "max_storage_value_bytes"
        assert value_error.value.limit == 128 * 1024
        assert value_error.value.value > 128 * 1024

        many = {f"m{i}": i for i in range(129)}
        with pytest.raises(LimitExceededError) as count_error:
            await storage.put(many)
        assert count_error.value.limit_name == "max_storage_keys_per_call"
        assert (count_error.value.limit, count_error.value.value) == (128, 129)
        with pytest.raises(LimitExceededError):
            await storage.get(list(many))
        with pytest.raises(LimitExceededError):
            await storage.delete(["existing", *list(many)[:128]])

        # One bad entry spoils the batch: nothing of it is written.
        with pytest.raises(LimitExceededError):
            await storage.put({"good1": 1, "good2": 2, "big": big_value})
        with pytest.raises(LimitExceededError):
            await storage.put({"good1": 1, long_key: 2})
        with pytest.raises(DataCloneError):
            await storage.put({"good1": 1, "bad": object()})
        with pytest.raises(TypeError):
            await storage.put(7, 1)  # type: ignore[call-overload]

        await storage.put({f"m{i}": i for i in range(128)})  # exactly the limit is fine
        assert len(await storage.get([f"m{i}" for i in range(128)])) == 128
        assert await storage.delete([f"m{i}" for i in range(128)]) == 128
        ws.send(repr(sorted(await storage.list())))

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "turn") == repr(sorted(["existing", "k" * 2048]))
    with open_db(tmp_path) as db:
        rows = db.list(prefix=None, start=None, end=None, reverse=False, limit=None)
    assert [key for key, _ in rows] == ["existing", "k" * 2048]


async def test_sql_exec(clock: MockClock, probe: Probe, tmp_path: Path) -> None:
    @probe.script
    async def create(store: Store, ws: WebSocket) -> None:
        sql = store.storage.sql
        created = sql.exec("CREATE TABLE people (name TEXT PRIMARY KEY, age INTEGER, pic BLOB)")
        assert (created.columns, created.rows, created.rows_written) == ((), [], 0)
        one = sql.exec("INSERT INTO people VALUES (?, ?, ?)", "ada", 36, b"\x00\x01")
        assert one.rows_written == 1
        two = sql.exec("INSERT INTO people VALUES (?, ?, NULL), (?, ?, NULL)", "bob", 7, "cy", 50)
        assert two.rows_written == 2
        older = sql.exec("UPDATE people SET age = age + 1 WHERE age > ?", 10)
        assert older.rows_written == 2
        with pytest.raises(sqlite3.IntegrityError):
            sql.exec("INSERT INTO people VALUES (?, ?, NULL)", "ada", 1)
        with pytest.raises(sqlite3.OperationalError):
            sql.exec("SELECT * FROM no_such_table")
        ws.send("created")

    @probe.script
    async def query(store: Store, ws: WebSocket) -> None:
        sql = store.storage.sql
        count = sql.exec("SELECT count(*) AS n FROM people")
        assert count.one() == {"n": 3}
        assert count.rows_written == 0
        rows = sql.exec("SELECT name, age, pic FROM people ORDER BY name")
        assert rows.columns == ("name", "age", "pic")
        assert rows.to_list() == [
            {"name": "ada", "age": 37, "pic": b"\x00\x01"},
            {"name": "bob", "age": 7, "pic": None},
            {"name": "cy", "age": 51, "pic": None},
        ]
        assert list(rows) == []  # a cursor is read once, as on Cloudflare
        with pytest.raises(ValueError, match="exactly one row, got 3"):
            sql.exec("SELECT name FROM people").one()
        with pytest.raises(ValueError, match="got 0"):
            sql.exec("SELECT * FROM people WHERE age > 1000").one()
        deleted = sql.exec("DELETE FROM people WHERE age < ?", 10)
        assert deleted.rows_written == 1
        ws.send("queried")

    @probe.script
    async def after(store: Store, ws: WebSocket) -> None:
        names = store.storage.sql.exec("SELECT name FROM people ORDER BY name").rows
        ws.send(",".join(str(name) for (name,) in names))

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "create") == "created"
        assert await ask(ws, "query") == "queried"
    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "after") == "ada,cy"


# -- durability ----------------------------------------------------------------------------


async def test_data_survives_hibernation_and_a_host_restart(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    @probe.script
    async def write(store: Store, ws: WebSocket) -> None:
        await store.storage.put({"greeting": "hello", "n": [1, 2, 3]})
        store.storage.sql.exec("CREATE TABLE log (line TEXT)")
        store.storage.sql.exec("INSERT INTO log VALUES ('first')")
        store.state["memory"] = "only in memory"
        ws.send("written")

    @probe.script
    async def read(store: Store, ws: WebSocket) -> None:
        lines = store.storage.sql.exec("SELECT line FROM log").rows
        ws.send(repr((await store.storage.list(), lines, store.state.get("memory"))))

    expected = repr(({"greeting": "hello", "n": [1, 2, 3]}, [("first",)], None))
    async with serve_store(probe, tmp_path, idle_timeout=5) as server, connect(server) as ws:
        assert await ask(ws, "write") == "written"
        await trio.sleep(6)  # idle: the object hibernates, the socket stays
        assert server.host.statistics().live_objects == 0
        assert probe.constructed == 1
        assert await ask(ws, "read") == expected
        assert probe.constructed == 2
    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "read") == expected
        assert probe.constructed == 3


async def test_memory_host_keeps_data_across_hibernation_but_not_restarts(
    clock: MockClock, probe: Probe
) -> None:
    @probe.script
    async def write(store: Store, ws: WebSocket) -> None:
        await store.storage.put("k", "kept")
        store.storage.sql.exec("CREATE TABLE t (x)")
        store.storage.sql.exec("INSERT INTO t VALUES (1)")
        ws.send("written")

    @probe.script
    async def read(store: Store, ws: WebSocket) -> None:
        tables = store.storage.sql.exec(
            "SELECT count(*) AS n FROM sqlite_master WHERE name = 't'"
        ).one()
        ws.send(repr((await store.storage.get("k"), tables["n"])))

    async with serve_store(probe, None) as server, connect(server) as ws:
        assert await ask(ws, "write") == "written"
        assert await server.host.hibernate(NAMESPACE, "obj") is True
        assert await ask(ws, "read") == repr(("kept", 1))
        assert probe.constructed == 2
    async with serve_store(probe, None) as server, connect(server) as ws:
        assert await ask(ws, "read") == repr((None, 0))


async def test_background_writes_are_committed_before_the_call_returns(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    @probe.script
    async def start(store: Store, ws: WebSocket) -> None:
        async def background() -> None:
            await store.storage.put("bg", "done")
            with open_db(tmp_path) as db:  # another connection: sees only committed data
                probe.record(db.get_many(["bg"]))

        store.ctx.start_soon(background)
        ws.send("started")

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "start") == "started"
        await probe.wait_for(lambda: bool(probe.events))
    assert len(probe.events) == 1
    assert isinstance(probe.events[0], dict)
    assert probe.events[0].keys() == {"bg"}


async def test_transaction_in_a_background_task_stays_all_or_nothing_across_turns(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    """A ``ctx.start_soon`` task runs ``transaction(fn)``; a message arrives while ``fn``
    is still running. The turn waits until the transaction is over (a background
    transaction is a turn of its own), ``fn``'s write is undone when it raises, its
    exception propagates, and the turn's own write stays."""

    class Abort(Exception):
        pass

    @probe.script
    async def begin(store: Store, ws: WebSocket) -> None:
        async def fn(txn: Storage) -> None:
            await txn.put("from_txn", 1)
            await trio.sleep(5)
            raise Abort("fn gives up")

        async def background() -> None:
            try:
                await store.storage.transaction(fn)
            except Exception as exc:
                probe.record(exc)

        store.ctx.start_soon(background)
        ws.send("transaction open")

    @probe.script
    async def write(store: Store, ws: WebSocket) -> None:
        probe.record("turn runs")
        await store.storage.put("from_turn", 2)
        ws.send("turn written")

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "begin") == "transaction open"
        assert await ask(ws, "write") == "turn written"
    with open_db(tmp_path) as db:
        durable = db.get_many(["from_txn", "from_turn"]).keys()
    raised, turn = probe.events
    assert (type(raised), turn, sorted(durable)) == (Abort, "turn runs", ["from_turn"])


async def test_background_transaction_rollback_does_not_undo_a_turns_acknowledged_write(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    """A turn's write, acknowledged to the client, must not be undone by a transaction
    that a background task started during that turn and rolled back."""

    @probe.script
    async def write(store: Store, ws: WebSocket) -> None:
        await store.storage.put("from_turn", 2)

        async def fn(txn: Storage) -> None:
            await txn.put("from_txn", 1)
            raise RuntimeError("fn gives up")

        async def background() -> None:
            try:
                await store.storage.transaction(fn)
            except RuntimeError as exc:
                probe.record(exc)

        store.ctx.start_soon(background)
        ws.send("ack")

    @probe.script
    async def read(store: Store, ws: WebSocket) -> None:
        ws.send(repr(await store.storage.get("from_turn")))

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "write") == "ack"
        await probe.wait_for(lambda: bool(probe.events))
        assert await ask(ws, "read") == "2"
    with open_db(tmp_path) as db:
        durable = db.get_many(["from_txn", "from_turn"])
    assert sorted(durable) == ["from_turn"]


# -- the output gate -----------------------------------------------------------------------


class BlockedCommits:
    """Patches ``SqliteDatabase.flush`` (the worker thread's part of a commit, which
    makes it durable) so that flushes wait for :meth:`release`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        self.commits = 0
        real_flush = SqliteDatabase.flush

        def flush(db: SqliteDatabase) -> bool:
            self.commits += 1
            self.entered.set()
            if not self._release.wait(timeout=WAIT):
                raise AssertionError("the test never released the commit")
            return real_flush(db)

        monkeypatch.setattr(SqliteDatabase, "flush", flush)

    def release(self) -> None:
        self._release.set()


@pytest.fixture
def blocked_commits(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockedCommits]:
    blocked = BlockedCommits(monkeypatch)
    try:
        yield blocked
    finally:
        blocked.release()  # never leave a worker thread waiting


async def nothing_arrives(ws: WebSocketConnection, seconds: float) -> None:
    """Assert that no message arrives for ``seconds`` (real time)."""
    with trio.move_on_after(seconds):
        message = await ws.get_message()
        raise AssertionError(f"received {message!r} while it should have been held")


async def test_output_gate_holds_replies_until_the_commit_is_durable(
    probe: Probe, tmp_path: Path, blocked_commits: BlockedCommits
) -> None:
    """Real clock: the commit is blocked on a threading.Event in its worker thread."""
    handled: list[str] = []

    @probe.script
    async def write(store: Store, ws: WebSocket) -> None:
        handled.append("write")
        ws.send("sent before the write")
        await store.storage.put("k", 1)
        ws.send("sent after the write")
        ws.send("and another")

    @probe.script
    async def second(store: Store, ws: WebSocket) -> None:
        handled.append("second")
        ws.send(f"second sees {await store.storage.get('k')}")

    async with (
        serve_store(probe, tmp_path, test_seconds=WAIT) as server,
        connect(server) as ws,
    ):
        try:
            await held_until_released(ws, blocked_commits, handled, tmp_path)
        finally:
            blocked_commits.release()  # before the server waits for the commit thread
        assert await recv_text(ws) == "sent after the write"
        assert await recv_text(ws) == "and another"
        assert await recv_text(ws) == "second sees 1"
        assert handled == ["write", "second"]
        assert blocked_commits.commits == 1  # "second" wrote nothing: no commit of its own


async def held_until_released(
    ws: WebSocketConnection, blocked_commits: BlockedCommits, handled: list[str], data_dir: Path
) -> None:
    """The part of the output-gate test that runs while the commit is blocked."""
    await ws.send_message("write")
    assert await recv_text(ws) == "sent before the write"
    await trio.to_thread.run_sync(blocked_commits.entered.wait, WAIT)
    assert blocked_commits.commits == 1
    await nothing_arrives(ws, 0.3)
    # Group commit: the next event runs while the commit is flushed, and reads the
    # write; its reply waits for that write to be durable, though it wrote nothing.
    await ws.send_message("second")
    await nothing_arrives(ws, 0.2)
    assert handled == ["write", "second"]


async def test_failed_commit_drops_the_replies_and_resets_the_object(
    clock: MockClock,
    probe: Probe,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = 1
    real_commit = SqliteDatabase.commit

    def commit(db: SqliteDatabase) -> None:
        nonlocal failures
        if failures:  # the first commit: the turn that writes (COMMIT, before its flush)
            failures -= 1
            raise sqlite3.OperationalError("disk I/O error (injected)")
        real_commit(db)

    monkeypatch.setattr(SqliteDatabase, "commit", commit)

    @probe.script
    async def write(store: Store, ws: WebSocket) -> None:
        store.state["mark"] = "set"
        ws.send("before the write")
        await store.storage.put("lost", 1)
        ws.send("after the write")

    @probe.script
    async def check(store: Store, ws: WebSocket) -> None:
        found = await store.storage.get("lost")
        ws.send(f"lost={found} mark={store.state.get('mark')} constructed={probe.constructed}")

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "write") == "before the write"
        # The next reply is the answer to "check": "after the write" was dropped.
        assert await ask(ws, "check") == "lost=None mark=None constructed=2"
        assert ws.closed is None
        assert failures == 0
        assert server.host.object_statistics(NAMESPACE, "obj").activations == 2
    failed = [r for r in caplog.records if "storage commit" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].levelno == logging.ERROR
    assert "1 held message(s) dropped" in failed[0].getMessage()
    assert failed[0].exc_info is not None
    assert isinstance(failed[0].exc_info[1], sqlite3.OperationalError)
    with open_db(tmp_path) as db:
        assert db.get_many(["lost"]) == {}


# -- alarms --------------------------------------------------------------------------------


def at_times(runs: list[AlarmRun]) -> list[float]:
    return [run.at for run in runs]


def assert_runs(runs: list[AlarmRun], expected: list[tuple[float, int, int]]) -> None:
    """``runs`` happened at these (virtual time, retry_count, constructor count)."""
    assert at_times(runs) == pytest.approx([at for at, _, _ in expected])
    assert [(run.retry_count, run.is_retry, run.constructed) for run in runs] == [
        (retry, retry > 0, constructed) for _, retry, constructed in expected
    ]


def arm_in(probe: Probe, seconds: float) -> list[float]:
    """Register the script ``arm``: set the alarm ``seconds`` after now, in epoch seconds
    (as a float), and answer ``armed``. Each run appends its virtual time to the list
    returned."""
    set_at: list[float] = []

    @probe.script
    async def arm(store: Store, ws: WebSocket) -> None:
        set_at.append(trio.current_time())
        await store.storage.set_alarm(wall() + seconds)
        ws.send("armed")

    return set_at


async def alarm_now(store: Store, ws: WebSocket) -> None:
    """A script: answer ``repr()`` of the alarm time."""
    ws.send(repr(await store.storage.get_alarm()))


async def test_alarm_wakes_a_hibernated_object_on_time(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    set_at: list[float] = []

    @probe.script
    async def arm(store: Store, ws: WebSocket) -> None:
        set_at.append(trio.current_time())
        when = datetime.fromtimestamp(wall() + 30, UTC)
        await store.storage.set_alarm(when)
        ws.send(repr(await store.storage.get_alarm() == when))

    probe.script(alarm_now)

    async def alarm_script(store: Store, info: AlarmInfo) -> None:
        for ws in store.ctx.get_websockets():
            ws.send(f"alarm retry_count={info.retry_count}")

    probe.alarm_script = alarm_script
    async with serve_store(probe, tmp_path, idle_timeout=5) as server, connect(server) as ws:
        assert await ask(ws, "arm") == "True"
        await trio.sleep(10)
        assert server.host.statistics().live_objects == 0  # hibernated, socket open
        assert probe.constructed == 1
        assert await recv_text(ws) == "alarm retry_count=0"
        assert_runs(probe.alarm_runs, [(set_at[0] + 30, 0, 2)])
        assert await ask(ws, "alarm_now") == "None"  # a run that returns deletes it


async def test_memory_host_alarm_wakes_a_hibernated_object(clock: MockClock, probe: Probe) -> None:
    set_at = arm_in(probe, 20)  # epoch seconds work too (as datetimes do above)

    async with serve_store(probe, None) as server, connect(server) as ws:
        assert await ask(ws, "arm") == "armed"
        assert await server.host.hibernate(NAMESPACE, "obj") is True
        await probe.wait_for(lambda: bool(probe.alarm_runs))
        assert_runs(probe.alarm_runs, [(set_at[0] + 20, 0, 2)])


async def test_failing_alarm_is_retried_with_backoff_then_given_up(
    clock: MockClock, probe: Probe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    set_at = arm_in(probe, 10)

    probe.script(alarm_now)

    async def always_fails(store: Store, info: AlarmInfo) -> None:
        raise RuntimeError(f"alarm fails (retry {info.retry_count})")

    probe.alarm_script = always_fails
    async with serve_store(probe, tmp_path, idle_timeout=5) as server, connect(server) as ws:
        assert await ask(ws, "arm") == "armed"
        await probe.wait_for(lambda: len(probe.alarm_runs) == 7, seconds=200)
        await trio.sleep(500)  # and no eighth run
        assert await ask(ws, "alarm_now") == "None"
    first = set_at[0] + 10
    # Retries 2, 4, 8, 16, 32 and 64 s after each failure. The object hibernates after
    # 5 idle seconds, so the first run and the gaps of 8 s and more wake a new instance.
    assert_runs(
        probe.alarm_runs,
        [
            (first, 0, 2),
            (first + 2, 1, 2),
            (first + 6, 2, 2),
            (first + 14, 3, 3),
            (first + 30, 4, 4),
            (first + 62, 5, 5),
            (first + 126, 6, 6),
        ],
    )
    messages = [r.getMessage() for r in caplog.records if "alarm()" in r.getMessage()]
    assert len(messages) == 7
    assert "giving up" in messages[-1]
    assert all("giving up" not in message for message in messages[:-1])


async def test_alarm_that_succeeds_on_a_retry_is_done(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    set_at = arm_in(probe, 1)

    probe.script(alarm_now)

    async def fails_twice(store: Store, info: AlarmInfo) -> None:
        if info.retry_count < 2:
            raise RuntimeError("not yet")

    probe.alarm_script = fails_twice
    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "arm") == "armed"
        await trio.sleep(200)
        assert await ask(ws, "alarm_now") == "None"
    start = set_at[0]
    assert_runs(probe.alarm_runs, [(start + 1, 0, 1), (start + 3, 1, 1), (start + 7, 2, 1)])


async def test_delete_alarm_cancels_and_set_alarm_replaces(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    set_at: list[float] = []

    @probe.script
    async def arm(store: Store, ws: WebSocket) -> None:
        await store.storage.set_alarm(wall() + 10)
        ws.send("armed")

    @probe.script
    async def cancel(store: Store, ws: WebSocket) -> None:
        await store.storage.delete_alarm()
        ws.send(repr(await store.storage.get_alarm()))

    @probe.script
    async def arm_later_then_sooner(store: Store, ws: WebSocket) -> None:
        await store.storage.set_alarm(wall() + 40)
        await store.storage.set_alarm(wall() + 30)  # same turn: replaces
        ws.send("armed")

    @probe.script
    async def move_later(store: Store, ws: WebSocket) -> None:
        set_at.append(trio.current_time())
        await store.storage.set_alarm(wall() + 50)  # another turn: replaces again
        ws.send("moved")

    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "arm") == "armed"
        await trio.sleep(5)
        assert await ask(ws, "cancel") == "None"
        await trio.sleep(100)
        assert probe.alarm_runs == []

        assert await ask(ws, "arm_later_then_sooner") == "armed"
        await trio.sleep(20)  # the +30 alarm is still pending...
        assert probe.alarm_runs == []
        assert await ask(ws, "move_later") == "moved"  # ...and is replaced
        await trio.sleep(200)
    assert_runs(probe.alarm_runs, [(set_at[0] + 50, 0, 1)])


async def test_alarm_in_the_past_fires_at_once_and_alarm_can_rearm(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    set_at = arm_in(probe, -1000)

    async def rearm_twice(store: Store, info: AlarmInfo) -> None:
        if len(store.probe.alarm_runs) < 3:
            await store.storage.set_alarm(wall() + 7)

    probe.alarm_script = rearm_twice
    async with serve_store(probe, tmp_path) as server, connect(server) as ws:
        assert await ask(ws, "arm") == "armed"
        await probe.wait_for(lambda: len(probe.alarm_runs) == 3)
        await trio.sleep(100)
    start = set_at[0]
    assert_runs(probe.alarm_runs, [(start, 0, 1), (start + 7, 0, 1), (start + 14, 0, 1)])


async def test_alarm_fires_after_a_host_restart_without_any_client(
    clock: MockClock, probe: Probe, tmp_path: Path
) -> None:
    set_at: list[float] = []

    @probe.script
    async def arm(store: Store, ws: WebSocket) -> None:
        set_at.append(trio.current_time())
        await store.storage.put("armed", True)
        await store.storage.set_alarm(wall() + 60)
        ws.send("armed")

    async def check_storage(store: Store, info: AlarmInfo) -> None:
        store.probe.record(await store.storage.get("armed"))

    probe.alarm_script = check_storage
    with trio.fail_after(TEST_SECONDS):
        async with serve_store(probe, tmp_path) as server, connect(server) as ws:
            assert await ask(ws, "arm") == "armed"
        assert probe.alarm_runs == []
        constructed = probe.constructed
        await trio.sleep(10)  # no host at all for a while
        async with serve_store(probe, tmp_path) as server:
            # alarm() notes its run, then what it read from storage.
            await probe.wait_for(lambda: True in probe.events, seconds=100)
            assert server.host.statistics().connections == 0
            assert_runs(probe.alarm_runs, [(set_at[0] + 60, 0, constructed + 1)])
            assert probe.events[-2:] == [probe.alarm_runs[0], True]
            await trio.sleep(100)
        async with serve_store(probe, tmp_path):  # done: a third host has nothing to fire
            await trio.sleep(100)
    assert len(probe.alarm_runs) == 1
