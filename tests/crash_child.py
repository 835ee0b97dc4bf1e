"""The child process of ``test_storage_crash.py``: serves one object until it is killed.

Run as ``python crash_child.py DATA_DIR``. It listens on 127.0.0.1 (a free port), prints
the port on a line of its own, and serves :class:`Writer`, which acknowledges a numbered
write only after ``put`` (the output gate holds the acknowledgement until the commit).
"""

from __future__ import annotations

import sys
from typing import Final, NoReturn

import trio

from trio_hibernate import App, DurableObject, Request, Response, WebSocket, open_server

NAMESPACE: Final = "crash"
NAME: Final = "victim"


class Writer(DurableObject):
    """``N`` (a decimal number) -> ``put(f"k{N}", N)``, then the reply ``ack N``."""

    async def fetch(self, request: Request) -> Response:
        ws = request.websocket
        if ws is None:
            return Response(status=400, body="WebSocket only\n")
        self.ctx.accept_websocket(ws)
        return Response(status=101, websocket=ws)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        number = int(message)
        await self.ctx.storage.put(f"k{number}", number)
        ws.send(f"ack {number}")


async def serve(data_dir: str) -> NoReturn:
    app = App({NAMESPACE: Writer})
    async with open_server(app, "127.0.0.1", 0, data_dir=data_dir) as server:
        print(server.port, flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(serve, sys.argv[1])
