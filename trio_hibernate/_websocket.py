"""The WebSocket handle that object code holds."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Final, final

from ._core.codec import decode_data, encode_data
from ._core.sockets import (
    ReadyState,
    SocketRecord,
    SocketRegistry,
    SocketState,
    Transport,
    connection_id_from_url,
)
from ._errors import InvalidCloseCodeError, WebSocketStateError
from ._limits import MAX_CLOSE_REASON_BYTES

if TYPE_CHECKING:
    from ._core.gate import OutputGate
    from ._ids import ObjectId
    from ._limits import Limits

__all__ = [
    "WebSocket",
    "accept",
    "acceptor_of",
    "attach_splice",
    "check_close_args",
    "check_text",
    "check_upgrade_headers",
    "end_upgrade",
    "handle_for",
    "record_of",
    "relocate",
    "settle_protocol",
    "splice_of",
    "upgrade_ended",
]

_RESERVED_CLOSE_CODES: Final = frozenset({1004, 1005, 1006, 1015})
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_OPEN: Final = SocketState.OPEN  # a module constant: Enum class attributes are slow to read


def check_text(message: str) -> None:
    """Raise :class:`UnicodeEncodeError` (naming the position) if ``message`` holds a
    lone surrogate, which has no UTF-8 form: a text frame could not carry it."""
    if not message.isascii() and _SURROGATE.search(message) is not None:
        message.encode("utf-8")


def check_close_args(code: int | None, reason: str | None) -> None:
    """Validate ``close()`` arguments as workerd does, before any state check."""
    if code is not None:
        if isinstance(code, bool) or not isinstance(code, int):
            raise TypeError(f"a close code must be an int, not {type(code).__name__}")
        if not 1000 <= code <= 4999 or code in _RESERVED_CLOSE_CODES:
            raise InvalidCloseCodeError(
                f"Invalid WebSocket close code: {code}. Allowed: 1000-4999 except "
                "1004, 1005, 1006 and 1015."
            )
    if reason is not None:
        if not isinstance(reason, str):
            raise TypeError(f"a close reason must be a str, not {type(reason).__name__}")
        if code is None:
            raise InvalidCloseCodeError(
                "If you specify a WebSocket close reason, you must also specify a code."
            )
        size = len(reason.encode("utf-8"))
        if size > MAX_CLOSE_REASON_BYTES:
            raise InvalidCloseCodeError(
                f"WebSocket close reason must not be longer than {MAX_CLOSE_REASON_BYTES} "
                f"bytes when UTF-8 encoded; it is {size} bytes."
            )


@final
class WebSocket:
    """One WebSocket as seen from object code.

    Handles are cheap views on the runtime's record of the socket. Within one activation
    the same handle stands for the same socket everywhere (handlers, ``get_websockets``);
    after the object hibernates and wakes, new handles are made. Every method is
    synchronous and never blocks: outgoing frames are buffered by the runtime.
    """

    __slots__ = (
        "_acceptor",
        "_gate",
        "_limits",
        "_pending_attachment",
        "_protocols",
        "_record",
        "_registry",
        "_splice",
        "_transport",
        "_upgrade_ended",
        "_url",
    )

    def __init__(
        self, *, transport: Transport, url: str, limits: Limits, protocols: tuple[str, ...] = ()
    ) -> None:
        # Made by the runtime for an upgrade request; users get handles, never build them.
        self._transport = transport
        self._url = url
        self._limits = limits
        self._protocols = protocols  # offered by the client (the upgrade's handle only)
        self._record: SocketRecord | None = None
        self._registry: SocketRegistry | None = None
        self._pending_attachment: bytes | None = None
        self._gate: OutputGate | None = None
        # The upgrade handle only: the (namespace, id) of the object that accepted it,
        # and whether its request was answered without an upgrade (see end_upgrade).
        self._acceptor: tuple[str, ObjectId] | None = None
        self._upgrade_ended = False
        # Answered by another host (cluster): opaque here (``_net/splice.py``'s value, but
        # this module stays free of I/O: ``_core`` sees it through ``_http``).
        self._splice: object = None

    def __repr__(self) -> str:
        return f"<WebSocket {self._url} {self.ready_state.name}>"

    @property
    def url(self) -> str:
        """The URL the client connected to (path and query). Survives hibernation."""
        return self._url

    @property
    def id(self) -> str:
        """The socket's connection id: stable for its whole life, across hibernation.

        It is what the client asked for with the ``_pk`` query parameter (as
        partyserver's clients send it), else a random 22-character id, made on first use.
        Unique among the object's listed sockets: :meth:`ObjectContext.get_websocket`
        finds the socket by it. Still readable in the close and error handlers.

        Raises:
            WebSocketStateError: the socket is not accepted yet.
        """
        record = self._record
        if record is None:
            raise WebSocketStateError(
                "a WebSocket gets its id when accepted: call ctx.accept_websocket() first"
            )
        connection_id = record.id
        if connection_id is None:
            assert self._registry is not None
            connection_id = self._registry.id_of(record)
        return connection_id

    @property
    def protocol(self) -> str:
        """The subprotocol chosen for this socket (``ctx.accept_websocket(...,
        protocol=...)`` or the 101's ``Sec-WebSocket-Protocol``), ``""`` if none (as in
        browsers). Survives hibernation."""
        record = self._record
        protocol = None if record is None else record.protocol
        return protocol or ""

    @property
    def ready_state(self) -> ReadyState:
        """``OPEN``; ``CLOSING`` after :meth:`close`; ``CLOSED`` once the socket is done.

        Inside ``websocket_close`` it is already ``CLOSED``: the runtime has answered the
        peer's Close frame before calling the handler.
        """
        record = self._record
        if record is None:
            return ReadyState.CONNECTING
        return record.ready_state

    def send(self, message: str | bytes | bytearray | memoryview) -> None:
        """Queue a text (``str``) or binary (``bytes``) message.

        Not a checkpoint; never blocks. After a storage write in this turn the message
        waits until the write is durable, and is dropped if it fails (the output gate).

        What it does depends on how far the socket is in its closing (spec 7, as workerd):

        * ``OPEN``: the message is queued.
        * This object called :meth:`close` (``CLOSING``, and after): raises
          :class:`WebSocketStateError`: sending after your own close is a bug.
        * The peer ended the socket (its Close, which the runtime has already answered,
          a drop or a protocol error), or the runtime let it go (shutdown, a failed
          constructor): the message is dropped silently; the close or error event is on
          its way (``ready_state`` is ``CLOSED``).

        To send to many sockets, use :meth:`ObjectContext.broadcast`: it skips the
        sockets in the last two cases instead of raising part way through.

        Raises:
            WebSocketStateError: the socket was not accepted, or ``close()`` was called.
            TypeError: ``message`` is neither ``str`` nor bytes-like.
            UnicodeEncodeError: ``message`` holds a lone surrogate (no UTF-8 for it).
        """
        record = self._record
        if record is None:
            raise WebSocketStateError(
                "You must call ctx.accept_websocket() on this WebSocket before sending messages."
            )
        state = record.state
        if state is not _OPEN and record.server_closed:
            raise WebSocketStateError("Can't call WebSocket send() after close().")
        value: object = message
        data: str | bytes
        if isinstance(value, str | bytes):
            data = value
        elif isinstance(value, bytearray | memoryview):
            data = bytes(value)
        else:
            raise TypeError(f"send() takes str or bytes, not {type(value).__name__}")
        if state is not _OPEN:
            return  # the end is decided (or the socket let go): the close event is on its way
        gate = self._gate
        if gate is not None and gate.closed:
            if isinstance(data, str):
                check_text(data)  # here, not in the commit that opens the gate
            # Spec 10, output gate: this message waits until the object's writes are durable.
            gate.hold(partial(record.transport.send_message, data))
        else:
            record.transport.send_message(data)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Start the closing handshake with ``code`` and ``reason``.

        The peer receives the Close frame (after any pending write is durable);
        ``websocket_close`` runs when it answers (with the peer's code). Without a code
        the Close frame is empty and the peer sees 1005. Closing twice, or closing a
        socket the peer already closed (or the runtime let go), does nothing.

        Raises:
            InvalidCloseCodeError: ``code`` outside 1000-4999 or reserved (1004, 1005,
                1006, 1015); a reason without a code; a reason over 123 UTF-8 bytes.
            WebSocketStateError: the socket was never accepted.
        """
        check_close_args(code, reason)
        record = self._record
        if record is None:
            raise WebSocketStateError(
                "You must call ctx.accept_websocket() on this WebSocket before closing it."
            )
        if not record.close_by_object():
            return  # closed already, or ended by the peer: nothing to send
        gate = self._gate
        if gate is not None and gate.closed:
            # If the write fails, the close never happened: the socket is open again.
            gate.hold(partial(record.transport.start_close, code, reason or ""), record.undo_close)
        else:
            record.transport.start_close(code, reason or "")

    def serialize_attachment(self, value: object) -> None:
        """Keep a copy of ``value`` with the socket, surviving hibernation (memory only).

        Later changes to ``value`` are not kept unless this is called again. The encoded
        size is limited by ``Limits.max_attachment_bytes`` (2,048 by default).

        Raises:
            DataCloneError: ``value`` is not data.
            LimitExceededError: the encoded value is too large. The previous attachment is
                kept in both cases.
        """
        encoded = encode_data(
            value,
            what="A WebSocket attachment",
            limit_name="max_attachment_bytes",
            limit_bytes=self._limits.max_attachment_bytes,
        )
        if self._record is None:
            self._pending_attachment = encoded
        else:
            self._record.attachment = encoded

    def deserialize_attachment(self) -> object:
        """A fresh copy of the latest attachment, or None if none was ever set."""
        record = self._record
        encoded = self._pending_attachment if record is None else record.attachment
        return None if encoded is None else decode_data(encoded)


# -- for the runtime (module functions, so that WebSocket shows users no such methods) --


def record_of(ws: WebSocket) -> SocketRecord | None:
    """The runtime's record of ``ws``: None until an object accepts it."""
    return ws._record


def handle_for(
    record: SocketRecord, registry: SocketRegistry, limits: Limits, gate: OutputGate | None
) -> WebSocket:
    """A new handle on an accepted socket of ``registry`` (one per socket per activation)."""
    handle = WebSocket(transport=record.transport, url=record.url, limits=limits)
    handle._record = record
    handle._registry = registry
    handle._gate = gate
    return handle


def _check_offered(ws: WebSocket, protocol: str) -> None:
    if protocol not in ws._protocols:
        offer = f"offered {list(ws._protocols)}" if ws._protocols else "offered none"
        raise ValueError(
            f"the client did not offer the subprotocol {protocol!r} ({offer} in "
            "Sec-WebSocket-Protocol; request.websocket_protocols): choose one of those, "
            "or none"
        )


def accept(
    ws: WebSocket,
    tags: tuple[str, ...],
    registry: SocketRegistry,
    gate: OutputGate | None,
    acceptor: tuple[str, ObjectId],
    protocol: str | None = None,
) -> SocketRecord:
    """Register the upgrading ``ws`` in ``registry`` with (normalized) ``tags``, carrying
    the attachment it got before, the connection id its URL asks for (``_pk``) and the
    subprotocol chosen; ``ws`` becomes a handle on the new record, and remembers
    ``acceptor`` (the accepting object's namespace and id: its connection delivers the
    socket's events there, whichever object the request was routed to).

    Raises:
        WebSocketStateError: ``ws`` was already accepted.
        TypeError, ValueError: ``protocol`` is not a str the client offered.
        ConnectionIdError: the URL's ``_pk`` is malformed (400) or in use (409).
        LimitExceededError: the registry is full. Nothing is changed when it raises.
    """
    if ws._record is not None:
        raise WebSocketStateError(
            "Cannot call accept_websocket() if the WebSocket was already accepted."
        )
    if protocol is not None:
        if not isinstance(protocol, str):
            raise TypeError(f"a subprotocol is a str, not {type(protocol).__name__}")
        _check_offered(ws, protocol)
        protocol = sys.intern(protocol)
    record = SocketRecord(
        transport=ws._transport,
        tags=tags,
        url=ws._url,
        attachment=ws._pending_attachment,
        id=connection_id_from_url(ws._url),
        protocol=protocol,
    )
    registry.add(record)
    ws._record = record
    ws._registry = registry
    ws._pending_attachment = None
    ws._gate = gate
    ws._acceptor = acceptor
    return record


def acceptor_of(ws: WebSocket) -> tuple[str, ObjectId] | None:
    """The (namespace, id) of the object that accepted the upgrading ``ws``, or None."""
    return ws._acceptor


def end_upgrade(ws: WebSocket) -> None:
    """The connection answered ``ws``'s request without an upgrade (a refusal, a 504, an
    error): an accept from now on is let go at once (see :func:`upgrade_ended`)."""
    ws._upgrade_ended = True


def upgrade_ended(ws: WebSocket) -> bool:
    """Whether the request of ``ws`` was answered without an upgrade: an object that
    accepts it now (a turn that outlived the request timeout, a forgotten forward) lets
    the socket go at once, with no event."""
    return ws._upgrade_ended


def attach_splice(ws: WebSocket, splice: object) -> None:
    """The upgrading ``ws`` was answered 101 by the host that owns its object (a relay):
    its connection splices the client to ``splice`` instead of completing the upgrade.

    Raises:
        WebSocketStateError: ``ws`` was accepted here, or spliced already.
    """
    if ws._record is not None or ws._splice is not None:
        raise WebSocketStateError(
            "a WebSocket accepted on this host, or relayed already, cannot be relayed"
        )
    ws._splice = splice


def splice_of(ws: WebSocket) -> object:
    """What :func:`attach_splice` attached to the upgrading ``ws``, or None."""
    return ws._splice


def relocate(ws: WebSocket, url: str) -> None:
    """The upgrading ``ws`` came through the internal relay path: its URL (what the
    object sees, and the ``_pk`` connection id) is the one the client asked for."""
    assert ws._record is None, "relocate a WebSocket before it is accepted"
    ws._url = url


def check_upgrade_headers(ws: WebSocket, headers: Iterable[tuple[str, str]]) -> None:
    """Check the headers of a 101 for ``ws`` that the server writes only as the object
    asks: one ``Sec-WebSocket-Protocol`` the client offered (the one ``ws`` was accepted
    with, if any), and ``Sec-WebSocket-Extensions`` only empty (no compression).

    Raises:
        ValueError: saying which header is wrong and what it may be.
    """
    chosen = [value for name, value in headers if name.lower() == "sec-websocket-protocol"]
    if len(chosen) > 1:
        raise ValueError(f"a 101 chooses one subprotocol, not {chosen!r} (Sec-WebSocket-Protocol)")
    if chosen:
        _check_offered(ws, chosen[0])
        accepted = ws._record.protocol if ws._record is not None else None
        if accepted is not None and accepted != chosen[0]:
            raise ValueError(
                f"the WebSocket was accepted with protocol={accepted!r}, but the 101's "
                f"Sec-WebSocket-Protocol says {chosen[0]!r}"
            )
    for name, value in headers:
        if name.lower() == "sec-websocket-extensions" and value:
            raise ValueError(
                "the server negotiates Sec-WebSocket-Extensions itself (open_host's "
                f"websocket_compression); a 101 may only set it to '' (no compression for "
                f"this socket), not {value!r}"
            )


def settle_protocol(record: SocketRecord, headers: Iterable[tuple[str, str]]) -> str | None:
    """Make the 101's ``Sec-WebSocket-Protocol`` (checked by :func:`check_upgrade_headers`
    when the response was made) the accepted socket's protocol, unless it was chosen at
    accept. Returns what is wrong (the two differ), or None."""
    for name, value in headers:
        if name.lower() == "sec-websocket-protocol":
            if record.protocol is None:
                record.protocol = sys.intern(value)
            elif record.protocol != value:
                return (
                    f"the WebSocket was accepted with protocol={record.protocol!r}, but the "
                    f"101's Sec-WebSocket-Protocol says {value!r}"
                )
    return None
