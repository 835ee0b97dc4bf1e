"""The reconnecting client: one task that connects, exchanges messages, and comes back.

Resource handling: :func:`open_client` owns a nursery; the connect loop and each
connection's reader and writer run in it and end with the ``async with`` block. On the
way out the open connection (if any) is closed with 1000, within ``disconnect_timeout``.
"""

from __future__ import annotations

import enum
import random as random_module
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from .._core.sockets import connection_id_from_url
from .._errors import ClientClosedError, LimitExceededError
from .._groups import open_owned_nursery
from ._policy import Backoff, retries_close, retries_status
from ._wire import decode_ack, encode_op

__all__ = ["ClientEvent", "ClientState", "ReconnectingWebSocket", "open_client"]

#: Messages :func:`open_client` holds for sending (and, when reliable, until acknowledged).
DEFAULT_MAX_BUFFERED_MESSAGES: Final = 1000
#: The waits of :func:`open_client` unless told otherwise: 0.5 s doubling up to 30 s, forever.
DEFAULT_BACKOFF: Final = Backoff()


class ClientState(enum.Enum):
    """Where a :class:`ReconnectingWebSocket` is.

    ``CONNECTING`` (the first attempt) -> ``CONNECTED`` <-> ``RECONNECTING`` (waiting,
    then trying again) -> ``CLOSED`` (for good: given up, refused, or the block ended).
    """

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@attrs.frozen
class ClientEvent:
    """A change of a client's :class:`ClientState`, as ``on_event`` receives it.

    Attributes:
        state: The state entered.
        attempt: ``RECONNECTING``: the number of the attempt it waits for (1, 2, ... in a
            row since the last connection); else 0.
        delay_seconds: ``RECONNECTING``: how long it waits before that attempt.
        close_code: The Close code that ended the last connection, if that is the cause.
        status: The HTTP status of the refused upgrade, if that is the cause.
        error: What went wrong otherwise (a failed connect), or why it closed for good.
    """

    state: ClientState
    attempt: int = 0
    delay_seconds: float = 0.0
    close_code: int | None = None
    status: int | None = None
    error: str | None = None


@attrs.frozen
class _Ended:
    """How one attempt ended: what the next step depends on."""

    connected: bool
    retry: bool
    close_code: int | None = None
    status: int | None = None
    error: str | None = None
    #: Seconds the connection was up (0 if it never was).
    uptime: float = 0.0


@attrs.frozen
class _Outgoing:
    wire: str | bytes
    op_id: str | None = None


def _with_client_id(url: str, client_id: str | None) -> tuple[str, str]:
    given = connection_id_from_url(url)  # ConnectionIdError for a malformed one
    if client_id is None:
        client_id = given or secrets.token_urlsafe(16)
    elif given is not None and given != client_id:
        raise ValueError(f"the URL's _pk is {given!r} but client_id is {client_id!r}")
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "_pk"]
    query.append(("_pk", client_id))
    probe = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    if connection_id_from_url(probe) != client_id:  # validates a client_id passed in
        raise AssertionError(f"client id {client_id!r} did not survive the URL")
    return probe, client_id


@attrs.define(eq=False)
class ReconnectingWebSocket:
    """A WebSocket client that stays connected: what :func:`open_client` yields.

    Messages sent while disconnected wait in a buffer (``max_buffered_messages``) and go
    out, in order, once connected again. With ``reliable=True`` every text message is an
    op: it stays buffered until the server acknowledges it (see
    :func:`~trio_hibernate.client.deliver_once`) and is sent again after a reconnect.
    """

    url: str
    """The URL every connection opens: the one given, with ``_pk`` set to the client id."""
    client_id: str
    """The id sent as ``_pk`` each time (given, taken from the URL, or random): the
    server's ``ws.id`` for this client, the same across reconnects."""
    _backoff: Backoff
    _rng: random_module.Random
    _reliable: bool
    _max_buffered: int
    _connect_timeout: float
    _disconnect_timeout: float
    _on_event: Callable[[ClientEvent], None] | None
    _state: ClientState = ClientState.CONNECTING
    _closed_error: ClientClosedError | None = None
    _outbox: deque[_Outgoing] = attrs.Factory(deque)
    _unacked: OrderedDict[str, _Outgoing] = attrs.Factory(OrderedDict)
    #: A plain message taken off the outbox whose write has not finished yet.
    _writing: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)
    _stopping: bool = False
    _attempt_scope: trio.CancelScope | None = None
    _exchange_scope: trio.CancelScope | None = None
    _received_send: trio.MemorySendChannel[str | bytes] = attrs.field(init=False)
    _received: trio.MemoryReceiveChannel[str | bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._received_send, self._received = trio.open_memory_channel[str | bytes](
            self._max_buffered
        )

    # -- the application's side ----------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """The current :class:`ClientState`."""
        return self._state

    @property
    def buffered(self) -> int:
        """Messages not yet sent (a write in progress included), plus (reliable) those
        sent and not yet acknowledged."""
        return len(self._outbox) + self._writing + len(self._unacked)

    async def send(self, message: str | bytes) -> None:
        """Queue ``message``; it is sent as soon as the client is connected, in order.

        A checkpoint; never waits for the network. Without ``reliable``, a message in
        flight when the connection drops may be lost or (rarely) arrive twice.

        Raises:
            ClientClosedError: the client is closed for good (nothing is queued).
            LimitExceededError: ``max_buffered_messages`` messages are waiting already
                (unsent, or unacknowledged when reliable); this one is not queued.
            TypeError: ``reliable`` and ``message`` is bytes (ops are text).
        """
        await trio.lowlevel.checkpoint()
        self._raise_if_closed()
        if self.buffered >= self._max_buffered:
            raise LimitExceededError(
                f"{self.buffered} messages are waiting to be sent or acknowledged; "
                f"max_buffered_messages is {self._max_buffered}",
                limit_name="max_buffered_messages",
                limit=self._max_buffered,
                value=self.buffered + 1,
            )
        if not self._reliable:
            self._outbox.append(_Outgoing(message))
        elif isinstance(message, str):
            op_id = secrets.token_urlsafe(12)
            self._outbox.append(_Outgoing(encode_op(op_id, message), op_id))
        else:
            raise TypeError(f"a reliable client sends text ops, not {type(message).__name__}")
        self._notify()

    async def receive(self) -> str | bytes:
        """The next message from the server (acknowledgements are not messages).

        Messages that arrived before the client closed for good can still be received.

        Raises:
            ClientClosedError: the client is closed for good and every message received
                before has been taken; the error says why it closed.
        """
        try:
            return await self._received.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            assert self._closed_error is not None
            raise self._closed_error from None

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                yield await self.receive()
            except ClientClosedError:
                return

    async def wait_connected(self) -> None:
        """Return once the client is connected (at once if it is).

        Raises:
            ClientClosedError: it closed for good instead.
        """
        await self._wait_until(lambda: self._state is ClientState.CONNECTED)

    async def flush(self) -> None:
        """Return once every queued message was sent and, when reliable, acknowledged.

        Raises:
            ClientClosedError: the client closed for good first.
        """
        await self._wait_until(lambda: self.buffered == 0)

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        await trio.lowlevel.checkpoint()
        while not done():
            self._raise_if_closed()
            await self._changed.wait()

    def _raise_if_closed(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _enter(self, event: ClientEvent) -> None:
        self._state = event.state
        self._notify()
        if self._on_event is not None:
            self._on_event(event)

    # -- the connect loop -----------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, exchange messages, reconnect; until closed for good or stopped."""
        task_status.started()
        retries = 0
        ended = _Ended(connected=False, retry=True)
        try:
            while not self._is_stopping():
                ended = await self._attempt()
                if self._is_stopping():
                    break
                if ended.uptime >= self._backoff.min_uptime_seconds:
                    retries = 0  # a connection that lasted: the failures are over
                if not ended.retry:
                    break
                retries += 1
                if self._backoff.gives_up(retries):
                    ended = attrs.evolve(
                        ended,
                        error=f"gave up after {retries - 1} failed reconnect attempts in a row "
                        f"(max_retries is {self._backoff.max_retries}); the last: "
                        + _describe(ended),
                    )
                    break
                delay = self._backoff.delay_seconds(retries, self._rng)
                self._enter(
                    ClientEvent(
                        ClientState.RECONNECTING,
                        retries,
                        delay,
                        ended.close_code,
                        ended.status,
                        ended.error,
                    )
                )
                with trio.CancelScope() as self._attempt_scope:
                    await trio.sleep(delay)
        finally:
            self._close_for_good(ended)

    def _is_stopping(self) -> bool:
        """Whether the ``async with`` block of :func:`open_client` has ended."""
        return self._stopping

    def _stop(self) -> None:
        """End the loop: close an open connection with 1000, cancel anything else."""
        self._stopping = True
        if self._exchange_scope is not None:
            self._exchange_scope.cancel()  # the connection then closes gracefully
        elif self._attempt_scope is not None:
            self._attempt_scope.cancel()

    def _close_for_good(self, ended: _Ended) -> None:
        if self._stopping:
            why, ended = "the client was closed (its async with block ended)", _Ended(False, False)
        elif ended.retry:  # out of retries: the error says so
            why = ended.error or _describe(ended)
        else:
            why = f"the server said not to retry: {_describe(ended)}"
        self._closed_error = ClientClosedError(
            f"{self.url}: closed for good: {why}", code=ended.close_code, status=ended.status
        )
        self._received_send.close()
        self._enter(ClientEvent(ClientState.CLOSED, 0, 0.0, ended.close_code, ended.status, why))

    async def _attempt(self) -> _Ended:
        """One connection, from the connect to its end."""
        ended: _Ended | None = None
        with trio.CancelScope() as self._attempt_scope:
            try:
                async with open_websocket_url(
                    self.url,
                    connect_timeout=self._connect_timeout,
                    disconnect_timeout=self._disconnect_timeout,
                ) as ws:
                    with trio.CancelScope() as self._exchange_scope:
                        if self._is_stopping():  # _stop() came during the connect
                            self._exchange_scope.cancel()
                        ended = await self._exchange(ws)
                    self._exchange_scope = None
            except ConnectionRejected as exc:
                status = exc.status_code
                ended = _Ended(False, retries_status(status), status=status)
            except (HandshakeError, OSError) as exc:  # refused, reset, timed out
                ended = ended or _Ended(False, True, error=_error_text(exc))
            finally:
                self._exchange_scope = None
                self._requeue_unacked()
        return ended or _Ended(True, False)  # None: stopped

    async def _exchange(self, ws: WebSocketConnection) -> _Ended:
        self._enter(ClientEvent(ClientState.CONNECTED))
        connected_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, ws)
            reason = await self._read(ws)
            nursery.cancel_scope.cancel()
        code = reason.code if reason is not None else 1006
        uptime = trio.current_time() - connected_at
        return _Ended(True, retries_close(code), close_code=code, uptime=uptime)

    async def _read(self, ws: WebSocketConnection) -> CloseReason | None:
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason
            op_id = decode_ack(message) if self._reliable else None
            if op_id is not None:
                if self._unacked.pop(op_id, None) is not None:
                    self._notify()
                continue
            await self._received_send.send(message)

    async def _write(self, ws: WebSocketConnection) -> None:
        while True:
            while not self._outbox:
                await self._changed.wait()
            item = self._outbox.popleft()
            if item.op_id is not None:
                self._unacked[item.op_id] = item  # before sending: an ack may come first
            else:
                self._writing = 1  # flush() waits for the write, not just the pop
            sent = False
            try:
                await ws.send_message(item.wire)
                sent = True
            except ConnectionClosed:
                return  # the reader learns why
            finally:
                self._writing = 0
                if not sent and item.op_id is None:
                    self._outbox.appendleft(item)
            self._notify()

    def _requeue_unacked(self) -> None:
        """Ops sent and not acknowledged go first on the next connection, in order."""
        self._outbox.extendleft(reversed(self._unacked.values()))
        self._unacked.clear()


def _error_text(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    detail = str(exc) or type(exc).__name__
    if cause is not None and not str(exc):
        detail = f"{type(exc).__name__}: {cause}"
    return f"connect failed: {detail}"


def _describe(ended: _Ended) -> str:
    if ended.status is not None:
        return f"the upgrade was refused with HTTP {ended.status}"
    if ended.close_code is not None:
        return f"the connection closed with code {ended.close_code}"
    return ended.error or "no reason"


@asynccontextmanager
async def open_client(
    url: str,
    *,
    client_id: str | None = None,
    reliable: bool = False,
    backoff: Backoff = DEFAULT_BACKOFF,
    max_buffered_messages: int = DEFAULT_MAX_BUFFERED_MESSAGES,
    connect_timeout: float = 10.0,
    disconnect_timeout: float = 10.0,
    on_event: Callable[[ClientEvent], None] | None = None,
    rng: random_module.Random | None = None,
) -> AsyncIterator[ReconnectingWebSocket]:
    """Connect to ``url`` and stay connected until the block ends.

    Yields at once (state ``CONNECTING``); messages sent before the first connection
    wait in the buffer. See ``docs/client.md`` for when it reconnects and when it gives up.

    Args:
        url: ``ws://`` or ``wss://`` URL of the object. Its ``_pk`` query parameter, if
            any, is the client id.
        client_id: The connection id sent as ``_pk`` on every connect, so the server sees
            the same ``ws.id`` across reconnects. Default: the URL's ``_pk``, else random.
        reliable: Send text messages as ops the server acknowledges (at-least-once;
            pair it with :func:`~trio_hibernate.client.deliver_once` on the server).
        backoff: The waits between attempts and the limit of attempts in a row.
        max_buffered_messages: Messages waiting to be sent (and, reliable, to be
            acknowledged) at most; :meth:`~ReconnectingWebSocket.send` past it raises
            :class:`~trio_hibernate.LimitExceededError`. Also the number of received
            messages held for :meth:`~ReconnectingWebSocket.receive`: past it the client
            stops reading from the server until the application catches up.
        connect_timeout: Seconds one connect (TCP and the upgrade) may take.
        disconnect_timeout: Seconds the Close handshake may take.
        on_event: Called (in the client's task, must not block) with every
            :class:`ClientEvent`.
        rng: The random source of the jitter (default: a new ``random.Random()``).

    Raises:
        ConnectionIdError: the ``_pk`` in ``url`` or ``client_id`` is malformed.
        ValueError: ``client_id`` differs from the URL's ``_pk``, or
            ``max_buffered_messages`` is less than 1.

    Resource handling:
        Nothing runs after the block: an open connection is closed with 1000 (messages
        still buffered are dropped; :meth:`~ReconnectingWebSocket.flush` first to keep
        them), a connect or a wait in progress is cancelled.
    """
    if max_buffered_messages < 1:
        raise ValueError(f"max_buffered_messages must be at least 1, got {max_buffered_messages}")
    full_url, client_id = _with_client_id(url, client_id)
    client = ReconnectingWebSocket(
        full_url,
        client_id,
        backoff,
        rng or random_module.Random(),
        reliable,
        max_buffered_messages,
        connect_timeout,
        disconnect_timeout,
        on_event,
    )
    async with open_owned_nursery() as nursery:
        await nursery.start(client._run)
        try:
            yield client
        finally:
            client._stop()
