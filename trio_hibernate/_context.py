"""The object context (``self.ctx``): the seed's ``state`` methods, in Python."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NoReturn, Protocol, TypeVar, final

from ._autoresponse import WebSocketRequestResponsePair
from ._broadcast import broadcast
from ._core.sockets import SocketRecord, SocketRegistry, normalize_tags
from ._errors import LimitExceededError, WebSocketStateError
from ._limits import MAX_EVENT_TIMEOUT_MS
from ._websocket import WebSocket, accept, handle_for, record_of, upgrade_ended

if TYPE_CHECKING:
    from ._core.gate import OutputGate
    from ._core.lifecycle import ObjectCore
    from ._ids import ObjectId
    from ._storage.api import Storage
    from ._stubs import Namespace

__all__ = ["Blocker", "ObjectContext", "handles_of"]

T = TypeVar("T")


class Blocker(Protocol):
    """What runs ``ctx.block_concurrency_while`` (the supervisor's critical sections)."""

    def __call__(self, async_fn: Callable[[], Awaitable[T]], /) -> Awaitable[T]: ...


def _check_pair(pair: WebSocketRequestResponsePair, limit: int) -> None:
    """Raise unless ``pair`` is a pair whose strings are within ``limit`` UTF-8 bytes
    (``Limits.max_auto_response_bytes``; the request is checked first, as workerd)."""
    if not isinstance(pair, WebSocketRequestResponsePair):
        raise TypeError(f"expected a WebSocketRequestResponsePair, got {pair!r}")
    for what, text in (("request", pair.request), ("response", pair.response)):
        size = len(text.encode("utf-8"))
        if size > limit:
            raise LimitExceededError(
                f"{what.capitalize()} cannot be larger than {limit} bytes. A {what} of "
                f"size {size} was provided (Limits.max_auto_response_bytes).",
                limit_name="max_auto_response_bytes",
                limit=limit,
                value=size,
            )


def _event_timeout_ms(timeout_ms: object) -> int | None:
    """The event timeout ``timeout_ms`` stands for (None: unset), checked as workerd does
    (see :meth:`ObjectContext.set_hibernatable_websocket_event_timeout`)."""
    value = timeout_ms
    if isinstance(value, bool) or not isinstance(value, int | float | None):
        raise TypeError(f"the event timeout is a number of ms, not {timeout_ms!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"the event timeout must be finite, got {value}")
        value = int(value)  # workerd truncates fractions of a millisecond
    if value is None or value == 0:
        return None
    assert isinstance(value, int)
    if value < 0:
        raise ValueError(f"the event timeout cannot be negative, got {value}")
    if value > MAX_EVENT_TIMEOUT_MS:
        raise ValueError(
            f"Event timeout should not exceed {MAX_EVENT_TIMEOUT_MS} ms (got {value})."
        )
    return value


def _listed_record(ws: WebSocket, registry: SocketRegistry) -> SocketRecord:
    """The record of ``ws`` if it is listed in ``registry``, else raise."""
    if not isinstance(ws, WebSocket):
        raise TypeError(f"expected a WebSocket, got {type(ws).__name__}")
    record = record_of(ws)
    if record is None or record.released or record not in registry:
        raise WebSocketStateError(
            "you must call 'accept_websocket()' before attempting to access the tags "
            "of a WebSocket (this one is not accepted by this object, or is closed)."
        )
    return record


@final
class ObjectContext:
    """What an object instance knows about itself and its sockets.

    A new context is made for every activation (every time the object wakes). Everything
    it reports about sockets, tags, attachments, the auto-response and the event timeout
    survives hibernation; the context object itself does not.
    """

    __slots__ = (
        "_abort",
        "_block",
        "_core",
        "_gate",
        "_handles",
        "_namespaces",
        "_spawn",
        "_storage",
        "_storage_factory",
        "_wall_clock",
        "id",
        "namespace",
    )

    def __init__(
        self,
        *,
        namespace: str,
        object_id: ObjectId,
        core: ObjectCore,
        spawn: Callable[[Callable[[], Awaitable[object]]], None],
        gate: OutputGate | None = None,
        storage: Callable[[], Storage] | None = None,
        namespaces: Callable[[str], Namespace] | None = None,
        wall_clock: Callable[[], float] = time.time,
        block: Blocker | None = None,
        abort: Callable[[str | None], NoReturn] | None = None,
    ) -> None:
        # Made by the runtime; never constructed by application code.
        self.namespace = namespace
        """The namespace (object class name in the app) of this object."""
        self.id = object_id
        """This object's :class:`ObjectId`."""
        self._core = core
        self._spawn = spawn
        self._gate = gate
        self._storage_factory = storage
        self._namespaces = namespaces
        self._wall_clock = wall_clock
        self._block = block
        self._abort = abort
        self._storage: Storage | None = None
        self._handles: dict[SocketRecord, WebSocket] = {}

    @property
    def storage(self) -> Storage:
        """This object's durable storage, SQL and alarm (see :class:`Storage`)."""
        if self._storage is None:
            if self._storage_factory is None:
                raise RuntimeError("this context has no storage (made outside a host)")
            self._storage = self._storage_factory()
        return self._storage

    def now(self) -> float:
        """The host's wall-clock time in epoch seconds.

        Use it (rather than ``time.time()``) for alarm times and timestamps: under
        :mod:`trio_hibernate.testing` it follows Trio's mock clock, so an hour of alarms
        runs in milliseconds.
        """
        return self._wall_clock()

    def get_namespace(self, name: str) -> Namespace:
        """A namespace of the app, to call other objects through stubs.

        Raises:
            KeyError: the app has no such namespace.
        """
        if self._namespaces is None:
            raise RuntimeError("this context has no host (made outside a host)")
        return self._namespaces(name)

    def _handle(self, record: SocketRecord) -> WebSocket:
        handle = self._handles.get(record)
        if handle is None:
            handle = handle_for(record, self._core.registry, self._core.limits, self._gate)
            self._handles[record] = handle
        return handle

    # -- sockets -------------------------------------------------------------------------

    def accept_websocket(
        self, ws: WebSocket, tags: Iterable[str] = (), *, protocol: str | None = None
    ) -> None:
        """Attach an upgrading WebSocket to this object, with optional ``tags``.

        From now on its messages, close and error go to this object's handlers, also
        after hibernation. Call it in ``fetch`` and return
        ``Response(status=101, websocket=ws)``. Tags are fixed for the socket's life.
        The request may have come through stubs: this object owns the socket. If it was
        answered already (a 504), the socket is let go at once: ``send`` does nothing.

        The socket's connection id (:attr:`WebSocket.id`) is the URL's ``_pk`` query
        parameter when the client gives one. ``protocol`` chooses one of the subprotocols
        the client offers (``request.websocket_protocols``): the 101 names it and
        :attr:`WebSocket.protocol` returns it.

        Raises:
            WebSocketStateError: ``ws`` was already accepted.
            ValueError: the client did not offer ``protocol``.
            TypeError: ``tags`` is a string or holds a non-string; ``protocol`` is not a str.
            LimitExceededError: too many tags, a tag too long, or the object already holds
                ``Limits.max_websockets_per_object`` sockets.
            ConnectionIdError: the ``_pk`` is malformed (status 400) or another socket of
                this object has it (409); raised out of ``fetch``, it refuses the upgrade
                with that status. Nothing is changed when this method raises.
        """
        if not isinstance(ws, WebSocket):
            raise TypeError(f"expected a WebSocket, got {type(ws).__name__}")
        if record_of(ws) is not None:  # before the tags are checked, as workerd
            raise WebSocketStateError(
                "Cannot call accept_websocket() if the WebSocket was already accepted."
            )
        clean = normalize_tags(tags, self._core.limits)
        record = accept(
            ws, clean, self._core.registry, self._gate, (self.namespace, self.id), protocol
        )
        self._handles[record] = ws
        if upgrade_ended(ws):  # answered already: nobody will complete the upgrade
            self._core.release(record)

    def get_websockets(self, tag: str | None = None) -> list[WebSocket]:
        """Accepted sockets, the most recently accepted first; with ``tag``, those
        carrying exactly it, oldest first (the orders workerd uses).

        A socket is listed until its ``websocket_close``/``websocket_error`` handler has
        run, so one this object closed stays listed (``CLOSING``) until the peer answers.
        """
        if tag is not None and not isinstance(tag, str):
            raise TypeError(f"a tag is a str, not {type(tag).__name__}")
        handle = self._handle
        return [handle(record) for record in self._core.registry.sockets(tag)]

    def get_websocket(self, connection_id: str) -> WebSocket | None:
        """The listed socket whose :attr:`WebSocket.id` is ``connection_id``, or None.

        Listed as in :meth:`get_websockets`: until its close or error handler has run.
        """
        if not isinstance(connection_id, str):
            raise TypeError(f"a connection id is a str, not {type(connection_id).__name__}")
        record = self._core.registry.by_id(connection_id)
        return None if record is None else self._handle(record)

    def broadcast(
        self,
        message: str | bytes | bytearray | memoryview,
        *,
        tag: str | None = None,
        exclude: WebSocket | str | Iterable[WebSocket | str] = (),
    ) -> int:
        """Send ``message`` to every open socket (with ``tag``, if given); returns how many.

        Skips, where a loop of :meth:`WebSocket.send` would raise part way, the sockets
        this object closed and those whose peer ended them; skips ``exclude`` too
        (WebSockets, connection ids, or one of either). Encodes the frame once; a send
        that fails in one connection is logged, the others still get it. Not a
        checkpoint. Held by the output gate like ``send`` (then counts the sockets it
        waits for).

        Raises:
            TypeError: ``message`` is not ``str`` or bytes-like; a bad ``tag`` or ``exclude``.
            UnicodeEncodeError: ``message`` holds a lone surrogate. Nothing is sent.
        """
        return broadcast(
            self._core.registry, self._gate, message, tag, exclude, (self.namespace, self.id)
        )

    def get_tags(self, ws: WebSocket) -> list[str]:
        """The tags ``ws`` was accepted with (also inside close and error handlers).

        Raises:
            WebSocketStateError: ``ws`` is not a socket accepted by this object.
        """
        candidate: object = ws
        record = record_of(candidate) if isinstance(candidate, WebSocket) else None
        if record is not None and record.released:
            return list(record.tags)  # inside its close/error handler
        return list(_listed_record(ws, self._core.registry).tags)

    # -- auto-response -------------------------------------------------------------------

    def set_websocket_auto_response(self, pair: WebSocketRequestResponsePair | None = None) -> None:
        """Answer ``pair.request`` with ``pair.response`` on every socket, without waking.

        Replaces any earlier pair; with no argument, removes it (timestamps are kept).

        Raises:
            LimitExceededError: the request or the response is over
                ``Limits.max_auto_response_bytes`` UTF-8 bytes (request checked first).
        """
        if pair is not None:
            _check_pair(pair, self._core.limits.max_auto_response_bytes)
        self._core.set_auto_response(pair)

    def get_websocket_auto_response(self) -> WebSocketRequestResponsePair | None:
        """The current auto-response pair, or None."""
        return self._core.auto_response

    def get_websocket_auto_response_timestamp(self, ws: WebSocket) -> datetime | None:
        """When ``ws`` last received the auto-response request (UTC), or None."""
        if not isinstance(ws, WebSocket):
            raise TypeError(f"expected a WebSocket, got {type(ws).__name__}")
        record = record_of(ws)
        if record is None or record.auto_response_at is None:
            return None
        return datetime.fromtimestamp(record.auto_response_at, UTC)

    # -- event timeout -------------------------------------------------------------------

    def set_hibernatable_websocket_event_timeout(self, timeout_ms: int | None = None) -> None:
        """Cancel socket event handlers that run longer than ``timeout_ms``.

        ``None`` or ``0`` removes the limit. A handler that overruns is cancelled, the
        error is logged and the instance is dropped (the next event builds a new one);
        sockets stay connected. Survives hibernation.

        Raises:
            TypeError: not a number, or not finite. Fractions of a millisecond are
                truncated, as workerd does.
            ValueError: negative, or over 604,800,000 ms (a week).
        """
        self._core.set_event_timeout_ms(_event_timeout_ms(timeout_ms))

    def get_hibernatable_websocket_event_timeout(self) -> int | None:
        """The event timeout in ms, or None when unset."""
        return self._core.event_timeout_ms

    # -- tasks ---------------------------------------------------------------------------

    def start_soon(self, async_fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``async_fn()`` in this object's nursery.

        While it runs the object is not idle and will not hibernate on its own. It is
        cancelled if the object is evicted by force (test hook, event timeout, shutdown).
        An exception it raises is logged with the object id and does not affect sockets.
        """
        self._spawn(async_fn)

    def block_concurrency_while(self, async_fn: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """Run ``await async_fn()`` while no other event reaches this object.

        Events arriving meanwhile (messages, closes, fetches, calls, alarms) queue and
        run afterwards in arrival order. Its storage writes commit as a turn's do. The
        object is not evicted while it runs.

        - In the constructor, which cannot await, it is scheduled: ``async_fn`` runs
          after the constructor returns and before the first event (typically, to load
          state from storage). Do not await the result there.
        - In a handler it runs within the turn: ``await`` it for what ``async_fn``
          returns.
        - In a ``ctx.start_soon`` task it waits for the current turn and holds the
          object as a turn does (its writes are committed when it returns).

        Awaiting it is a checkpoint. Cancelled (the object is evicted by force, the host
        shuts down), ``async_fn`` is cancelled and nothing is reset.

        ``async_fn`` gets 30 seconds (Cloudflare's limit). If it raises, or overruns and
        is cancelled (:class:`TimeoutError`), the exception propagates and **the object
        is reset** as by :meth:`abort` (catch inside ``async_fn`` to avoid that); in the
        constructor that is a failed constructor. See ``docs/differences.md``.

        Raises:
            TypeError: ``async_fn`` is not callable (pass ``self.load``, not
                ``self.load()``).
            TimeoutError: ``async_fn`` ran longer than 30 s.
        """
        if self._block is None:
            raise RuntimeError("this context has no host (made outside a host)")
        return self._block(async_fn)

    def abort(self, reason: str | None = None) -> NoReturn:
        """Reset this object now (Cloudflare's ``ctx.abort``).

        ``reason`` is logged as an error. The instance is dropped: the code that called
        ``abort`` is unwound (by an internal :class:`BaseException`: let it through),
        the running event fails (a fetch gets 500, a stub call an error, an alarm is
        retried), the object's ``ctx.start_soon`` tasks are cancelled, the writes not
        yet committed are rolled back and held messages dropped. Queued events are
        answered with an error and the object's WebSockets are closed with 1011, as
        when a constructor raises. The next event constructs a new instance.

        Raises:
            TypeError: ``reason`` is not a str.
        """
        if self._abort is None:
            raise RuntimeError("this context has no host (made outside a host)")
        self._abort(reason)


def handles_of(ctx: ObjectContext) -> Callable[[SocketRecord], WebSocket]:
    """For the runtime: the function giving the handle of a socket record in ``ctx``.

    A record gets one handle per context (per activation), made on first use; handlers
    see that same handle, so ``ws is ws`` holds across events of one activation.
    """
    return ctx._handle
