"""A ledger: the app the cluster demo serves and the cluster proofs (tests/cluster/) drive.

Serve it alone with ``trio-hibernate serve examples/cluster/app.py:app``, or as a cluster
with ``python examples/cluster/cluster.py`` (PostgreSQL, three hosts and nginx on
127.0.0.1; see README.md). Every object of the ``ledger`` namespace
(``ws://HOST:PORT/ledger/<name>``) speaks JSON over its WebSockets:

- ``{"op": n}`` stores key ``op:<n, zero-padded to 12 digits>`` and answers ``{"ack": n}``.
  The answer leaves only once the write is committed (the output gate), so a client that
  got its ack knows the op is durable: in cluster mode, committed to PostgreSQL under the
  object's current epoch. Sending an op again (after a reconnect) stores it again: ops are
  idempotent.
- ``{"broadcast": text}`` sends ``{"broadcast": text}`` to every socket of the object,
  on every host: in cluster mode sockets on other hosts reach the one instance through
  the relay.
- ``{"alarm_in": seconds}`` sets the object's alarm ``seconds`` from now and answers
  ``{"alarm_set": at}`` (epoch seconds) once the alarm is durable. When it fires, the
  object counts it: it stores ``alarm:<count>`` (and ``alarms``, the count) and
  broadcasts ``{"alarm": count}``.
- ``"ping"`` is answered ``"pong"`` by the runtime without waking the object (an
  auto-response, set in the constructor).
- Anything else is answered ``{"error": ...}``.

A plain ``GET /ledger/<name>`` answers ``{"ops": [n, ...], "alarms": count}`` from storage.
"""

from __future__ import annotations

import json
from typing import Any, Final

from trio_hibernate import (
    AlarmInfo,
    App,
    DurableObject,
    ObjectContext,
    Request,
    Response,
    WebSocket,
    WebSocketRequestResponsePair,
)

#: Digits of an op's number in its key, so that keys sort as numbers.
OP_DIGITS: Final = 12
HEARTBEAT: Final = WebSocketRequestResponsePair("ping", "pong")
JSON_HEADERS: Final = {"content-type": "application/json"}


def op_key(n: int) -> str:
    """The storage key of op ``n`` (``op:000000000042``)."""
    return f"op:{n:0{OP_DIGITS}d}"


class Ledger(DurableObject):
    """One ledger: its ops and alarm count in storage, nothing in memory."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        # Kept across hibernation anyway; setting it on every wake is cheap.
        ctx.set_websocket_auto_response(HEARTBEAT)

    async def fetch(self, request: Request) -> Response:
        if request.websocket is not None:
            self.ctx.accept_websocket(request.websocket)
            return Response(status=101, websocket=request.websocket)
        if request.method != "GET":
            return Response(status=405, body="GET, or connect with a WebSocket\n")
        ops = await self.ctx.storage.list(prefix="op:")
        alarms = await self.ctx.storage.get("alarms")
        body = {"ops": sorted(n for n in ops.values() if isinstance(n, int)), "alarms": alarms or 0}
        return Response(body=json.dumps(body), headers=JSON_HEADERS)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        try:
            command = json.loads(message)
        except ValueError:
            command = None
        if not isinstance(command, dict) or len(command) != 1:
            ws.send(json.dumps({"error": "send one of {op: n}, {broadcast: s}, {alarm_in: s}"}))
            return
        ((verb, value),) = command.items()
        if verb == "op" and isinstance(value, int) and value >= 0:
            await self.ctx.storage.put(op_key(value), value)
            ws.send(json.dumps({"ack": value}))  # held by the output gate until committed
        elif verb == "broadcast" and isinstance(value, str):
            self.ctx.broadcast(json.dumps({"broadcast": value}))
        elif verb == "alarm_in" and isinstance(value, int | float) and value >= 0:
            at = self.ctx.now() + value
            await self.ctx.storage.set_alarm(at)
            ws.send(json.dumps({"alarm_set": at}))
        else:
            ws.send(json.dumps({"error": f"bad command {command!r}"}))

    async def alarm(self, info: AlarmInfo) -> None:
        stored = await self.ctx.storage.get("alarms")
        count = (stored if isinstance(stored, int) else 0) + 1
        await self.ctx.storage.put({"alarms": count, f"alarm:{count}": self.ctx.now()})
        self.ctx.broadcast(json.dumps({"alarm": count}))


app = App({"ledger": Ledger})
