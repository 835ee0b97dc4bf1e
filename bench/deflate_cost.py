"""What permessage-deflate costs: memory per idle (hibernated) socket, CPU per message.

Memory: N clients (wsproto, offering ``permessage-deflate; client_max_window_bits``)
connect over in-memory streams, each to its own echo object, exchange one 1 KiB JSON
message each way (so that, with context takeover, both zlib states exist) then a
1-byte one (the read loop keeps the last message it received), and every object
hibernates. The server's allocations (tracemalloc, every trace with a
``trio_hibernate`` frame in its stack) divided by N is the cost of an idle socket, for:
no compression, deflate without context takeover (the default), and with context
takeover at 15 and 12 window bits.

CPU: microseconds per message to encode a server frame (plain, compressed on its own,
compressed with a kept context) and to inflate an inbound one, for messages of 200 B and
4 KiB of JSON; and echo round trips per second for one client, without and with
compression.

    python bench/deflate_cost.py            # N = 1,000
    python bench/deflate_cost.py --sockets 200
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import timeit
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import trio
from trio.testing import memory_stream_pair
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request as WSRequest, TextMessage
from wsproto.extensions import PerMessageDeflate

from trio_hibernate import (
    App,
    DurableObject,
    Host,
    Request,
    Response,
    WebSocket,
    WebSocketCompression,
    open_host,
)
from trio_hibernate._core.deflate import new_compressor
from trio_hibernate._core.frames import deflate_message, encode_message
from trio_hibernate._host import runtime_of


class Echo(DurableObject):
    async def fetch(self, request: Request) -> Response:
        ws = request.websocket
        assert ws is not None
        self.ctx.accept_websocket(ws)
        return Response(status=101, websocket=ws)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.send(message)


def sample(size: int) -> str:
    """JSON of about ``size`` bytes, as a chat or game server sends."""
    rows = [
        {"user": f"user{i}", "x": i * 7 % 1000, "y": i * 13 % 1000, "on": True} for i in range(200)
    ]
    return json.dumps(rows)[: size - 1] + "]"


class Client:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def upgrade(self, target: str) -> None:
        offer = PerMessageDeflate(client_max_window_bits=15)
        await self.stream.send_all(
            self.ws.send(WSRequest(host="memory", target=target, extensions=[offer]))
        )
        assert isinstance(await self.next_event(), AcceptConnection)

    async def next_event(self) -> Any:
        while True:
            for event in self.ws.events():
                return event
            self.ws.receive_data(bytes(await self.stream.receive_some(65536)))

    async def echo(self, message: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=message)))
        parts = []
        while True:
            event = await self.next_event()
            assert isinstance(event, Message)
            parts.append(event.data)
            if event.message_finished:
                assert "".join(parts) == message
                return


async def idle_bytes(n: int, compression: WebSocketCompression | None) -> float:
    """Server bytes per idle socket whose object hibernated."""
    message = sample(1024)
    async with open_host(
        App({"echo": Echo}), websocket_compression=compression, idle_timeout=1e9
    ) as host:
        runtime = runtime_of(host)

        async def connect(name: str) -> Client:
            client_end, server_end = memory_stream_pair()
            runtime.serve_stream(server_end)
            client = Client(client_end)
            await client.upgrade(f"/echo/{name}")
            await client.echo(message)
            # The read loop keeps the last chunk and message it received until the next
            # one: make it the same tiny one in every mode.
            await client.echo(".")
            return client

        warm = await connect("warm-up")  # caches, first-use allocations
        await hibernate_all(host, ["warm-up"])
        gc.collect()
        tracemalloc.start(20)
        try:
            before = tracemalloc.take_snapshot()
            clients = [await connect(f"o{i}") for i in range(n)]
            await hibernate_all(host, [f"o{i}" for i in range(n)])
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        ours = [tracemalloc.Filter(True, "*/trio_hibernate/*", all_frames=True)]
        grown = sum(
            stat.size_diff
            for stat in after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
        )
        for client in [warm, *clients]:
            await client.stream.aclose()
        return grown / n


async def hibernate_all(host: Host, names: list[str]) -> None:
    await trio.testing.wait_all_tasks_blocked()
    for name in names:
        assert await host.hibernate("echo", name)
    assert host.statistics().live_objects == 0


def per_call(fn: Callable[[], object]) -> float:
    """Microseconds per call, the best of 5."""
    number = 2000
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def cpu_table() -> list[tuple[str, float, float]]:
    rows = []
    for size in (200, 4096):
        message = sample(size)
        data = message.encode()
        kept = new_compressor(15)
        once = new_compressor(15)
        packed = once.compress(data) + once.flush(zlib.Z_SYNC_FLUSH)

        def inflate(packed: bytes = packed) -> bytes:
            return zlib.decompressobj(-15).decompress(packed)

        def plain(message: str = message) -> bytes:
            return encode_message(message)

        def alone(message: str = message) -> bytes:
            return deflate_message(message, new_compressor(15))

        def context(message: str = message, kept: Any = kept) -> bytes:
            return deflate_message(message, kept)

        rows.append((f"{size} B JSON: plain / alone", per_call(plain), per_call(alone)))
        rows.append(("  kept context / inflate", per_call(context), per_call(inflate)))
        rows.append(("  frame bytes: plain / alone", len(plain()), len(alone())))
    return rows


async def round_trips(compression: WebSocketCompression | None, seconds: float = 2.0) -> float:
    message = sample(1024)
    async with open_host(App({"echo": Echo}), websocket_compression=compression) as host:
        client_end, server_end = memory_stream_pair()
        runtime_of(host).serve_stream(server_end)
        client = Client(client_end)
        await client.upgrade("/echo/rt")
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            await client.echo(message)
            count += 1
        rate = count / (time.perf_counter() - start)
        await client_end.aclose()
        return rate


async def main(n: int) -> None:
    modes: list[tuple[str, WebSocketCompression | None]] = [
        ("off", None),
        ("deflate, no context takeover (default)", WebSocketCompression()),
        ("deflate, context takeover, 15 bits", WebSocketCompression(context_takeover=True)),
        (
            "deflate, context takeover, 12 bits",
            WebSocketCompression(context_takeover=True, window_bits=12),
        ),
    ]
    print(f"server bytes per idle (hibernated) socket, {n} sockets:")
    for label, compression in modes:
        print(f"  {label:42} {await idle_bytes(n, compression):10.0f}")
    print("CPU per message (us): encode plain / deflate on its own; kept context / inflate")
    for label, a, b in cpu_table():
        print(f"  {label:28} {a:8.2f} {b:8.2f}")
    print("echo round trips per second, 1 KiB JSON, one client, in-memory streams:")
    for label, compression in modes[:3]:
        print(f"  {label:42} {await round_trips(compression):10.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sockets", type=int, default=1000)
    trio.run(main, parser.parse_args().sockets)
