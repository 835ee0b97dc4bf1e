"""Proof 2 (zombie): SIGSTOP a host for twice the lease TTL while its objects get traffic
through the other hosts, then SIGCONT it.

The other hosts take its objects over once its lease has expired. Once it runs again it
must notice that it was fenced: close its sockets (1012) and exit with status 3 (the
contract's choice among "exit or rejoin"). An op sent to it while it was stopped must not
be acknowledged unless it is stored, and the commit log must show no write under an
old epoch committed after a newer epoch's (per object, in commit order).
"""

from __future__ import annotations

import json
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
    op_key,
    open_cluster,
    owners,
    stored_keys,
)
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

pytestmark = CLUSTER

OBJECTS: Final = 12
#: The fenced host's exit status (docs: cluster mode, the contract of issue 14).
FENCED_STATUS: Final = 3
#: The op a client sends to the stopped host (no other client uses numbers this high).
ZOMBIE_OP: Final = 9_000_000


async def test_a_stopped_host_is_fenced_and_its_late_writes_never_commit() -> None:
    async with open_cluster(3, lease_ttl=LEASE_TTL, audit=True, nginx=False) as cluster:
        hosts = list(cluster.hosts.values())
        names = [f"zombie-{i:02d}" for i in range(OBJECTS)]
        # Each object is claimed by the host its first client connects to: spread them.
        progress = Progress()
        first = [
            LedgerClient(name, [hosts[i % len(hosts)].url("")], pause=0.2, progress=progress)
            for i, name in enumerate(names)
        ]
        async with trio.open_nursery() as nursery:
            for client in first:
                nursery.start_soon(client.run)
            with trio.fail_after(30):
                await progress.wait_for(lambda: all(len(client.acked) >= 2 for client in first))
            nursery.cancel_scope.cancel()
        owned = await owners(hosts, "zombie-")
        victim = next(host for host in hosts if host.host_id == owned[names[0]][0])
        others = [host for host in hosts if host is not victim]
        victims_objects = sorted(
            name for name, (host_id,) in owned.items() if host_id == victim.host_id
        )
        assert victims_objects, owned

        async with trio.open_nursery() as nursery:
            # A socket on the stopped host: it must be closed once the host runs again.
            zombie_socket: WebSocketConnection = await nursery.start(
                hold_socket, victim.url(f"/ledger/{victims_objects[0]}")
            )
            victim.child.signal(signal.SIGSTOP)
            stopped_at = trio.current_time()
            # Queued in the kernel: the stopped host reads it on SIGCONT, fenced by then.
            await zombie_socket.send_message(json.dumps({"op": ZOMBIE_OP}))
            takers = [
                LedgerClient(
                    name,
                    [others[i % len(others)].url("")],
                    base=1_000_000,
                    pause=0.1,
                    progress=progress,
                )
                for i, name in enumerate(victims_objects)
            ]
            for client in takers:
                nursery.start_soon(client.run)
            with trio.fail_after(2 * LEASE_TTL + 15):
                await progress.wait_for(lambda: all(client.acked for client in takers))
            taken_over_after = trio.current_time() - stopped_at
            await trio.sleep_until(stopped_at + 2 * LEASE_TTL)  # the scenario: 2 x TTL stopped
            victim.child.signal(signal.SIGCONT)
            continued_at = trio.current_time()
            with trio.fail_after(LEASE_TTL + 10):
                status = await victim.child.wait()
                replies = await drain_until_closed(zombie_socket)
            exited_after = trio.current_time() - continued_at
            # The new owners keep writing after the zombie ran again.
            with trio.fail_after(10):
                await progress.wait_for(
                    lambda: all(client.last_ack_at > continued_at + 0.5 for client in takers)
                )
            nursery.cancel_scope.cancel()
        moved = await owners(others, "zombie-")
        stored = await stored_keys(cluster.dsn, "zombie-")
        rows = await commit_log(cluster.dsn)

    print(
        f"stopped {victim.host_id} (owned {len(victims_objects)} of {OBJECTS}); others served "
        f"its objects {taken_over_after:.2f} s after SIGSTOP; after SIGCONT it exited with "
        f"status {status} in {exited_after:.2f} s; its socket got {replies} and close code "
        f"{zombie_socket.closed.code if zombie_socket.closed else None}"
    )
    assert status == FENCED_STATUS, victim.child.tail()
    assert zombie_socket.closed is not None
    assert zombie_socket.closed.code == 1012, zombie_socket.closed
    assert all(moved.get(name, [None])[0] != victim.host_id for name in victims_objects), moved
    if {"ack": ZOMBIE_OP} in replies:
        assert op_key(ZOMBIE_OP) in stored[victims_objects[0]], "acked, never stored"
    assert missing_acked([*first, *takers], stored) == []
    assert audit_epochs(rows) == []
    late = [
        row for row in rows if row.host_id == victim.host_id and row.keys == (op_key(ZOMBIE_OP),)
    ]
    assert late == [], "the zombie's write committed"


async def hold_socket(
    url: str, *, task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED
) -> None:
    """Open a WebSocket to ``url`` and hand it out; keep it until cancelled."""
    async with open_websocket_url(url, connect_timeout=10, disconnect_timeout=1) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def drain_until_closed(ws: WebSocketConnection) -> list[object]:
    """The messages ``ws`` receives until it is closed (the caller bounds the wait)."""
    replies: list[object] = []
    while True:
        try:
            replies.append(json.loads(await ws.get_message()))
        except ConnectionClosed:
            return replies
