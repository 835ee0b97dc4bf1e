"""permessage-deflate (RFC 7692): what a client's offer gets, and the host's side of it.

Negotiation (:func:`negotiate`) takes the first offer of ``Sec-WebSocket-Extensions``
the host can honour and answers it. Without context takeover (the default) the answer
always carries ``server_no_context_takeover`` and ``client_no_context_takeover`` (RFC
7692 sections 7.1.1.1 and 7.1.1.2 let a server add both to any offer): then each message
is compressed on its own, by both sides, so a socket holds no compression state between
messages (nothing while it is idle or its object hibernates), and a message's
compressed frame is the same bytes for every socket with the same window: a broadcast
compresses once (:meth:`Compression.shared_frame`).

Inflating is bounded (:meth:`Compression.room`, :class:`Inflater`): never more than
what is left of ``Limits.max_message_bytes`` for the message, nor of the host's memory
budget, plus one byte, so a decompression bomb costs no more memory than a plain message
at the limit; past it the message is refused with 1009 (or 1013 for the budget).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING, Final, Protocol

import attrs

from .._errors import WebSocketProtocolError
from .frames import deflate_message

if TYPE_CHECKING:
    from .._compression import WebSocketCompression
    from .._limits import Limits
    from .budget import MemoryBudget
    from .frames import Compressor

__all__ = [
    "Compression",
    "Decompressor",
    "DeflateParams",
    "Inflater",
    "negotiate",
    "new_compressor",
]

#: The name of the extension in ``Sec-WebSocket-Extensions``.
PERMESSAGE_DEFLATE: Final = "permessage-deflate"
_BITS: Final = re.compile(r"[1-9][0-9]?")
#: Frames larger than this are not kept for the next socket of a broadcast.
_FRAME_CACHE_MAX_BYTES: Final = 65536
#: What the sender removed from the end of each compressed message (RFC 7692 7.2.2).
_SYNC_TAIL: Final = b"\x00\x00\xff\xff"


class Decompressor(Protocol):
    """What inflating uses of a ``zlib.decompressobj`` (raw deflate)."""

    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes, /, max_length: int = ...) -> bytes: ...


@attrs.frozen
class DeflateParams:
    """What one socket negotiated. Interned: sockets with the same terms share one."""

    server_context_takeover: bool
    """The server keeps its compressor between messages."""
    client_context_takeover: bool
    """The client may keep its compressor: the server keeps its decompressor."""
    server_window_bits: int
    """The window the server compresses with (9-15)."""
    client_window_bits: int
    """The window the server inflates with (9-15; a client asked for 8 uses 8 or 9)."""
    response: str
    """The ``Sec-WebSocket-Extensions`` value of the 101."""


@cache
def _params(
    server_takeover: bool,
    client_takeover: bool,
    server_bits: int,
    client_bits: int,
    server_bits_said: bool,
    client_bits_said: bool,
) -> DeflateParams:
    words = [PERMESSAGE_DEFLATE]
    if not server_takeover:
        words.append("server_no_context_takeover")
    if not client_takeover:
        words.append("client_no_context_takeover")
    if server_bits_said:
        words.append(f"server_max_window_bits={server_bits}")
    if client_bits_said:
        words.append(f"client_max_window_bits={client_bits}")
    return DeflateParams(
        server_takeover, client_takeover, server_bits, max(client_bits, 9), "; ".join(words)
    )


def _parse_offer(offer: str) -> dict[str, str | None] | None:
    """The parameters of one ``permessage-deflate`` offer, or None if it is another
    extension or malformed (a parameter repeated, unknown, or with a bad value)."""
    name, *rest = (part.strip() for part in offer.split(";"))
    if name.lower() != PERMESSAGE_DEFLATE:
        return None
    params: dict[str, str | None] = {}
    for part in rest:
        key, sep, raw = part.partition("=")
        key = key.strip().lower()
        value = raw.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]  # a quoted-string (RFC 7692 section 7.1)
        if key in params:
            return None
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if sep:
                return None
            params[key] = None
        elif key in ("server_max_window_bits", "client_max_window_bits"):
            if sep and not (_BITS.fullmatch(value) and 8 <= int(value) <= 15):
                return None
            if not sep and key == "server_max_window_bits":
                return None  # a value is required (section 7.1.2.1)
            params[key] = value if sep else None
        else:
            return None
    return params


def negotiate(
    header_values: Iterable[str], *, context_takeover: bool, window_bits: int
) -> DeflateParams | None:
    """The terms for the first ``permessage-deflate`` offer in ``header_values`` (the
    request's ``Sec-WebSocket-Extensions`` headers) the host can accept, or None.

    An offer is declined when malformed, or when it asks the server for an 8-bit window
    (zlib cannot compress raw deflate with one).
    """
    for offer in ",".join(header_values).split(","):
        params = _parse_offer(offer)
        if params is None:
            continue
        server_bits = window_bits
        asked = params.get("server_max_window_bits")
        if asked is not None:
            if int(asked) < 9:
                continue
            server_bits = min(server_bits, int(asked))
        client_bits = 15
        client_said = "client_max_window_bits" in params
        if client_said:
            offered = params["client_max_window_bits"]
            client_bits = min(window_bits, 15 if offered is None else int(offered))
        if context_takeover:
            server_takeover = "server_no_context_takeover" not in params
            client_takeover = "client_no_context_takeover" not in params
        else:
            server_takeover = client_takeover = False
        return _params(
            server_takeover,
            client_takeover,
            server_bits,
            client_bits,
            asked is not None or server_bits < 15,
            client_said,
        )
    return None


def new_compressor(bits: int) -> Compressor:
    """A raw-deflate compressor with a ``2**bits`` window (and a hash table sized to it:
    zlib's default memory level at 15 bits, less below)."""
    return zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits, max(1, bits - 7))


class Compression:
    """A host's permessage-deflate: its settings, the room left for inflating, and the
    last compressed frame (without context takeover, a broadcast compresses once)."""

    __slots__ = (
        "_budget",
        "_last_bits",
        "_last_frame",
        "_last_message",
        "context_takeover",
        "max_message_bytes",
        "min_message_bytes",
        "window_bits",
    )

    def __init__(
        self, settings: WebSocketCompression, limits: Limits, budget: MemoryBudget
    ) -> None:
        self.context_takeover = settings.context_takeover
        self.window_bits = settings.window_bits
        self.min_message_bytes = settings.min_message_bytes
        self.max_message_bytes = limits.max_message_bytes
        self._budget = budget
        self._last_message: str | bytes | None = None
        self._last_bits = 0
        self._last_frame = b""

    def negotiate(self, header_values: Iterable[str]) -> DeflateParams | None:
        """The terms for a client's offer (see :func:`negotiate`), or None."""
        return negotiate(
            header_values, context_takeover=self.context_takeover, window_bits=self.window_bits
        )

    def room(self, inflated: int) -> int:
        """Bytes a message that has ``inflated`` bytes so far may still inflate: within
        ``Limits.max_message_bytes`` and what the memory budget has left."""
        budget = self._budget
        return min(self.max_message_bytes - inflated, budget.limit - budget.used)

    def over_message_limit(self, inflated: int) -> bool:
        """Whether a message of ``inflated`` bytes is over ``Limits.max_message_bytes``
        (else inflating it stopped at the memory budget)."""
        return inflated > self.max_message_bytes

    def shared_frame(self, message: str | bytes, bits: int) -> bytes:
        """The frame of ``message`` compressed on its own with a ``2**bits`` window: the
        same bytes for every socket without server context takeover (the last one is
        cached for broadcasts)."""
        if message is self._last_message and bits == self._last_bits:
            return self._last_frame
        frame = deflate_message(message, new_compressor(bits))
        if len(frame) <= _FRAME_CACHE_MAX_BYTES:
            self._last_message = message
            self._last_bits = bits
            self._last_frame = frame
        return frame


class Inflater:
    """One socket's inbound permessage-deflate, on the ``params`` it negotiated: the
    frame reader (``_core/wsreader.py``) hands it each payload chunk of a compressed
    message (:meth:`inflate`), then the message's end (:meth:`end_message`).

    Holds a decompressor only while it must: during a compressed message, or for good
    with client context takeover.
    """

    __slots__ = ("_decompressor", "_host", "_inflated", "params")

    def __init__(self, compression: Compression, params: DeflateParams) -> None:
        self._host = compression
        self.params = params
        """The terms negotiated (shared with other sockets)."""
        self._decompressor: Decompressor | None = None
        self._inflated = 0  # bytes inflated of the message

    def inflate(self, data: bytes) -> bytes:
        """The next inflated bytes of the message, ``data`` its next compressed bytes.

        Raises:
            WebSocketProtocolError: 1007 the data is not raw deflate; 1009 the message
                inflates past ``Limits.max_message_bytes``; 1013 past what the memory
                budget has left. The reason of a 1013 says what was refused (the caller
                words the close reason).
        """
        decompressor = self._decompressor
        if decompressor is None:
            decompressor = zlib.decompressobj(-self.params.client_window_bits)
            self._decompressor = decompressor
        host = self._host
        room = host.room(self._inflated)
        try:
            out = decompressor.decompress(data, room + 1)
        except zlib.error as exc:
            self.reset()
            raise WebSocketProtocolError(1007, f"invalid compressed data: {exc}") from None
        self._inflated += len(out)
        if len(out) > room:  # the message limit, or the memory budget: no more
            inflated = self._inflated
            self.reset()
            if host.over_message_limit(inflated):
                raise WebSocketProtocolError(
                    1009,
                    f"Message is too large: over {host.max_message_bytes} bytes once "
                    "inflated (Limits.max_message_bytes)",
                )
            raise WebSocketProtocolError(1013, "inflating a compressed message")
        return out

    def end_message(self) -> bytes:
        """The last inflated bytes of the message (its sync tail, which the sender
        removed). Then the next message starts from zero.

        Raises:
            WebSocketProtocolError: As :meth:`inflate`.
        """
        data = self.inflate(_SYNC_TAIL)
        self._inflated = 0
        decompressor = self._decompressor
        if decompressor is not None and (
            not self.params.client_context_takeover or decompressor.eof
        ):
            self._decompressor = None  # nothing to keep (or a final block ended its stream)
        return data

    def reset(self) -> None:
        """Forget the message in progress (and any context): nothing more is inflated."""
        self._decompressor = None
        self._inflated = 0
