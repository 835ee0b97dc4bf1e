"""Tests for the Edge Chat port (examples/edge_chat.py).

Every test runs twice, as examples/test_chat.py does: normally, and in strict mode, where
every object (rooms and rate limiters) is dropped after every event, so the state the
port keeps in storage and attachments is all there is.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Final

import pytest
import trio
import trio.testing
from edge_chat import (
    GRACE_S,
    RATE_LIMITED,
    ROOM_TTL_S,
    SECONDS_PER_MESSAGE,
    TOKEN_LIFETIME_S,
    Env,
    app as edge_chat_app,
    issue_token,
)

from trio_hibernate import App
from trio_hibernate.testing import TestHost, TestWebSocket, UpgradeRejected, WebSocketClosed

#: Bound on every wait for a message (virtual seconds under the autojump clock).
WAIT_S: Final = 10.0


@pytest.fixture
def hibernate_app() -> App:
    return edge_chat_app


@pytest.fixture(params=[False, True], ids=["normal", "strict"])
def hibernate_strict(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def token(host: TestHost, user: str) -> str:
    env = edge_chat_app.env
    assert isinstance(env, Env)
    return issue_token(env.secret, user, host.now())


async def receive(client: TestWebSocket) -> Any:
    with trio.fail_after(WAIT_S):
        return json.loads(await client.receive())


async def assert_quiet(client: TestWebSocket) -> None:
    """Nothing arrives for a (virtual) second."""
    with trio.move_on_after(1):
        message = await client.receive()
        pytest.fail(f"expected nothing, got {message!r}")


async def join(host: TestHost, user: str, room: str = "lobby", name: str | None = None) -> Any:
    """Connect as ``user`` and send the first message; returns the client once ready, and
    what it got before ``{"ready": true}``."""
    client = await host.connect_to(f"/api/room/{room}/websocket?token={token(host, user)}")
    await client.send(json.dumps({"name": name or user.title()}))
    before = []
    while (message := await receive(client)) != {"ready": True}:
        before.append(message)
    return client, before


async def http(host: TestHost, method: str, target: str) -> tuple[int, bytes]:
    """One HTTP request through the app (``App.fetch``), as a client would send it."""
    server_end, client_end = socket.socketpair()
    host.host.serve_socket(server_end)
    with trio.fail_after(WAIT_S):
        async with trio.SocketStream(trio.socket.from_stdlib_socket(client_end)) as stream:
            await stream.send_all(
                f"{method} {target} HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n".encode()
            )
            answer = b""
            while chunk := await stream.receive_some():  # the server closes: no keep-alive
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_messages_reach_the_room(
    hibernate_host: TestHost, autojump_clock: trio.testing.MockClock
) -> None:
    ann, before = await join(hibernate_host, "ann")
    assert before == [{"joined": "Ann"}]  # the broadcast reaches ann herself
    bob, before = await join(hibernate_host, "bob")
    assert before == [{"joined": "Ann"}, {"joined": "Bob"}]  # the roster, then the join
    assert await receive(ann) == {"joined": "Bob"}
    await ann.send(json.dumps({"message": "hello"}))
    for client in (ann, bob):
        line = await receive(client)
        assert (line["name"], line["message"]) == ("Ann", "hello")
        assert 0 < line["timestamp"] <= round(hibernate_host.now() * 1000)
    await bob.close()
    assert await receive(ann) == {"quit": "Bob"}


async def test_a_token_is_needed(
    hibernate_host: TestHost, autojump_clock: trio.testing.MockClock
) -> None:
    good = token(hibernate_host, "ann")
    forged = good[:-1] + ("0" if good[-1] != "0" else "1")
    for query in ["", "?token=", f"?token={forged}", "?token=ann.99999999999.00"]:
        with pytest.raises(UpgradeRejected) as refused:
            await hibernate_host.connect_to(f"/api/room/lobby/websocket{query}")
        assert refused.value.status == 401
    with hibernate_host.assert_not_woken(), pytest.raises(UpgradeRejected):
        await hibernate_host.connect_to("/api/room/lobby/websocket")
    ann = await hibernate_host.connect_to(
        "/api/room/lobby/websocket", headers={"authorization": f"Bearer {good}"}
    )
    await ann.send(json.dumps({"name": "Ann"}))
    assert await receive(ann) == {"joined": "Ann"}
    await trio.sleep(TOKEN_LIFETIME_S)  # virtual time
    with pytest.raises(UpgradeRejected) as expired:
        await hibernate_host.connect_to(f"/api/room/lobby/websocket?token={good}")
    assert expired.value.status == 401


async def test_routes(hibernate_host: TestHost, autojump_clock: trio.testing.MockClock) -> None:
    assert (await http(hibernate_host, "GET", "/api/room"))[0] == 405
    assert (await http(hibernate_host, "GET", "/elsewhere"))[0] == 404
    assert (await http(hibernate_host, "GET", f"/api/room/{'x' * 33}/websocket"))[0] == 404
    # The built-in /<namespace>/<name> routing is off: only the worker routes.
    assert (await http(hibernate_host, "GET", "/rooms/lobby"))[0] == 404
    with pytest.raises(UpgradeRejected) as plain:
        await hibernate_host.connect_to(f"/rooms/lobby?token={token(hibernate_host, 'ann')}")
    assert plain.value.status == 404
    status, body = await http(
        hibernate_host, "GET", f"/api/room/lobby/websocket?token={token(hibernate_host, 'ann')}"
    )
    assert (status, body) == (400, b"expected websocket\n")


async def test_private_rooms_have_unique_ids(
    hibernate_host: TestHost, autojump_clock: trio.testing.MockClock
) -> None:
    status, body = await http(hibernate_host, "POST", "/api/room")
    assert status == 200
    room = body.decode()
    assert room != (await http(hibernate_host, "POST", "/api/room"))[1].decode()
    ann, _ = await join(hibernate_host, "ann", room)
    await ann.send(json.dumps({"message": "secret"}))
    assert (await receive(ann))["message"] == "secret"
    _, before = await join(hibernate_host, "bob", room)
    assert [m.get("message") for m in before] == [None, "secret", None]  # roster, line, join
    _, lobby = await join(hibernate_host, "carol")  # another room: nothing of it
    assert lobby == [{"joined": "Carol"}]


async def test_nothing_is_forgotten_when_the_room_hibernates(
    hibernate_host: TestHost, autojump_clock: trio.testing.MockClock
) -> None:
    ann, _ = await join(hibernate_host, "ann")
    await ann.send(json.dumps({"message": "before the nap"}))
    first = await receive(ann)
    waiting = await hibernate_host.connect_to(
        f"/api/room/lobby/websocket?token={token(hibernate_host, 'bob')}"
    )  # connected, but has not sent its name yet
    await trio.sleep(60)  # the idle room is evicted; the sockets stay open
    assert hibernate_host.statistics().live_objects == 0
    await ann.send(json.dumps({"message": "after"}))
    second = await receive(ann)
    await assert_quiet(waiting)  # not ready: no broadcasts, they come with the backlog
    await waiting.send(json.dumps({"name": "Bob"}))
    assert [await receive(waiting) for _ in range(5)] == [
        {"joined": "Ann"},
        first,
        second,
        {"joined": "Bob"},
        {"ready": True},
    ]


async def test_timestamps_increase_across_wakes(
    hibernate_host: TestHost, mock_clock: trio.testing.MockClock
) -> None:
    """Two messages in the same millisecond, with the room woken again between them: the
    second is still later (the room loaded the newest timestamp before its first event).
    The clock stands still here (pytest-trio's ``mock_clock``, no autojump)."""
    ann, _ = await join(hibernate_host, "ann")
    await ann.send(json.dumps({"message": "one"}))
    first = await receive(ann)
    assert first["timestamp"] == round(hibernate_host.now() * 1000)
    await hibernate_host.hibernate("rooms", "lobby")  # already gone in strict mode
    await ann.send(json.dumps({"message": "two"}))
    second = await receive(ann)
    assert second["timestamp"] == first["timestamp"] + 1
    _, before = await join(hibernate_host, "bob")
    assert [m.get("message") for m in before] == [None, "one", "two", None]  # both kept


async def test_the_rate_limit_holds_across_rooms_and_hibernation(
    hibernate_host: TestHost, autojump_clock: trio.testing.MockClock
) -> None:
    ann, _ = await join(hibernate_host, "ann")  # the name message counts too
    burst = int(GRACE_S // SECONDS_PER_MESSAGE)  # 4 more go through at once
    for n in range(burst):
        await ann.send(json.dumps({"message": f"m{n}"}))
        assert (await receive(ann))["message"] == f"m{n}"
    await ann.send(json.dumps({"message": "one too many"}))
    assert await receive(ann) == {"error": RATE_LIMITED}
    await hibernate_host.hibernate("limiters", "ann")
    elsewhere, _ = await join(hibernate_host, "bob", "elsewhere")  # bob is not limited
    ann_elsewhere = await hibernate_host.connect_to(
        f"/api/room/elsewhere/websocket?token={token(hibernate_host, 'ann')}"
    )
    await ann_elsewhere.send(json.dumps({"name": "Ann"}))
    assert await receive(ann_elsewhere) == {"error": RATE_LIMITED}  # held back everywhere
    await trio.sleep(SECONDS_PER_MESSAGE)
    await ann.send(json.dumps({"message": "later"}))
    assert (await receive(ann))["message"] == "later"
    await assert_quiet(elsewhere)


async def test_long_names_and_bad_messages(
    hibernate_host: TestHost, autojump_clock: trio.testing.MockClock
) -> None:
    ann = await hibernate_host.connect_to(
        f"/api/room/lobby/websocket?token={token(hibernate_host, 'ann')}"
    )
    await ann.send("not json")
    assert (await receive(ann))["error"].startswith("not JSON")
    await ann.send(json.dumps({"name": "x" * 33}))
    assert await receive(ann) == {"error": "Name too long."}
    with pytest.raises(WebSocketClosed) as closed:
        await receive(ann)
    assert (closed.value.code, closed.value.reason) == (1009, "Name too long.")
    bob, _ = await join(hibernate_host, "bob")
    await bob.send(json.dumps({"message": "y" * 257}))
    assert await receive(bob) == {"error": "Message too long."}


async def test_an_empty_room_forgets_its_history_a_day_later(
    hibernate_host: TestHost, autojump_clock: trio.testing.MockClock
) -> None:
    ann, _ = await join(hibernate_host, "ann")
    await ann.send(json.dumps({"message": "remember me"}))
    await receive(ann)
    await ann.close()
    await trio.sleep(ROOM_TTL_S / 2)
    bob, before = await join(hibernate_host, "bob")  # back within the day: kept
    assert [m.get("message") for m in before] == ["remember me", None]
    await trio.sleep(ROOM_TTL_S)  # someone is here when the alarm fires: kept
    await bob.close()  # the last one out sets the alarm again
    await trio.sleep(ROOM_TTL_S - 60)
    carol, before = await join(hibernate_host, "carol")
    assert [m.get("message") for m in before] == ["remember me", None]
    await carol.drop()  # a drop (1006) counts as leaving too
    await trio.sleep(ROOM_TTL_S + 1)  # nobody came back: the history is gone
    _, before = await join(hibernate_host, "dave")
    assert before == [{"joined": "Dave"}]
