"""Durable commits in cluster mode (PostgreSQL, fenced) against single-host mode (SQLite).

Starts PostgreSQL (``examples/cluster/cluster.py``'s launcher), then, alternately, one
``trio-hibernate serve bench/th_app.py:app`` host with ``--data-dir`` (SQLite, an
``fsync`` per group of commits) and one with ``--cluster`` (each group of commits is one
PostgreSQL transaction that checks the object's epoch first; PostgreSQL with
``fsync=on``, ``synchronous_commit=on``). Clients (trio-websocket, 127.0.0.1) send
messages to ``/writer/<name>`` objects: each message is a turn that does one ``put`` and
replies, the reply held until the write is durable. Two cases:

* ``many``: ``--objects`` objects (default 32), one client each, one message in flight:
  acknowledged writes per second and the round trip of each (p50, p99): a turn's latency
  with its commit, as a client sees it.
* ``one``: one object, 4 clients with 8 messages in flight each (group commit).

    python bench/cluster_commits.py                 # about 2 minutes
    python bench/cluster_commits.py --seconds 3 --repeat 1
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "cluster"))

from cluster import missing_binaries, open_postgres  # noqa: E402

LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


async def start_server(
    mode: str, dsn: str, data_dir: Path, nursery: trio.Nursery
) -> tuple[trio.Process, int]:
    """A host in ``mode`` ("sqlite" or "cluster"); its port once it listens."""
    argv = [
        sys.executable,
        "-m",
        "trio_hibernate",
        "serve",
        str(ROOT / "bench" / "th_app.py") + ":app",
    ]
    argv += ["--port", "0", "--log-level", "warning"]
    if mode == "sqlite":
        argv += ["--data-dir", str(data_dir)]
    else:
        argv += ["--cluster", dsn, "--host-id", f"bench-{secrets.token_hex(3)}"]
        argv += ["--cluster-key", secrets.token_hex(16)]
    process: trio.Process = await nursery.start(
        partial(trio.run_process, argv, stdout=subprocess.PIPE, check=False)
    )
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(60):
        while (found := LISTENING.search(seen)) is None:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"the {mode} host exited: {seen.decode(errors='replace')}")
            seen += chunk
    return process, int(found.group(1))


async def drive(
    ws: WebSocketConnection, window: int, stop_at: float, start_at: float, rtts: list[float]
) -> None:
    """Keep ``window`` messages in flight until ``stop_at``; record round trips after
    ``start_at``."""
    sent: list[float] = []
    n = 0

    async def send_one() -> None:
        nonlocal n
        n += 1
        sent.append(time.perf_counter())
        await ws.send_message(f"{n % 16:04d}" + "x" * 28)

    for _ in range(window):
        await send_one()
    while True:
        await ws.get_message()
        now = time.perf_counter()
        began = sent.pop(0)
        if now >= start_at:
            rtts.append(now - began)
        if now >= stop_at:
            return
        await send_one()


async def run_case(
    port: int, objects: int, clients: int, window: int, seconds: float, prefix: str
) -> tuple[float, list[float]]:
    """Acknowledged writes per second and the round trips measured."""
    rtts: list[float] = []
    async with trio.open_nursery() as nursery:
        sockets: list[WebSocketConnection] = []

        async def connect(path: str, *, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
            async with open_websocket_url(f"ws://127.0.0.1:{port}{path}") as ws:
                task_status.started(ws)
                await trio.sleep_forever()

        for i in range(objects * clients):
            sockets.append(await nursery.start(connect, f"/writer/{prefix}-{i // clients}"))  # noqa: PERF401
        warmup = 1.0
        start_at = time.perf_counter() + warmup
        stop_at = start_at + seconds
        async with trio.open_nursery() as drivers:
            for ws in sockets:
                drivers.start_soon(drive, ws, window, stop_at, start_at, rtts)
        nursery.cancel_scope.cancel()
    return len(rtts) / seconds, rtts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace, directory: Path) -> None:
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    cases = {"many": (args.objects, 1, 1), "one": (1, 4, 8)}
    try:
        async with open_postgres(directory / "pg") as postgres:
            for rep in range(args.repeat):
                for mode in ("sqlite", "cluster") if rep % 2 == 0 else ("cluster", "sqlite"):
                    data_dir = directory / f"data-{rep}-{mode}"
                    async with trio.open_nursery() as nursery:
                        process, port = await start_server(mode, postgres.dsn, data_dir, nursery)
                        for case, (objects, clients, window) in cases.items():
                            rate, rtts = await run_case(
                                port, objects, clients, window, args.seconds, f"{case}{rep}"
                            )
                            p50, p99 = percentile(rtts, 0.5), percentile(rtts, 0.99)
                            results.setdefault((case, mode), []).append((rate, p50, p99))
                            print(
                                f"rep {rep} {mode:7} {case:4}: {rate:8.0f} writes/s, "
                                f"p50 {p50 * 1e3:6.2f} ms, p99 {p99 * 1e3:6.2f} ms",
                                flush=True,
                            )
                        process.terminate()
                        await process.wait()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print()
    print("| case | storage | acked writes/s | p50 ms | p99 ms |")
    print("|---|---|---:|---:|---:|")
    for (case, mode), runs in sorted(results.items()):
        rate = statistics.median(r[0] for r in runs)
        p50 = statistics.median(r[1] for r in runs)
        p99 = statistics.median(r[2] for r in runs)
        print(f"| {case} | {mode} | {rate:,.0f} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} |")
    for case in cases:
        sqlite = statistics.median(r[0] for r in results[(case, "sqlite")])
        cluster = statistics.median(r[0] for r in results[(case, "cluster")])
        print(f"{case}: cluster / sqlite throughput = {cluster / sqlite:.2f}x")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per case")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each mode, alternated")
    parser.add_argument("--objects", type=int, default=32, help="objects in the 'many' case")
    return parser.parse_args()


if __name__ == "__main__":
    if missing := missing_binaries():
        sys.exit(f"cluster_commits.py: not installed: {', '.join(missing)}")
    scratch = Path(tempfile.mkdtemp(prefix="th-bench-cluster-"))
    scratch.chmod(0o711)  # the postgres user goes through to its own directory
    trio.run(main, parse_args(), scratch)
