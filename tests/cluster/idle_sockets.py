"""A load generator for the scale proof: many idle WebSockets from one process.

``python idle_sockets.py PORT PREFIX SOCKETS PER_OBJECT`` opens SOCKETS WebSockets to
``ws://127.0.0.1:PORT/ledger/PREFIX-<k>`` (PER_OBJECT sockets per object), at most
:data:`CONCURRENCY` handshakes at a time, and prints ``connected N``. Then each line
``ping`` on stdin sends ``ping`` on every socket and waits for every ``pong`` (the
objects' auto-response), printing ``pongs N SECONDS``; end of input closes everything.

Sockets are bare: a handshake with a fixed key and one masked frame each way, no task or
buffer per socket while idle, so that one process holds 15,000 of them well under the
20,000-descriptor limit.
"""

from __future__ import annotations

import sys
import time
from typing import Final

import trio

CONCURRENCY: Final = 200
SECONDS: Final = 120.0
#: A masked text frame "ping" with the mask 0 (masking with 0 leaves the payload as is).
PING: Final = bytes((0x81, 0x84, 0, 0, 0, 0)) + b"ping"
PONG: Final = bytes((0x81, 0x04)) + b"pong"


async def receive_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


async def open_socket(port: int, path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await sock.send(request.encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # the 101 is all the server sends: nothing follows
        chunk = await sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"{path}: closed after {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101 "):
        raise ConnectionError(f"{path}: {head.decode(errors='replace')}")
    return sock


async def main(port: int, prefix: str, count: int, per_object: int) -> None:
    sockets: list[trio.socket.SocketType] = []
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def connect(k: int) -> None:
        async with limiter:
            sockets.append(await open_socket(port, f"/ledger/{prefix}-{k // per_object:05d}"))

    with trio.fail_after(SECONDS):
        async with trio.open_nursery() as nursery:
            for k in range(count):
                nursery.start_soon(connect, k)
    print(f"connected {len(sockets)}", flush=True)

    async def ping(sock: trio.socket.SocketType) -> None:
        async with limiter:
            await sock.send(PING)
            reply = await receive_exactly(sock, len(PONG))
            if reply != PONG:
                raise ConnectionError(f"got {reply!r} for a ping")

    stdin = trio.lowlevel.FdStream(0)
    buffered = b""
    while True:
        chunk = await stdin.receive_some()
        if not chunk:
            break
        buffered += chunk
        while b"\n" in buffered:
            line, _, buffered = buffered.partition(b"\n")
            if line.strip() != b"ping":
                raise ValueError(f"unknown command {line!r}")
            started = time.monotonic()
            with trio.fail_after(SECONDS):
                async with trio.open_nursery() as nursery:
                    for sock in sockets:
                        nursery.start_soon(ping, sock)
            print(f"pongs {len(sockets)} {time.monotonic() - started:.3f}", flush=True)
    for sock in sockets:
        sock.close()


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
