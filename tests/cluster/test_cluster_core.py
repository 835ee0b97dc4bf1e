"""Cluster mode in one process: hosts sharing a PostgreSQL database (marker ``cluster``).

The database is ``TRIO_HIBERNATE_TEST_DSN`` if set, else the one the ``postgres_dsn``
fixture starts (one server for the module, in a thread of its own); each test starts from
empty tables.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from clusterkit import CLUSTER, CLUSTER_SKIP_REASON, open_postgres
from helpers import WAIT_SECONDS, ask, closed_by_server, http_exchange, open_client, send, serve

from trio_hibernate import (
    AlarmInfo,
    App,
    ClusterCommitError,
    ClusterConfig,
    DurableObject,
    ObjectContext,
    ObjectId,
    RemoteCallError,
    Request,
    Response,
    StorageError,
)
from trio_hibernate._cluster import store
from trio_hibernate._cluster.node import ClusterNode
from trio_hibernate._cluster.relay import RelayTarget, relay_fetch
from trio_hibernate._host import runtime_of
from trio_hibernate._server import Server

pytestmark = CLUSTER

KEY = "k" * 24
TTL = 2.0


class Ledger(DurableObject):
    """Stores each op it is sent and acknowledges it (after the commit: the output gate);
    an alarm stores how many times it fired."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        self.ctx = ctx

    async def fetch(self, request: Request) -> Response:
        if request.websocket is not None:
            self.ctx.accept_websocket(request.websocket)
            return Response(status=101, websocket=request.websocket)
        sql = self.ctx.storage.sql
        if request.path.endswith("/sql"):  # one row more, and how many there are
            sql.exec("CREATE TABLE IF NOT EXISTS t (x)")
            params = request.query_params
            value = "y" * int(params["size"]) if "size" in params else params.get("x", "row")
            sql.exec("INSERT INTO t VALUES (?)", value)
            rows = sql.exec("SELECT x FROM t ORDER BY rowid").to_list()
            return Response(body=json.dumps([row["x"] for row in rows]))
        ops = await self.ctx.storage.list(prefix="op:")
        return Response(body=json.dumps(sorted(ops.values())))

    async def websocket_message(self, ws: Any, message: str | bytes) -> None:
        data = json.loads(message)
        if "op" in data:
            await self.ctx.storage.put(f"op:{data['op']:08}", data["op"])
            ws.send(json.dumps({"ack": data["op"]}))
        elif "delete" in data:
            await self.ctx.storage.delete(f"op:{data['delete']:08}")
            ws.send(json.dumps({"deleted": data["delete"]}))
        elif "clear" in data:
            await self.ctx.storage.delete_all()
            await self.ctx.storage.put("op:00000000", 0)
            ws.send(json.dumps({"cleared": True}))
        elif "alarm_in" in data:
            await self.ctx.storage.set_alarm(time.time() + data["alarm_in"])
            ws.send(json.dumps({"alarm_set": True}))

    async def bounce(self, names: list[str]) -> str:
        """Call ``bounce`` on the next object named, and so on."""
        if not names:
            return "done"
        stub = self.ctx.get_namespace("ledger").get_by_name(names[0])
        result: str = await stub.bounce(names[1:])
        return result

    async def count_ops(self) -> int:
        return len(await self.ctx.storage.list(prefix="op:"))

    async def alarm(self, info: AlarmInfo) -> None:
        fired = await self.ctx.storage.get("alarm_fired")
        count = fired if isinstance(fired, int) else 0
        await self.ctx.storage.put("alarm_fired", count + 1)


APP = App({"ledger": Ledger})


#: Seconds PostgreSQL may take to start, and to stop.
START_STOP_SECONDS = 120.0


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    """The DSN of a PostgreSQL database that lives for the session."""
    if CLUSTER_SKIP_REASON is not None:
        pytest.skip(CLUSTER_SKIP_REASON)
    ready: queue.Queue[str | BaseException] = queue.Queue()
    stop = threading.Event()

    directory = Path(tempfile.mkdtemp(prefix="trio-hibernate-pg-"))
    directory.chmod(0o711)  # the postgres user goes through to its own directory

    async def serve() -> None:
        try:
            async with open_postgres(directory / "pg") as postgres:
                ready.put(postgres.dsn)
                await trio.to_thread.run_sync(stop.wait)
        except BaseException as exc:
            ready.put(exc)
            raise
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    thread = threading.Thread(target=trio.run, args=(serve,), name="postgres", daemon=True)
    thread.start()
    started = ready.get(timeout=START_STOP_SECONDS)
    if isinstance(started, BaseException):
        thread.join(START_STOP_SECONDS)
        raise started
    try:
        yield started
    finally:
        stop.set()
        thread.join(START_STOP_SECONDS)


@pytest.fixture
def dsn(request: pytest.FixtureRequest) -> str:
    value = os.environ.get("TRIO_HIBERNATE_TEST_DSN") or request.getfixturevalue("postgres_dsn")
    import psycopg

    with psycopg.connect(value, autocommit=True) as conn:
        conn.execute(
            "DROP TABLE IF EXISTS th_hosts, th_objects, th_kv, th_alarms, th_sql, th_commit_log"
        )
    return value


def sql(dsn: str, query: str, *args: object) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


async def eventually(check: Callable[[], bool], seconds: float = WAIT_SECONDS) -> None:
    """Wait until ``check()`` holds (it reads PostgreSQL: polled, bounded)."""
    with trio.fail_after(seconds):
        # PostgreSQL tells no one when a row changes: poll it, at most ``seconds``.
        while not await trio.to_thread.run_sync(check):  # noqa: ASYNC110
            await trio.sleep(0.05)


@asynccontextmanager
async def cluster_host(
    dsn: str, host_id: str, *, key: str | None = KEY, **options: Any
) -> AsyncIterator[Server]:
    config = ClusterConfig(dsn=dsn, host_id=host_id, key=key, lease_ttl=TTL, audit=True)
    async with serve(APP, cluster=config, **options) as server:
        yield server


def node_of(server: Server) -> ClusterNode:
    node = runtime_of(server.host).cluster
    assert isinstance(node, ClusterNode)
    return node


async def get(server: Server, path: str) -> Any:
    reply = await http_exchange(server.port, f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
    return reply


async def test_acked_writes_are_in_postgres_and_move_with_the_object(dsn: str) -> None:
    async with cluster_host(dsn, "a") as a, open_client(a, "/ledger/x") as ws:
        assert json.loads(await ask(ws, json.dumps({"op": 1}))) == {"ack": 1}
        assert sql(dsn, "SELECT key FROM th_kv") == [("op:00000001",)]
        metrics = (await get(a, "/_metrics")).body.decode()
        assert "trio_hibernate_cluster_claims_total 1.0" in metrics
        assert "trio_hibernate_cluster_owned_objects 1.0" in metrics
        assert "trio_hibernate_cluster_lease_valid 1.0" in metrics
        assert 'trio_hibernate_cluster_hosts{state="alive"} 1.0' in metrics
        assert "trio_hibernate_websockets 1.0" in metrics  # the host's own families too
        status = json.loads((await get(a, "/_cluster")).body)
        assert (status["host_id"], status["state"]) == ("a", "alive")
        assert [o["name"] for o in status["owned"]] == ["x"]
        assert [h["state"] for h in status["hosts"]] == ["alive"]
    # a left (released its objects): b claims x with a new epoch and sees the write
    assert sql(dsn, "SELECT owner, epoch FROM th_objects") == [(None, 1)]
    assert sql(dsn, "SELECT state FROM th_hosts") == [("left",)]
    async with cluster_host(dsn, "b") as b:
        assert json.loads((await get(b, "/ledger/x")).body) == [1]
        assert sql(dsn, "SELECT owner, epoch FROM th_objects") == [("b", 2)]


async def test_concurrent_first_requests_make_one_claim(dsn: str) -> None:
    async with cluster_host(dsn, "a") as a:
        replies: list[int] = []

        async def fetch() -> None:
            replies.append((await get(a, "/ledger/busy")).status)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(fetch)
        assert replies == [200] * 20
        assert node_of(a).counters["claims"] == 1
        assert sql(dsn, "SELECT epoch FROM th_objects") == [(1,)]


async def test_deletes_and_delete_all_reach_postgres(dsn: str) -> None:
    async with cluster_host(dsn, "a") as a, open_client(a, "/ledger/x") as ws:
        for op in (1, 2, 3):
            await ask(ws, json.dumps({"op": op}))
        await ask(ws, json.dumps({"alarm_in": 3600}))
        assert sql(dsn, "SELECT count(*) FROM th_alarms") == [(1,)]
        await ask(ws, json.dumps({"delete": 2}))
        assert sql(dsn, "SELECT key FROM th_kv ORDER BY key") == [
            ("op:00000001",),
            ("op:00000003",),
        ]
        await ask(ws, json.dumps({"clear": True}))  # the alarm goes too
        assert sql(dsn, "SELECT key FROM th_kv") == [("op:00000000",)]
        assert sql(dsn, "SELECT count(*) FROM th_alarms") == [(0,)]


async def test_a_fenced_commit_in_a_batch_leaves_the_others_committed(dsn: str) -> None:
    import psycopg

    async with cluster_host(dsn, "a") as a:
        for name in ("p", "q"):
            await get(a, f"/ledger/{name}")  # claimed by a, epoch 1
        held = node_of(a).held
        assert held is not None
        ids = {name: ObjectId.from_name("ledger", name).hex for name in ("p", "q")}
        items: list[store.BatchItem] = [
            ("ledger", ids["p"], "p", 1, store.Writes(entries={"k": b"p"})),
            ("ledger", ids["q"], "q", 0, store.Writes(entries={"k": b"q"})),  # stale epoch
        ]

        def commit() -> list[bool]:
            with psycopg.connect(dsn, autocommit=True) as conn:
                return store.commit_batch(conn, held, items, audit=False)

        assert await trio.to_thread.run_sync(commit) == [True, False]
        assert sql(dsn, "SELECT object_id FROM th_kv") == [(ids["p"],)]


async def test_a_commit_after_a_takeover_is_fenced_and_the_host_stops(dsn: str) -> None:
    async with cluster_host(dsn, "a") as a, open_client(a, "/ledger/x") as ws:
        assert json.loads(await ask(ws, json.dumps({"op": 1}))) == {"ack": 1}
        # Another host takes x over (as after a's lease expired): a's epoch is stale.
        sql(dsn, "UPDATE th_objects SET owner = 'thief', incarnation = 0, epoch = epoch + 1")
        await send(ws, json.dumps({"op": 2}))
        code, _ = await closed_by_server(ws)  # no ack: the host fenced itself
        assert code == 1012
        assert sql(dsn, "SELECT key FROM th_kv") == [("op:00000001",)]
        assert sql(dsn, "SELECT epoch FROM th_commit_log") == [(1,)]
        assert node_of(a).lease.fenced.is_set()


async def test_a_failed_commit_is_not_acked_and_the_object_reloads(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    real = store.commit_batch
    failures = [psycopg.OperationalError("connection lost during COMMIT")]

    def flaky(*args: Any, **kwargs: Any) -> list[bool]:
        if failures:
            real(*args, **kwargs)  # it may well have committed: the outcome is unknown
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "commit_batch", flaky)
    async with cluster_host(dsn, "a") as a, open_client(a, "/ledger/x") as ws:
        await send(ws, json.dumps({"op": 1}))  # committed, but never acknowledged
        node = node_of(a)
        await eventually(lambda: node.counters["claims_lost"] == 1)  # the copy is poisoned
        assert json.loads(await ask(ws, json.dumps({"op": 2}))) == {"ack": 2}
        # the second instance was loaded from PostgreSQL under a new epoch
        assert sql(dsn, "SELECT epoch FROM th_objects") == [(2,)]
        assert json.loads((await get(a, "/ledger/x")).body) == [1, 2]


async def test_postgres_failing_while_an_object_is_reclaimed_ends_only_its_sockets(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    real_commit, real_claim = store.commit_batch, store.claim
    broken = {"commit": 1, "claim": 0}

    def commit(*args: Any, **kwargs: Any) -> list[bool]:
        if broken["commit"]:
            broken["commit"] -= 1
            broken["claim"] = 1  # PostgreSQL stays down for the claim that follows
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real_commit(*args, **kwargs)

    def claim(*args: Any, **kwargs: Any) -> object:
        if broken["claim"]:
            broken["claim"] -= 1
            raise psycopg.OperationalError("connection refused")
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(store, "commit_batch", commit)
    monkeypatch.setattr(store, "claim", claim)
    async with cluster_host(dsn, "a") as a:
        async with open_client(a, "/ledger/x") as ws:
            await send(ws, json.dumps({"op": 1}))  # its commit fails: never acked
            node = node_of(a)
            await eventually(lambda: node.counters["claims_lost"] == 1)
            await send(ws, json.dumps({"op": 2}))  # the claim fails: the socket is closed
            code, _ = await closed_by_server(ws)
            assert code == 1012
        # the host lives on: a new client is served once PostgreSQL is back
        async with open_client(a, "/ledger/x") as ws:
            assert json.loads(await ask(ws, json.dumps({"op": 3}))) == {"ack": 3}
        assert sql(dsn, "SELECT key FROM th_kv") == [("op:00000003",)]
        # Before an activation, a failed claim is an OSError: the supervisor's
        # preparation catches it (the object fails; the host goes on).
        broken["claim"] = 1
        object_id = ObjectId.from_name("ledger", "other")
        with pytest.raises(ClusterCommitError, match="connection refused") as info:
            await node_of(a).backend.prepare("ledger", object_id)
        assert isinstance(info.value, OSError)


async def test_an_object_owned_elsewhere_without_a_key_is_503(dsn: str) -> None:
    async with (
        cluster_host(dsn, "a") as a,
        cluster_host(dsn, "b", key=None) as b,
        open_client(a, "/ledger/x") as ws,
    ):
        assert json.loads(await ask(ws, json.dumps({"op": 1}))) == {"ack": 1}
        reply = await get(b, "/ledger/x")
        assert reply.status == 503
        assert 1 <= int(reply.headers["retry-after"]) <= TTL + 1
        assert b"owned by host a" in reply.body


async def test_requests_and_calls_for_an_object_owned_elsewhere_are_relayed(dsn: str) -> None:
    async with (
        cluster_host(dsn, "a") as a,
        cluster_host(dsn, "b") as b,
        open_client(a, "/ledger/x") as ws,
    ):
        assert json.loads(await ask(ws, json.dumps({"op": 1}))) == {"ack": 1}
        reply = await get(b, "/ledger/x")  # b relays it to a, which owns x
        assert (reply.status, json.loads(reply.body)) == (200, [1])
        stub = b.host.get_namespace("ledger").get_by_name("x")
        assert await stub.count_ops() == 1
        assert node_of(b).counters["relayed"] == 2
        assert node_of(b).counters["claims"] == 0
        assert len(runtime_of(b.host).objects) == 0  # b keeps nothing for relayed objects


async def test_a_call_cycle_across_hosts_is_refused_at_once(dsn: str) -> None:
    async with (
        cluster_host(dsn, "a") as a,
        cluster_host(dsn, "b") as b,
        open_client(a, "/ledger/x") as on_a,  # x lives on a
        open_client(b, "/ledger/y") as on_b,  # y lives on b
    ):
        await ask(on_a, json.dumps({"op": 1}))
        await ask(on_b, json.dumps({"op": 1}))
        ledger = a.host.get_namespace("ledger")
        assert await ledger.get_by_name("x").bounce(["y"]) == "done"
        # x -> y (relayed to b) -> x (relayed back to a): x's turn waits for y, so y's
        # call to x is refused on b at once, not after the relay's timeout.
        with trio.fail_after(TTL / 2), pytest.raises(RemoteCallError) as info:
            await ledger.get_by_name("x").bounce(["y", "x"])
        assert info.value.remote_type == "ReentrantCallError"


async def test_a_relayed_request_is_never_relayed_again(dsn: str) -> None:
    async with (
        cluster_host(dsn, "a") as a,
        cluster_host(dsn, "b") as b,
        open_client(a, "/ledger/x") as ws,
    ):
        await ask(ws, json.dumps({"op": 1}))
        # A peer that wrongly believes b owns x relays to b: b answers, not a.
        target = RelayTarget(f"127.0.0.1:{b.port}", KEY, timeout=WAIT_SECONDS)
        object_id = ObjectId.from_name("ledger", "x")
        response = await relay_fetch(
            target, "ledger", object_id, Request(method="GET", url="/ledger/x")
        )
        assert response.status == 503
        assert b"moved to host a" in response.body
        assert node_of(b).counters["relayed"] == 0


async def test_the_alarm_of_an_object_whose_owner_died_fires_on_another_host(dsn: str) -> None:
    async with cluster_host(dsn, "a") as a, open_client(a, "/ledger/x") as ws:
        assert json.loads(await ask(ws, json.dumps({"op": 1}))) == {"ack": 1}
    # x's owner dies holding it (its lease expired) with the alarm due
    sql(dsn, "UPDATE th_hosts SET state = 'alive', expires_at = now() - interval '1 s'")
    sql(dsn, "UPDATE th_objects SET owner = 'a', incarnation = (SELECT incarnation FROM th_hosts)")
    sql(
        dsn,
        "INSERT INTO th_alarms SELECT namespace, object_id, name, %s FROM th_objects",
        time.time() - 1,
    )
    async with cluster_host(dsn, "b"):
        await eventually(lambda: sql(dsn, "SELECT count(*) FROM th_alarms") == [(0,)])
        fired = sql(dsn, "SELECT value FROM th_kv WHERE key = 'alarm_fired'")
        assert len(fired) == 1
        assert sql(dsn, "SELECT owner FROM th_objects") == [("b",)]


async def test_sql_tables_move_with_the_object(dsn: str) -> None:
    async with cluster_host(dsn, "a") as a, open_client(a, "/ledger/x") as ws:
        await ask(ws, json.dumps({"op": 1}))
        assert json.loads((await get(a, "/ledger/x/sql?x=first")).body) == ["first"]
        assert json.loads((await get(a, "/ledger/x/sql?x=second")).body) == ["first", "second"]
        await ask(ws, json.dumps({"op": 2}))  # a key-value write after the SQL ones
    assert sql(dsn, "SELECT count(*) FROM th_sql") == [(1,)]
    async with cluster_host(dsn, "b") as b:  # a left: b restores x's database exactly
        reply = await get(b, "/ledger/x/sql?x=third")
        assert json.loads(reply.body) == ["first", "second", "third"]
        assert json.loads((await get(b, "/ledger/x")).body) == [1, 2]


async def test_a_sql_database_over_the_cap_is_not_committed(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trio_hibernate._cluster import storage

    monkeypatch.setattr(storage, "MAX_SQL_IMAGE_BYTES", 64 * 1024)
    async with cluster_host(dsn, "a") as a:
        assert json.loads((await get(a, "/ledger/x/sql?x=small")).body) == ["small"]
        reply = await get(a, "/ledger/x/sql?size=100000")
        assert reply.status == 500  # the commit failed: the reply never left
        # the object was reset to its last commit, here and in PostgreSQL
        assert json.loads((await get(a, "/ledger/x/sql?x=again")).body) == ["small", "again"]


async def test_a_host_id_in_use_by_a_live_process_is_refused(dsn: str) -> None:
    async with cluster_host(dsn, "a") as first:
        incarnation = node_of(first).incarnation
        assert incarnation is not None
        twin = ClusterConfig(dsn=dsn, host_id="a", key=KEY, lease_ttl=0.5)
        with pytest.raises(StorageError, match="'a' is in use by a live process"):
            async with serve(APP, cluster=twin):
                pass
    # a left (its lease ended): the same host id joins at once, with a new incarnation
    async with cluster_host(dsn, "a") as again:
        assert (node_of(again).incarnation or 0) > incarnation


async def test_postgres_unreachable_at_start_is_a_storage_error() -> None:
    config = ClusterConfig(dsn="postgresql://nobody@127.0.0.1:1/none", host_id="a")
    with pytest.raises(StorageError, match="cannot use the cluster's PostgreSQL database"):
        async with serve(APP, cluster=config):
            pass


def test_cluster_config_checks_its_values() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"host_id": "bad id"}, "host_id"),
        ({"advertise": "nohost"}, "HOST:PORT"),
        ({"lease_ttl": 0.1}, "lease_ttl"),
        ({"key": "short"}, "at least 16"),
    ]
    for options, match in cases:
        values: dict[str, Any] = {"dsn": "postgresql://x", "host_id": "a", **options}
        with pytest.raises(ValueError, match=match):
            ClusterConfig(**values)
