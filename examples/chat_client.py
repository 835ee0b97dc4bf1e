"""A terminal client for the chat example that survives server restarts.

Run the server (``trio-hibernate serve examples/chat.py:app --data-dir chat-data``), then
``python examples/chat_client.py lobby ada``: lines you type go to the room, lines of the
room are printed. Restart the server (SIGUSR1, then start it again) and keep typing: the
client reconnects with backoff, and every line you typed reaches the room exactly once
(``reliable=True``: lines are ops the room acknowledges once stored; see
``docs/client.md``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterable, Callable
from functools import partial
from urllib.parse import quote

import trio

from trio_hibernate.client import ClientClosedError, ClientEvent, ClientState, open_client


def room_url(server: str, room: str, nick: str) -> str:
    """The WebSocket URL of ``room`` on ``server`` (``ws://host:port``) as ``nick``."""
    return f"{server.rstrip('/')}/chat/{quote(room)}?nick={quote(nick)}"


async def chat(
    url: str,
    lines: AsyncIterable[str],
    show: Callable[[str], None],
    *,
    on_event: Callable[[ClientEvent], None] | None = None,
) -> None:
    """Send every line of ``lines`` to the room at ``url``; ``show`` every message of the
    room; return once every line is stored by the room.

    Raises:
        ClientClosedError: the room closed for good (in an ExceptionGroup if it happened
            while a line was being sent).
    """
    async with open_client(url, reliable=True, on_event=on_event) as room:

        async def print_room(typing: trio.CancelScope) -> None:
            async for message in room:  # ends when the room is closed for good
                show(message if isinstance(message, str) else repr(message))
            typing.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(print_room, nursery.cancel_scope)
            async for line in lines:
                await room.send(line)
            await room.flush()  # every line acknowledged: stored by the room
            nursery.cancel_scope.cancel()
        await room.flush()  # ClientClosedError if the room closed for good meanwhile


async def _stdin_lines() -> AsyncIterable[str]:
    stdin = trio.wrap_file(sys.stdin)
    while line := await stdin.readline():
        if line.strip():
            yield line.rstrip("\n")


def _show(line: str) -> None:
    print(line, flush=True)


def _status(event: ClientEvent) -> None:
    if event.state is ClientState.RECONNECTING:
        print(f"* reconnecting in {event.delay_seconds:.1f} s", file=sys.stderr, flush=True)
    elif event.state is ClientState.CONNECTED:
        print("* connected", file=sys.stderr, flush=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("room")
    parser.add_argument("nick")
    parser.add_argument("--server", default="ws://127.0.0.1:8080")
    args = parser.parse_args()
    url = room_url(args.server, args.room, args.nick)
    try:
        try:
            trio.run(partial(chat, url, _stdin_lines(), _show, on_event=_status))
        except* ClientClosedError as group:
            sys.exit(f"* {group.exceptions[0]}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
