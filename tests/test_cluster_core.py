"""Cluster mode in one process: hosts sharing a PostgreSQL database (marker ``cluster``;
``TRIO_HIBERNATE_TEST_DSN`` names the database, else these tests are skipped)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from helpers import ask, http_exchange, open_client, serve

from trio_hibernate import App, ClusterConfig, DurableObject, ObjectContext, Request, Response
from trio_hibernate._server import Server

pytestmark = pytest.mark.cluster

DSN = os.environ.get("TRIO_HIBERNATE_TEST_DSN")
KEY = "k" * 24


class Ledger(DurableObject):
    """Stores each op it is sent, acknowledges it after the commit."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        self.ctx = ctx

    async def fetch(self, request: Request) -> Response:
        if request.websocket is not None:
            self.ctx.accept_websocket(request.websocket)
            return Response(status=101, websocket=request.websocket)
        ops = await self.ctx.storage.list(prefix="op:")
        return Response(body=json.dumps(sorted(ops.values())))

    async def websocket_message(self, ws: Any, message: str | bytes) -> None:
        data = json.loads(message)
        if "op" in data:
            await self.ctx.storage.put(f"op:{data['op']:08}", data["op"])
            ws.send(json.dumps({"ack": data["op"]}))


APP = App({"ledger": Ledger})


@pytest.fixture
def dsn() -> str:
    if DSN is None:
        pytest.skip("set TRIO_HIBERNATE_TEST_DSN to a PostgreSQL database")
    import psycopg

    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS th_hosts, th_objects, th_kv, th_alarms, th_commit_log")
    return DSN


@asynccontextmanager
async def cluster_host(dsn: str, host_id: str, **options: Any) -> AsyncIterator[Server]:
    config = ClusterConfig(dsn=dsn, host_id=host_id, key=KEY, lease_ttl=2.0, audit=True)
    async with serve(APP, cluster=config, **options) as server:
        yield server


async def test_acked_write_is_in_postgres_and_moves_with_the_object(dsn: str) -> None:
    async with cluster_host(dsn, "a") as a:
        async with open_client(a, "/ledger/x") as ws:
            assert json.loads(await ask(ws, json.dumps({"op": 1}))) == {"ack": 1}
            status = json.loads(
                (await http_exchange(a.port, b"GET /_cluster HTTP/1.1\r\nhost: x\r\n\r\n")).body
            )
            assert status["owned_count"] == 1
    # a left: b claims the object and sees the write
    async with cluster_host(dsn, "b") as b:
        reply = await http_exchange(b.port, b"GET /ledger/x HTTP/1.1\r\nhost: x\r\n\r\n")
        assert json.loads(reply.body) == [1]
