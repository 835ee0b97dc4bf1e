"""The trio-hibernate side of the benchmarks: the objects ``bench/run.py`` drives.

Served as ``python -m trio_hibernate serve bench/th_app.py:app --port 0``:

* ``/echo/<name>``: one object per name. It echoes every message, and its sockets answer
  ``"ping"`` with ``"pong"`` by auto-response (without waking the object). The constructor
  is the default one (trivial), as the wake-latency target asks.
* ``/broadcast/<name>``: one object holds every socket of the room; a message from any of
  them is sent to all of them, the sender included (``get_websockets()`` loop calling
  ``send``). The many-rooms run uses one such object per room.
* ``/writer/<name>``: each message ``m`` is one turn that does ``storage.put(m[:4], m)``
  and sends ``m`` back; the reply is held until the turn's write is durable (served with
  ``--data-dir`` for the durable-writes run).

The workerd peer (``bench/workerd/bench.js``) and the Python peers (``bench/peer_*.py``)
serve the same paths with the same behaviour.
"""

from __future__ import annotations

from trio_hibernate import (
    App,
    DurableObject,
    Request,
    Response,
    WebSocket,
    WebSocketRequestResponsePair,
)

AUTO_RESPONSE = WebSocketRequestResponsePair("ping", "pong")


def _accept(obj: DurableObject, request: Request) -> Response:
    ws = request.websocket
    if ws is None:
        return Response(status=426, body="WebSocket only\n")
    obj.ctx.accept_websocket(ws)
    return Response(status=101, websocket=ws)


class Echo(DurableObject):
    """Echoes each message back to its sender."""

    async def fetch(self, request: Request) -> Response:
        self.ctx.set_websocket_auto_response(AUTO_RESPONSE)
        return _accept(self, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.send(message)


class Broadcast(DurableObject):
    """Sends each message to every socket of the object."""

    async def fetch(self, request: Request) -> Response:
        return _accept(self, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        for peer in self.ctx.get_websockets():
            peer.send(message)


class Writer(DurableObject):
    """Stores each message under its first 4 characters, then acknowledges it."""

    async def fetch(self, request: Request) -> Response:
        return _accept(self, request)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        key = message[:4] if isinstance(message, str) else message[:4].decode()
        await self.ctx.storage.put(key, message)
        ws.send(message)


app = App({"echo": Echo, "broadcast": Broadcast, "writer": Writer})
