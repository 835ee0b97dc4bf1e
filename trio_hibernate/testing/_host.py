"""A host for tests: Trio's clock drives idle timeouts *and* the wall clock (alarms)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, final

import trio
from trio.testing import wait_all_tasks_blocked

from .._app import App
from .._core.events import AlarmEvent
from .._host import Host, open_host, runtime_of
from .._http import Request, Response
from .._ids import ObjectId
from .._limits import Limits
from .._settling import busy_objects, committing
from .._statistics import HostStatistics
from ._client import TestWebSocket, handshake

__all__ = ["TestHost", "open_test_host"]

#: The virtual wall clock starts here (2027-01-15T08:00:00Z), so timestamps in tests
#: are the same on every run.
EPOCH: Final = 1_800_000_000.0

#: How long (Trio seconds) a test client or :meth:`TestHost.settle` waits by default.
DEFAULT_WAIT_TIMEOUT: Final = 10.0

#: Real seconds between two looks at a storage commit running in a worker thread.
_THREAD_POLL_SECONDS: Final = 0.001


@final
class TestHost:
    """A :class:`~trio_hibernate.Host` with helpers for tests (see :func:`open_test_host`).

    The wrapped host is :attr:`host`; everything here is a thin, documented shortcut.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, host: Host, *, wait_timeout: float = DEFAULT_WAIT_TIMEOUT) -> None:
        self.host = host
        """The real host underneath."""
        self.wait_timeout = wait_timeout
        """Trio seconds that :meth:`settle` and the clients' ``receive``, ``ping`` and
        ``close`` wait before raising :class:`trio.TooSlowError` (each takes a
        ``timeout=`` of its own too)."""
        # The clients whose sockets are still open (closed at exit); a client that
        # closes or is dropped leaves at once.
        self._clients: dict[TestWebSocket, None] = {}

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
            headers_list = list((headers or {}).items())
            client = await handshake(stream, target, headers_list, self, self._clients)
        except BaseException:
            await stream.aclose()
            raise
        return client

    @property
    def open_clients(self) -> int:
        """How many clients made by :meth:`connect` still hold their socket."""
        return len(self._clients)

    async def settle(self, *, timeout: float | None = None) -> None:
        """Wait until every event delivered so far has been handled.

        Returns once the bytes every client has sent are read, every object's mailbox
        is empty and no turn (nor its storage commit) runs: each object is hibernated or
        parked waiting for its next event. What those turns sent is on its way to the
        clients. Tasks started with ``ctx.start_soon`` are not waited for. Takes no
        Trio time unless a turn itself waits (a ``trio.sleep`` in a handler, a commit in
        a worker thread); never sleeps.

        Use it between a client's ``send`` and ``run_alarm()``, ``hibernate()``,
        ``statistics()`` or a look at storage (or ``await ws.send(m, settle=True)``).

        Raises:
            trio.TooSlowError: objects were still busy after ``timeout`` Trio seconds
                (default :attr:`wait_timeout`); the message names them.
            ValueError: ``timeout`` is not positive.
        """
        seconds = self.wait_timeout if timeout is None else timeout
        if not seconds > 0:  # also refuses nan
            raise ValueError(f"timeout must be > 0 seconds (math.inf: no limit), not {seconds!r}")
        runtime = runtime_of(self.host)
        with trio.move_on_after(seconds):
            while True:
                # Every task blocked: the connections have read what the clients sent
                # (a socket pair delivers at once) and handed it to the objects.
                await wait_all_tasks_blocked()
                if not busy_objects(runtime.objects):
                    return
                if committing(runtime.objects):
                    # A worker thread commits: every task looks blocked, and the autojump
                    # clock would jump, but not while a task is in wait_all_tasks_blocked.
                    await wait_all_tasks_blocked(cushion=_THREAD_POLL_SECONDS)
                    continue
                # A turn waits (on the clock, a thread, another object): let the clock
                # move, and look again when an object comes to rest.
                await runtime.reaper.rests.wait()
        busy = "; ".join(busy_objects(runtime.objects)) or "none any more"
        raise trio.TooSlowError(
            f"settle() waited {seconds:g} s of Trio time and objects were still busy "
            f"({busy}); a turn that waits that long needs timeout="
        )

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
        for client in list(self._clients):
            await client.drop()


@asynccontextmanager
async def open_test_host(
    app: App,
    *,
    strict: bool = False,
    idle_timeout: float = 10.0,
    data_dir: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    **options: Any,
) -> AsyncIterator[TestHost]:
    """Run ``app`` in a host made for tests.

    The host's wall clock is Trio's clock (starting at a fixed date), so with
    pytest-trio's ``autojump_clock`` idle timeouts *and* alarms take no real time.
    ``strict=True`` drops every instance after each event, so an object that keeps
    state only in memory fails its tests instead of failing in production.
    ``wait_timeout`` bounds :meth:`TestHost.settle` and the clients' waits (Trio
    seconds, see :attr:`TestHost.wait_timeout`); the other options go to
    :func:`~trio_hibernate.open_host`.
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
        test_host = TestHost(host, wait_timeout=wait_timeout)
        try:
            yield test_host
        finally:
            await test_host._aclose_clients()
