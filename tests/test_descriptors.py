"""File descriptors as a resource: the budget holds, at the limit clients get 503 at once,
``/_health`` answers, and the server never runs out because of object databases.

Descriptors are counted from ``/proc/<pid>/fd``, never estimated. The end-to-end tests run
``trio-hibernate serve`` in a subprocess whose soft ``RLIMIT_NOFILE`` is lowered, on the
real clock (a real process), with every wait bounded; the in-process server tests run on
the autojump clock.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Final

import attrs
import pytest
import trio
from helpers import Probe, RawWebSocket, http_exchange, open_raw_websocket, settle
from test_cli import Served, drain, serve
from trio.testing import MockClock
from wsproto.events import TextMessage

from trio_hibernate import (
    App,
    DurableObject,
    LimitExceededError,
    ObjectContext,
    Request,
    Response,
    open_host,
    open_server,
)
from trio_hibernate._descriptors import default_max_open_databases, fd_reserve
from trio_hibernate._ids import ObjectId
from trio_hibernate._storage.sqlite import FLUSH_DESCRIPTORS, SqliteBackend, SqliteDatabase

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts from /proc"),
]

NAMESPACE: Final = "room"
#: Every single wait on the subprocess server (real seconds).
WAIT: Final = 10.0
#: The server's soft descriptor limit: with the old budget (the limit less 256 for
#: connections, databases uncounted) 256 awake rooms need 1,024 descriptors.
NOFILE: Final = 512
BUDGET: Final = re.compile(rb"at most (\d+) connections and (\d+) descriptors for object")


def descriptors(pid: int | str = "self", under: Path | None = None) -> int:
    """Open descriptors of process ``pid`` (those on files under ``under``, if given)."""
    directory = Path(f"/proc/{pid}/fd")
    count = 0
    for entry in os.listdir(directory):
        if under is None:
            count += 1
            continue
        try:
            target = os.readlink(directory / entry)
        except OSError:
            continue  # closed while we looked
        count += target.startswith(f"{under}{os.sep}")
    return count


# -- the SQLite pool, directly -------------------------------------------------------------


def write(db: SqliteDatabase, value: bytes) -> None:
    db.put_many([("k", value)])
    db.commit()


def test_a_file_database_holds_three_descriptors_and_the_pool_keeps_to_its_limit(
    tmp_path: Path,
) -> None:
    backend = SqliteBackend(tmp_path, max_open_databases=2)
    assert backend.max_descriptors == 6 + FLUSH_DESCRIPTORS
    dbs: list[SqliteDatabase] = []
    try:
        for i in range(3):
            dbs.append(db := backend.open(NAMESPACE, ObjectId.from_name(NAMESPACE, str(i))))
            write(db, b"%d" % i)
            assert descriptors(under=tmp_path) == 3 * min(i + 1, 2) == backend.open_descriptors
        # The first one's connection was closed for the third; it reopens on use, closing
        # the least recently used (the second), and its data is all there.
        assert dbs[0].get_many(["k"]) == {"k": b"0"}
        assert descriptors(under=tmp_path) == 6
        assert dbs[2].get_many(["k"]) == {"k": b"2"}
        assert dbs[1].get_many(["k"]) == {"k": b"1"}
        assert descriptors(under=tmp_path) == 6
    finally:
        for db in dbs:
            backend.release(NAMESPACE, ObjectId.from_name(NAMESPACE, "x"), db)
        backend.close()
    assert descriptors(under=tmp_path) == 0
    assert backend.open_descriptors == 0


def test_a_database_inside_a_transaction_or_a_commit_is_never_closed(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path, max_open_databases=1)
    second_id = ObjectId.from_name(NAMESPACE, "second")
    try:
        first = backend.open(NAMESPACE, ObjectId.from_name(NAMESPACE, "first"))
        first.put_many([("k", b"v")])  # a transaction is open
        with pytest.raises(LimitExceededError, match="all 1 open ones") as refused:
            backend.open(NAMESPACE, second_id)
        assert (refused.value.limit_name, refused.value.limit, refused.value.value) == (
            "max_open_databases",
            1,
            2,
        )
        first.commit()
        # A commit still returning in its worker thread holds the lock: not closed either.
        with first._commit_lock, pytest.raises(LimitExceededError):
            backend.open(NAMESPACE, second_id)
        second = backend.open(NAMESPACE, second_id)  # now first is idle: closed for it
        assert descriptors(under=tmp_path) == 3
        assert second.get_many(["k"]) == {}
        assert first.get_many(["k"]) == {"k": b"v"}  # reconnected, committed data there
        assert descriptors(under=tmp_path) == 3
    finally:
        backend.close()
    assert descriptors(under=tmp_path) == 0


def test_the_default_pool_is_an_eighth_of_the_budget() -> None:
    assert fd_reserve(512) == 128
    assert fd_reserve(20000) == 256
    assert default_max_open_databases(3, 20000) == (20000 - 256) // 8 // 3 == 822
    assert default_max_open_databases(3, 512) == 16
    assert SqliteBackend().max_descriptors == 0  # memory holds none


# -- objects woken without a new connection ------------------------------------------------


@attrs.define(eq=False)
class Env:
    """What the counters report to: holders that started, and the event they wait for."""

    probe: Probe = attrs.Factory(Probe)
    release: trio.Event = attrs.Factory(trio.Event)


class Counter(DurableObject):
    """Counts in storage; ``hold`` writes, then waits inside its turn (transaction open)."""

    def __init__(self, ctx: ObjectContext, env: Env) -> None:
        super().__init__(ctx, env)
        self.env: Env = env

    async def bump(self) -> int:
        count = await self.ctx.storage.get("count")
        assert count is None or isinstance(count, int)
        await self.ctx.storage.put("count", (count or 0) + 1)
        return (count or 0) + 1

    async def hold(self) -> None:
        await self.ctx.storage.put("held", True)
        self.env.probe.record("holding")
        await self.env.release.wait()


async def test_objects_woken_by_stub_calls_stay_within_max_open_databases(tmp_path: Path) -> None:
    env = Env()
    rooms = tmp_path / "counter"
    with trio.fail_after(WAIT):
        async with open_host(
            App({"counter": Counter}, env=env), data_dir=tmp_path, max_open_databases=3
        ) as host:
            counters = host.get_namespace("counter")
            for round_ in (1, 2):
                for i in range(12):
                    assert await counters.get_by_name(str(i)).bump() == round_
                    assert descriptors(under=rooms) <= 3 * 3
            # Closing a database is not hibernating: every instance is still live.
            assert host.statistics().live_objects == 12
            assert host.statistics().wakes == 12

            # Past the limit with every open database inside a transaction, the storage
            # call that needs one more raises, in the handler (here, to the stub caller).
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(counters.get_by_name(f"held {i}").hold)
                await env.probe.wait_for(lambda: len(env.probe.events) == 3)
                with pytest.raises(LimitExceededError, match="max_open_databases"):
                    await counters.get_by_name("one more").bump()
                assert descriptors(under=rooms) == 3 * 3
                env.release.set()
            assert await counters.get_by_name("one more").bump() == 1
    assert descriptors(under=tmp_path) == 0


# -- the server at its descriptor limit ----------------------------------------------------

APP_SOURCE = """
from trio_hibernate import App, DurableObject, Response

class Room(DurableObject):
    async def fetch(self, request):
        if request.websocket is None:
            return Response(body="room")
        visits = await self.ctx.storage.get("visits") or 0
        await self.ctx.storage.put("visits", visits + 1)
        self.ctx.accept_websocket(request.websocket)
        return Response(status=101, websocket=request.websocket)

    async def websocket_message(self, ws, message):
        count = await self.ctx.storage.get("messages") or 0
        await self.ctx.storage.put("messages", count + 1)
        ws.send(f"{message} {count + 1}")

class Hog(DurableObject):
    '''Takes every free descriptor of the process (as a leaky app would), or gives them back.'''

    held = []

    async def fetch(self, request):
        self.ctx.accept_websocket(request.websocket)
        return Response(status=101, websocket=request.websocket)

    async def websocket_message(self, ws, message):
        import os
        if message == "take":
            try:
                while True:
                    Hog.held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                ws.send(f"took {len(Hog.held)}: {exc.strerror}")
        else:
            while Hog.held:
                os.close(Hog.held.pop())
            ws.send("gave back")

app = App({"room": Room, "hog": Hog})
"""


@asynccontextmanager
async def limited_server(tmp_path: Path, nofile: int) -> AsyncIterator[Served]:
    """``trio-hibernate serve`` with ``nofile`` descriptors, its output read as it comes."""
    app_file = tmp_path / "rooms.py"
    app_file.write_text(APP_SOURCE)
    async with (
        serve(f"{app_file}:app", "--data-dir", str(tmp_path / "data"), nofile=nofile) as s,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(drain, s)  # a full pipe would block the server's logging
        yield s
        nursery.cancel_scope.cancel()


async def exchange(ws: RawWebSocket, text: str) -> str:
    await ws.send(TextMessage(data=text))
    event = await ws.next_event()
    assert isinstance(event, TextMessage), event
    return event.data


async def test_at_the_descriptor_limit_clients_get_503_health_answers_and_fds_stay_bounded(
    tmp_path: Path,
) -> None:
    nofile = NOFILE
    most = most_storage = 0

    async def sample(pid: int, data: Path) -> None:
        nonlocal most, most_storage
        while True:
            most = max(most, descriptors(pid))
            most_storage = max(most_storage, descriptors(pid, under=data))
            await trio.sleep(0.005)  # a sampling period, not a wait for something

    with trio.fail_after(60):
        async with limited_server(tmp_path, nofile) as served, AsyncExitStack() as stack:
            match = BUDGET.search(served.output)
            assert match is not None, served.output
            max_connections, storage_budget = int(match.group(1)), int(match.group(2))
            sampler = await stack.enter_async_context(trio.open_nursery())
            sampler.start_soon(sample, served.process.pid, tmp_path / "data" / "room")
            # Every connection wakes its own room, which writes: its database opens.
            sockets = []
            for i in range(max_connections):
                with trio.fail_after(WAIT):
                    ws = await stack.enter_async_context(
                        open_raw_websocket(served.port, f"/room/{i}")
                    )
                sockets.append(ws)
            # One more: an immediate 503 (the request is read first: no reset).
            with trio.fail_after(WAIT):
                refused = await http_exchange(
                    served.port, b"GET /room/extra HTTP/1.1\r\nHost: x\r\n\r\n"
                )
            assert refused.status == 503, refused
            assert b"connection limit" in refused.body
            with trio.fail_after(WAIT):
                health = await http_exchange(
                    served.port, b"GET /_health HTTP/1.1\r\nHost: x\r\n\r\n"
                )
            assert (health.status, health.body) == (200, b"ok\n")
            # Every room woken again by its socket (not a new connection): each writes.
            for i, ws in enumerate(sockets):
                with trio.fail_after(WAIT):
                    assert await exchange(ws, f"hi {i}") == f"hi {i} 1"
            assert descriptors(served.process.pid) < nofile
            sampler.cancel_scope.cancel()
    assert 0 < most < nofile
    assert 0 < most_storage <= storage_budget
    assert b"accept() failed" not in served.output
    assert b"Too many open files" not in served.output
    assert b"Traceback" not in served.output


async def test_out_of_descriptors_at_accept_each_client_gets_503_from_the_spare(
    tmp_path: Path,
) -> None:
    request = b"GET /room/a HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.fail_after(60):
        async with limited_server(tmp_path, NOFILE) as served:
            async with open_raw_websocket(served.port, "/hog/x") as hog:
                # The app itself takes every descriptor left (outside our budget).
                took = await exchange(hog, "take")
                assert took.endswith("Too many open files"), took
                assert descriptors(served.process.pid) == NOFILE
                for _ in range(3):
                    with trio.fail_after(WAIT):
                        refused = await http_exchange(served.port, request)
                    assert refused.status == 503, refused
                assert await exchange(hog, "give back") == "gave back"
            with trio.fail_after(WAIT):
                served_again = await http_exchange(served.port, request)
            assert (served_again.status, served_again.body) == (200, b"room")
    # Logged once, then summed up when accept() works again: not every 0.1 s.
    assert served.output.count(b"accept() failed") == 1, served.output
    assert b"accept() works again; 2 more failure(s)" in served.output


# -- past the connection limit, in process -------------------------------------------------


class Plain(DurableObject):
    async def fetch(self, request: Request) -> Response:
        return Response(body="plain")


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    received = bytearray()
    with trio.fail_after(WAIT):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


async def test_past_the_limit_health_and_metrics_answer_and_others_get_503(
    autojump_clock: MockClock,
) -> None:
    async with open_server(App({"plain": Plain}), max_connections=1) as server:
        with trio.fail_after(WAIT):
            held = await trio.open_tcp_stream("127.0.0.1", server.port)  # the only slot
        async with held:
            await settle()
            assert server.host.statistics().connections == 1
            # Clients that connect first and send later are waited for, briefly.
            late = {}
            for path in ("/_health", "/_metrics", "/plain/a"):
                with trio.fail_after(WAIT):
                    late[path] = await trio.open_tcp_stream("127.0.0.1", server.port)
            await settle()  # all three accepted, none has sent its request yet
            replies = {}
            for path, stream in late.items():
                async with stream:
                    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    replies[path] = await read_to_eof(stream)
            assert replies["/_health"].startswith(b"HTTP/1.1 200 OK\r\n")
            assert replies["/_health"].endswith(b"\r\n\r\nok\n")
            assert replies["/_metrics"].startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"\ntrio_hibernate_connections 1.0\n" in replies["/_metrics"]
            assert replies["/plain/a"].startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            # Only GET: anything else past the limit is a 503.
            refused = await http_exchange(server.port, b"POST /_health HTTP/1.1\r\n\r\n")
            assert refused.status == 503
            # A client that sends nothing gets the 503 after the triage time.
            with trio.fail_after(WAIT):
                silent = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with silent:
                before = trio.current_time()
                assert (await read_to_eof(silent)).startswith(b"HTTP/1.1 503 ")
                assert trio.current_time() - before == pytest.approx(1.0, abs=0.1)


async def test_past_the_limit_at_most_16_silent_clients_are_waited_for(
    autojump_clock: MockClock,
) -> None:
    async with open_server(App({"plain": Plain}), max_connections=1) as server:
        async with AsyncExitStack() as stack:
            with trio.fail_after(WAIT):
                await stack.enter_async_context(
                    await trio.open_tcp_stream("127.0.0.1", server.port)
                )
            await settle()
            silent = []
            for _ in range(17):
                with trio.fail_after(WAIT):
                    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                silent.append(await stack.enter_async_context(stream))
            await settle()
            # The 17th was answered at once: no time passed.
            before = trio.current_time()
            assert (await read_to_eof(silent[-1])).startswith(b"HTTP/1.1 503 ")
            assert trio.current_time() == before
            assert (await read_to_eof(silent[0])).startswith(b"HTTP/1.1 503 ")
            assert trio.current_time() > before


async def test_an_alarm_that_cannot_open_its_database_is_retried(
    tmp_path: Path, clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Review finding: with every pooled database inside a transaction, an alarm's own
    read of its database raised out of the supervisor and ended the host."""
    from trio_hibernate import AlarmInfo, Response
    from trio_hibernate.testing import open_test_host

    release = trio.Event()
    holding = trio.Event()
    runs: list[int] = []

    class Obj(DurableObject):
        async def fetch(self, request: Request) -> Response:
            if request.path.endswith("/alarm"):
                await self.ctx.storage.set_alarm(self.ctx.now() + 5)
            else:
                await self.ctx.storage.put("k", 1)  # the turn's transaction: pool full
                holding.set()
                await release.wait()
            return Response(body="ok")

        async def alarm(self, info: AlarmInfo) -> None:
            runs.append(info.retry_count)

    app = App({"o": Obj})
    with trio.fail_after(WAIT):
        async with open_test_host(app, data_dir=str(tmp_path), max_open_databases=1) as host:
            await host.fetch("o", "b", "/alarm")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(host.fetch, "o", "a", "/hold")
                await holding.wait()
                await trio.sleep(6)  # B's alarm comes due and cannot open its database
                assert runs == []
                release.set()
            await trio.sleep(3)  # the retry, 2 s later
            assert runs == [1]
    assert "failed; retry 1 in 2 s" in caplog.text
    assert "max_open_databases" in caplog.text
