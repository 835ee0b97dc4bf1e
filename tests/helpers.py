"""Test helpers for the end-to-end tests: a probe that objects report to, raw clients.

Everything here runs under Trio's mock clock in the tests: waits are bounded with
``trio.fail_after`` (virtual seconds), and "let things settle" means
``wait_all_tasks_blocked``, which returns once every task (server and client) has been
blocked for :data:`IO_GRACE_SECONDS` with no socket ready, never a sleep on the clock.

Why a grace and not zero: the tests talk over real loopback sockets, and the runtime
commits storage in a worker thread. Bytes in flight (when the kernel defers loopback
delivery to ``ksoftirqd``) or a thread still running look exactly like "everyone is
blocked", so with ``autojump_threshold = 0`` the mock clock could jump over a timeout
while a reply is on its way. Trio's ``MockClock`` documentation says to set the threshold
"to the smallest value that lets you reliably avoid false alarms where some I/O is in
flight"; the grace is that value. It costs real time only when every task is blocked.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final, TypeVar

import attrs
import trio
from trio.testing import wait_all_tasks_blocked
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    Event as WSEvent,
    RejectConnection,
    RejectData,
    Request,
)

__all__ = [
    "EMPTY_CLOSE_FRAME",
    "IO_GRACE_SECONDS",
    "WAIT_SECONDS",
    "HttpReply",
    "Probe",
    "RawWebSocket",
    "Refusal",
    "http_exchange",
    "open_raw_websocket",
    "refused_upgrade",
    "settle",
]

T = TypeVar("T")

#: Bound on every single wait (virtual seconds under the autojump clock).
WAIT_SECONDS: Final = 30.0
#: Real seconds every task must stay blocked before the mock clock jumps or ``settle``
#: returns (see the module docstring).
IO_GRACE_SECONDS: Final = 0.05

#: A client Close frame with an empty payload (FIN + opcode 8; masked, length 0; mask 0).
EMPTY_CLOSE_FRAME: Final = bytes((0x88, 0x80, 0, 0, 0, 0))


async def settle() -> None:
    """Wait until every task (server and clients) is blocked and no socket has data ready.

    Takes no virtual time: ``wait_all_tasks_blocked`` has priority over the autojump.
    """
    with trio.fail_after(WAIT_SECONDS):
        await wait_all_tasks_blocked(cushion=IO_GRACE_SECONDS)


@attrs.define(eq=False)
class Probe:
    """The ``env`` of the test apps: objects count their constructions and log events here.

    It keeps only weak references to instances, so it never keeps an evicted one alive.
    """

    constructed: int = 0
    events: list[object] = attrs.Factory(list)
    instances: list[weakref.ref[object]] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    def constructing(self, instance: object) -> None:
        """Called by every test object's constructor."""
        self.constructed += 1
        self.instances.append(weakref.ref(instance))

    def record(self, event: object) -> None:
        """Append ``event`` and wake whoever waits in :meth:`wait_for`."""
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def of(self, kind: type[T]) -> list[T]:
        """The recorded events of type ``kind``, in order."""
        return [event for event in self.events if isinstance(event, kind)]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait (at most :data:`WAIT_SECONDS`) until ``predicate()`` holds after a record."""
        with trio.fail_after(WAIT_SECONDS):
            while not predicate():
                await self._changed.wait()


class RawWebSocket:
    """A minimal WebSocket client on wsproto, for what trio-websocket will not do:
    send an empty Close frame, drop the TCP connection without a Close, withhold the
    answer to the server's Close, or break the protocol."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = WSConnection(ConnectionType.CLIENT)
        self._events: deque[WSEvent] = deque()

    async def send(self, event: WSEvent) -> None:
        """Encode ``event`` with wsproto and send it."""
        with trio.fail_after(WAIT_SECONDS):
            await self.stream.send_all(self.conn.send(event))

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are, bypassing wsproto's state machine."""
        with trio.fail_after(WAIT_SECONDS):
            await self.stream.send_all(data)

    async def next_event(self) -> WSEvent | None:
        """The next wsproto event from the server, or None on EOF."""
        with trio.fail_after(WAIT_SECONDS):
            while not self._events:
                self._events.extend(self.conn.events())
                if self._events:
                    break
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.conn.receive_data(data)
            return self._events.popleft()

    async def drop(self) -> None:
        """Close the TCP connection without any Close frame."""
        with trio.fail_after(WAIT_SECONDS):
            await self.stream.aclose()


@asynccontextmanager
async def open_raw_websocket(port: int, target: str) -> AsyncIterator[RawWebSocket]:
    """Connect to 127.0.0.1:``port``, complete the upgrade for ``target``; close on exit."""
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        raw = RawWebSocket(stream)
        await raw.send(Request(host=f"127.0.0.1:{port}", target=target))
        event = await raw.next_event()
        if not isinstance(event, AcceptConnection):
            raise AssertionError(f"the upgrade to {target} was refused: {event!r}")
        yield raw


@attrs.frozen
class Refusal:
    """A refused WebSocket upgrade: the HTTP status and body."""

    status: int
    body: bytes


async def refused_upgrade(port: int, target: str) -> Refusal:
    """Ask for an upgrade to ``target`` that the server must refuse; return the refusal.

    Done with wsproto rather than trio-websocket because trio-websocket 0.12.2 never
    closes its TCP stream when the server refuses the upgrade (a ResourceWarning, which
    this suite turns into an error).
    """
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        raw = RawWebSocket(stream)
        await raw.send(Request(host=f"127.0.0.1:{port}", target=target))
        event = await raw.next_event()
        if isinstance(event, AcceptConnection):
            raise AssertionError(f"the upgrade to {target} was accepted")
        assert isinstance(event, RejectConnection), event
        body = bytearray()
        finished = not event.has_body
        while not finished:
            data = await raw.next_event()
            assert isinstance(data, RejectData), data
            body += data.data
            finished = data.body_finished
        return Refusal(event.status_code, bytes(body))


@attrs.frozen
class HttpReply:
    """A parsed HTTP/1.1 response."""

    status: int
    headers: dict[str, str]
    body: bytes


async def http_exchange(port: int, request: bytes) -> HttpReply:
    """Send a hand-written HTTP request, read to EOF, and parse the response by hand."""
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
    head, separator, body = bytes(received).partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {bytes(received)!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body), (headers, body)
    return HttpReply(int(status), headers, body)
