"""Proof 3 (graceful drain): SIGTERM a host under traffic.

It releases its objects and closes its sockets with 1012; its clients, reconnecting
through nginx, are served by another host in under a second; it exits with status 0;
no acknowledged op is lost.
"""

from __future__ import annotations

import signal
from typing import Final

import trio
from clusterkit import (
    CLUSTER,
    LEASE_TTL,
    LedgerClient,
    Progress,
    audit_epochs,
    commit_log,
    missing_acked,
    open_cluster,
    owners,
    stored_keys,
)

pytestmark = CLUSTER

OBJECTS: Final = 30
#: A drained host's clients must be served again within this.
RECONNECT_SECONDS: Final = 1.0


async def test_sigterm_hands_objects_over_within_a_second() -> None:
    async with open_cluster(3, lease_ttl=LEASE_TTL, audit=True) as cluster:
        assert cluster.nginx is not None
        progress = Progress()
        clients = [
            LedgerClient(f"drain-{i:02d}", [cluster.nginx.url("")], progress=progress)
            for i in range(OBJECTS)
        ]
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.run)
            with trio.fail_after(30):
                await progress.wait_for(lambda: all(client.acked for client in clients))
            owned = await owners(cluster.hosts.values(), "drain-")
            counts = dict.fromkeys(cluster.hosts, 0)
            for hosts in owned.values():
                counts[hosts[0]] += 1
            victim = cluster.hosts[max(counts, key=counts.__getitem__)]
            drained = [client for client in clients if owned[client.name] == [victim.host_id]]
            victim.child.signal(signal.SIGTERM)
            terminated_at = trio.current_time()
            with trio.fail_after(LEASE_TTL + 10):
                status = await victim.child.wait()
                await progress.wait_for(
                    lambda: all(c.down_since is None and c.outages for c in drained)
                )
            exited_after = trio.current_time() - terminated_at
            nursery.cancel_scope.cancel()
        stored = await stored_keys(cluster.dsn, "drain-")
        rows = await commit_log(cluster.dsn)

    gaps = [end - start for client in drained for start, end in client.outages]
    # How each drained client's connection ended (later failed attempts, if any, follow).
    codes = [client.close_codes[0] if client.close_codes else None for client in drained]
    print(
        f"SIGTERM to {victim.host_id} (owned {len(drained)} of {OBJECTS}); it exited with "
        f"{status} after {exited_after:.2f} s; its clients saw close codes {codes} and were "
        f"served again after {min(gaps, default=0):.3f}-{max(gaps, default=0):.3f} s"
    )
    assert status == 0, victim.child.tail()
    assert drained, counts
    assert codes == [1012] * len(drained), [client.close_codes for client in drained]
    assert max(gaps) < RECONNECT_SECONDS, gaps
    assert missing_acked(clients, stored) == []
    assert audit_epochs(rows) == []
