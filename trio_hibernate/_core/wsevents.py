"""What a client's WebSocket frames mean to the server, and the closing handshake.

The frame reader (``wsreader.py``) turns bytes into :data:`ReaderEvent`: whole messages,
:class:`Ping`, :class:`Pong`, the peer's :class:`PeerClose`, or a :class:`Violation`.
A control frame's payload becomes its event in :func:`control_event`, which checks a
Close's code (:func:`is_valid_close_code`) and reason.

The closing handshake (RFC 6455 section 7) is one :class:`CloseState` per socket, moved
only through :data:`CLOSE_TRANSITIONS` by :class:`ClosingHandshake`: each side sends one
Close frame; the first one's sender waits for the answer, the receiver answers at once.
A pair the table does not hold raises :class:`InvalidTransition` (a bug of the runtime;
:data:`CLOSE_REFUSALS` says why).
"""

from __future__ import annotations

from enum import Enum
from typing import Final, TypeAlias

import attrs

from .._errors import InvalidTransition, WebSocketProtocolError
from .frames import encode_close

__all__ = [
    "CLOSE_REFUSALS",
    "CLOSE_TRANSITIONS",
    "CloseInput",
    "CloseState",
    "ClosingHandshake",
    "PeerClose",
    "Ping",
    "Pong",
    "ReaderEvent",
    "Violation",
    "control_event",
    "is_valid_close_code",
]


@attrs.frozen
class Ping:
    """The peer's Ping: answer with a Pong carrying ``payload``."""

    payload: bytes


@attrs.frozen
class Pong:
    """The peer's Pong (unsolicited or not: nothing to do)."""

    payload: bytes


@attrs.frozen
class PeerClose:
    """The peer's Close frame: ``code`` 1005 when it carried none."""

    code: int
    reason: str


@attrs.frozen
class Violation:
    """The peer broke the protocol or a limit: close with ``code``, ``reason`` says why
    (for 1013, what was refused)."""

    code: int
    reason: str


#: What ``FrameReader.feed`` returns a list of (``str``/``bytes``: a whole message).
ReaderEvent: TypeAlias = str | bytes | Ping | Pong | PeerClose | Violation


def is_valid_close_code(code: int) -> bool:
    """Whether a peer's Close frame may carry ``code`` (RFC 6455 7.4 and the IANA
    registry): 1000-1003, 1007-1014, 3000-4999. 1004 is reserved, 1005, 1006 and 1015
    never travel in a frame, 1016-2999 are unassigned."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def control_event(opcode: int, payload: bytes) -> Ping | Pong | PeerClose:
    """The event of a peer's control frame: ``opcode`` 8 (Close), 9 (Ping) or 10 (Pong),
    ``payload`` unmasked (at most 125 bytes).

    Raises:
        WebSocketProtocolError: A bad Close (RFC 6455 5.5.1, 7.4): 1002 a 1-byte payload
            or a code no Close may carry, 1007 a reason that is not UTF-8.
    """
    if opcode == 9:
        return Ping(payload)
    if opcode == 10:
        return Pong(payload)
    if not payload:
        return PeerClose(1005, "")
    if len(payload) == 1:
        raise WebSocketProtocolError(1002, "a Close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not is_valid_close_code(code):
        raise WebSocketProtocolError(1002, f"a Close frame with the invalid code {code}")
    try:
        return PeerClose(code, payload[2:].decode())
    except UnicodeDecodeError as exc:
        raise WebSocketProtocolError(1007, f"invalid UTF-8 in a Close reason: {exc}") from None


class CloseState(Enum):
    """Where a socket's closing handshake is."""

    #: No Close frame either way.
    OPEN = "open"
    #: The peer's Close came first; ours, the answer, is to go at once.
    REMOTE_CLOSING = "remote_closing"
    #: Ours went first (``ws.close()``, a violation, a shutdown); the peer's is awaited.
    LOCAL_CLOSING = "local_closing"
    #: Both went: the peer sends nothing more (the server may close the TCP connection).
    CLOSED = "closed"


class CloseInput(Enum):
    """What moves the closing handshake."""

    #: Our Close frame goes out.
    SENT = "sent"
    #: The peer's Close frame was read.
    RECEIVED = "received"


_OPEN: Final = CloseState.OPEN
_REMOTE: Final = CloseState.REMOTE_CLOSING
_LOCAL: Final = CloseState.LOCAL_CLOSING
_CLOSED: Final = CloseState.CLOSED
_SENT: Final = CloseInput.SENT
_RECEIVED: Final = CloseInput.RECEIVED

#: (state, input) -> next state. Every pair is here or in :data:`CLOSE_REFUSALS`.
CLOSE_TRANSITIONS: Final[dict[tuple[CloseState, CloseInput], CloseState]] = {
    (_OPEN, _SENT): _LOCAL,
    (_OPEN, _RECEIVED): _REMOTE,
    (_REMOTE, _SENT): _CLOSED,
    (_LOCAL, _RECEIVED): _CLOSED,
}
#: The pairs :data:`CLOSE_TRANSITIONS` leaves out, and why each is a runtime bug.
CLOSE_REFUSALS: Final[dict[tuple[CloseState, CloseInput], str]] = {
    (_LOCAL, _SENT): "one Close frame per side: ours went",
    (_CLOSED, _SENT): "one Close frame per side: ours went",
    (_REMOTE, _RECEIVED): "the reader reads nothing after the peer's Close",
    (_CLOSED, _RECEIVED): "the reader reads nothing after the peer's Close",
}


class ClosingHandshake:
    """One socket's closing handshake (see the module)."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = _OPEN
        """Where the handshake is; moved only by the methods below."""

    def _move(self, what: CloseInput) -> CloseState:
        try:
            new = CLOSE_TRANSITIONS[self.state, what]
        except KeyError:
            raise InvalidTransition(self.state, what) from None
        self.state = new
        return new

    def send_close(self, code: int | None, reason: str = "") -> bytes:
        """Our Close frame (see ``frames.encode_close``), to be written now.

        Raises:
            InvalidTransition: Ours went already (callers check :attr:`state` first).
            UnicodeEncodeError: ``reason`` holds a lone surrogate.
        """
        frame = encode_close(code, reason)
        self._move(_SENT)
        return frame

    def received_close(self) -> CloseState:
        """The peer's Close frame was read. Returns the new state: ``REMOTE_CLOSING``,
        ours is to answer it; ``CLOSED``, it answered ours.

        Raises:
            InvalidTransition: The peer's Close was read already.
        """
        return self._move(_RECEIVED)

    def check_valid(self) -> None:
        """Assert the table is complete and the state one of its (for tests)."""
        assert isinstance(self.state, CloseState)
        pairs = {(state, what) for state in CloseState for what in CloseInput}
        assert pairs == CLOSE_TRANSITIONS.keys() | CLOSE_REFUSALS.keys()
        assert not CLOSE_TRANSITIONS.keys() & CLOSE_REFUSALS.keys()
