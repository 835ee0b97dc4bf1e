"""The runtime of one host: the object table, delivery, the idle reaper, shutdown.

Internal, not exported. :class:`~trio_hibernate.Host` is its public facade. Connections
(``_net``), supervisors and stubs each depend only on a small Protocol they define
themselves (``ConnectionOwner``, ``SupervisorServices``, ``Deliverer``); the runtime
meets them structurally, with public methods, so no module reaches into another's
private names.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from ._connections import ConnectionSet
from ._core.budget import MemoryBudget
from ._core.codec import encode_data
from ._core.deflate import Compression
from ._core.directory import ObjectDirectory
from ._core.events import AlarmEvent, CallEvent, Event, FetchEvent, MessageEvent
from ._core.frames import encode_message
from ._core.routing import parse_target
from ._directory import LoggedSettings, ObjectEntry
from ._http import Request, Response
from ._ids import ObjectId
from ._limits import Limits
from ._net.channel import ByteChannel, SocketChannel, StreamChannel
from ._net.connection import ServerConnection
from ._net.operations import operations_response
from ._net.owner import Connection
from ._reaper import IdleReaper
from ._statistics import Counters, HostStatistics
from ._storage.alarms import AlarmIndex, AlarmKey, AlarmScheduler
from ._storage.backend import StorageBackend
from ._storage.settings import SettingsIndex
from ._stubs import Namespace
from ._supervisor import Supervisor

if TYPE_CHECKING:
    from ._app import App
    from ._compression import WebSocketCompression
    from ._object import DurableObject

__all__ = ["FrameCache", "ObjectEntry", "Placement", "Runtime", "fence_runtime"]

log = logging.getLogger("trio_hibernate.host")

#: Messages up to this size keep their encoded frame for the next send of the same object
#: (a broadcast loop sends one ``str`` to many sockets: encode once).
_FRAME_CACHE_MAX_BYTES: Final = 65536


class FrameCache:
    """Encodes data messages into frames, keeping the last one for a broadcast loop."""

    __slots__ = ("_last_frame", "_last_message")

    def __init__(self) -> None:
        self._last_message: str | bytes | None = None
        self._last_frame = b""

    def encode(self, message: str | bytes) -> bytes:
        """The WebSocket frame of ``message`` (the last one is cached for broadcasts)."""
        if message is self._last_message:
            return self._last_frame
        frame = encode_message(message)
        if len(frame) <= _FRAME_CACHE_MAX_BYTES:
            self._last_message = message
            self._last_frame = frame
        return frame


class Placement(Protocol):
    """Where events for objects this host has not claimed go first (cluster mode)."""

    def place(self, entry: ObjectEntry, event: Event, *, relayed: bool = False) -> None:
        """Claim the object (then deliver ``event``), or send ``event`` to its owner
        (``relayed``: a peer relayed it here; answer it 503 rather than relay again)."""

    def forgotten(self, entry: ObjectEntry) -> None:
        """The runtime dropped ``entry``: give the object up."""

    async def join(self, address: str) -> None:
        """Join the cluster, advertising ``address`` (once; later calls do nothing)."""

    @property
    def incarnation(self) -> int | None:
        """This process's incarnation in the cluster once joined (None before)."""
        ...

    async def wait_fenced(self) -> str:
        """Wait until the host has fenced itself (lost its lease); returns why."""
        ...


class Runtime:
    """Everything a host does between its public API and its parts (see the module)."""

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
        call_timeout: float,
        shutdown_close_code: int,
        compression: WebSocketCompression | None = None,
    ) -> None:
        self.app = app
        self.env = app.env
        self.limits = limits
        self.hibernate_after_every_event = hibernate_after_every_event
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.partial_message_timeout = partial_message_timeout
        self.close_timeout = close_timeout
        self.wall_clock = wall_clock
        self.storage_backend = storage_backend
        self.allowed_origins = allowed_origins
        self.call_timeout = call_timeout
        self.shutdown_close_code = shutdown_close_code
        self.alarm_index = AlarmIndex(storage_backend.alarm_index_path)
        self.alarms = AlarmScheduler(wall_clock=wall_clock, fire=self.fire_alarm)
        for key, when in self.alarm_index.load():
            self.alarms.schedule(key, when)
        self.settings = SettingsIndex()
        """Auto-response pairs and event timeouts of objects the runtime forgot."""
        self.objects: ObjectDirectory[ObjectEntry, type[DurableObject]] = ObjectDirectory(
            partial(ObjectEntry, self), limits, LoggedSettings(self.settings)
        )
        """The objects the runtime knows."""
        self.counters = Counters()
        """What happened so far (read through :meth:`statistics`)."""
        self.buffers = MemoryBudget(limits.max_buffered_bytes)
        """Bytes held for clients, host-wide (``Limits.max_buffered_bytes``)."""
        self.compression = Compression(compression, limits, self.buffers) if compression else None
        self.closing = False
        """The host is shutting down: no instance is constructed any more."""
        self.reaper = IdleReaper(idle_timeout)
        """Hibernates objects idle for ``idle_timeout`` (its task runs in the host nursery)."""
        self._nursery = nursery
        self.connections = ConnectionSet()
        """The open client connections."""
        self.frame_encoder = FrameCache().encode  # shared by every connection (ConnectionOwner)
        self.extra_operations: dict[str, Callable[[Request], Response]] = {}  # /_dashboard
        self.relay_key: str | None = None  # peers relay with it (cluster); None: refused
        self.cluster: Placement | None = None
        """Cluster mode's placement and leases (``_cluster/node.py``), else None."""

    # -- for the facade ------------------------------------------------------------------

    def serve_socket(self, sock: socket.socket) -> None:
        """Serve an accepted client socket (see :meth:`Host.serve_socket`)."""
        if self.closing:
            sock.close()
            return
        sock.setblocking(False)
        self._serve(SocketChannel(sock))

    def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve a client connected through ``stream``, as :meth:`serve_socket` does a
        socket (tests drive connections over ``trio.testing`` memory streams). Takes
        ownership of ``stream``: it is closed when the connection ends. Not a checkpoint.
        """
        if self.closing:
            self._nursery.start_soon(trio.aclose_forcefully, stream)
            return
        self._serve(StreamChannel(stream))

    def _serve(self, channel: ByteChannel) -> None:
        conn = ServerConnection(self, channel)
        self.connections.add(conn)
        self._nursery.start_soon(conn.run)

    @property
    def connection_count(self) -> int:
        """Open client connections (``_net.owner.ListenerOwner``)."""
        return len(self.connections)

    def object_id(self, namespace: str, name: str | ObjectId) -> ObjectId:
        """The id of ``name`` in ``namespace``. Raises KeyError for an unknown namespace."""
        if namespace not in self.app.objects:
            raise KeyError(
                f"unknown namespace {namespace!r}; the app has {sorted(self.app.objects)}"
            )
        return name if isinstance(name, ObjectId) else ObjectId.from_name(namespace, name)

    def get_namespace(self, name: str) -> Namespace:
        """The namespace ``name`` (see :meth:`Host.get_namespace`)."""
        if name not in self.app.objects:
            raise KeyError(f"unknown namespace {name!r}; the app has {sorted(self.app.objects)}")
        return Namespace(self, name)

    async def replace_app(self, app: App) -> None:
        """Switch to new code without disconnecting anyone (see :meth:`Host.replace_app`)."""
        self.app = app
        self.env = app.env
        waits = []
        for entry in self.objects:
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
        """Counts of objects, sockets, wakes and hibernations."""
        live, hibernated, websockets = self.objects.counts()
        return self.counters.snapshot(
            live_objects=live,
            hibernated_objects=hibernated,
            websockets=websockets,
            connections=len(self.connections),
            buffered_bytes=self.buffers.used,
            alarms=self.alarms,
        )

    # -- for connections (_net.owner.ConnectionOwner) -------------------------------------

    def route(self, path: str) -> ObjectEntry | Response | None:
        """The object a path names; a Response for a bad path; None for no namespace."""
        segments = path.split("/", 2)
        cls = self.app.objects.get(segments[1]) if len(segments) > 1 else None
        if cls is None:
            return None
        target = parse_target(path)
        if isinstance(target, str):
            return Response(status=400, body=f"Bad Request: {target}\n")
        if self.closing:
            return Response(status=503, body="the server is shutting down\n")
        namespace, name = target
        return self.objects.entry(namespace, ObjectId.from_name(namespace, name), cls)

    def operations(self, request: Request) -> Response:
        """The answer to a request for the server's own paths (``/_health``...)."""
        if (extra := self.extra_operations.get(request.path)) is not None:
            return extra(request)  # a path the server added (``/_dashboard``)
        return operations_response(request, self.statistics(), self.closing)

    def deliver_relayed(self, namespace: str, object_id: ObjectId, event: Event) -> None:
        """Queue an event a peer host relayed here (``_net/relayed.py``): no app hook;
        in cluster mode it is claimed here if need be, never relayed again."""
        entry = self.entry_for(namespace, object_id)
        if entry.placed is None and self.cluster is not None and not self.closing:
            self.cluster.place(entry, event, relayed=True)
        else:
            self.deliver(entry, event)

    def spawn(self, async_fn: Callable[[], Any]) -> None:
        """Run ``async_fn`` in the host nursery (a connection's helper task)."""
        self._nursery.start_soon(async_fn)

    def connection_ended(self, conn: Connection) -> None:
        """``conn`` has ended (it closes its byte channel right after)."""
        self.connections.ended(conn)

    # -- for stubs (_stubs.Deliverer) ------------------------------------------------------

    def entry_for(self, namespace: str, object_id: ObjectId) -> ObjectEntry:
        """The entry of an object, made if the runtime does not know it yet.

        Raises:
            LookupError: the namespace is no longer in the app.
        """
        cls = self.app.objects.get(namespace)
        if cls is None:
            raise LookupError(f"namespace {namespace!r} is no longer in the app")
        return self.objects.entry(namespace, object_id, cls)

    def encode_call(self, value: object) -> bytes:
        """A stub call's argument or result as data (checked against the size limit)."""
        limit = self.limits.max_message_bytes
        what = "A stub call's argument or result"
        return encode_data(value, what=what, limit_name="max_message_bytes", limit_bytes=limit)

    # -- delivery --------------------------------------------------------------------------

    def deliver(self, entry: ObjectEntry, event: Event) -> None:
        """Queue ``event`` for the object, waking it if it is hibernated."""
        if self.closing:
            self.refuse_unrun_event(entry, event)
            return
        if self.cluster is not None and entry.placed is None:
            self.cluster.place(entry, event)  # claimed first, or relayed
            return
        if entry.core.enqueue(event):
            self._nursery.start_soon(Supervisor(self, entry).run)
            return
        activation = entry.activation
        if activation is not None and activation.idle:
            activation.lot.unpark()

    def fire_alarm(self, key: AlarmKey, when: float, retry_count: int) -> None:
        """The alarm scheduler's callback: deliver the alarm to its object."""
        namespace, hex_id, name = key
        cls = self.app.objects.get(namespace)
        if cls is None:
            log.error("an alarm for unknown namespace %r was dropped", namespace)
            return
        entry = self.objects.entry(namespace, ObjectId(hex_id, name), cls)
        self.deliver(entry, AlarmEvent(when, retry_count))

    # -- for supervisors (_supervisor.SupervisorServices) -----------------------------------

    def forget_if_unused(self, entry: ObjectEntry) -> None:
        """Drop an object with nothing left to do from memory (see ``ObjectDirectory``)."""
        if self.objects.forget_if_unused(entry) and self.cluster is not None:
            self.cluster.forgotten(entry)  # gives the object up

    def fail_object(self, entry: ObjectEntry, dropped: list[Event], why: str) -> None:
        """The constructor raised, or the object was reset (``ctx.abort()``, a failed
        ``block_concurrency_while``): close every socket with 1011, answer fetches 500
        and stub calls with an error saying ``why``, retry a due alarm later.

        No handler can run (there is no instance), so the sockets are released at once.
        """
        for event in dropped:
            if isinstance(event, MessageEvent):
                self.buffers.give(event.size)
            elif isinstance(event, FetchEvent):
                event.reply.send(Response(status=500, body="Internal Server Error\n"))
            elif isinstance(event, CallEvent):
                event.reply.fail(RuntimeError(why))
            elif isinstance(event, AlarmEvent):
                self.alarms.retry(entry.alarm_key, event.retry_count)
                if event.on_done is not None:
                    event.on_done()
        entry.core.shut_down_sockets(1011, "internal error")

    def refuse_unrun_event(self, entry: ObjectEntry, event: Event) -> None:
        """Answer an event that will not run because the host is shutting down, or (a
        live code update) its namespace is no longer in the app.

        A fetch gets 503, a stub call an error, an alarm's ``on_done`` runs (the alarm
        stays set in the object's storage). Socket events are dropped: their sockets are
        being closed without handlers.
        """
        if self.closing:
            server_why, why = "the server is shutting down", "the host is shutting down"
        else:
            server_why = why = f"namespace {entry.namespace!r} is no longer in the app"
        if isinstance(event, MessageEvent):
            self.buffers.give(event.size)
        elif isinstance(event, FetchEvent):
            event.reply.send(Response(status=503, body=f"{server_why}\n"))
        elif isinstance(event, CallEvent):
            event.reply.fail(
                RuntimeError(
                    f"{why}: {event.method}() of {entry.namespace} {entry.object_id} was not run"
                )
            )
        elif isinstance(event, AlarmEvent) and event.on_done is not None:
            event.on_done()

    # -- shutdown ----------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """Close every connection with :attr:`shutdown_close_code` and wait until each
        has ended, at most ``grace`` seconds after the first call.

        Called again (the signal helper starts the shutdown, leaving ``open_host`` ends
        it), it only waits for what remains of the first call's grace period.
        """
        if not self.closing:
            self.closing = True
            for entry in self.objects:
                if entry.activation is not None:
                    entry.activation.cancel()
            code = self.shutdown_close_code
            reason = "service restart" if code == 1012 else "going away"
            self.connections.begin_shutdown(code, reason, grace)
        await self.connections.wait_closed(grace)

    def close(self) -> None:
        """Close the runtime's own files (once every task has finished)."""
        self.alarm_index.close()
        self.settings.close()


def fence_runtime(runtime: Runtime, why: str) -> None:
    """Cluster mode: the host lost its lease (``why``). Serve nothing more: close every
    socket with 1012 (clients reconnect to another host), run no handler."""
    log.error("serving nothing more: %s", why)
    if not runtime.closing:
        runtime.closing = True
        for entry in runtime.objects:
            if entry.activation is not None:
                entry.activation.cancel()
        runtime.connections.begin_shutdown(1012, "host fenced", runtime.close_timeout)
