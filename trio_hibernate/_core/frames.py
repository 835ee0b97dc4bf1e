"""Encoding server-to-client WebSocket data frames (RFC 6455 section 5.2).

Server frames are never masked, so a message's frame is the same bytes for every socket:
a broadcast encodes once. Receiving, control frames and the close handshake go through
``wsproto``; only whole data messages are encoded here (no extensions are negotiated).
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["encode_message"]

_TEXT: Final = 0x81  # FIN + opcode 1
_BINARY: Final = 0x82  # FIN + opcode 2
_PACK_16: Final = struct.Struct("!BBH").pack
_PACK_64: Final = struct.Struct("!BBQ").pack


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
