"""Peer (the floor): plain trio TCP, no WebSocket framing at all.

It reads the client's HTTP upgrade request and answers ``101`` (so the same load
generator can drive it), then treats the connection as a byte stream: ``/echo/<name>``
sends back whatever arrives; ``/broadcast/<name>`` writes whatever arrives to every
connection of the room (the sender too). The load generator counts the client's own
(masked) frames coming back. One task per connection, non-blocking writes.
``python bench/peer_tcp.py --port 0``.
"""

from __future__ import annotations

import base64
import hashlib
import socket

import trio
from _peerlib import Writer, accept_loop, listen, parse_port, recv_some, report_port

Room = dict[Writer, None]
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _switching_protocols(head: bytes) -> bytes:
    key = b""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


async def serve(sock: socket.socket, nursery: trio.Nursery, rooms: dict[str, Room]) -> None:
    writer = Writer(sock, nursery)
    room: Room | None = None
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await recv_some(sock)
            if not data:
                return
            head += data
        head, _, data = head.partition(b"\r\n\r\n")
        writer.write(_switching_protocols(head))
        target = head.split(b" ", 2)[1].decode("latin-1")
        if target.startswith("/broadcast/"):
            room = rooms.setdefault(target, {})
            room[writer] = None
        while True:
            if data:
                if room is None:
                    writer.write(data)
                else:
                    for peer in room:
                        peer.write(data)
            data = await recv_some(sock)
            if not data:
                return
    finally:
        if room is not None:
            room.pop(writer, None)
        writer.close()


async def main(port: int) -> None:
    listener = listen(port)
    rooms: dict[str, Room] = {}
    async with trio.open_nursery() as nursery:
        report_port(listener.getsockname()[1])
        await accept_loop(listener, nursery, lambda sock: serve(sock, nursery, rooms))


if __name__ == "__main__":
    trio.run(main, parse_port(__doc__ or ""))
