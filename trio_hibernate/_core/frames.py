"""Encoding server-to-client WebSocket data frames (RFC 6455 section 5.2).

Server frames are never masked, so a message's frame is the same bytes for every socket:
a broadcast encodes once. Receiving, control frames and the close handshake go through
``wsproto``; only whole data messages are encoded here, uncompressed
(:func:`encode_message`) or compressed with permessage-deflate (:func:`deflate_message`,
RFC 7692: the RSV1 bit set).
"""

from __future__ import annotations

import struct
import zlib
from typing import Final, Protocol

__all__ = ["Compressor", "deflate_message", "encode_message"]


class Compressor(Protocol):
    """What :func:`deflate_message` uses of a ``zlib.compressobj`` (raw deflate)."""

    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self, mode: int = ..., /) -> bytes: ...


_TEXT: Final = 0x81  # FIN + opcode 1
_BINARY: Final = 0x82  # FIN + opcode 2
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
