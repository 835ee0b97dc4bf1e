"""The host: owns the connection tasks and the object supervisors of one app."""

from __future__ import annotations

import logging
import math
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from ._core.budget import MemoryBudget
from ._core.codec import encode_data
from ._core.events import AlarmEvent, CallEvent, Event, FetchEvent, MessageEvent
from ._core.frames import encode_message
from ._core.lifecycle import ObjectCore, ObjectState
from ._groups import open_owned_nursery
from ._http import Request, Response
from ._ids import ObjectId
from ._limits import Limits
from ._net.connection import ServerConnection
from ._net.operations import operations_response
from ._statistics import Counters, HostStatistics, ObjectStatistics
from ._storage.alarms import AlarmIndex, AlarmKey, AlarmScheduler
from ._storage.backend import StorageBackend
from ._storage.settings import SettingsIndex
from ._storage.sqlite import SqliteBackend
from ._stubs import Namespace
from ._supervisor import Activation, supervise

if TYPE_CHECKING:
    from ._app import App
    from ._object import DurableObject

__all__ = ["Host", "open_host"]

log = logging.getLogger("trio_hibernate.host")

#: Messages up to this size keep their encoded frame for the next send of the same object
#: (a broadcast loop sends one ``str`` to many sockets: encode once).
_FRAME_CACHE_MAX_BYTES: Final = 65536


@attrs.define(eq=False)
class ObjectEntry:
    """What the host keeps for an object it knows (live, or hibernated with sockets)."""

    namespace: str
    object_id: ObjectId
    cls: type[DurableObject]
    """The class to construct on the next wake (replaced by live code updates)."""
    core: ObjectCore
    activation: Activation | None = None

    @property
    def alarm_key(self) -> AlarmKey:
        """How the alarm index names this object."""
        return (self.namespace, self.object_id.hex, self.object_id.name)


_DEFAULT_PORTS: Final = {"http": "80", "ws": "80", "https": "443", "wss": "443"}


def is_same_origin(origin: str, host_header: str | None) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``) names the server that ``Host`` names.

    Compared case-insensitively, with the scheme's default port made explicit; the
    ``null`` origin and anything unparsable are never the same origin.
    """
    if host_header is None:
        return False
    scheme, sep, authority = origin.partition("://")
    default = _DEFAULT_PORTS.get(scheme.lower())
    if not sep or default is None or not authority or "/" in authority:
        return False

    def normal(value: str) -> str:
        value = value.strip().lower()
        if value.endswith("]") or ":" not in value.rpartition("]")[2]:
            value = f"{value}:{default}"
        return value

    return normal(authority) == normal(host_header)


@final
class Host:
    """Runs the objects of one :class:`App` and their connections.

    Make one with :func:`open_host` (or let :func:`~trio_hibernate.open_server` do it).
    Connections are served by :meth:`serve_socket`; each lives in the host nursery as one
    task, independent of its object's activations.
    """

    def __init__(
        self,
        app: App,
        nursery: trio.Nursery,
        *,
        limits: Limits,
        idle_timeout: float,
        hibernate_after_every_event: bool,
        handshake_timeout: float,
        request_timeout: float,
        partial_message_timeout: float,
        close_timeout: float,
        wall_clock: Callable[[], float],
        storage_backend: StorageBackend,
        allowed_origins: frozenset[str] | None,
        call_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.env = app.env
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.hibernate_after_every_event = hibernate_after_every_event
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.partial_message_timeout = partial_message_timeout
        self.close_timeout = close_timeout
        self.wall_clock = wall_clock
        self.storage_backend = storage_backend
        self.allowed_origins = allowed_origins
        self.call_timeout = call_timeout
        """Seconds a stub call or fetch waits for its answer (see :func:`open_host`)."""
        self.shutdown_close_code = 1001
        """Close code sent to every WebSocket when the host shuts down (1001 going away;
        set 1012 before a restart so clients reconnect at once)."""
        self.alarm_index = AlarmIndex(storage_backend.alarm_index_path)
        self.alarms = AlarmScheduler(wall_clock=wall_clock, fire=self._fire_alarm)
        for key, when in self.alarm_index.load():
            self.alarms.schedule(key, when)
        self.settings = SettingsIndex()
        """Auto-response pairs and event timeouts of objects the host forgot."""
        self._nursery = nursery
        self._objects: dict[tuple[str, str], ObjectEntry] = {}
        self._connections: set[ServerConnection] = set()
        # Idle activations in the order they became idle: with one idle_timeout for the
        # whole host that is also the order they expire in (see _reap_idle).
        self._idle: dict[Activation, float] = {}
        self._idle_arrived = trio.Event()
        self._closing = False
        self._all_done: trio.Event | None = None
        self._shutdown_deadline: float | None = None  # trio time; set by _shutdown
        self._shutdown_wait: trio.CancelScope | None = None
        self._shutdown_reported = False
        self._last_message: str | bytes | None = None
        self._last_frame = b""
        self.counters = Counters()
        """What happened so far (read through :meth:`statistics`)."""
        self.buffers = MemoryBudget(limits.max_buffered_bytes)
        """Bytes held for clients, host-wide (``Limits.max_buffered_bytes``)."""

    # -- public --------------------------------------------------------------------------

    def serve_socket(self, sock: socket.socket) -> None:
        """Serve an accepted client socket (HTTP request, maybe a WebSocket) in the host.

        The host takes ownership of ``sock``: it is made non-blocking and closed when
        the connection ends. Not a checkpoint.
        """
        if self._closing:
            sock.close()
            return
        sock.setblocking(False)
        conn = ServerConnection(self, sock)
        self._connections.add(conn)
        self._nursery.start_soon(conn.run)

    async def hibernate(self, namespace: str, name: str | ObjectId) -> bool:
        """Evict an object now (test hook), keeping its WebSockets connected.

        Waits for the current turn to finish, cancels the object's background tasks and
        drops the instance; the next event constructs a new one. Returns False when the
        object had no instance in memory. A checkpoint.
        """
        entry = self._objects.get((namespace, self._object_id(namespace, name).hex))
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
        if name not in self.app.objects:
            raise KeyError(f"unknown namespace {name!r}; the app has {sorted(self.app.objects)}")
        return Namespace(self, name)

    async def replace_app(self, app: App) -> None:
        """Switch to new code without disconnecting anyone (live code update).

        Every live object finishes its current turn and hibernates; from then on each
        object is constructed from ``app``'s class for its namespace. WebSockets stay
        connected, with their tags and attachments. Objects of a namespace that ``app``
        no longer has get their sockets closed with 1012 (service restart).
        """
        self.app = app
        self.env = app.env
        waits = []
        for entry in list(self._objects.values()):
            cls = app.objects.get(entry.namespace)
            if entry.activation is not None:
                entry.activation.request_stop()
                waits.append(entry.activation.stopped)
            if cls is None:
                entry.core.shut_down_sockets(1012, "service restart")
            else:
                entry.cls = cls
        for stopped in waits:
            await stopped.wait()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> HostStatistics:
        """Counts of objects, sockets, wakes and hibernations (see the fields)."""
        live = sum(1 for e in self._objects.values() if e.activation is not None)
        counters = self.counters
        return HostStatistics(
            live_objects=live,
            hibernated_objects=len(self._objects) - live,
            websockets=sum(len(e.core.registry) for e in self._objects.values()),
            connections=len(self._connections),
            wakes=counters.wakes,
            hibernations=counters.hibernations,
            auto_responses=counters.auto_responses,
            seconds_in_memory=counters.seconds_in_memory,
            storage_commits=counters.storage_commits,
            buffered_bytes=self.buffers.used,
            bad_requests=counters.bad_requests,
            internal_errors=counters.internal_errors,
        )

    def object_statistics(self, namespace: str, name: str | ObjectId) -> ObjectStatistics:
        """State and counts of one object (``HIBERNATED`` with zeros if unknown)."""
        entry = self._objects.get((namespace, self._object_id(namespace, name).hex))
        if entry is None:
            return ObjectStatistics(
                state=ObjectState.HIBERNATED, websockets=0, queued_events=0, activations=0
            )
        core = entry.core
        return ObjectStatistics(
            state=core.state,
            websockets=len(core.registry),
            queued_events=core.queued,
            activations=core.generation,
        )

    # -- used by connections and supervisors -----------------------------------------------

    def _object_id(self, namespace: str, name: str | ObjectId) -> ObjectId:
        if namespace not in self.app.objects:
            raise KeyError(
                f"unknown namespace {namespace!r}; the app has {sorted(self.app.objects)}"
            )
        return name if isinstance(name, ObjectId) else ObjectId.from_name(namespace, name)

    def _route(self, path: str) -> ObjectEntry | Response | None:
        """The object a path names; a Response for a bad path; None for no namespace."""
        segments = path.split("/", 2)
        cls = self.app.objects.get(segments[1]) if len(segments) > 1 else None
        if cls is None:
            return None
        target = ServerConnection.parse_target(path)
        if isinstance(target, str):
            return Response(status=400, body=f"Bad Request: {target}\n")
        if self._closing:
            return Response(status=503, body="the server is shutting down\n")
        namespace, name = target
        return self._entry(namespace, ObjectId.from_name(namespace, name), cls)

    def _entry_for(self, namespace: str, object_id: ObjectId) -> ObjectEntry:
        cls = self.app.objects.get(namespace)
        if cls is None:
            raise LookupError(f"namespace {namespace!r} is no longer in the app")
        return self._entry(namespace, object_id, cls)

    def _encode_call(self, value: object) -> bytes:
        return encode_data(
            value,
            what="A stub call's argument or result",
            limit_name="max_message_bytes",
            limit_bytes=self.limits.max_message_bytes,
        )

    def _operations(self, request: Request) -> Response:
        return operations_response(request, self.statistics(), self._closing)

    def _check_origin(self, request: Request) -> Response | None:
        """Refuse cross-site WebSocket hijacking: a browser upgrade (it carries
        ``Origin``) from another site than the ``Host`` it connects to, unless allowed."""
        origin = request.header("origin")
        if origin is None:
            return None  # not a browser: Origin protects browser users only
        allowed = self.allowed_origins
        if allowed is not None and ("*" in allowed or origin in allowed):
            return None
        if allowed is None and is_same_origin(origin, request.header("host")):
            return None
        return Response(
            status=403,
            body=f"Forbidden: origin {origin!r} is not allowed to open a WebSocket here "
            "(allowed_origins / --allowed-origin)\n",
        )

    def _entry(self, namespace: str, object_id: ObjectId, cls: type[DurableObject]) -> ObjectEntry:
        key = (namespace, object_id.hex)
        entry = self._objects.get(key)
        if entry is None:
            core = ObjectCore(self.limits)
            try:
                kept = self.settings.take(*key)
            except sqlite3.Error:
                log.exception(
                    "could not read the kept settings of %s %s; they are lost",
                    namespace,
                    object_id,
                )
                kept = None
            if kept is not None:
                core.set_auto_response(kept[0])
                core.set_event_timeout_ms(kept[1])
            entry = ObjectEntry(namespace, object_id, cls, core)
            self._objects[key] = entry
        return entry

    def _fire_alarm(self, key: AlarmKey, when: float, retry_count: int) -> None:
        namespace, hex_id, name = key
        cls = self.app.objects.get(namespace)
        if cls is None:
            log.error("an alarm for unknown namespace %r was dropped", namespace)
            return
        entry = self._entry(namespace, ObjectId(hex_id, name), cls)
        self._deliver(entry, AlarmEvent(when, retry_count))

    def _deliver(self, entry: ObjectEntry, event: Event) -> None:
        """Queue ``event`` for the object, waking it if it is hibernated."""
        if self._closing:
            self._refuse_unrun_event(entry, event)
            return
        if entry.core.enqueue(event):
            self._nursery.start_soon(supervise, self, entry)
            return
        activation = entry.activation
        if activation is not None and activation.idle:
            activation.lot.unpark()

    def _forget_if_unused(self, entry: ObjectEntry) -> None:
        """Drop an object with nothing left to do from memory; settings that must
        outlive it (spec 1) go to the settings index."""
        core = entry.core
        key = (entry.namespace, entry.object_id.hex)
        if core.has_work or self._objects.get(key) is not entry:
            return
        del self._objects[key]
        if core.auto_response is not None or core.event_timeout_ms is not None:
            try:
                self.settings.keep(*key, (core.auto_response, core.event_timeout_ms))
            except sqlite3.Error:  # the temporary directory is full, say: not fatal
                log.exception(
                    "could not keep the auto-response and event timeout of %s %s; they "
                    "are lost (the object must set them again)",
                    entry.namespace,
                    entry.object_id,
                )

    def _fail_object(self, entry: ObjectEntry, dropped: list[Event]) -> None:
        """The constructor raised: close every socket with 1011, answer fetches 500 and
        stub calls with an error, retry a due alarm later.

        No handler can run (there is no instance), so the sockets are released at once.
        """
        for event in dropped:
            if isinstance(event, MessageEvent):
                self.buffers.give(event.size)
            elif isinstance(event, FetchEvent):
                event.reply(Response(status=500, body="Internal Server Error\n"))
            elif isinstance(event, CallEvent):
                failure = RuntimeError(f"the constructor of {entry.cls.__name__} raised")
                event.reply((False, failure))
            elif isinstance(event, AlarmEvent):
                delay = self.alarms.retry_delay(event.retry_count)
                if delay is not None:
                    retry_at = self.wall_clock() + delay
                    self.alarms.schedule(entry.alarm_key, retry_at, event.retry_count + 1)
                if event.on_done is not None:
                    event.on_done()
        entry.core.shut_down_sockets(1011, "internal error")

    def _refuse_unrun_event(self, entry: ObjectEntry, event: Event) -> None:
        """Answer an event that will not run because the host is shutting down, or (a
        live code update) its namespace is no longer in the app.

        A fetch gets 503, a stub call an error, an alarm's ``on_done`` runs (the alarm
        stays set in the object's storage). Socket events are dropped: their sockets are
        being closed without handlers.
        """
        if self._closing:
            server_why, why = "the server is shutting down", "the host is shutting down"
        else:
            server_why = why = f"namespace {entry.namespace!r} is no longer in the app"
        if isinstance(event, MessageEvent):
            self.buffers.give(event.size)
        elif isinstance(event, FetchEvent):
            event.reply(Response(status=503, body=f"{server_why}\n"))
        elif isinstance(event, CallEvent):
            failure = RuntimeError(
                f"{why}: {event.method}() of {entry.namespace} {entry.object_id} was not run"
            )
            event.reply((False, failure))
        elif isinstance(event, AlarmEvent) and event.on_done is not None:
            event.on_done()

    def _idle_from(self, activation: Activation) -> None:
        self._idle[activation] = trio.current_time()
        if len(self._idle) == 1:
            self._idle_arrived.set()

    def _busy_again(self, activation: Activation) -> None:
        self._idle.pop(activation, None)

    async def _reap_idle(self) -> None:
        """Hibernate objects idle for ``idle_timeout``: one task for the whole host, so a
        message costs the object no timer (a cancel scope per idle period was measurable
        on the echo path)."""
        idle = self._idle
        while True:
            if not idle:
                self._idle_arrived = trio.Event()
                await self._idle_arrived.wait()
                continue
            activation, since = next(iter(idle.items()))
            deadline = since + self.idle_timeout
            if trio.current_time() >= deadline:
                del idle[activation]
                activation.request_stop()
            else:
                await trio.sleep_until(deadline)

    def _encode(self, message: str | bytes) -> bytes:
        if message is self._last_message:
            return self._last_frame
        frame = encode_message(message)
        if len(frame) <= _FRAME_CACHE_MAX_BYTES:
            self._last_message = message
            self._last_frame = frame
        return frame

    def _spawn(self, async_fn: Callable[[], Any]) -> None:
        self._nursery.start_soon(async_fn)

    def _connection_ended(self, conn: ServerConnection) -> None:
        self._connections.discard(conn)
        if self._all_done is not None and not self._connections:
            self._all_done.set()

    async def _shutdown(self, grace: float) -> None:
        """Close every connection with :attr:`shutdown_close_code` and wait until each
        has ended, at most ``grace`` seconds after the first call, logging how many
        remain once a second.

        Called again (the signal helper starts the shutdown, leaving ``open_host`` ends
        it), it only waits for what remains of the first call's grace period.
        """
        if not self._closing:
            self._closing = True
            if self._shutdown_deadline is None:  # else _stop_waiting came first
                self._shutdown_deadline = trio.current_time() + grace
            for entry in list(self._objects.values()):
                if entry.activation is not None:
                    entry.activation.scope.cancel()
            code = self.shutdown_close_code
            reason = "service restart" if code == 1012 else "going away"
            for conn in list(self._connections):
                conn.begin_shutdown(code, reason)
        with trio.CancelScope() as self._shutdown_wait:
            while self._connections and trio.current_time() < self._deadline():
                self._all_done = trio.Event()
                with trio.move_on_at(min(self._deadline(), trio.current_time() + 1)):
                    await self._all_done.wait()
                if self._connections and trio.current_time() < self._deadline():
                    log.info("shutdown: %d connection(s) still closing", len(self._connections))
        if self._connections and not self._shutdown_reported:
            self._shutdown_reported = True
            log.warning(
                "shutdown: %d connection(s) did not close within %g s (close_timeout); "
                "dropping them",
                len(self._connections),
                grace,
            )

    def _deadline(self) -> float:
        assert self._shutdown_deadline is not None
        return self._shutdown_deadline

    def _stop_waiting(self) -> int:
        """Forced exit: the shutdown stops waiting for connections (now and if called
        again); they are dropped when the host exits. Returns how many there are."""
        self._shutdown_deadline = -math.inf
        self._shutdown_reported = True
        if self._shutdown_wait is not None:
            self._shutdown_wait.cancel()
        return len(self._connections)


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
        call_timeout: Seconds a stub's ``call`` or ``fetch`` waits for its answer before
            raising ``trio.TooSlowError`` (``math.inf``: no limit). The call is not
            withdrawn: it stays queued, runs in its turn, and its result is dropped.

    Raises:
        StorageError: ``data_dir`` is not a writable directory, or its alarm index
            (``_alarms.sqlite3``) cannot be read; raised on entry, before the block runs.
        ValueError: a timeout is not positive, or both ``data_dir`` and
            ``storage_backend`` were given.

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
    if storage_backend is not None and (data_dir is not None or max_open_databases is not None):
        raise ValueError("give data_dir and max_open_databases, or storage_backend, not both")
    backend = (
        storage_backend
        if storage_backend is not None
        else SqliteBackend(data_dir, max_open_databases=max_open_databases)
    )
    host: Host | None = None
    try:
        async with open_owned_nursery() as outer:
            nursery, scope = await outer.start(_run_host_nursery)
            # The host nursery ignores every cancellation but ``scope``'s: whatever way we
            # leave (a storage error while starting, KeyboardInterrupt during shutdown),
            # ``scope`` must be cancelled, or this block waits for that nursery forever.
            try:
                host = Host(
                    app,
                    nursery,
                    limits=limits or Limits(),
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
                )
                host.shutdown_close_code = shutdown_close_code
                nursery.start_soon(host.alarms.run)
                nursery.start_soon(host._reap_idle)
                try:
                    yield host
                finally:
                    with trio.CancelScope(shield=True):
                        await host._shutdown(close_timeout)
            finally:
                scope.cancel()
    finally:
        # Only now has every task of the host nursery finished, including commits in
        # worker threads (not abandoned on cancel), which record into the alarm index.
        if host is not None:
            host.alarm_index.close()
            host.settings.close()
        backend.close()


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
