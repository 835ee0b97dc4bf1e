"""Proof 5 (alarm failover): an alarm set on a host that is then SIGKILLed fires once,
on another host.

A client sets the alarm of an object owned by host A a little ahead, A is killed at
once; once A's lease has expired another host's sweeper claims the object and fires the
alarm: ``alarm:1`` is stored, written by another host, and no ``alarm:2`` follows.
"""

from __future__ import annotations

import json
import signal
from typing import Final

import trio
from clusterkit import CLUSTER, LEASE_TTL, commit_log, open_cluster, owners, poll, stored_keys
from trio_websocket import open_websocket_url

pytestmark = CLUSTER

#: How far ahead the alarm is set (A is dead by then).
ALARM_IN_SECONDS: Final = 1.0


async def test_an_alarm_of_a_killed_host_fires_once_elsewhere() -> None:
    async with open_cluster(3, lease_ttl=LEASE_TTL, audit=True, nginx=False) as cluster:
        a = cluster.hosts["h1"]
        async with open_websocket_url(a.url("/ledger/alarm-1"), connect_timeout=10) as ws:
            await ws.send_message(json.dumps({"alarm_in": ALARM_IN_SECONDS}))
            with trio.fail_after(10):
                reply = json.loads(await ws.get_message())
            assert set(reply) == {"alarm_set"}, reply
            assert await owners([a], "alarm-") == {"alarm-1": ["h1"]}
            a.child.signal(signal.SIGKILL)
        killed_at = trio.current_time()
        await a.child.wait()

        async def fired() -> bool:
            return "alarm:1" in (await stored_keys(cluster.dsn, "alarm-")).get("alarm-1", ())

        with trio.fail_after(LEASE_TTL + ALARM_IN_SECONDS + 15):
            await poll(fired)
        fired_after = trio.current_time() - killed_at
        # Several sweeps later, it has still fired once.
        await trio.sleep(3 * LEASE_TTL)
        keys = (await stored_keys(cluster.dsn, "alarm-"))["alarm-1"]
        rows = await commit_log(cluster.dsn)
        survivors = [host for host in cluster.hosts.values() if host is not a]
        owner = await owners(survivors, "alarm-")

    writers = {row.host_id for row in rows if "alarm:1" in row.keys}
    print(f"the alarm fired {fired_after:.2f} s after h1 was killed, on {writers}; owner {owner}")
    assert "alarm:2" not in keys, keys
    assert len(writers) == 1, rows
    assert "h1" not in writers, rows
