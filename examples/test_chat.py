"""Tests for the chat example, written the way we suggest you test your own objects.

Every test runs twice: normally, and in strict mode, where the room is dropped from
memory after every event. A room that kept its members in a Python dict would pass the
first run and fail the second.
"""

from __future__ import annotations

import pytest
import trio
from chat import app as chat_app

from trio_hibernate import App
from trio_hibernate.testing import TestHost, UpgradeRejected


@pytest.fixture
def hibernate_app() -> App:
    return chat_app


@pytest.fixture(params=[False, True], ids=["normal", "strict"])
def hibernate_strict(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_messages_reach_everyone_in_the_room(
    hibernate_host: TestHost, autojump_clock: trio.abc.Clock
) -> None:
    ada = await hibernate_host.connect("chat", "lobby", "?nick=ada")
    assert await ada.receive() == "* ada joined"
    bob = await hibernate_host.connect("chat", "lobby", "?nick=bob")
    assert await ada.receive() == "* bob joined"
    assert await bob.receive() == "* bob joined"
    await ada.send("hello")
    assert await ada.receive() == "ada: hello"
    assert await bob.receive() == "ada: hello"


async def test_the_room_forgets_nothing_when_it_hibernates(
    hibernate_host: TestHost, autojump_clock: trio.abc.Clock
) -> None:
    ada = await hibernate_host.connect("chat", "lobby", "?nick=ada")
    bob = await hibernate_host.connect("chat", "lobby", "?nick=bob")
    await ada.send("before the nap")
    await trio.sleep(60)  # virtual time: the idle room is evicted, sockets stay open
    assert hibernate_host.statistics().live_objects == 0
    await bob.send("/who")
    while (line := await bob.receive()) != "* here: ada, bob":
        assert isinstance(line, str)
        assert not line.startswith("* here"), line  # skip the joins and the message
    carol = await hibernate_host.connect("chat", "lobby", "?nick=carol")
    assert await carol.receive() == "ada: before the nap"  # history, from storage


async def test_heartbeat_does_not_wake_the_room(
    hibernate_host: TestHost, autojump_clock: trio.abc.Clock
) -> None:
    ada = await hibernate_host.connect("chat", "lobby", "?nick=ada")
    assert await ada.receive() == "* ada joined"
    await hibernate_host.hibernate("chat", "lobby")
    with hibernate_host.assert_not_woken():
        await ada.send("ping")
        assert await ada.receive() == "pong"


async def test_nicknames_are_checked(hibernate_host: TestHost) -> None:
    with pytest.raises(UpgradeRejected) as bad:
        await hibernate_host.connect("chat", "lobby", "?nick=not%20ok")
    assert bad.value.status == 400
    await hibernate_host.connect("chat", "lobby", "?nick=ada")
    with pytest.raises(UpgradeRejected) as taken:
        await hibernate_host.connect("chat", "lobby", "?nick=ada")
    assert taken.value.status == 409


async def test_whispers_and_departures(
    hibernate_host: TestHost, autojump_clock: trio.abc.Clock
) -> None:
    ada = await hibernate_host.connect("chat", "lobby", "?nick=ada")
    bob = await hibernate_host.connect("chat", "lobby", "?nick=bob")
    assert [await ada.receive(), await ada.receive(), await bob.receive()] == [
        "* ada joined",
        "* bob joined",
        "* bob joined",
    ]
    await ada.send("/msg bob psst")
    assert await bob.receive() == "(whisper) ada: psst"
    await ada.send("/msg carol hello?")
    assert await ada.receive() == "* no carol here"
    await bob.close()
    assert await ada.receive() == "* bob left"  # sent to the open sockets: not bob's
