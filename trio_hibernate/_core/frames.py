"""Encoding server-to-client WebSocket frames (RFC 6455 section 5.2).

Server frames are never masked, so a message's frame is the same bytes for every socket:
a broadcast encodes once. Whole data messages are encoded uncompressed
(:func:`encode_message`) or compressed with permessage-deflate (:func:`deflate_message`,
RFC 7692: the RSV1 bit set); of the control frames the server sends Close
(:func:`encode_close`) and Pong (:func:`encode_pong`), never Ping. Receiving is
``wsreader.py``'s.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final, Protocol

__all__ = [
    "MAX_CLOSE_REASON_BYTES",
    "Compressor",
    "deflate_message",
    "encode_close",
    "encode_message",
    "encode_pong",
]

#: A Close frame's reason is cut to this many bytes (a control frame carries at most
#: 125 bytes, two of them the code), at a character boundary.
MAX_CLOSE_REASON_BYTES: Final = 123


class Compressor(Protocol):
    """What :func:`deflate_message` uses of a ``zlib.compressobj`` (raw deflate)."""

    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self, mode: int = ..., /) -> bytes: ...


_TEXT: Final = 0x81  # FIN + opcode 1
_BINARY: Final = 0x82  # FIN + opcode 2
_CLOSE: Final = 0x88  # FIN + opcode 8
_PONG: Final = 0x8A  # FIN + opcode 10
#: Codes that never travel in a Close frame (RFC 6455 section 7.4.1): sent as 1000.
_LOCAL_ONLY: Final = frozenset({1005, 1006, 1015})
_RSV1: Final = 0x40  # "compressed" (RFC 7692 section 6)
_PACK_16: Final = struct.Struct("!BBH").pack
_PACK_64: Final = struct.Struct("!BBQ").pack
#: What a sync flush ends with; RFC 7692 section 7.2.1 has the sender remove it.
_SYNC_TAIL: Final = b"\x00\x00\xff\xff"


def _frame(first: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return _PACK_16(first, 126, size) + payload
    return _PACK_64(first, 127, size) + payload


def encode_message(message: str | bytes) -> bytes:
    """One unfragmented, unmasked frame carrying ``message``."""
    if isinstance(message, str):
        payload = message.encode("utf-8")
        first = _TEXT
    else:
        payload = message
        first = _BINARY
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return _PACK_16(first, 126, size) + payload
    return _PACK_64(first, 127, size) + payload


def deflate_message(message: str | bytes, compressor: Compressor) -> bytes:
    """One unfragmented, unmasked frame carrying ``message`` compressed by
    ``compressor`` (a raw-deflate ``zlib.compressobj``, whose state carries on into the
    next message: give a fresh one per message without context takeover).

    Raises:
        UnicodeEncodeError: ``message`` holds a lone surrogate.
    """
    if isinstance(message, str):
        data = message.encode("utf-8")
        first = _TEXT | _RSV1
    else:
        data = message
        first = _BINARY | _RSV1
    payload = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    if payload.endswith(_SYNC_TAIL):
        payload = payload[:-4]
    return _frame(first, payload)


def encode_close(code: int | None, reason: str = "") -> bytes:
    """Our Close frame. ``None`` or 1005 (no status) make an empty one, whatever the
    reason; 1006 and 1015, which never travel in a frame, become 1000. The reason is cut
    to :data:`MAX_CLOSE_REASON_BYTES` bytes, at a character boundary.

    Raises:
        UnicodeEncodeError: ``reason`` holds a lone surrogate.
    """
    if code is None or code == 1005:
        return b"\x88\x00"
    if code in _LOCAL_ONLY:
        code = 1000
    data = reason.encode("utf-8")
    if len(data) > MAX_CLOSE_REASON_BYTES:
        data = data[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return bytes((_CLOSE, 2 + len(data))) + code.to_bytes(2, "big") + data


def encode_pong(payload: bytes) -> bytes:
    """The Pong that answers a Ping carrying ``payload`` (at most 125 bytes, as the
    Ping's was)."""
    return bytes((_PONG, len(payload))) + payload
