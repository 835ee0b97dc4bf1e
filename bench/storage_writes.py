"""Storage write throughput: puts per second, one object and many, 1 and 10 puts per turn.

Each object gets its own WebSocket client (trio-websocket, 127.0.0.1) that keeps up to
``--window`` messages in flight; every message is one turn that does ``--puts`` ``put``
calls and then replies. A turn's writes are committed once, when the turn ends, in a
worker thread, and the reply is held until that commit is durable, so turns per second is
the commit rate, and puts per turn shows what coalescing buys.

    python bench/storage_writes.py                   # 1 and 50 objects x 1 and 10 puts
    python bench/storage_writes.py --objects 1 10 100 --puts 1 100 --seconds 5

Storage is a temporary directory (``--data-dir`` to choose; memory with ``--memory``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trio_hibernate import (
    App,
    DurableObject,
    ObjectContext,
    Request,
    Response,
    WebSocket,
    open_server,
)

NAMESPACE = "bench"


class Writer(DurableObject):
    """Each message is a turn of ``env`` puts (keys reused, so the table stays small)."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        self.puts: int = env
        self.keys = [f"key{i}" for i in range(self.puts)]

    async def fetch(self, request: Request) -> Response:
        ws = request.websocket
        assert ws is not None
        self.ctx.accept_websocket(ws)
        return Response(status=101, websocket=ws)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        storage = self.ctx.storage
        for key in self.keys:
            await storage.put(key, message)
        ws.send(message)


@attrs.frozen
class Result:
    objects: int
    puts_per_turn: int
    turns: int
    seconds: float

    @property
    def turns_per_second(self) -> float:
        return self.turns / self.seconds

    @property
    def puts_per_second(self) -> float:
        return self.turns * self.puts_per_turn / self.seconds


async def drive(ws: WebSocketConnection, window: int, stop: trio.Event, done: list[int]) -> None:
    """Keep ``window`` turns in flight on one object until ``stop``; count finished turns."""
    in_flight = trio.Semaphore(window)

    async def send() -> None:
        number = 0
        while not stop.is_set():
            await in_flight.acquire()
            await ws.send_message(str(number))
            number += 1

    async def receive() -> None:
        while True:
            await ws.get_message()
            done[0] += 1
            in_flight.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
        await stop.wait()
        nursery.cancel_scope.cancel()


async def run_case(
    objects: int, puts: int, seconds: float, window: int, data_dir: Path | None
) -> Result:
    app = App({NAMESPACE: Writer}, env=puts)
    done = [0]
    async with (
        open_server(app, "127.0.0.1", 0, data_dir=data_dir, idle_timeout=3600) as server,
        trio.open_nursery() as nursery,
    ):
        stop = trio.Event()
        clients: list[WebSocketConnection] = []
        for index in range(objects):
            url = server.url(f"/{NAMESPACE}/o{puts}-{index}")
            clients.append(await nursery.start(_client, url))
        async with trio.open_nursery() as warm_up:
            for ws in clients:  # one turn each first: every object is live, its file made
                warm_up.start_soon(_one_turn, ws)
        started = time.perf_counter()
        async with trio.open_nursery() as drivers:
            for ws in clients:
                drivers.start_soon(drive, ws, window, stop, done)
            await trio.sleep(seconds)
            stop.set()
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return Result(objects, puts, done[0], elapsed)


async def _one_turn(ws: WebSocketConnection) -> None:
    await ws.send_message("warm-up")
    await ws.get_message()


async def _client(url: str, *, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
    async with open_websocket_url(url, disconnect_timeout=1) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


def print_table(results: list[Result]) -> None:
    header = (
        f"{'objects':>8} {'puts/turn':>10} {'turns':>8} {'seconds':>8} {'turns/s':>9} {'puts/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.objects:>8} {r.puts_per_turn:>10} {r.turns:>8} {r.seconds:>8.2f} "
            f"{r.turns_per_second:>9.0f} {r.puts_per_second:>9.0f}"
        )


async def main(args: argparse.Namespace) -> None:
    results = []
    for objects in args.objects:
        for puts in args.puts:
            if args.memory:
                results.append(await run_case(objects, puts, args.seconds, args.window, None))
                continue
            with tempfile.TemporaryDirectory(dir=args.data_dir) as scratch:
                results.append(
                    await run_case(objects, puts, args.seconds, args.window, Path(scratch))
                )
    storage = "memory" if args.memory else f"files under {args.data_dir or tempfile.gettempdir()}"
    print(f"storage: {storage}; window {args.window} turns per object; {args.seconds} s per row")
    print_table(results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--objects", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--puts", type=int, nargs="+", default=[1, 10], help="puts per turn")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per row")
    parser.add_argument("--window", type=int, default=8, help="turns in flight per object")
    parser.add_argument("--data-dir", type=Path, default=None, help="parent of the scratch dir")
    parser.add_argument("--memory", action="store_true", help="in-memory storage (no flush)")
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_args())
