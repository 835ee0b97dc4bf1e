"""The chat example's terminal client against the chat server on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio
from chat import app
from chat_client import chat, room_url
from trio.testing import MockClock
from trio_websocket import open_websocket_url

from trio_hibernate import open_server


async def test_every_line_reaches_the_room_and_the_room_is_shown(
    autojump_clock: MockClock,
) -> None:
    autojump_clock.autojump_threshold = 0.05  # real I/O in flight: see tests/helpers.py
    shown: list[str] = []

    async def typed() -> AsyncIterator[str]:
        for line in ("hello", "again"):
            yield line

    with trio.fail_after(60):
        async with open_server(app, "127.0.0.1", 0) as server:
            await chat(room_url(server.url(""), "lobby", "ada"), typed(), shown.append)
            async with open_websocket_url(server.url("/chat/lobby?nick=bob")) as bob:
                history = [await bob.get_message() for _ in range(2)]
    assert history == ["ada: hello", "ada: again"]  # stored once each, in order
    assert shown[0] == "* ada joined"
