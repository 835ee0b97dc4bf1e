"""Peer: trio + wsproto, one task per connection, no objects, no hibernation.

``/echo/<name>`` echoes; ``/broadcast/<name>`` sends each message to every socket of the
room (the sender too), encoding the frame once and writing it to each socket without
blocking. Protocol pings are answered. ``python bench/peer_wsproto.py --port 0``.
"""

from __future__ import annotations

import socket

import trio
from _peerlib import Writer, accept_loop, listen, parse_port, recv_some, report_port
from wsproto import WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

Room = dict[Writer, None]


async def serve(sock: socket.socket, nursery: trio.Nursery, rooms: dict[str, Room]) -> None:
    writer = Writer(sock, nursery)
    ws = WSConnection(ConnectionType.SERVER)
    room: Room | None = None
    parts: list[str] = []
    binary_parts: list[bytes] = []
    try:
        while True:
            data = await recv_some(sock)
            if not data:
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    frame: bytes
                    if isinstance(event, TextMessage):
                        parts.append(event.data)
                        if not event.message_finished:
                            continue
                        frame = ws.send(TextMessage(data="".join(parts)))
                        parts.clear()
                    else:
                        binary_parts.append(bytes(event.data))
                        if not event.message_finished:
                            continue
                        frame = ws.send(BytesMessage(data=b"".join(binary_parts)))
                        binary_parts.clear()
                    if room is None:
                        writer.write(frame)
                    else:
                        for peer in room:
                            peer.write(frame)
                elif isinstance(event, Ping):
                    writer.write(ws.send(event.response()))
                elif isinstance(event, Request):
                    writer.write(ws.send(AcceptConnection()))
                    if event.target.startswith("/broadcast/"):
                        room = rooms.setdefault(event.target, {})
                        room[writer] = None
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        writer.write(ws.send(event.response()))
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
