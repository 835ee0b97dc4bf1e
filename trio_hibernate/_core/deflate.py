"""permessage-deflate (RFC 7692): what a client's offer gets, and the host's side of it.

Negotiation (:func:`negotiate`) takes the first offer of ``Sec-WebSocket-Extensions``
the host can honour and answers it. Without context takeover (the default) the answer
always carries ``server_no_context_takeover`` and ``client_no_context_takeover`` (RFC
7692 sections 7.1.1.1 and 7.1.1.2 let a server add both to any offer): then each message
is compressed on its own, by both sides, so a socket holds no compression state between
messages (nothing while it is idle or its object hibernates), and a message's
compressed frame is the same bytes for every socket with the same window: a broadcast
compresses once (:meth:`Compression.shared_frame`).

Inflating is bounded (:meth:`Compression.room`): never more than what is left of
``Limits.max_message_bytes`` for the message, nor of the host's memory budget.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING, Final, Protocol

import attrs

from .frames import deflate_message

if TYPE_CHECKING:
    from .._compression import WebSocketCompression
    from .._limits import Limits
    from .budget import MemoryBudget
    from .frames import Compressor

__all__ = ["Compression", "Decompressor", "DeflateParams", "negotiate", "new_compressor"]

#: The name of the extension in ``Sec-WebSocket-Extensions``.
PERMESSAGE_DEFLATE: Final = "permessage-deflate"
_BITS: Final = re.compile(r"[1-9][0-9]?")
#: Frames larger than this are not kept for the next socket of a broadcast.
_FRAME_CACHE_MAX_BYTES: Final = 65536


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
