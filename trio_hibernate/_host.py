"""The host: the public face of a runtime that serves one app's objects and connections."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypedDict, TypeVar, final

import trio

from ._cluster.config import ClusterConfig
from ._cluster.setup import attach_cluster, connect_cluster
from ._compression import WebSocketCompression
from ._groups import open_owned_nursery
from ._ids import ObjectId
from ._limits import Limits
from ._runtime import Runtime
from ._statistics import HostStatistics, ObjectStatistics
from ._storage.backend import StorageBackend
from ._storage.sqlite import SqliteBackend
from ._websocket import check_close_args

if TYPE_CHECKING:
    from ._app import App
    from ._cluster.node import ClusterNode
    from ._stubs import Namespace

__all__ = ["Host", "HostOptions", "open_host", "runtime_of"]

T = TypeVar("T")


class _NoPublicConstructor(type):
    """Instances are made by this package only (as trio's ``NoPublicConstructor``)."""

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor; "
            "use trio_hibernate.open_host()"
        )

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        instance: T = super().__call__(*args, **kwargs)  # type: ignore[misc]
        return instance


@final
class Host(metaclass=_NoPublicConstructor):
    """Runs the objects of one :class:`App` and their connections.

    Make one with :func:`open_host` (or let :func:`~trio_hibernate.open_server` do it).
    Connections are served by :meth:`serve_socket`; each lives in the host nursery as one
    task, independent of its object's activations.
    """

    __slots__ = ("_runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    @property
    def app(self) -> App:
        """The app whose objects this host runs (replaced by :meth:`replace_app`)."""
        return self._runtime.app

    @property
    def limits(self) -> Limits:
        """The limits this host enforces."""
        return self._runtime.limits

    @property
    def close_timeout(self) -> float:
        """Seconds shutdown waits for peers to answer the Close frame."""
        return self._runtime.close_timeout

    @property
    def shutdown_close_code(self) -> int:
        """Close code sent to every WebSocket when the host shuts down (1001 going away;
        set 1012 before a restart so clients reconnect at once)."""
        return self._runtime.shutdown_close_code

    @shutdown_close_code.setter
    def shutdown_close_code(self, code: int) -> None:
        check_close_args(code, None)
        self._runtime.shutdown_close_code = code

    @property
    def hibernate_after_every_event(self) -> bool:
        """Strict mode (see :func:`open_host`); may be switched at any time."""
        return self._runtime.hibernate_after_every_event

    @hibernate_after_every_event.setter
    def hibernate_after_every_event(self, value: bool) -> None:
        self._runtime.hibernate_after_every_event = bool(value)

    def serve_socket(self, sock: socket.socket) -> None:
        """Serve an accepted client socket (HTTP request, maybe a WebSocket) in the host.

        The host takes ownership of ``sock``: it is made non-blocking and closed when
        the connection ends. Not a checkpoint.
        """
        self._runtime.serve_socket(sock)

    async def hibernate(self, namespace: str, name: str | ObjectId) -> bool:
        """Evict an object now (test hook), keeping its WebSockets connected.

        Waits for the current turn (and a ``block_concurrency_while`` section of a
        ``ctx.start_soon`` task) to finish, cancels the object's background tasks and
        drops the instance; the next event constructs a new one. Returns False when the
        object had no instance in memory. A checkpoint.

        Raises:
            KeyError: the app has no namespace ``namespace``.
        """
        runtime = self._runtime
        entry = runtime.objects.get(namespace, runtime.object_id(namespace, name))
        activation = entry.activation if entry is not None else None
        if activation is None:
            await trio.lowlevel.checkpoint()
            return False
        activation.request_stop()
        await activation.stopped.wait()
        return True

    def get_namespace(self, name: str) -> Namespace:
        """The namespace ``name`` of the app, to get stubs for its objects.

        Raises:
            KeyError: the app has no such namespace.
        """
        return self._runtime.get_namespace(name)

    async def replace_app(self, app: App) -> None:
        """Switch to new code without disconnecting anyone (live code update).

        Every live object finishes its current turn and hibernates; from then on each
        object is constructed from ``app``'s class for its namespace. WebSockets stay
        connected, with their tags and attachments. Objects of a namespace that ``app``
        no longer has get their sockets closed with 1012 (service restart). A checkpoint.
        """
        await self._runtime.replace_app(app)

    def statistics(self) -> HostStatistics:
        """Counts of objects, sockets, wakes and hibernations (see the fields)."""
        return self._runtime.statistics()

    def object_statistics(self, namespace: str, name: str | ObjectId) -> ObjectStatistics:
        """State and counts of one object (``HIBERNATED`` with zeros if unknown).

        Raises:
            KeyError: the app has no namespace ``namespace``.
        """
        runtime = self._runtime
        return runtime.objects.statistics(namespace, runtime.object_id(namespace, name))


def runtime_of(host: Host) -> Runtime:
    """The runtime behind ``host`` (for this package's CLI, server and test kit)."""
    return host._runtime


class HostOptions(TypedDict, total=False):
    """The keyword arguments of :func:`open_host` (see there), as
    :func:`~trio_hibernate.serve_objects` and :func:`~trio_hibernate.open_server` take
    them: a type checker then catches a misspelt option."""

    limits: Limits | None
    idle_timeout: float
    hibernate_after_every_event: bool
    handshake_timeout: float
    request_timeout: float
    partial_message_timeout: float
    close_timeout: float
    shutdown_close_code: int
    wall_clock: Callable[[], float]
    data_dir: str | os.PathLike[str] | None
    allowed_origins: Iterable[str] | None
    storage_backend: StorageBackend | None
    call_timeout: float
    max_open_databases: int | None
    websocket_compression: WebSocketCompression | None
    cluster: ClusterConfig | None


@asynccontextmanager
async def open_host(
    app: App,
    *,
    limits: Limits | None = None,
    idle_timeout: float = 10.0,
    hibernate_after_every_event: bool = False,
    handshake_timeout: float = 10.0,
    request_timeout: float = 30.0,
    partial_message_timeout: float = 30.0,
    close_timeout: float = 10.0,
    shutdown_close_code: int = 1001,
    wall_clock: Callable[[], float] = time.time,
    data_dir: str | os.PathLike[str] | None = None,
    allowed_origins: Iterable[str] | None = None,
    storage_backend: StorageBackend | None = None,
    call_timeout: float = 30.0,
    max_open_databases: int | None = None,
    websocket_compression: WebSocketCompression | None = None,
    cluster: ClusterConfig | None = None,
) -> AsyncIterator[Host]:
    """Run a :class:`Host` for ``app`` for the duration of the ``async with`` block.

    Args:
        app: The object classes and their ``env``.
        limits: The limits to enforce (default :class:`Limits()`).
        idle_timeout: Seconds an object may be idle (no event, no background task)
            before it hibernates. Its WebSockets stay connected.
        hibernate_after_every_event: Strict mode for tests: drop the instance after every
            event, so state kept only in memory is lost at once, not in production.
        handshake_timeout: Seconds a client has to send its HTTP request.
        request_timeout: Seconds to answer a request (``App.authorize``, ``App.fetch``
            and the object's ``fetch``, including a WebSocket upgrade) before the client
            gets 504. An upgrade the object accepts later is let go at once.
        partial_message_timeout: Seconds a WebSocket message that has started to
            arrive may go without more data before the connection is closed with 1008
            (its bytes are held in memory meanwhile).
        close_timeout: Seconds to wait for the peer's answer to our Close frame before
            dropping the connection (the object then sees 1006).
        shutdown_close_code: Close code sent to every WebSocket when the block exits
            (1001 going away; use 1012 for a restart). No handler runs for these closes.
        wall_clock: Source of wall-clock time (epoch seconds) for auto-response
            timestamps and alarms.
        data_dir: Where object databases live (one SQLite file per object, plus the
            alarm index). None keeps storage in memory for the host's life: fine for
            tests and demos, lost on exit.
        storage_backend: Another place to keep object data (see
            ``trio_hibernate._storage.backend``); exclusive with ``data_dir``.
        max_open_databases: With ``data_dir``, the most object databases open at once
            (3 file descriptors each). Past it, opening one closes the least recently
            used one that is between transactions (its object, live or not, reopens it
            on its next storage call); if all are inside a transaction, the storage call
            raises :class:`LimitExceededError`. Default: an eighth of the file descriptor
            limit less a reserve of 256, in databases. No effect in memory.
        allowed_origins: Origins (``"https://app.example"``) whose pages may open
            WebSockets here; ``"*"`` allows any. By default (None) a browser may only
            connect from the same origin: an upgrade whose ``Origin`` names another host
            than its ``Host`` header is refused with 403 before any object wakes
            (cross-site WebSocket hijacking). Clients that send no ``Origin`` (anything
            but a browser) are not affected.
        websocket_compression: Compress WebSocket messages with permessage-deflate
            (RFC 7692) for clients that offer it (see :class:`WebSocketCompression`:
            without context takeover by default, which keeps no state per idle socket).
            None (the default): no compression.
        call_timeout: Seconds a stub's ``call`` or ``fetch`` waits for its answer before
            raising ``trio.TooSlowError`` (``math.inf``: no limit). The call is not
            withdrawn: it stays queued, runs in its turn, and its result is dropped.
        cluster: Run as one host of a cluster sharing a PostgreSQL database (see
            :class:`ClusterConfig` and ``docs/cluster.md``): objects are claimed by one
            host at a time and their storage and alarms live in PostgreSQL. Exclusive
            with ``data_dir`` and ``storage_backend``. The host joins the cluster on
            entry when ``cluster.advertise`` is set; otherwise
            :func:`~trio_hibernate.serve_objects` joins it once it listens, advertising
            the bound address. On exit the host releases its objects and its lease.

    Raises:
        StorageError: ``data_dir`` is not a writable directory, or its alarm index
            (``_alarms.sqlite3``) cannot be read; raised on entry, before the block runs.
        ValueError: a timeout is not positive, or both ``data_dir`` and
            ``storage_backend`` were given.
        InvalidCloseCodeError: ``shutdown_close_code`` is not a close code a server
            may send (1000-4999 but 1004, 1005, 1006 and 1015).

    Resource handling:
        On exit every WebSocket is closed with ``shutdown_close_code`` and every instance
        is dropped; the host waits up to ``close_timeout`` for peers to answer, then
        cancels what remains. Stub calls, fetches and alarms still queued, or arriving
        while the host closes, are answered (an error, a 503, ``on_done``), not run.
    """
    if idle_timeout <= 0:
        raise ValueError(f"idle_timeout must be positive, got {idle_timeout}")
    for option, value in (
        ("close_timeout", close_timeout),
        ("handshake_timeout", handshake_timeout),
        ("request_timeout", request_timeout),
        ("partial_message_timeout", partial_message_timeout),
        ("call_timeout", call_timeout),
    ):
        if not value > 0:
            raise ValueError(f"{option} must be positive, got {value}")
    check_close_args(shutdown_close_code, None)
    if websocket_compression is not None and not isinstance(
        websocket_compression, WebSocketCompression
    ):
        raise TypeError(
            "websocket_compression takes a WebSocketCompression or None, "
            f"not {websocket_compression!r}"
        )
    limits = limits or Limits()
    if storage_backend is not None and (data_dir is not None or max_open_databases is not None):
        raise ValueError("give data_dir and max_open_databases, or storage_backend, not both")
    node: ClusterNode | None = None
    if cluster is not None:
        if storage_backend is not None or data_dir is not None:
            raise ValueError(
                "cluster mode keeps storage in PostgreSQL: no data_dir or storage_backend"
            )
        node = await connect_cluster(cluster, wall_clock)
    backend: StorageBackend = (
        storage_backend
        if storage_backend is not None
        else node.backend
        if node is not None
        else SqliteBackend(data_dir, max_open_databases=max_open_databases)
    )
    runtime: Runtime | None = None
    try:
        async with open_owned_nursery() as outer:
            nursery, scope = await outer.start(_run_host_nursery)
            # The host nursery ignores every cancellation but ``scope``'s: whatever way we
            # leave (a storage error while starting, KeyboardInterrupt during shutdown),
            # ``scope`` must be cancelled, or this block waits for that nursery forever.
            try:
                runtime = Runtime(
                    app,
                    nursery,
                    limits=limits,
                    idle_timeout=idle_timeout,
                    hibernate_after_every_event=hibernate_after_every_event,
                    handshake_timeout=handshake_timeout,
                    request_timeout=request_timeout,
                    partial_message_timeout=partial_message_timeout,
                    close_timeout=close_timeout,
                    wall_clock=wall_clock,
                    storage_backend=backend,
                    allowed_origins=None if allowed_origins is None else frozenset(allowed_origins),
                    call_timeout=call_timeout,
                    shutdown_close_code=shutdown_close_code,
                    compression=websocket_compression,
                )
                nursery.start_soon(runtime.alarms.run)
                nursery.start_soon(runtime.reaper.run)
                if node is not None:
                    attach_cluster(node, runtime)
                    if cluster is not None and cluster.advertise is not None:
                        await node.join(cluster.advertise)
                try:
                    yield Host._create(runtime)
                finally:
                    with trio.CancelScope(shield=True):
                        await runtime.shutdown(close_timeout)
                        if node is not None:
                            await node.leave(close_timeout)
            finally:
                scope.cancel()
    finally:
        # Only now has every task of the host nursery finished, including commits in
        # worker threads (not abandoned on cancel), which record into the alarm index.
        if runtime is not None:
            runtime.close()
        backend.close()
        if node is not None:  # closing the pools joins their threads: not on the loop
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(node.close)


async def _run_host_nursery(
    *, task_status: trio.TaskStatus[tuple[trio.Nursery, trio.CancelScope]]
) -> None:
    # The host nursery is shielded from the caller's cancellation so that shutdown can
    # close every WebSocket properly (Close frame, wait for the answer) before the
    # connection tasks go; ``open_host`` cancels it when that is done or timed out.
    with trio.CancelScope(shield=True) as scope:
        async with trio.open_nursery() as nursery:
            task_status.started((nursery, scope))
            await trio.sleep_forever()
