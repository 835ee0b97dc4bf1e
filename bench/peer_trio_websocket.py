"""Peer: a plain trio-websocket server (its defaults; one handler per connection).

``/echo/<name>`` echoes; ``/broadcast/<name>`` sends each message to every socket of the
room (the sender too) with ``await send_message`` in a loop.
``python bench/peer_trio_websocket.py --port 0``.
"""

from __future__ import annotations

import trio
from _peerlib import parse_port, report_port
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    serve_websocket,
)

Room = dict[WebSocketConnection, None]


async def main(port: int) -> None:
    rooms: dict[str, Room] = {}

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        path = request.path
        if not path.startswith("/broadcast/"):
            try:
                while True:
                    await ws.send_message(await ws.get_message())
            except ConnectionClosed:
                return
        room = rooms.setdefault(path, {})
        room[ws] = None
        try:
            while True:
                message = await ws.get_message()
                for peer in list(room):
                    try:
                        await peer.send_message(message)
                    except ConnectionClosed:
                        room.pop(peer, None)
        except ConnectionClosed:
            pass
        finally:
            room.pop(ws, None)

    async with trio.open_nursery() as nursery:
        server: WebSocketServer = await nursery.start(
            serve_websocket, handler, "127.0.0.1", port, None
        )
        report_port(server.port)


if __name__ == "__main__":
    trio.run(main, parse_port(__doc__ or ""))
