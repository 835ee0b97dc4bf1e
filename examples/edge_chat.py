"""Cloudflare's Edge Chat Demo, ported to trio-hibernate: chat rooms, private rooms and a
per-user rate limiter, with the client authenticated by the app before any room wakes.

The original is https://github.com/cloudflare/workers-chat-demo, ``src/chat.mjs`` at
commit dd32ce8 (its hibernation version; BSD-3-Clause, Copyright (c) 2020, Cloudflare):
a Worker routes ``/api/room/<name>/websocket`` to a ``ChatRoom`` Durable Object (a name
of up to 32 characters through ``idFromName``, 64 hex digits through ``idFromString``),
``POST /api/room`` answers ``newUniqueId()`` for a private room, and a ``RateLimiter``
object allows a burst of about five messages, then one per five seconds. The protocol is
the original's, so its ``chat.html`` speaks it: the client's first message is
``{"name": ...}``; the server answers with the roster (``{"joined": name}`` for everyone
present), the last 100 messages, ``{"joined": <you>}`` to everyone and ``{"ready":
true}``; then each ``{"message": text}`` is broadcast to the room as ``{"name",
"message", "timestamp"}`` (milliseconds) and stored; ``{"quit": name}`` when someone
leaves; ``{"error": ...}`` on a rate-limited, malformed or over-long message. Names of
more than 32 characters close the socket with 1009.

What differs from the original, and why:

- **Authentication.** The Worker rate-limits by the client's IP (``CF-Connecting-IP``,
  set by Cloudflare's edge). Here ``App.fetch`` checks a signed token (``?token=`` or
  ``Authorization: Bearer``; see :func:`issue_token`) before any object wakes, refuses
  the upgrade with 401 without one, and hands the verified :class:`User` to the room with
  ``request.with_context``: the room rate-limits that user, in every room at once, as
  the original does an IP.
- **State that survives hibernation.** The original keeps each session (its name, its
  rate limiter client, the messages queued until the client is ready) in a ``Map``
  rebuilt in the constructor, so a room woken from hibernation forgets what it queued,
  and its rate limiter forgets every cooldown. Here the name lives in the socket's
  attachment; a session is "ready" once it has one, broadcasts skip the others
  (``ctx.broadcast(..., exclude=...)``), and the roster and the backlog are read when the
  client becomes ready, so nothing needs queueing. The rate limiter keeps its state in
  storage, loaded with ``ctx.block_concurrency_while`` in its constructor, and does the
  whole check itself (the original splits it with a cooldown timer in the room).
- **Timestamps.** The original restarts its "last timestamp" at 0 on every wake; here
  ``block_concurrency_while`` loads it from the newest stored message, so timestamps
  stay increasing across hibernation. Time is ``ctx.now()``, so tests run on Trio's clock.
- **Cleanup.** When the last socket leaves, the room sets an alarm: if nobody is back a
  day later (:data:`ROOM_TTL_S`), it deletes its history. The original keeps it forever.
- **Errors.** The original wraps every handler in ``handleErrors`` and sends the stack to
  the client (its comment says not to do that in production); here an exception is
  logged by the runtime, an upgrade that fails gets a 500, and bad input gets
  ``{"error": ...}`` without a stack.
- The room keeps the request path as it is (the original rewrites it to ``/websocket``),
  the page (``chat.html``) is not ported (``/`` answers a line of text), and the stored
  message is written before it is broadcast, so nobody sees a message the room has not
  stored (the output gate holds it until the write is durable).

Run it with ``trio-hibernate serve examples/edge_chat.py:app`` (set ``EDGE_CHAT_SECRET``
to keep tokens valid across restarts) or ``python examples/edge_chat.py``, which prints a
token and the URL to connect to. ``python examples/edge_chat.py --token ann`` prints a
token for ``ann``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import trio

from trio_hibernate import (
    AlarmInfo,
    App,
    AppContext,
    DurableObject,
    ObjectContext,
    ReadyState,
    Request,
    Response,
    WebSocket,
    open_server,
    wait_for_shutdown_signal,
)

#: How long a token is valid, in seconds.
TOKEN_LIFETIME_S: Final = 24 * 3600
#: How long a room with nobody in it keeps its history, in seconds.
ROOM_TTL_S: Final = 24 * 3600
#: Messages replayed to whoever joins (the original's 100).
BACKLOG: Final = 100
MAX_NAME_CHARS: Final = 32
MAX_MESSAGE_CHARS: Final = 256
#: The rate limiter: each message costs this many seconds of budget...
SECONDS_PER_MESSAGE: Final = 5.0
#: ...and a user may be this far ahead of the clock before being held back (a burst of
#: about five messages, as in the original).
GRACE_S: Final = 20.0

USER = re.compile(r"[A-Za-z0-9_-]{1,32}")
HEX_ID = re.compile(r"[0-9a-f]{64}")
RATE_LIMITED: Final = "You are being rate-limited, please try again later."


@dataclass(frozen=True)
class Env:
    """The app's bindings: the key tokens are signed with."""

    secret: bytes


@dataclass(frozen=True)
class User:
    """Who the app verified; the room gets it as ``request.context``."""

    id: str


# -- tokens -----------------------------------------------------------------------------


def _signature(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def issue_token(secret: bytes, user: str, now: float) -> str:
    """A token proving ``user`` until ``now + TOKEN_LIFETIME_S``: ``user.expiry.signature``.

    A real app issues these at login; this one prints them (``--token``).

    Raises:
        ValueError: ``user`` is not 1-32 letters, digits, ``_`` or ``-``.
    """
    if not USER.fullmatch(user):
        raise ValueError(f"a user id is 1-32 letters, digits, '_' or '-', not {user!r}")
    payload = f"{user}.{int(now) + TOKEN_LIFETIME_S}"
    return f"{payload}.{_signature(secret, payload)}"


def verify_token(secret: bytes, token: str, now: float) -> User | None:
    """The user ``token`` proves, or None if it is malformed, forged or expired."""
    user, _, rest = token.partition(".")
    expiry, _, signature = rest.partition(".")
    if not (USER.fullmatch(user) and expiry.isdigit()):
        return None
    if not hmac.compare_digest(signature, _signature(secret, f"{user}.{expiry}")):
        return None
    return User(user) if now < int(expiry) else None


def _token_of(request: Request) -> str:
    # Browsers cannot set headers on a WebSocket: the query parameter is for them.
    bearer = (request.header("authorization") or "").removeprefix("Bearer ").strip()
    return bearer or request.query_params.get("token") or ""


# -- the Worker -------------------------------------------------------------------------


async def worker(request: Request, ctx: AppContext) -> Response:
    """The app's front door (the original's ``fetch`` and ``handleApiRequest``)."""
    path = request.path.removeprefix("/").split("/")
    if path == [""]:
        return Response(body="Edge Chat: connect to /api/room/<name>/websocket?token=...\n")
    if path[:2] != ["api", "room"]:
        return Response(status=404, body="Not found\n")
    rooms = ctx.get_namespace("rooms")
    if len(path) == 2 or path[2:] == [""]:
        if request.method != "POST":
            return Response(status=405, body="Method not allowed\n")
        # A private room: the id is unguessable, so knowing it is the permission to enter.
        return Response(
            body=str(rooms.new_unique_id()), headers={"access-control-allow-origin": "*"}
        )
    name = path[2]
    if HEX_ID.fullmatch(name):
        room_id = rooms.id_from_string(name)
    elif len(name) <= MAX_NAME_CHARS:
        room_id = rooms.id_from_name(name)
    else:
        return Response(status=404, body="Name too long\n")
    env: Env = ctx.env
    user = verify_token(env.secret, _token_of(request), ctx.now())
    if user is None:
        return Response(status=401, body="a valid token is needed (?token=...)\n")
    # The upgrade travels with the request: the room that accepts it owns the socket.
    return await rooms.get(room_id).fetch(request.with_context(user))


# -- the chat room ----------------------------------------------------------------------


def _key(timestamp_ms: int) -> str:
    """The storage key of a message: its time, ISO 8601 as JavaScript writes it."""
    when = datetime.fromtimestamp(timestamp_ms // 1000, UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{timestamp_ms % 1000:03d}Z"


class ChatRoom(DurableObject):
    """One room. Storage: the messages, keyed by time. Per socket, the attachment
    ``{"user": <verified id>, "name": <chosen name, or None until the client is ready>}``."""

    def __init__(self, ctx: ObjectContext, env: Env) -> None:
        super().__init__(ctx, env)
        self.last_timestamp = 0
        # Runs before the first event: nothing sees the room half loaded.
        ctx.block_concurrency_while(self.load)

    async def load(self) -> None:
        """Read the newest message's timestamp, so that timestamps keep increasing."""
        newest = await self.ctx.storage.list(reverse=True, limit=1)
        for line in newest.values():
            self.last_timestamp = int(json.loads(str(line))["timestamp"])

    async def fetch(self, request: Request) -> Response:
        if not request.path.endswith("/websocket"):
            return Response(status=404, body="Not found\n")
        ws = request.websocket
        if ws is None:
            return Response(status=400, body="expected websocket\n")
        user = request.context
        if not isinstance(user, User):  # only the worker can set it
            return Response(status=403, body="not through the front door\n")
        ws.serialize_attachment({"user": user.id, "name": None})
        self.ctx.accept_websocket(ws)
        return Response(status=101, websocket=ws)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        session = self.session(ws)
        limiter = self.ctx.get_namespace("limiters").get_by_name(session["user"])
        if await limiter.check() > 0:
            ws.send(json.dumps({"error": RATE_LIMITED}))
            return
        try:
            data = json.loads(message)
        except ValueError as exc:  # bytes that are not UTF-8 too (UnicodeDecodeError)
            ws.send(json.dumps({"error": f"not JSON: {exc}"}))
            return
        if not isinstance(data, dict):
            ws.send(json.dumps({"error": "expected a JSON object"}))
            return
        name = session["name"]
        if name is None:
            await self.start_session(ws, session, str(data.get("name") or "anonymous"))
            return
        text = str(data.get("message", ""))
        if len(text) > MAX_MESSAGE_CHARS:
            ws.send(json.dumps({"error": "Message too long."}))
            return
        # Ordered even if the clock steps back, or two messages share a millisecond.
        timestamp = max(round(self.ctx.now() * 1000), self.last_timestamp + 1)
        self.last_timestamp = timestamp
        line = json.dumps({"name": name, "message": text, "timestamp": timestamp})
        await self.ctx.storage.put(_key(timestamp), line)
        self.broadcast(line)  # held by the output gate until the write is durable

    async def start_session(self, ws: WebSocket, session: dict[str, Any], name: str) -> None:
        """The client's first message: it gets the roster and the backlog, then is ready."""
        if len(name) > MAX_NAME_CHARS:
            ws.send(json.dumps({"error": "Name too long."}))
            ws.close(1009, "Name too long.")
            return
        for other in self.ready_sockets():
            ws.send(json.dumps({"joined": self.session(other)["name"]}))
        backlog = await self.ctx.storage.list(reverse=True, limit=BACKLOG)
        for line in reversed(backlog.values()):
            ws.send(str(line))
        ws.serialize_attachment({**session, "name": name})
        self.broadcast(json.dumps({"joined": name}))
        ws.send(json.dumps({"ready": True}))

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        await self.quit(ws)

    async def websocket_error(self, ws: WebSocket, error: Exception) -> None:
        await self.quit(ws)

    async def quit(self, ws: WebSocket) -> None:
        """``ws`` is gone: tell the room, and start the clock if it was the last one."""
        name = self.session(ws)["name"]
        if name is not None:
            self.broadcast(json.dumps({"quit": name}))  # open sockets only: not ws
        if not self.open_sockets():
            await self.ctx.storage.set_alarm(self.ctx.now() + ROOM_TTL_S)

    async def alarm(self, info: AlarmInfo) -> None:
        """A day after the last one left: forget the room, unless someone came back
        (they will set the alarm again when they leave)."""
        if not self.open_sockets():
            await self.ctx.storage.delete_all()

    def broadcast(self, message: str) -> None:
        """Send to every ready session (the others get the backlog when they are)."""
        waiting = [ws for ws in self.open_sockets() if self.session(ws)["name"] is None]
        self.ctx.broadcast(message, exclude=waiting)

    def open_sockets(self) -> list[WebSocket]:
        return [ws for ws in self.ctx.get_websockets() if ws.ready_state == ReadyState.OPEN]

    def ready_sockets(self) -> list[WebSocket]:
        return [ws for ws in self.open_sockets() if self.session(ws)["name"] is not None]

    @staticmethod
    def session(ws: WebSocket) -> dict[str, Any]:
        attachment = ws.deserialize_attachment()
        assert isinstance(attachment, dict), attachment
        return attachment


# -- the rate limiter -------------------------------------------------------------------


class RateLimiter(DurableObject):
    """One per user, shared by every room: a user who floods one room is held back in all.

    ``next_allowed`` runs ahead of the clock by :data:`SECONDS_PER_MESSAGE` per message;
    once it is more than :data:`GRACE_S` ahead, the user waits (``blocked_until``) for the
    difference. Both are stored, so hibernation forgets nothing.
    """

    def __init__(self, ctx: ObjectContext, env: Env) -> None:
        super().__init__(ctx, env)
        self.next_allowed = 0.0
        self.blocked_until = 0.0
        ctx.block_concurrency_while(self.load)

    async def load(self) -> None:
        stored = await self.ctx.storage.get(["next_allowed", "blocked_until"])
        self.next_allowed = float(stored.get("next_allowed", 0.0))  # type: ignore[arg-type]
        self.blocked_until = float(stored.get("blocked_until", 0.0))  # type: ignore[arg-type]

    async def check(self) -> float:
        """Count one message: 0 if it may go, else the seconds until one may (and then
        this one was not counted). Called through a stub (RPC)."""
        now = self.ctx.now()
        if now < self.blocked_until:
            return self.blocked_until - now
        self.next_allowed = max(now, self.next_allowed) + SECONDS_PER_MESSAGE
        self.blocked_until = now + max(0.0, self.next_allowed - now - GRACE_S)
        await self.ctx.storage.put(
            {"next_allowed": self.next_allowed, "blocked_until": self.blocked_until}
        )
        return 0.0


def _secret() -> bytes:
    configured = os.environ.get("EDGE_CHAT_SECRET")
    return configured.encode() if configured else secrets.token_bytes(32)


app = App(
    {"rooms": ChatRoom, "limiters": RateLimiter},
    env=Env(secret=_secret()),
    fetch=worker,
    route_by_path=False,  # the worker routes everything, as a Cloudflare Worker does
)


async def main(port: int, address: str, data_dir: str | None) -> None:
    async with open_server(app, address, port, data_dir=data_dir) as server:
        token = issue_token(app.env.secret, "guest", _now())
        url = server.url("/api/room/lobby/websocket")
        print(f"edge chat listening; connect to {url}?token={token}", flush=True)
        signum = await wait_for_shutdown_signal(server)
    print(f"{signum.name}: stopped", flush=True)


def _now() -> float:
    return datetime.now(UTC).timestamp()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--data-dir", default=None, help="keep rooms here (default: in memory)")
    parser.add_argument("--token", metavar="USER", help="print a token for USER and exit")
    args = parser.parse_args()
    if args.token:
        if "EDGE_CHAT_SECRET" not in os.environ:
            parser.error("set EDGE_CHAT_SECRET (for the server too): the key is random otherwise")
        print(issue_token(app.env.secret, args.token, _now()))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        trio.run(main, args.port, args.address, args.data_dir)
    except KeyboardInterrupt:
        print("interrupted")


if __name__ == "__main__":
    cli()
