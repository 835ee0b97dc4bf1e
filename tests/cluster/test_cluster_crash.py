"""Proof 1 (crash): SIGKILL the host that owns the most objects under traffic.

30 ledger objects, 2 clients each, send acknowledged ops through nginx. The host listed
(``GET /_cluster``) as owning the most of them is killed. Every client must be served
again within the lease TTL and a few seconds; no acknowledged op may be missing from
PostgreSQL; and the commit log must show one owner per object at a time (per object, in
commit order, the epoch never decreases and each epoch is written by one host
incarnation).
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
CLIENTS_PER_OBJECT: Final = 2
#: Every client must have an ack again within this after the kill.
RECOVERY_SECONDS: Final = LEASE_TTL + 5.0


async def wait_until_all_acked_since(clients: list[LedgerClient], since: float) -> None:
    """Wait (the caller bounds it) until every client had an ack after ``since``."""
    await clients[0].progress.wait_for(
        lambda: all(client.last_ack_at > since for client in clients)
    )


async def test_sigkill_of_the_busiest_host_loses_no_acked_write() -> None:
    async with open_cluster(3, lease_ttl=LEASE_TTL, audit=True) as cluster:
        assert cluster.nginx is not None
        progress = Progress()
        clients = [
            LedgerClient(
                f"crash-{i:02d}", [cluster.nginx.url("")], base=k * 1_000_000, progress=progress
            )
            for i in range(OBJECTS)
            for k in range(CLIENTS_PER_OBJECT)
        ]
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.run)
            with trio.fail_after(30):
                await wait_until_all_acked_since(clients, trio.current_time())
            owned = await owners(cluster.hosts.values(), "crash-")
            assert all(len(hosts) == 1 for hosts in owned.values()), owned
            counts = dict.fromkeys(cluster.hosts, 0)
            for (host_id,) in owned.values():
                counts[host_id] += 1
            victim = cluster.hosts[max(counts, key=counts.__getitem__)]
            victim.child.signal(signal.SIGKILL)
            killed_at = trio.current_time()
            assert await victim.child.wait() == -signal.SIGKILL
            with trio.move_on_after(RECOVERY_SECONDS):
                await wait_until_all_acked_since(clients, killed_at)
            stuck = [(c.name, c.last_error) for c in clients if c.last_ack_at <= killed_at]
            assert not stuck, f"not served {RECOVERY_SECONDS} s after the kill: {stuck}"
            recovered_at = trio.current_time()
            # Traffic on the new owners for a while more: the audit covers them too.
            with trio.fail_after(30):
                await wait_until_all_acked_since(clients, recovered_at + 1.0)
            nursery.cancel_scope.cancel()
        survivors = [host for host in cluster.hosts.values() if host is not victim]
        moved = await owners(survivors, "crash-")
        assert all(len(hosts) == 1 for hosts in moved.values()), moved
        stored = await stored_keys(cluster.dsn, "crash-")
        rows = await commit_log(cluster.dsn)

    outages = [end - start for client in clients for start, end in client.outages]
    print(
        f"owners before the kill: {counts}; killed {victim.host_id} "
        f"(owned {counts[victim.host_id]} of {OBJECTS} objects)"
    )
    print(
        f"{len(outages)} client outages, longest {max(outages, default=0):.2f} s "
        f"(lease TTL {LEASE_TTL} s); {sum(len(c.acked) for c in clients)} ops acknowledged; "
        f"{len(rows)} commits audited"
    )
    assert missing_acked(clients, stored) == []
    assert audit_epochs(rows) == []
    assert {row.host_id for row in rows} >= {victim.host_id}, "the audit log saw no commit"
