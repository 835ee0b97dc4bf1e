"""Proof 4 (relay): two clients of one object on two hosts talk to the one instance.

Client X connects to host A, which claims the object; client Y connects to host B, which
relays Y's socket to A. A broadcast from X reaches Y, and one from Y reaches X; the
object is owned by A alone, and its ops, sent through either host, land in one ledger.
"""

from __future__ import annotations

import json

import trio
from clusterkit import CLUSTER, LEASE_TTL, http_get, open_cluster, owners
from trio_websocket import WebSocketConnection, open_websocket_url

pytestmark = CLUSTER


async def receive_json(ws: WebSocketConnection) -> object:
    with trio.fail_after(10):
        return json.loads(await ws.get_message())


async def test_a_broadcast_reaches_a_socket_relayed_from_another_host() -> None:
    async with open_cluster(2, lease_ttl=LEASE_TTL, nginx=False) as cluster:
        a, b = cluster.hosts["h1"], cluster.hosts["h2"]
        async with open_websocket_url(a.url("/ledger/relay-1"), connect_timeout=10) as x:
            await x.send_message(json.dumps({"op": 1}))
            assert await receive_json(x) == {"ack": 1}
            async with open_websocket_url(b.url("/ledger/relay-1"), connect_timeout=10) as y:
                await y.send_message(json.dumps({"op": 2}))
                assert await receive_json(y) == {"ack": 2}
                await x.send_message(json.dumps({"broadcast": "from X on A"}))
                assert await receive_json(x) == {"broadcast": "from X on A"}
                assert await receive_json(y) == {"broadcast": "from X on A"}
                await y.send_message(json.dumps({"broadcast": "from Y on B"}))
                assert await receive_json(y) == {"broadcast": "from Y on B"}
                assert await receive_json(x) == {"broadcast": "from Y on B"}
                assert await owners(cluster.hosts.values(), "relay-") == {"relay-1": ["h1"]}
                # A plain request through B reaches the same instance too.
                status, body = await http_get(b.port, "/ledger/relay-1")
                assert (status, json.loads(body)) == (200, {"ops": [1, 2], "alarms": 0})
