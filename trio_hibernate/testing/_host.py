"""A host for tests: Trio's clock drives idle timeouts *and* the wall clock (alarms)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, final

import trio

from .._app import App
from .._core.events import AlarmEvent
from .._host import Host, open_host, runtime_of
from .._http import Request, Response
from .._ids import ObjectId
from .._limits import Limits
from .._statistics import HostStatistics
from ._client import TestWebSocket, handshake

__all__ = ["TestHost", "open_test_host"]

#: The virtual wall clock starts here (2027-01-15T08:00:00Z), so timestamps in tests
#: are the same on every run.
EPOCH: Final = 1_800_000_000.0


@final
class TestHost:
    """A :class:`~trio_hibernate.Host` with helpers for tests (see :func:`open_test_host`).

    The wrapped host is :attr:`host`; everything here is a thin, documented shortcut.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, host: Host) -> None:
        self.host = host
        """The real host underneath."""
        self._clients: list[TestWebSocket] = []

    @property
    def strict(self) -> bool:
        """Strict mode: every activation ends after one event (instances never last)."""
        return self.host.hibernate_after_every_event

    @strict.setter
    def strict(self, value: bool) -> None:
        self.host.hibernate_after_every_event = value

    def statistics(self) -> HostStatistics:
        """The host's statistics (wakes, hibernations, auto-responses...)."""
        return self.host.statistics()

    def now(self) -> float:
        """The virtual wall clock (epoch seconds) objects see through ``ctx.now()``."""
        return runtime_of(self.host).wall_clock()

    async def connect(
        self,
        namespace: str,
        name: str,
        path: str = "",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> TestWebSocket:
        """Open a WebSocket to ``/<namespace>/<name><path>`` over an in-process socket pair.

        Raises:
            UpgradeRejected: the object's ``fetch`` did not accept it.
        """
        return await self.connect_to(f"/{namespace}/{name}{path}", headers=headers)

    async def connect_to(
        self, target: str, *, headers: Mapping[str, str] | None = None
    ) -> TestWebSocket:
        """Open a WebSocket to any request target (``/api/match/<id>/ws?user=ann``) over
        an in-process socket pair. The request goes where a real one would:
        ``App.authorize``, the built-in routing, ``App.fetch`` (which may forward it to
        any object through a stub).

        Raises:
            UpgradeRejected: the upgrade was refused (the status and body say by what).
        """
        server_end, client_end = socket.socketpair()
        self.host.serve_socket(server_end)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(client_end))
        try:
            client = await handshake(stream, target, list((headers or {}).items()))
        except BaseException:
            await stream.aclose()
            raise
        self._clients.append(client)
        return client

    async def fetch(
        self,
        namespace: str,
        name: str,
        path: str = "",
        *,
        method: str = "GET",
        body: bytes | str = b"",
    ) -> Response:
        """Send an HTTP request to the object's ``fetch`` (through a stub)."""
        stub = self.host.get_namespace(namespace).get_by_name(name)
        return await stub.fetch(Request(method=method, url=f"/{namespace}/{name}{path}", body=body))

    async def hibernate(self, namespace: str, name: str | ObjectId) -> bool:
        """Evict the object now (sockets stay connected). False if it was not in memory."""
        return await self.host.hibernate(namespace, name)

    async def run_alarm(self, namespace: str, name: str | ObjectId) -> None:
        """Fire the object's pending alarm now and wait until its turn has run.

        Raises:
            LookupError: the object has no alarm set.
        """
        object_id = name if isinstance(name, ObjectId) else ObjectId.from_name(namespace, name)
        key = (namespace, object_id.hex, object_id.name)
        runtime = runtime_of(self.host)
        if runtime.alarms.pending(key) is None:
            raise LookupError(f"{namespace}/{object_id.name or object_id.hex} has no alarm set")
        runtime.alarms.schedule(key, None)
        done = trio.Event()
        # Fire as if it were due now: the object checks its stored alarm is not later.
        runtime.entry_for(namespace, object_id).deliver(AlarmEvent(float("inf"), 0, done.set))
        await done.wait()

    @contextmanager
    def assert_not_woken(self) -> Iterator[None]:
        """Fail if any object is constructed inside the ``with`` block."""
        before = self.host.statistics().wakes
        yield
        woken = self.host.statistics().wakes - before
        assert woken == 0, f"{woken} object(s) were woken"

    async def _aclose_clients(self) -> None:
        for client in self._clients:
            await client.drop()


@asynccontextmanager
async def open_test_host(
    app: App,
    *,
    strict: bool = False,
    idle_timeout: float = 10.0,
    data_dir: str | None = None,
    limits: Limits | None = None,
    **options: Any,
) -> AsyncIterator[TestHost]:
    """Run ``app`` in a host made for tests.

    The host's wall clock is Trio's clock (starting at a fixed date), so with
    pytest-trio's ``autojump_clock`` idle timeouts *and* alarms take no real time.
    ``strict=True`` drops every instance after each event, so an object that keeps
    state only in memory fails its tests instead of failing in production.
    """
    start = trio.current_time()
    async with open_host(
        app,
        limits=limits,
        idle_timeout=idle_timeout,
        hibernate_after_every_event=strict,
        data_dir=data_dir,
        wall_clock=lambda: EPOCH + (trio.current_time() - start),
        **options,
    ) as host:
        test_host = TestHost(host)
        try:
            yield test_host
        finally:
            await test_host._aclose_clients()
