"""One client connection: HTTP/1.1 request, then (maybe) a WebSocket. One task each.

The connection task drives a non-blocking socket directly with ``h11`` (the request) and
``wsproto`` (frames). It holds no object state: it turns bytes into events for the object
(``ObjectLink.deliver``) and answers what needs no object itself: protocol pings, the
auto-response, and the reply to a peer's Close. That is why it keeps running while the
object hibernates.

Writes are synchronous (object code calls ``ws.send`` without awaiting): a frame goes
straight to the kernel with a non-blocking ``send``. Only if the kernel buffer is full does
a short-lived flusher task appear, holding the backlog until the peer reads it. Per idle
socket the runtime keeps this object, its ``wsproto`` connection, the socket and one
parked task; queues, events and timers are created only while needed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import socket
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

import h11
import trio
from wsproto.connection import Connection as WSConnection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token

from .._core.events import CloseEvent, ErrorEvent, FetchEvent, MessageEvent
from .._errors import WebSocketProtocolError
from .._http import Request, Response, split_target
from .._oneshot import OneShot
from .._supervisor import run_app_hook
from .._websocket import WebSocket, record_of

if TYPE_CHECKING:
    import outcome

    from .._core.sockets import SocketRecord
    from .owner import ConnectionOwner, ObjectLink

__all__ = ["ServerConnection"]

log = logging.getLogger("trio_hibernate.connection")

_RECV_BYTES: Final = 65536
_DROP_REASON: Final = "WebSocket disconnected without sending Close frame."
#: Bytes of a request line and headers (h11 buffers them whole). Larger: 431.
_MAX_HEAD_BYTES: Final = 16384
#: Closing a socket with unread bytes, or getting bytes after closing it, makes the
#: kernel send a reset, which throws away whatever the peer has not received yet: the end
#: of a response, the last frames, our Close frame. So a connection that sent something
#: ends with a lingering close (``_linger``): our bytes go out, then EOF, while what the
#: peer still sends is read and discarded until its EOF; for at most ``close_timeout``
#: (this long after a refused request) and this many bytes. Past either bound the socket
#: is closed as it is, and the peer gets a reset.
_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 1024 * 1024


class _BadRequest(Exception):
    """The peer's request cannot be served: answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _join(parts: list[str | bytes]) -> str | bytes:
    if isinstance(parts[0], str):
        return "".join(p for p in parts if isinstance(p, str))
    return b"".join(p for p in parts if isinstance(p, bytes))


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _simple_response(status: int, body: str, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status=status, body=body + "\n", headers=extra)


class ServerConnection:
    """A client connection and, after the upgrade, the transport of its WebSocket."""

    __slots__ = (
        "_backlog",
        "_closing",
        "_dead",
        "_entry",
        "_flushed",
        "_held",
        "_host",
        "_pending",
        "_pending_close",
        "_record",
        "_resume",
        "_sock",
        "_terminal",
        "_watchdog",
        "_ws",
    )

    def __init__(self, host: ConnectionOwner, sock: socket.socket) -> None:
        self._host = host
        self._sock = sock
        self._ws: WSConnection | None = None
        self._entry: ObjectLink | None = None
        self._record: SocketRecord | None = None
        # Frames sent by the object before the 101 response went out; None afterwards.
        self._pending: list[bytes] | None = []
        self._pending_close: tuple[int | None, str] | None = None
        self._backlog: bytearray | None = None
        #: Inbound bytes counted in the host's memory budget on behalf of this connection
        #: (a request body, or a message being reassembled); queued messages carry theirs.
        self._held = 0
        self._flushed: trio.Event | None = None
        self._resume: trio.Event | None = None
        self._watchdog: trio.CancelScope | None = None
        self._terminal = False  # the terminal event is decided; no other may follow
        self._dead = False  # the transport is unusable; writes are dropped
        self._closing = False  # lingering: writes are dropped, the backlog still goes out

    # -- the task ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends. Runs in the host nursery.

        This is the connection boundary (house rule 5): whatever goes wrong while serving
        this one client, including a bug of ours, ends this connection only, with a 500
        or a Close 1011 and a logged traceback; the host and every other client go on.
        """
        host = self._host
        try:
            try:
                if await self._http_phase():
                    await self._websocket_phase()
            except trio.ClosedResourceError:
                pass  # aborted by us (notify_closing): the reason was already recorded
            except Exception as exc:  # contained here (house rule 5): logged, counted
                self._internal_error(exc)
            # What was held (a message cut short) went with the phase that held it.
            host.buffers.give(self._held)
            self._held = 0
            if self._pending is None:  # a response went out: let it arrive whole
                await self._linger(host.close_timeout)
        except trio.ClosedResourceError:
            pass
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            host.connection_ended(self)
            host.buffers.give(self._held)
            self._held = 0
            if not self._terminal and self._record is not None:
                # Cancelled (host shutdown) before the socket's end was decided.
                self._terminal = True
                self._record.peer_closed = True
            self._dead = True
            trio.lowlevel.notify_closing(self._sock)  # wakes a flusher still waiting on it
            self._sock.close()

    def _peer(self) -> str:
        try:
            address = self._sock.getpeername()
        except OSError:
            return "a client"
        return f"{address[0]}:{address[1]}"

    def _internal_error(self, exc: Exception) -> None:
        """A bug of ours (or of a library) while serving this connection: end it only."""
        self._host.counters.internal_error()
        log.error(
            "internal error serving %s; closing this connection only", self._peer(), exc_info=exc
        )
        record, entry = self._record, self._entry
        if self._pending is not None:  # no response went out yet
            self._send_raw_response(500, "Internal Server Error")
            if record is not None and entry is not None:
                # Accepted, but the upgrade could not be completed: undo the accept.
                self._record = None
                entry.core.release(record)
                entry.forget_if_unused()
        elif record is not None and self._ws is not None:
            self._fail(1011, "internal error")
        else:
            self._abort()

    async def _recv(self) -> bytes:
        """The next bytes from the peer; ``b""`` on EOF or a transport error."""
        sock = self._sock
        while True:
            if self._dead:
                return b""
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return b""

    # -- HTTP ----------------------------------------------------------------------------

    async def _http_phase(self) -> bool:
        """Read one request, hand it to the object. True if it became a WebSocket."""
        host = self._host
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)
        request: Request | None = None
        with trio.move_on_after(host.handshake_timeout):
            try:
                request = await self._read_request(h)
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint, f"Bad Request: {exc}")
                return False
            except _BadRequest as exc:
                await self._refuse(exc.status, str(exc))
                return False
        if request is None:
            return False  # EOF, or the handshake timed out
        response: Response | None = None
        with trio.move_on_after(host.request_timeout):
            response = await self._answer(request)
        host.buffers.give(self._held)  # the request body is no longer needed
        self._held = 0
        if response is None:
            log.warning(
                "%s %s from %s: no response within the request timeout (%g s); answering 504",
                request.method,
                request.path,
                self._peer(),
                host.request_timeout,
            )
            self._send_http(h, request, _simple_response(504, "Gateway Timeout"))
            return False
        if response.status == 101:
            record = self._record
            assert record is not None
            self._upgrade(h, request, record, response)
            return True
        self._send_http(h, request, response)
        return False

    async def _answer(self, request: Request) -> Response:
        """The response to ``request``: from the server itself, an app hook or the
        object. Sets ``_record`` when the object accepted the upgrade (status 101)."""
        routed = await self._gatekeep(request)
        if isinstance(routed, Response):
            return routed
        ws = request.websocket
        self._entry = entry = routed
        response = await self._fetch(entry, request)
        record = record_of(ws) if ws is not None else None
        if ws is not None and response.status == 101 and response.websocket is ws and record:
            self._record = record
            return response
        if record is not None:
            entry.core.release(record)  # accepted, then refused: undo without any event
            entry.forget_if_unused()
        if response.status == 101:
            log.error(
                "fetch() for %s returned 101 with a WebSocket it did not accept for this "
                "request; answering 500",
                request.path,
            )
            response = _simple_response(500, "Internal Server Error")
        return response

    async def _gatekeep(self, request: Request) -> ObjectLink | Response:
        """Everything decided before an object wakes: the server's own paths, the
        handshake headers, the origin check, ``App.authorize``, routing."""
        host = self._host
        if request.path.startswith("/_"):
            return host.operations(request)
        if request.websocket is not None:
            refused = self._check_websocket_headers(request) or host.check_origin(request)
            if refused is not None:
                log.info(
                    "refused a WebSocket upgrade for %s from %s: %d",
                    request.path,
                    self._peer(),
                    refused.status,
                )
                return refused
        app = host.app
        if app.authorize is not None:
            refused = await run_app_hook("App.authorize", app.authorize, request)
            if refused is not None:
                return refused
        routed = host.route(request.path)
        if routed is not None:
            return routed
        if app.fetch is not None:
            response = await run_app_hook("App.fetch", app.fetch, request)
            assert response is not None
            if response.status != 101:
                return response
            log.error("App.fetch answered 101 for %s; it cannot accept WebSockets", request.path)
            return _simple_response(500, "Internal Server Error")
        return _simple_response(404, f"Not Found: {request.path}")

    async def _read_request(self, h: h11.Connection) -> Request | None:
        host = self._host
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await self._recv())
                continue
            if isinstance(event, h11.Request):
                head = event
                if self._is_upgrade(event):
                    break
            elif isinstance(event, h11.Data):
                body += event.data
                limit = host.limits.max_request_body_bytes
                if len(body) > limit:
                    raise _BadRequest(
                        413,
                        f"Payload Too Large: the request body is over {limit} bytes "
                        "(Limits.max_request_body_bytes)",
                    )
                if not host.buffers.take(len(event.data)):
                    raise _BadRequest(503, f"Service Unavailable: {self._budget_text()}")
                self._held += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return None  # ConnectionClosed or PAUSED without a request: nothing to do
        assert head is not None
        if head.method == b"CONNECT":  # a proxy's method: nothing here can tunnel
            raise _BadRequest(405, "Method Not Allowed: CONNECT")
        target = head.target.decode("latin-1")
        if not split_target(target)[0] and not (head.method == b"OPTIONS" and target == "*"):
            raise _BadRequest(
                400, f"Bad Request: {target!r} is not an origin-form or absolute-form target"
            )
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
        websocket = None
        if self._is_upgrade(head):
            websocket = WebSocket(transport=self, url=target, limits=host.limits)
        try:
            return Request(
                method=head.method.decode("ascii"),
                url=target,
                headers=headers,
                body=bytes(body),
                websocket=websocket,
            )
        except ValueError as exc:  # h11 lets control characters through in values
            raise _BadRequest(400, f"Bad Request: {exc}") from None

    @staticmethod
    def _is_upgrade(head: h11.Request) -> bool:
        connection = upgrade = b""
        for name, value in head.headers:
            if name == b"connection":
                connection = value.lower()
            elif name == b"upgrade":
                upgrade = value.lower()
        return (
            head.method == b"GET"
            and upgrade == b"websocket"
            and b"upgrade" in (token.strip() for token in connection.split(b","))
        )

    async def _fetch(self, entry: ObjectLink, request: Request) -> Response:
        """The object's answer. If cancelled first (the request timeout), a socket the
        object accepts later is let go at once."""

        def late(_answer: outcome.Outcome[Response]) -> None:
            # We gave up waiting (504 sent): a socket accepted since is let go.
            ws = request.websocket
            record = record_of(ws) if ws is not None else None
            if record is not None and not record.released:
                entry.core.release(record)
                entry.forget_if_unused()

        answer: OneShot[Response] = OneShot(on_late=late)
        entry.deliver(FetchEvent(request, answer.reply))
        response: Response = (await answer.wait()).unwrap()
        return response

    @staticmethod
    def _check_websocket_headers(request: Request) -> Response | None:
        if request.header("sec-websocket-version") != "13":
            return _simple_response(
                426, "Upgrade Required: WebSocket version 13", (("sec-websocket-version", "13"),)
            )
        key = request.header("sec-websocket-key") or ""
        try:
            valid = len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
        except (UnicodeEncodeError, binascii.Error):
            valid = False
        if not valid:
            return _simple_response(
                400, "Bad Request: Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455)"
            )
        return None

    def _upgrade(
        self, h: h11.Connection, request: Request, record: SocketRecord, response: Response
    ) -> None:
        key = request.header("sec-websocket-key")
        assert key is not None
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", generate_accept_token(key.encode("ascii"))),
        ]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        head = h.send(
            h11.InformationalResponse(
                status_code=101, headers=headers, reason=b"Switching Protocols"
            )
        )
        assert head is not None
        trailing, _closed = h.trailing_data
        self._ws = WSConnection(ConnectionType.SERVER, trailing_data=trailing)
        pending = self._pending or []
        self._pending = None
        self._write(head)
        for frame in pending:
            self._write(frame)
        if self._pending_close is not None:
            self.start_close(*self._pending_close)

    def _send_http(self, h: h11.Connection, request: Request, response: Response) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        headers += [
            (b"content-length", str(len(response.body)).encode()),
            (b"connection", b"close"),
        ]
        data = h.send(
            h11.Response(
                status_code=response.status, headers=headers, reason=_reason(response.status)
            )
        )
        assert data is not None
        if request.method != "HEAD":  # the head of the response only (RFC 9110 9.3.2)
            data += h.send(h11.Data(data=response.body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        self._pending = None
        self._terminal = True  # the exchange is over: nothing may follow (a late frame)
        self._write(data)

    def _send_raw_response(self, status: int, message: str) -> None:
        """An error response written without h11 (it refuses to answer a request it
        could not parse). Non-ASCII characters of ``message`` become ``?``."""
        body = f"{message}\n".encode("ascii", "replace")
        self._pending = None
        self._write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, _reason(status), len(body), body)
        )

    async def _refuse(self, status: int, message: str) -> None:
        """The peer sent a request we cannot serve: answer ``status``, then close without
        losing the answer to a reset (a lingering close of ``_LINGER_SECONDS``)."""
        if status < 500:
            self._host.counters.bad_request()
        log.info("refused a request from %s: %d %s", self._peer(), status, message)
        self._send_raw_response(status, message)
        await self._linger(_LINGER_SECONDS)
        self._abort()

    # -- WebSocket -----------------------------------------------------------------------

    async def _websocket_phase(self) -> None:
        ws = self._ws
        record = self._record
        entry = self._entry
        assert ws is not None
        assert record is not None
        assert entry is not None
        core = entry.core
        host = self._host
        deliver = entry.deliver
        budget = host.buffers
        counters = host.counters
        limits = host.limits
        max_queued = limits.max_queued_messages_per_websocket
        max_queued_bytes = limits.max_queued_bytes_per_websocket
        max_bytes = limits.max_message_bytes
        parts: list[str | bytes] = []
        while True:
            for event in ws.events():
                kind = type(event)
                if kind is TextMessage or kind is BytesMessage:
                    assert isinstance(event, TextMessage | BytesMessage)
                    if self._terminal:
                        continue  # shutting down: discard, wait for the peer's Close
                    payload = event.data
                    chunk: str | bytes
                    if isinstance(payload, str):
                        chunk = payload
                        added = len(payload) if payload.isascii() else len(payload.encode())
                    else:
                        chunk = payload if type(payload) is bytes else bytes(payload)
                        added = len(chunk)
                    size = self._held + added
                    if size > max_bytes:
                        self._fail(1009, f"Message is too large: {size} > {max_bytes}")
                        return
                    if not budget.take(added):
                        self._over_budget(size)
                        return
                    self._held = size
                    if not event.message_finished:
                        parts.append(chunk)
                        continue
                    message = chunk
                    if parts:
                        parts.append(chunk)
                        message = _join(parts)
                        parts = []
                    self._held = 0  # from here the event holds the bytes (see _core/budget.py)
                    if isinstance(message, str) and core.is_auto_response(message):
                        budget.give(size)
                        reply = core.record_auto_response(record, host.wall_clock())
                        counters.auto_responded()
                        if reply is not None:
                            self.send_message(reply)
                        continue
                    deliver(MessageEvent(record, message, size))
                elif kind is Ping:
                    assert isinstance(event, Ping)
                    if ws.state is ConnectionState.OPEN:
                        self._write(ws.send(event.response()))
                elif kind is CloseConnection:
                    assert isinstance(event, CloseConnection)
                    self._on_close_frame(ws, record, event)
                    return
                # Pong: nothing to do.
            if self._dead:
                # Lost while writing (reset by the peer), or aborted after the end was
                # decided (then this changes nothing): the object must hear of it.
                self._end(CloseEvent(record, 1006, _DROP_REASON, False))
                return
            if not self._terminal and (
                record.queued >= max_queued or record.queued_bytes >= max_queued_bytes
            ):
                # Backpressure: the object is behind; stop reading until it catches up
                # (the supervisor calls resume_reading). Not while shutting down: the
                # object will never catch up then, and the peer's Close must be read.
                self._resume = trio.Event()
                record.reading_paused = True
                await self._resume.wait()
                record.reading_paused = False
                self._resume = None
                continue
            if parts:
                # A message is partly here: it must keep coming, or it is dropped.
                with trio.move_on_after(host.partial_message_timeout) as stalled:
                    data = await self._recv()
                if stalled.cancelled_caught:
                    self._fail(
                        1008,
                        f"message incomplete: no data for {host.partial_message_timeout:g} s "
                        "(partial_message_timeout)",
                    )
                    return
            else:
                data = await self._recv()
            if not data:
                self._end(CloseEvent(record, 1006, _DROP_REASON, False))
                return
            ws.receive_data(data)

    def _over_budget(self, size: int) -> None:
        budget = self._host.buffers
        log.warning(
            "%s: closing with 1013: a %d-byte message would take the host over its memory "
            "budget (%d of Limits.max_buffered_bytes=%d in use)",
            self._peer(),
            size,
            budget.used,
            budget.limit,
        )
        self._fail(
            1013,
            f"the server is over its memory budget ({budget.limit} bytes, "
            "Limits.max_buffered_bytes); try again later",
        )

    def _on_close_frame(
        self, ws: WSConnection, record: SocketRecord, event: CloseConnection
    ) -> None:
        state = ws.state
        code, reason = int(event.code), event.reason or ""
        if state is ConnectionState.REMOTE_CLOSING:
            # The peer started: answer at once (spec 7, Rule), then tell the object.
            self._write(ws.send(event.response()))
            self._end(CloseEvent(record, code, reason, True))
        elif state is ConnectionState.CLOSED:
            self._end(CloseEvent(record, code, reason, True))  # the answer to our close()
        else:
            # wsproto reports a protocol violation as a CloseConnection it did not receive.
            if state is ConnectionState.OPEN:
                self._write(ws.send(CloseConnection(code=code, reason=reason[:120])))
            self._end(ErrorEvent(record, WebSocketProtocolError(code, reason)))

    def _fail(self, code: int, reason: str) -> None:
        ws = self._ws
        record = self._record
        assert ws is not None
        assert record is not None
        if ws.state is ConnectionState.OPEN:
            self._write(ws.send(CloseConnection(code=code, reason=reason)))
        self._end(ErrorEvent(record, WebSocketProtocolError(code, reason)))

    def _end(self, event: CloseEvent | ErrorEvent) -> None:
        """Decide the socket's terminal event (at most once) and queue it for the object."""
        if self._terminal:
            return
        self._terminal = True
        event.record.peer_closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        assert self._entry is not None
        self._entry.deliver(event)

    # -- Transport (called synchronously by object code) ----------------------------------

    def send_message(self, data: str | bytes) -> None:
        """Queue one data message (see :class:`~trio_hibernate._core.sockets.Transport`)."""
        if not (self._dead or self._terminal):  # nothing may follow a Close frame
            self._write(self._host.encode_frame(data))

    def start_close(self, code: int | None, reason: str) -> None:
        """Send our Close frame; the peer's answer ends the socket (or the watchdog does)."""
        ws = self._ws
        if ws is None:
            self._pending_close = (code, reason)
            return
        if self._dead or ws.state is not ConnectionState.OPEN:
            return
        # wsproto sends an empty Close only for the enum member, not the int 1005.
        close_code = CloseReason.NO_STATUS_RCVD if code is None else code
        self._write(ws.send(CloseConnection(code=close_code, reason=reason)))
        if not self._terminal:
            self._host.spawn(self._close_watchdog)

    def resume_reading(self) -> None:
        """The object caught up with this socket's queued messages: read again."""
        if self._resume is not None:
            self._resume.set()

    async def _close_watchdog(self) -> None:
        if self._terminal:
            return  # the peer answered before this task even started
        with trio.CancelScope() as scope:
            self._watchdog = scope
            await trio.sleep(self._host.close_timeout)
            if self._record is not None:
                self._end(CloseEvent(self._record, 1006, _DROP_REASON, False))
            self._abort()

    def begin_shutdown(self, code: int, reason: str) -> None:
        """Host shutdown: close with ``code`` and run no handler."""
        self._terminal = True
        self.resume_reading()
        ws = self._ws
        if ws is not None and ws.state is ConnectionState.OPEN and not self._dead:
            self._write(ws.send(CloseConnection(code=code, reason=reason)))
            if self._record is not None:
                self._record.peer_closed = True
        else:
            self._abort()

    def _lost(self) -> None:
        """Writing failed (the peer reset the connection): the connection task, even if
        paused for backpressure, wakes up and reports the drop (1006)."""
        self._dead = True
        self.resume_reading()

    def _abort(self) -> None:
        """Drop the transport now; the connection task wakes up and ends."""
        self.resume_reading()
        if not self._dead:
            self._dead = True
            trio.lowlevel.notify_closing(self._sock)

    # -- writing -------------------------------------------------------------------------

    def _write(self, data: bytes | bytearray) -> None:
        if self._pending is not None:
            self._pending.append(bytes(data))
            return
        if self._dead or self._closing:
            return
        backlog = self._backlog
        if backlog is not None:
            limit = self._host.limits.max_send_buffer_bytes
            if len(backlog) + len(data) > limit:
                self._drop_slow_reader(
                    f"the peer is not reading: over {limit} bytes buffered "
                    "(Limits.max_send_buffer_bytes)"
                )
            elif not self._host.buffers.take(len(data)):
                self._drop_slow_reader(self._budget_text())
            else:
                backlog += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._lost()
            return
        if sent < len(data):
            # One write may leave more than max_send_buffer_bytes behind (a big message):
            # the cap applies to what piles up on top while the peer does not read.
            if self._host.buffers.take(len(data) - sent):
                self._backlog = bytearray(memoryview(data)[sent:])
                self._host.spawn(self._flush)
            else:
                self._drop_slow_reader(self._budget_text())

    def _budget_text(self) -> str:
        budget = self._host.buffers
        return (
            f"the server is over its memory budget ({budget.used} of {budget.limit} bytes "
            "in use, Limits.max_buffered_bytes)"
        )

    def _drop_slow_reader(self, reason: str) -> None:
        """Outbound bytes cannot be buffered for this peer: drop the connection (a Close
        frame would wait behind the bytes it is not reading)."""
        log.warning("%s: disconnected: %s", self._peer(), reason)
        if self._record is not None:
            self._end(ErrorEvent(self._record, WebSocketProtocolError(1011, reason)))
        self._abort()

    async def _flush(self) -> None:
        sock = self._sock
        backlog = self._backlog
        assert backlog is not None
        try:
            while backlog and not self._dead:
                await trio.lowlevel.wait_writable(sock)
                try:
                    sent = sock.send(backlog)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    self._lost()
                    break
                del backlog[:sent]
                self._host.buffers.give(sent)
            if self._closing and not self._dead:
                self._shutdown_write()  # the EOF that _linger left to follow the backlog
        except trio.ClosedResourceError:
            pass  # aborted by _abort(); nothing more can be written
        finally:
            self._host.buffers.give(len(backlog))
            self._backlog = None
            if self._flushed is not None:
                self._flushed.set()

    async def _linger(self, seconds: float) -> None:
        """End the connection without a reset (see ``_LINGER_BYTES``): what we buffered
        goes out, then EOF, while what the peer still sends is read and discarded until its
        EOF. Returns then, after ``seconds``, or once the peer has sent ``_LINGER_BYTES``
        more, whichever comes first; nothing more is written from the start.

        A peer that sends a burst before it reads needs this: after a protocol error or a
        refusal in the middle of the burst, it reads our last bytes only once its own
        sending is done, so we keep reading until then. After a complete closing handshake
        the peer sends nothing more and the server closes at once (RFC 6455 section
        7.1.1): only our buffered bytes are waited for.

        Raises:
            trio.ClosedResourceError: The connection was aborted meanwhile (``_abort``).
        """
        if self._dead:
            return
        self._closing = True
        if self._backlog is None:
            self._shutdown_write()
        # Else the flusher sends EOF once the backlog is out.
        handshake_done = self._ws is not None and self._ws.state is ConnectionState.CLOSED
        discarded = 0
        with trio.move_on_after(seconds):
            while not handshake_done and (data := await self._recv()):
                discarded += len(data)
                if discarded > _LINGER_BYTES:
                    return  # the peer does not stop: closing now resets it
            if self._backlog is not None:  # the peer may still be reading
                self._flushed = trio.Event()
                await self._flushed.wait()

    def _shutdown_write(self) -> None:
        """Send EOF after the bytes the kernel holds."""
        with contextlib.suppress(OSError):  # already reset by the peer
            self._sock.shutdown(socket.SHUT_WR)
