"""HTTP/1.1 for a connection: read one request with ``h11``, write its response.

A connection serves one request (every response says ``connection: close``), which may
be a WebSocket upgrade: then the 101 is written here and the bytes that came after the
request (the first frames) are handed to the transport.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Final, final

import h11
from wsproto.utilities import generate_accept_token

from .._errors import BadRequest
from .._http import Request, Response, header_list, split_target
from .._websocket import WebSocket
from .deflate import DeflateExtension
from .writer import over_budget_text

if TYPE_CHECKING:
    from .._core.sockets import SocketRecord, Transport
    from .channel import ByteChannel
    from .owner import ConnectionOwner
    from .writer import Writer

__all__ = [
    "MAX_HEAD_BYTES",
    "HttpExchange",
    "is_upgrade",
    "raw_response",
    "reason_phrase",
    "simple_response",
]

#: Bytes of a request line and headers (h11 buffers them whole). Larger: 431.
MAX_HEAD_BYTES: Final = 16384
#: Headers of a 101 the server writes from what was negotiated, not as the object gave them.
_NEGOTIATED: Final = frozenset({"sec-websocket-protocol", "sec-websocket-extensions"})


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (empty for an unknown status)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def simple_response(status: int, body: str, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    """A plain-text response: ``body`` and a newline."""
    return Response(status=status, body=body + "\n", headers=extra)


def raw_response(status: int, message: str) -> bytes:
    """An error response written without h11 (it refuses to answer a request it could not
    parse). Non-ASCII characters of ``message`` become ``?``."""
    body = f"{message}\n".encode("ascii", "replace")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
        % (status, reason_phrase(status), len(body), body)
    )


def is_upgrade(head: h11.Request) -> bool:
    """Whether ``head`` asks for a WebSocket (``GET`` with ``Upgrade: websocket``)."""
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


@final
class HttpExchange:
    """One request read from a connection's channel and its response, written with its
    writer. ``held`` is the request body's size, counted in the host's memory budget
    until :meth:`release_body`."""

    __slots__ = ("_channel", "_h", "_owner", "_writer", "held")

    def __init__(self, owner: ConnectionOwner, channel: ByteChannel, writer: Writer) -> None:
        self._owner = owner
        self._channel = channel
        self._writer = writer
        self._h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.held = 0

    def release_body(self) -> None:
        """The request body is no longer needed: give its bytes back to the budget."""
        self._owner.buffers.give(self.held)
        self.held = 0

    async def read_request(self, transport: Transport) -> Request | None:
        """The request, or None at EOF before a whole one. An upgrade request carries a
        :class:`WebSocket` on ``transport``; its body is not read.

        Raises:
            h11.RemoteProtocolError: The peer sent something that is not HTTP/1.1.
            BadRequest: The request cannot be served (too large, a bad target...).
        """
        owner = self._owner
        h = self._h
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await self._channel.receive())
                continue
            if isinstance(event, h11.Request):
                head = event
                if is_upgrade(event):
                    break
            elif isinstance(event, h11.Data):
                body += event.data
                limit = owner.limits.max_request_body_bytes
                if len(body) > limit:
                    raise BadRequest(
                        413,
                        f"Payload Too Large: the request body is over {limit} bytes "
                        "(Limits.max_request_body_bytes)",
                    )
                if not owner.buffers.take(len(event.data)):
                    raise BadRequest(503, f"Service Unavailable: {over_budget_text(owner.buffers)}")
                self.held += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return None  # ConnectionClosed or PAUSED without a request: nothing to do
        assert head is not None
        if head.method == b"CONNECT":  # a proxy's method: nothing here can tunnel
            raise BadRequest(405, "Method Not Allowed: CONNECT")
        target = head.target.decode("latin-1")
        if not split_target(target)[0] and not (head.method == b"OPTIONS" and target == "*"):
            raise BadRequest(
                400, f"Bad Request: {target!r} is not an origin-form or absolute-form target"
            )
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
        websocket = None
        if is_upgrade(head):
            offered = header_list(v for k, v in headers if k == "sec-websocket-protocol")
            websocket = WebSocket(
                transport=transport, url=target, limits=owner.limits, protocols=offered
            )
        try:
            return Request(
                method=head.method.decode("ascii"),
                url=target,
                headers=headers,
                body=bytes(body),
                websocket=websocket,
            )
        except ValueError as exc:  # h11 lets control characters through in values
            raise BadRequest(400, f"Bad Request: {exc}") from None

    def send_response(self, request: Request, response: Response) -> None:
        """Write ``response`` (its head only for ``HEAD``), closing the connection after."""
        h = self._h
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        headers += [
            (b"content-length", str(len(response.body)).encode()),
            (b"connection", b"close"),
        ]
        data = h.send(
            h11.Response(
                status_code=response.status,
                headers=headers,
                reason=reason_phrase(response.status),
            )
        )
        assert data is not None
        if request.method != "HEAD":  # the head of the response only (RFC 9110 9.3.2)
            data += h.send(h11.Data(data=response.body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        self._writer.start_response()  # frames sent meanwhile are dropped: no upgrade
        self._writer.write(data)

    def trailing(self) -> bytes:
        """The bytes the client sent after its (upgrade) request, read already."""
        return bytes(self._h.trailing_data[0])

    def upgrade(
        self, request: Request, response: Response, record: SocketRecord
    ) -> tuple[bytes, DeflateExtension | None]:
        """Write the 101 for the WebSocket the object accepted as ``record`` (naming its
        subprotocol, and permessage-deflate if negotiated), then the frames it sent
        meanwhile. Returns the bytes received after the request (frames already), and
        the socket's compression (None: none)."""
        key = request.header("sec-websocket-key")
        assert key is not None
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", generate_accept_token(key.encode("ascii"))),
        ]
        if record.protocol is not None:
            headers.append((b"sec-websocket-protocol", record.protocol.encode("latin-1")))
        deflate = self._negotiate_deflate(request, response)
        if deflate is not None:
            headers.append((b"sec-websocket-extensions", deflate.params.response.encode()))
        headers += [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers
            if k.lower() not in _NEGOTIATED
        ]
        head = self._h.send(
            h11.InformationalResponse(
                status_code=101, headers=headers, reason=b"Switching Protocols"
            )
        )
        assert head is not None
        trailing, _closed = self._h.trailing_data
        writer = self._writer
        pending = writer.start_response()
        writer.write(head)
        for frame in pending:  # never compressed: RSV1 marks each message that is
            writer.write(frame)
        return bytes(trailing), deflate

    def _negotiate_deflate(self, request: Request, response: Response) -> DeflateExtension | None:
        """The socket's permessage-deflate: when the host compresses, the client offers
        it, and the object did not refuse it (``Sec-WebSocket-Extensions: ""``)."""
        compression = self._owner.compression
        if compression is None:
            return None
        for name, _value in response.headers:
            if name.lower() == "sec-websocket-extensions":
                return None  # only "" gets through Response: the object refuses it
        offers = [v for k, v in request.headers if k == "sec-websocket-extensions"]
        params = compression.negotiate(offers) if offers else None
        return None if params is None else DeflateExtension(compression, params)
