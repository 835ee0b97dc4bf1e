"""Proof 6 (scale on one machine): 45,000 hibernated WebSockets across 3 host processes,
all answering the auto-response; the hosts' resident memory per socket is printed.

Each host holds 15,000 sockets (under the 20,000-descriptor limit of a process here),
opened by its own load generator process (``idle_sockets.py``, 15,000 descriptors too) to
objects whose first socket lands on that host, so each host owns its objects and nothing
is relayed. Once every object has hibernated (``trio_hibernate_objects{state="live"}``
is 0), every socket sends ``ping`` and must get ``pong``, answered without waking any
object. VmRSS of each host before the sockets and after the pongs gives the memory per
socket (printed: ``pytest -rP``). About 2-4 minutes; marked ``scale`` too, so that
``pytest -m "cluster and not scale"`` leaves it out.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest
import trio
from clusterkit import CLUSTER, LEASE_TTL, HostProcess, metric, open_cluster, poll, vm_rss_kib

pytestmark = [*CLUSTER, pytest.mark.scale]

HOSTS: Final = 3
SOCKETS_PER_HOST: Final = 15_000
SOCKETS_PER_OBJECT: Final = 100
#: The hard descriptor limit of a process on these machines.
DESCRIPTOR_LIMIT: Final = 20_000
IDLE_SOCKETS: Final = Path(__file__).resolve().parent / "idle_sockets.py"
LIVE: Final = 'trio_hibernate_objects{state="live"}'


async def read_line(process: trio.Process, buffer: bytearray) -> str:
    """The next line of the load generator's output."""
    assert process.stdout is not None
    while b"\n" not in buffer:
        chunk = await process.stdout.receive_some(4096)
        assert chunk, f"the load generator exited: {buffer.decode(errors='replace')}"
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


async def hibernated(host: HostProcess) -> bool:
    """Whether every object of ``host`` hibernated."""
    return await metric(host, LIVE) == 0


def descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def test_45000_hibernated_sockets_answer_the_auto_response() -> None:
    # Objects hibernate one second after their last event.
    async with open_cluster(
        HOSTS, lease_ttl=LEASE_TTL, nginx=False, host_args=["--idle-timeout", "1"]
    ) as cluster:
        hosts = list(cluster.hosts.values())
        rss_before = {host.host_id: vm_rss_kib(host.child.pid) for host in hosts}
        auto_before = {
            h.host_id: await metric(h, "trio_hibernate_auto_responses_total") for h in hosts
        }
        wakes_before: dict[str, float] = {}
        generators: list[tuple[HostProcess, trio.Process, bytearray]] = []
        try:
            for host in hosts:
                process = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        str(IDLE_SOCKETS),
                        str(host.port),
                        f"scale-{host.host_id}",
                        str(SOCKETS_PER_HOST),
                        str(SOCKETS_PER_OBJECT),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                generators.append((host, process, bytearray()))
            with trio.fail_after(150):
                for _, process, buffer in generators:
                    assert await read_line(process, buffer) == f"connected {SOCKETS_PER_HOST}"
                for host in hosts:
                    await poll(functools.partial(hibernated, host), 0.5)
                    wakes_before[host.host_id] = await metric(host, "trio_hibernate_wakes_total")
            fds = {host.host_id: descriptors(host.child.pid) for host in hosts}
            loadgen_fds = [descriptors(process.pid) for _, process, _ in generators]
            pong_seconds: dict[str, float] = {}
            with trio.fail_after(120):
                for _, process, _ in generators:
                    assert process.stdin is not None
                    await process.stdin.send_all(b"ping\n")
                for host, process, buffer in generators:
                    word, count, seconds = (await read_line(process, buffer)).split()
                    assert (word, int(count)) == ("pongs", SOCKETS_PER_HOST)
                    pong_seconds[host.host_id] = float(seconds)
            rss_after = {host.host_id: vm_rss_kib(host.child.pid) for host in hosts}
            for host in hosts:
                assert await metric(host, "trio_hibernate_websockets") == SOCKETS_PER_HOST
                assert (
                    await metric(host, "trio_hibernate_wakes_total") == wakes_before[host.host_id]
                )
                answered = await metric(host, "trio_hibernate_auto_responses_total")
                assert answered - auto_before[host.host_id] == SOCKETS_PER_HOST
        finally:
            for _, process, _ in generators:
                if process.stdin is not None:
                    await process.stdin.aclose()
            with trio.CancelScope(shield=True), trio.fail_after(60):
                for _, process, _ in generators:
                    await process.wait()

    print(f"{HOSTS * SOCKETS_PER_HOST} hibernated sockets, {SOCKETS_PER_HOST} per host:")
    for host in hosts:
        per_socket = (rss_after[host.host_id] - rss_before[host.host_id]) * 1024 / SOCKETS_PER_HOST
        print(
            f"  {host.host_id}: VmRSS {rss_before[host.host_id] / 1024:.1f} MiB before, "
            f"{rss_after[host.host_id] / 1024:.1f} MiB after: {per_socket:,.0f} B per socket; "
            f"{fds[host.host_id]} descriptors; {SOCKETS_PER_HOST} pongs in "
            f"{pong_seconds[host.host_id]:.2f} s"
        )
    print(f"  load generators: {loadgen_fds} descriptors")
    assert all(count < DESCRIPTOR_LIMIT for count in [*fds.values(), *loadgen_fds])
