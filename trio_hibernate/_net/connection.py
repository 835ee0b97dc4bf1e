"""One client connection: HTTP/1.1 request, then (maybe) a WebSocket. One task each.

The connection task owns a byte channel (an OS socket, or any ``trio.abc.Stream``) and
goes through the phases of :class:`Phase`: it reads one request (``http``), has it
answered (``gatekeeper``), and after an upgrade runs the WebSocket transport
(``websocket``) until the socket's end, or after an upgrade another host answered (a
relay in cluster mode) copies bytes to and from that host (``splice``); then it lingers
until its last bytes are out (``writer``) and closes the channel. It holds no object
state: it turns bytes into events for the object (``ObjectLink.deliver``) and answers
what needs no object itself, which is why it keeps running while the object hibernates.

Per idle socket the runtime keeps this object, its transport and writer, the
frame reader, the channel and one parked task; queues, events and timers are
created only while needed.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, final

import h11
import trio

from .._containment import object_label
from .._errors import BadRequest
from .gatekeeper import Answer, Gatekeeper
from .http import HttpExchange, raw_response, simple_response
from .splice import SplicePipe
from .websocket import WebSocketTransport
from .writer import REFUSAL_LINGER_SECONDS

if TYPE_CHECKING:
    from .._core.sockets import SocketRecord
    from .._http import Request
    from .channel import ByteChannel
    from .owner import ConnectionOwner, ObjectLink

__all__ = ["Phase", "ServerConnection"]

log = logging.getLogger("trio_hibernate.connection")


class Phase(enum.Enum):
    """Where a connection is in its life. It only moves down this list."""

    #: Reading the request and having it answered.
    HTTP = "http"
    #: Upgraded: the WebSocket transport reads frames.
    WEBSOCKET = "websocket"
    #: Upgraded by another host: bytes are copied to and from it (``splice.py``).
    SPLICED = "spliced"
    #: The socket's end is decided: our last bytes go out, the peer's are discarded.
    LINGERING = "lingering"
    #: The channel is closed.
    CLOSED = "closed"


@final
class ServerConnection:
    """A client connection: its task, its byte channel, its WebSocket transport."""

    __slots__ = ("_channel", "_owner", "_transport", "_writer", "phase")

    def __init__(self, owner: ConnectionOwner, channel: ByteChannel) -> None:
        self._owner = owner
        self._channel = channel
        self._transport = transport = WebSocketTransport(owner, channel)
        self._writer = transport.writer
        self.phase = Phase.HTTP
        """Where the connection is (see :class:`Phase`)."""

    async def run(self) -> None:
        """Serve the connection until it ends, then close the channel. Runs in the host
        nursery.

        This is the connection boundary (house rule 5): whatever goes wrong while serving
        this one client, including a bug of ours, ends this connection only, with a 500
        or a Close 1011 and a logged traceback; the host and every other client go on.
        """
        owner = self._owner
        transport = self._transport
        link: ObjectLink | None = None  # the object that accepted the WebSocket
        try:
            try:
                answered = await self._http_phase()
                if isinstance(answered, SplicePipe):
                    self.phase = Phase.SPLICED
                    await answered.run()
                elif answered is not None:
                    link = answered
                    self.phase = Phase.WEBSOCKET
                    await transport.run()
            except trio.ClosedResourceError:
                pass  # aborted by us: the reason was already recorded
            except Exception as exc:  # contained here (house rule 5): logged, counted
                self._internal_error(exc)
            transport.release_held()  # a message cut short went with the phase
            if self._writer.responded:  # a response went out: let it arrive whole
                self.phase = Phase.LINGERING
                await self._writer.linger(
                    owner.close_timeout, handshake_done=transport.handshake_done
                )
        except trio.ClosedResourceError:
            pass
        finally:
            self.phase = Phase.CLOSED
            transport.connection_over()
            if link is not None and log.isEnabledFor(logging.DEBUG):
                self._log_closed(link)
            owner.connection_ended(self)
            await self._channel.aclose()

    def begin_shutdown(self, code: int, reason: str) -> None:
        """Host shutdown: close with ``code`` and run no handler; a connection still in
        its HTTP exchange, or spliced to another host, is dropped."""
        transport = self._transport
        transport.begin_shutdown(code, reason)
        if not transport.is_upgraded:
            transport.abort()

    def _internal_error(self, exc: Exception) -> None:
        """A bug of ours (or of a library) while serving this connection: end it only."""
        self._owner.counters.internal_error()
        log.error(
            "internal error serving %s; closing this connection only",
            self._channel.peer(),
            exc_info=exc,
        )
        transport = self._transport
        if not self._writer.responded:
            self._send_raw_response(500, "Internal Server Error")
            # Accepted, but the upgrade could not be completed: undo the accept.
            transport.undo_accept()
        elif transport.is_open:
            transport.fail(1011, "internal error")
        else:
            transport.abort()

    async def _http_phase(self) -> ObjectLink | SplicePipe | None:
        """Read one request, have it answered. The object that accepted the WebSocket if
        it became one, the splice if another host answered the upgrade, else None."""
        owner = self._owner
        http = HttpExchange(owner, self._channel, self._writer)
        request: Request | None = None
        upgraded = False
        gatekeeper = Gatekeeper(owner, self._channel.peer)
        try:
            with trio.move_on_after(owner.handshake_timeout):
                try:
                    request = await http.read_request(self._transport)
                except h11.RemoteProtocolError as exc:
                    await self._refuse(exc.error_status_hint, f"Bad Request: {exc}")
                    return None
                except BadRequest as exc:
                    await self._refuse(exc.status, str(exc))
                    return None
            if request is None:
                return None  # EOF, or the handshake timed out
            answer: Answer | None = None
            with trio.move_on_after(owner.request_timeout):
                answer = await gatekeeper.answer(request)
            http.release_body()  # no longer needed
            transport = self._transport
            if answer is None:
                log.warning(
                    "%s %s from %s: no response within the request timeout (%g s); answering 504",
                    request.method,
                    request.path,
                    self._channel.peer(),
                    owner.request_timeout,
                )
                transport.end_exchange()
                http.send_response(request, simple_response(504, "Gateway Timeout"))
                return None
            if answer.splice is not None:  # the owner's 101 goes out as it wrote it
                upgraded = True
                transport.end_exchange()
                self._writer.start_response()
                return SplicePipe(answer.splice, self._channel, http.trailing())
            if answer.record is not None:
                assert answer.link is not None
                transport.accept(answer.link, answer.record)
                upgraded = True
                transport.upgraded(*http.upgrade(request, answer.response, answer.record))
                if log.isEnabledFor(logging.DEBUG):
                    self._log_opened(answer.link, answer.record)
                return answer.link
            transport.end_exchange()  # nothing may follow (a late frame)
            http.send_response(request, answer.response)
            return None
        finally:
            http.release_body()  # the phase ended early (a bug, a cancellation)
            if request is not None and not upgraded:
                # Answered without an upgrade (or not at all): whichever object accepted
                # the socket, or accepts it later, lets it go with no event.
                gatekeeper.let_go(request)

    def _log_opened(self, link: ObjectLink, record: SocketRecord) -> None:
        """The DEBUG line of an accepted WebSocket (see docs/operations.md)."""
        peer = self._channel.peer()
        label = object_label(link.namespace, link.object_id)
        log.debug(
            "%s: WebSocket open: %s (%s)",
            peer,
            label,
            record.url,
            extra={
                "peer": peer,
                "object": label,
                "namespace": link.namespace,
                "object_id": link.object_id.hex,
                "url": record.url,
            },
        )

    def _log_closed(self, link: ObjectLink) -> None:
        """The DEBUG line of a WebSocket's end: its close code and who closed it."""
        # Not decided by then: the task was cancelled (a forced shutdown), no Close sent.
        code, closed_by = self._transport.ended or (1006, "dropped")
        peer = self._channel.peer()
        label = object_label(link.namespace, link.object_id)
        log.debug(
            "%s: WebSocket closed: %s, code %d by %s",
            peer,
            label,
            code,
            closed_by,
            extra={
                "peer": peer,
                "object": label,
                "namespace": link.namespace,
                "object_id": link.object_id.hex,
                "close_code": code,
                "closed_by": closed_by,
            },
        )

    def _send_raw_response(self, status: int, message: str) -> None:
        writer = self._writer
        writer.start_response()
        writer.write(raw_response(status, message))

    async def _refuse(self, status: int, message: str) -> None:
        """The peer sent a request we cannot serve: answer ``status``, then close without
        losing the answer to a reset (a lingering close of ``REFUSAL_LINGER_SECONDS``)."""
        if status < 500:
            self._owner.counters.bad_request()
        log.info("refused a request from %s: %d %s", self._channel.peer(), status, message)
        self._send_raw_response(status, message)
        await self._writer.linger(REFUSAL_LINGER_SECONDS, handshake_done=False)
        self._transport.abort()
