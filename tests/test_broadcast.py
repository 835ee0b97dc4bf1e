"""``ctx.broadcast`` and connection ids (``ws.id``, ``ctx.get_websocket``, ``?_pk=``).

The first tests drive an :class:`ObjectContext` with fake transports and a real
:class:`OutputGate` (no Trio), where what each socket was sent can be read directly; the
rest run a room on :func:`trio_hibernate.testing.open_test_host` with the mock clock.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import pytest
import trio
from fakes import FakeTransport
from helpers import WAIT_SECONDS, Probe, accept_upgrade

import trio_hibernate._runtime
from trio_hibernate import (
    App,
    ConnectionIdError,
    DurableObject,
    ObjectContext,
    Request,
    Response,
    WebSocket,
    WebSocketStateError,
)
from trio_hibernate._core.events import FetchEvent, Reply
from trio_hibernate._core.frames import encode_message
from trio_hibernate._core.gate import OutputGate
from trio_hibernate._core.lifecycle import ObjectCore
from trio_hibernate._core.sockets import SocketRecord, connection_id_from_url
from trio_hibernate._ids import ObjectId
from trio_hibernate._limits import MAX_CONNECTION_ID_LENGTH, Limits
from trio_hibernate._storage.sqlite import SqliteDatabase
from trio_hibernate.testing import TestHost, TestWebSocket, UpgradeRejected, open_test_host

# -- without Trio: a context, fake connections, a real output gate ------------------------------


class BrokenTransport(FakeTransport):
    """A connection whose sends fail (a bug of ours in one connection)."""

    def send_message(self, data: str | bytes) -> None:
        raise RuntimeError("this connection is broken")


@attrs.define
class Room:
    """A live object's core and context, with its gate."""

    core: ObjectCore
    ctx: ObjectContext
    gate: OutputGate

    def accept(
        self, tags: tuple[str, ...] = (), transport: FakeTransport | None = None, query: str = ""
    ) -> tuple[WebSocket, FakeTransport]:
        transport = FakeTransport() if transport is None else transport
        url = f"/room/lobby?socket={len(self.core.registry)}{query}"
        ws = WebSocket(transport=transport, url=url, limits=self.core.limits)
        self.ctx.accept_websocket(ws, tags)
        return ws, transport


def _no_spawn(async_fn: Callable[[], Awaitable[object]]) -> None:
    raise AssertionError("nothing here starts tasks")


def live_room(limits: Limits | None = None) -> Room:
    core = ObjectCore(limits or Limits())
    core.enqueue(FetchEvent(Request(method="GET", url="/room/lobby"), Reply(lambda _: None)))
    core.on_started()
    core.pop_event()
    gate = OutputGate()
    ctx = ObjectContext(
        namespace="room",
        object_id=ObjectId.from_name("room", "lobby"),
        core=core,
        spawn=_no_spawn,
        gate=gate,
    )
    return Room(core, ctx, gate)


def record(ws: WebSocket, room: Room) -> SocketRecord:
    found = [r for r in room.core.registry.sockets() if r.url == ws.url]
    assert len(found) == 1
    return found[0]


def test_broadcast_sends_to_every_open_socket_and_counts() -> None:
    room = live_room()
    sockets = [room.accept(("a",) if i % 2 else ()) for i in range(4)]
    assert room.ctx.broadcast("hi") == 4
    assert room.ctx.broadcast(b"bytes", tag="a") == 2
    assert room.ctx.broadcast(bytearray(b"ba"), tag="nobody") == 0
    for i, (_, transport) in enumerate(sockets):
        assert transport.sent == (["hi", b"bytes"] if i % 2 else ["hi"])
    # One object for all: the runtime's frame cache then encodes it once.
    sent = [transport.sent[0] for _, transport in sockets]
    assert all(message is sent[0] for message in sent)


def send_to_each(sockets: list[WebSocket], message: str) -> None:
    """The README's old broadcast loop."""
    for ws in sockets:
        ws.send(message)


def test_broadcast_skips_closing_and_ended_sockets() -> None:
    """The loop over get_websockets() raises on a socket the object closed; broadcast
    sends to the open ones only, whatever comes first in the listing."""
    room = live_room()
    (closed, closed_t), (ended, ended_t), (_, open_t) = (room.accept() for _ in range(3))
    closed.close(4000, "kicked")
    record(ended, room).decide_end()  # the peer's Close arrived; its handler has not run
    assert len(room.ctx.get_websockets()) == 3
    with pytest.raises(WebSocketStateError, match=r"send\(\) after close\(\)"):
        send_to_each(room.ctx.get_websockets(), "loop")
    assert room.ctx.broadcast("safe") == 1
    assert open_t.sent[-1] == "safe"
    assert "safe" not in closed_t.sent
    assert "safe" not in ended_t.sent


def test_broadcast_excludes_handles_and_ids() -> None:
    room = live_room()
    (a, a_t), (b, b_t), (c, c_t) = (room.accept() for _ in range(3))
    assert room.ctx.broadcast("1", exclude=a) == 2
    assert room.ctx.broadcast("2", exclude=[a, b.id]) == 1
    assert room.ctx.broadcast("3", exclude=c.id) == 2  # one id, not its characters
    assert room.ctx.broadcast("4", exclude=["no such id"]) == 3
    assert (a_t.sent, b_t.sent, c_t.sent) == (["3", "4"], ["1", "3", "4"], ["1", "2", "4"])


def test_broadcast_refuses_what_it_cannot_send_and_sends_nothing() -> None:
    room = live_room()
    _, transport = room.accept()
    with pytest.raises(TypeError, match="takes str or bytes, not int"):
        room.ctx.broadcast(7)  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        room.ctx.broadcast("half a pair: \ud83d")
    with pytest.raises(TypeError, match="a tag is a str"):
        room.ctx.broadcast("x", tag=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="exclude takes WebSockets and connection ids"):
        room.ctx.broadcast("x", exclude=[1])  # type: ignore[list-item]
    assert transport.sent == []


def test_a_failing_send_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    room = live_room()
    _, first = room.accept()
    room.accept(transport=BrokenTransport())
    _, last = room.accept()
    with caplog.at_level(logging.ERROR, "trio_hibernate.object"):
        assert room.ctx.broadcast("still") == 2
    assert first.sent == last.sent == ["still"]
    (failure,) = caplog.records
    assert "broadcast() of room" in failure.getMessage()
    assert failure.exc_info is not None
    assert isinstance(failure.exc_info[1], RuntimeError)


def test_broadcast_waits_for_the_output_gate() -> None:
    """Spec 10: after a write, the broadcast is held in order with the turn's other
    sends, released by the commit, dropped by a failed one."""
    room = live_room()
    (a, a_t), (_, b_t) = room.accept(), room.accept()
    room.gate.wrote()  # the turn wrote to storage
    a.send("one")
    assert room.ctx.broadcast("two") == 2  # the sockets it waits for
    a.send("three")
    assert a_t.sent == b_t.sent == []
    room.gate.open()
    assert (a_t.sent, b_t.sent) == (["one", "two", "three"], ["two"])

    room.gate.wrote()
    room.ctx.broadcast("lost")
    assert room.gate.drop() == 1  # one held action for the whole broadcast
    room.gate.open()
    assert "lost" not in a_t.sent + b_t.sent


def test_a_held_broadcast_contains_a_failing_send(caplog: pytest.LogCaptureFixture) -> None:
    room = live_room()
    room.accept(transport=BrokenTransport())
    _, good = room.accept()
    room.gate.wrote()
    assert room.ctx.broadcast("later") == 2
    with caplog.at_level(logging.ERROR, "trio_hibernate.object"):
        room.gate.open()  # the commit's caller never sees the broken connection's error
    assert good.sent == ["later"]
    assert len(caplog.records) == 1


def test_a_held_send_refuses_a_lone_surrogate_at_once() -> None:
    """Regression: the gate used to hold it and the commit that opened the gate raised
    UnicodeEncodeError, out of the supervisor and the host."""
    room = live_room()
    ws, transport = room.accept()
    room.gate.wrote()
    with pytest.raises(UnicodeEncodeError):
        ws.send("\udc00")
    room.gate.open()
    assert transport.sent == []


# -- connection ids, without Trio ---------------------------------------------------------------


def test_an_id_comes_from_pk_or_is_made_on_first_use() -> None:
    room = live_room()
    given, _ = room.accept(query="&_pk=alice-1")
    made, _ = room.accept()
    assert record(made, room).id is None  # nobody asked yet: no id kept in memory
    assert given.id == "alice-1"
    made_id = made.id
    assert len(made_id) == 22
    assert made.id == made_id == record(made, room).id
    assert room.ctx.get_websocket("alice-1") is given
    assert room.ctx.get_websocket(made_id) is made
    assert room.ctx.get_websocket("nobody") is None
    room.core.registry.check_valid()
    with pytest.raises(TypeError, match="a connection id is a str"):
        room.ctx.get_websocket(1)  # type: ignore[arg-type]


def test_an_id_is_unique_among_listed_sockets_and_freed_by_release() -> None:
    room = live_room()
    first, _ = room.accept(query="&_pk=p")
    with pytest.raises(ConnectionIdError, match="'p' is in use") as info:
        room.accept(query="&_pk=p")
    assert (info.value.status, info.value.connection_id) == (409, "p")
    assert len(room.core.registry) == 1  # nothing changed
    first.close(1000)
    with pytest.raises(ConnectionIdError):  # closing, still listed: still its id
        room.accept(query="&_pk=p")
    room.core.release(record(first, room))  # its close handler ran
    assert first.id == "p"  # still readable on the old handle
    assert room.ctx.get_websocket("p") is None
    second, _ = room.accept(query="&_pk=p")
    assert room.ctx.get_websocket("p") is second
    room.core.registry.check_valid()


def test_a_socket_has_no_id_before_it_is_accepted() -> None:
    ws = WebSocket(transport=FakeTransport(), url="/room/lobby?_pk=a", limits=Limits())
    with pytest.raises(WebSocketStateError, match="gets its id when accepted"):
        _ = ws.id


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/room/lobby", None),
        ("/room/lobby?_pk=", None),  # empty: a random id, as partyserver does
        ("/room/lobby?x=1&_pk=a.B_c-9~&y", "a.B_c-9~"),
        ("/room/lobby?_pk=%41b", "Ab"),
        ("/room/lobby/_pk", None),
        ("/room/lobby?_pkx=1", None),
        ("/room/lobby?_pk=" + "x" * MAX_CONNECTION_ID_LENGTH, "x" * MAX_CONNECTION_ID_LENGTH),
        ("ws://example.com/room/lobby?_pk=u", "u"),
    ],
)
def test_pk_parsing(url: str, expected: str | None) -> None:
    assert connection_id_from_url(url) == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("_pk=a&_pk=b", "gives _pk 2 times"),
        ("_pk=" + "x" * (MAX_CONNECTION_ID_LENGTH + 1), "is 129 characters long; at most 128"),
        ("_pk=a%20b", "holds ' '"),
        ("_pk=a/b", "holds '/'"),
        ("_pk=%C3%A9", "holds 'é'"),
        ("_pk=a:b", "holds ':'"),
    ],
)
def test_a_malformed_pk_is_refused_with_400(query: str, message: str) -> None:
    with pytest.raises(ConnectionIdError, match=message) as info:
        connection_id_from_url(f"/room/lobby?{query}")
    assert info.value.status == 400


# -- on a test host -----------------------------------------------------------------------------


@attrs.frozen
class Sent:
    """What a command made the room do: its name and broadcast's count (or a reply)."""

    command: str
    result: object


@attrs.define
class Env:
    probe: Probe = attrs.Factory(Probe)
    go: trio.Event = attrs.Factory(trio.Event)


class Chat(DurableObject):
    """Accepts every upgrade with the tags in ``?tag=``; runs text commands
    (``<command> <text>``) and records what each did in ``env.probe``."""

    async def fetch(self, request: Request) -> Response:
        return accept_upgrade(self.ctx, request, request.query_params.getlist("tag"))

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        assert isinstance(message, str)
        env: Env = self.env
        command, _, text = message.partition(" ")
        ctx = self.ctx
        result: object
        if command == "all":
            result = ctx.broadcast(text)
        elif command == "others":
            result = ctx.broadcast(text, exclude=ws)
        elif command == "red":
            result = ctx.broadcast(text, tag="red")
        elif command == "write":  # a storage write first: the gate holds the broadcast
            ws.send("before the write")
            await ctx.storage.put("k", text)
            result = ctx.broadcast(text)
        elif command == "wait":  # wait for the test, then broadcast
            await env.go.wait()
            result = ctx.broadcast(text)
        elif command == "kick":  # close another socket, then broadcast
            target = ctx.get_websocket(text)
            assert target is not None
            target.close(4000, "kicked")
            result = ctx.broadcast(f"{text} was kicked")
        elif command == "id":
            result = ws.id
            ws.send(ws.id)
        else:
            assert command == "find"
            found = ctx.get_websocket(text)
            result = None if found is None else found.id
            ws.send(repr(result))
        env.probe.record(Sent(command, result))

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        env: Env = self.env
        assert self.ctx.get_websocket(ws.id) is ws  # listed until this handler returns
        env.probe.record(Sent("closed", ws.id))


NAMESPACE: Final = "chat"


@pytest.fixture
def env() -> Env:
    return Env()


@pytest.fixture
async def host(env: Env, autojump_clock: trio.abc.Clock) -> Any:
    async with open_test_host(App({NAMESPACE: Chat}, env=env)) as test_host:
        yield test_host


async def receive(client: TestWebSocket) -> str | bytes:
    with trio.fail_after(WAIT_SECONDS):
        return await client.receive()


async def connect(host: TestHost, query: str = "") -> TestWebSocket:
    with trio.fail_after(WAIT_SECONDS):
        return await host.connect(NAMESPACE, "room", f"?{query}" if query else "")


async def result_of(env: Env, client: TestWebSocket, command: str) -> object:
    """Send ``command`` and wait until the room has run it; what it recorded."""
    before = len(env.probe.of(Sent))
    with trio.fail_after(WAIT_SECONDS):
        await client.send(command)
    await env.probe.wait_for(lambda: len(env.probe.of(Sent)) > before)
    return env.probe.of(Sent)[-1].result


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[str | bytes]:
    """Every message the runtime encodes into a frame."""
    seen: list[str | bytes] = []

    def counting(message: str | bytes) -> bytes:
        seen.append(message)
        return encode_message(message)

    monkeypatch.setattr(trio_hibernate._runtime, "encode_message", counting)
    return seen


async def test_broadcast_on_a_host_encodes_once(
    host: TestHost, env: Env, encodes: list[str | bytes]
) -> None:
    clients = [await connect(host, "tag=red" if i < 2 else "") for i in range(4)]
    assert await result_of(env, clients[0], "all hello") == 4
    assert [await receive(c) for c in clients] == ["hello"] * 4
    assert encodes.count("hello") == 1
    assert await result_of(env, clients[0], "others psst") == 3
    assert await result_of(env, clients[3], "red only") == 2
    assert [await receive(c) for c in clients[1:]] == ["psst", "psst", "psst"]
    assert [await receive(c) for c in clients[:2]] == ["only", "only"]


async def test_broadcast_skips_a_socket_the_object_closed(host: TestHost, env: Env) -> None:
    alice, _bob, carol = [await connect(host, f"_pk={n}") for n in ("alice", "bob", "carol")]
    # Bob gets the Close but does not answer yet: his socket stays listed, CLOSING.
    assert await result_of(env, alice, "kick bob") == 2
    assert await receive(alice) == await receive(carol) == "bob was kicked"
    assert await result_of(env, carol, "all still here") == 2
    assert await receive(alice) == await receive(carol) == "still here"
    assert await result_of(env, carol, "find bob") == "bob"  # listed until it ends
    assert await receive(carol) == "'bob'"


async def test_broadcast_skips_a_socket_whose_peer_ended(host: TestHost, env: Env) -> None:
    alice, bob, carol = [await connect(host) for _ in range(3)]
    with trio.fail_after(WAIT_SECONDS):
        await alice.send("wait after bob")  # the room is busy in this turn ...
        assert await bob.close(1000, "bye") == (1000, "bye")  # ... when bob's Close is echoed
    env.go.set()
    await env.probe.wait_for(lambda: bool(env.probe.of(Sent)))
    assert env.probe.of(Sent)[0] == Sent("wait", 2)  # before bob's close handler
    assert await receive(alice) == await receive(carol) == "after bob"


async def test_broadcast_after_a_write_is_held_and_dropped_with_a_failed_commit(
    host: TestHost, env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = await connect(host), await connect(host)
    assert await result_of(env, alice, "write kept") == 2
    assert await receive(alice) == "before the write"
    assert await receive(alice) == await receive(bob) == "kept"

    def failing_commit(db: SqliteDatabase) -> None:
        raise sqlite3.OperationalError("disk I/O error (injected)")

    monkeypatch.setattr(SqliteDatabase, "commit", failing_commit)
    assert await result_of(env, alice, "write lost") == 2  # held for both ...
    assert await receive(alice) == "before the write"
    monkeypatch.undo()
    assert await result_of(env, bob, "all next") == 2
    # ... and dropped: the next message each gets is the one after.
    assert await receive(alice) == await receive(bob) == "next"
    assert any("1 held message(s) dropped" in r.getMessage() for r in caplog.records)


async def test_ids_survive_hibernation(host: TestHost, env: Env) -> None:
    given, made = await connect(host, "_pk=given-1"), await connect(host)
    assert await result_of(env, given, "id") == "given-1"
    made_id = await result_of(env, made, "id")
    assert isinstance(made_id, str)
    assert len(made_id) == 22
    for client in (given, made):
        await receive(client)
    assert await host.hibernate(NAMESPACE, "room")
    host.strict = True  # and a new instance for every event from now on
    assert await result_of(env, made, "id") == made_id
    assert await result_of(env, made, "find given-1") == "given-1"
    assert await result_of(env, given, f"find {made_id}") == made_id
    assert await receive(made) == made_id
    assert await receive(made) == "'given-1'"
    assert await receive(given) == repr(made_id)


async def test_a_duplicate_pk_is_refused_with_409_until_the_first_has_ended(
    host: TestHost, env: Env
) -> None:
    first = await connect(host, "_pk=dup")
    with pytest.raises(UpgradeRejected) as info:
        await connect(host, "_pk=dup")
    assert info.value.status == 409
    assert b"Conflict: the connection id (_pk) 'dup' is in use" in info.value.body
    with trio.fail_after(WAIT_SECONDS):
        await first.close()
    await env.probe.wait_for(lambda: Sent("closed", "dup") in env.probe.of(Sent))
    again = await connect(host, "_pk=dup")
    assert await result_of(env, again, "id") == "dup"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("_pk=" + "k" * 129, b"is 129 characters long; at most 128"),
        ("_pk=a%20b", b"holds ' '"),
        ("_pk=a&_pk=b", b"gives _pk 2 times"),
    ],
)
async def test_a_malformed_pk_gets_400(host: TestHost, query: str, message: bytes) -> None:
    with pytest.raises(UpgradeRejected) as info:
        await connect(host, query)
    assert info.value.status == 400
    assert info.value.body.startswith(b"Bad Request: the ")
    assert message in info.value.body
    assert host.statistics().websockets == 0
