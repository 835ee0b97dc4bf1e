"""Peer: a websockets (asyncio) server, with its defaults (no compression is negotiated:
the load generator offers none).

``/echo/<name>`` echoes; ``/broadcast/<name>`` sends each message to every socket of the
room (the sender too) with ``websockets.asyncio.server.broadcast``.
``python bench/peer_websockets.py --port 0``.
"""

from __future__ import annotations

import asyncio

from _peerlib import parse_port, report_port
from websockets.asyncio.server import ServerConnection, broadcast, serve

Room = dict[ServerConnection, None]


async def main(port: int) -> None:
    rooms: dict[str, Room] = {}

    async def handler(ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "/"
        if not path.startswith("/broadcast/"):
            async for message in ws:
                await ws.send(message)
            return
        room = rooms.setdefault(path, {})
        room[ws] = None
        try:
            async for message in ws:
                broadcast(room, message)
        finally:
            room.pop(ws, None)

    async with serve(handler, "127.0.0.1", port, backlog=1024) as server:
        report_port(next(iter(server.sockets)).getsockname()[1])
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main(parse_port(__doc__ or "")))
