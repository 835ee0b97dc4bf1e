"""A chat server: one object per room, hibernating between messages.

Run it with ``trio-hibernate serve examples/chat.py:app`` (or ``python examples/chat.py``)
and open http://127.0.0.1:8080/ in a browser, or connect any WebSocket client to
``ws://127.0.0.1:8080/chat/<room>?nick=<nickname>``. Text messages are broadcast to the
room and kept in the room's storage (the last 50 are replayed to whoever joins); ``/who``
lists who is here; ``/msg <nick> <text>`` whispers; ``ping`` is answered
with ``pong`` by the runtime without waking the room. ``examples/chat_client.py`` is a
terminal client that rides out server restarts without losing or repeating a line.

The room keeps nothing in memory that it cannot rebuild: nicknames live in each socket's
attachment and tags, so the room can be evicted at any time while everyone stays
connected. The page shows it happen: its "The room" panel polls the server's own view of
the room (``/_dashboard/object``, which wakes nothing) and says when the room hibernates
and when a message wakes it; http://127.0.0.1:8080/_dashboard shows the whole server.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import trio

from trio_hibernate import (
    App,
    DurableObject,
    ObjectContext,
    Request,
    Response,
    WebSocket,
    WebSocketRequestResponsePair,
    open_server,
    wait_for_shutdown_signal,
)
from trio_hibernate.client import deliver_once

NICK = re.compile(r"[A-Za-z0-9_-]{1,32}")
HISTORY = 50
HEARTBEAT = WebSocketRequestResponsePair("ping", "pong")


class ChatRoom(DurableObject):
    """A chat room. Tags: ``user:<nick>`` on every socket; attachment: ``{"nick": ...}``."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        # Runs on every wake: keep it cheap. The heartbeat survives hibernation anyway;
        # setting it again is harmless.
        ctx.set_websocket_auto_response(HEARTBEAT)

    async def fetch(self, request: Request) -> Response:
        if request.websocket is None:
            return Response(status=426, body="connect with a WebSocket\n")
        nick = parse_qs(request.query).get("nick", [""])[0]
        if not NICK.fullmatch(nick):
            return Response(status=400, body="nick: 1-32 letters, digits, '_' or '-'\n")
        if self.ctx.get_websockets(f"user:{nick}"):
            return Response(status=409, body=f"{nick} is already in this room\n")
        ws = request.websocket
        ws.serialize_attachment({"nick": nick})
        self.ctx.accept_websocket(ws, [f"user:{nick}"])
        history = await self.ctx.storage.list(prefix="msg:", reverse=True, limit=HISTORY)
        for line in reversed(history.values()):
            ws.send(str(line))  # queued; delivered right after the 101 response
        self.ctx.broadcast(f"* {nick} joined")
        return Response(status=101, websocket=ws)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        # A reliable client's message (examples/chat_client.py) is an op: handled once,
        # even when it is sent again after a reconnect, and acknowledged once durable.
        # A browser's message passes through as it is.
        handled = await deliver_once(self.ctx.storage, ws, message)
        if handled is None:
            return
        message = handled
        if isinstance(message, bytes):
            ws.send("* binary messages are not supported")
            return
        nick = self.nick(ws)
        if message == "/who":
            ws.send("* here: " + ", ".join(sorted(self.nick(s) for s in self.present())))
        elif message.startswith("/msg "):
            _, target, text = ([*message.split(" ", 2), ""])[:3]
            # broadcast() returns how many open sockets got it: 0 if nobody has the tag
            # (or its socket is closing).
            if not self.ctx.broadcast(f"(whisper) {nick}: {text}", tag=f"user:{target}"):
                ws.send(f"* no {target} here")
        else:
            line = f"{nick}: {message}"
            await self.remember(line)
            self.ctx.broadcast(line)  # held by the output gate until the write is durable

    # A socket that ended is no longer open: broadcast() skips it, no exclude needed.
    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self.ctx.broadcast(f"* {self.nick(ws)} left")

    async def websocket_error(self, ws: WebSocket, error: Exception) -> None:
        self.ctx.broadcast(f"* {self.nick(ws)} dropped")

    async def remember(self, line: str) -> None:
        """Append ``line`` to the room's history, keeping the last HISTORY lines."""
        storage = self.ctx.storage
        seq_value = await storage.get("seq")
        seq = (seq_value if isinstance(seq_value, int) else 0) + 1
        await storage.put({"seq": seq, f"msg:{seq:012d}": line})
        if seq > HISTORY:
            await storage.delete(f"msg:{seq - HISTORY:012d}")

    def present(self) -> list[WebSocket]:
        """Sockets that are still open (closing ones are still listed until they end)."""
        return [ws for ws in self.ctx.get_websockets() if ws.ready_state == 1]

    @staticmethod
    def nick(ws: WebSocket) -> str:
        attachment = ws.deserialize_attachment()
        assert isinstance(attachment, dict)
        return str(attachment["nick"])


PAGE = (Path(__file__).parent / "chat.html").read_bytes()


async def page(request: Request) -> Response:
    """The chat page at ``/`` (requests that name no namespace come here)."""
    if request.path != "/":
        return Response(status=404, body="Not Found\n")
    return Response(body=PAGE, headers={"content-type": "text/html; charset=utf-8"})


app = App({"chat": ChatRoom}, fetch=page)


async def main(port: int, address: str, data_dir: str | None) -> None:
    async with open_server(app, address, port, data_dir=data_dir) as server:
        print(f"chat server listening on {server.url('/chat/<room>?nick=<name>')}", flush=True)
        print(f"chat page: {server.url('/', 'http')}", flush=True)
        print(f"dashboard: {server.url('/_dashboard', 'http')}", flush=True)
        # SIGTERM or Ctrl-C: every client gets a Close (1001) and is waited for; a second
        # one stops waiting (KeyboardInterrupt).
        signum = await wait_for_shutdown_signal(server)
    print(f"{signum.name}: stopped", flush=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument(
        "--data-dir", default=None, help="keep room history here (default: in memory)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        trio.run(main, args.port, args.address, args.data_dir)
    except KeyboardInterrupt:  # Ctrl-C while starting, or a second one while stopping
        print("interrupted")


if __name__ == "__main__":
    cli()
