"""WebSocket compression (permessage-deflate, RFC 7692) settings, as one validated value."""

from __future__ import annotations

import attrs

__all__ = ["WebSocketCompression"]


def _window_bits(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"WebSocketCompression.window_bits must be an int, not {value!r}")
    if not 9 <= value <= 15:
        raise ValueError(f"WebSocketCompression.window_bits must be 9 to 15, got {value}")


def _size(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"WebSocketCompression.{attribute.name} must be an int, not {value!r}")
    if value < 0:
        raise ValueError(f"WebSocketCompression.{attribute.name} cannot be negative, got {value}")


def _boolean(instance: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"WebSocketCompression.{attribute.name} must be a bool, not {value!r}")


@attrs.frozen(kw_only=True)
class WebSocketCompression:
    """How a host compresses WebSocket messages: ``open_host(...,
    websocket_compression=WebSocketCompression())`` (off without it).

    A client that offers ``permessage-deflate`` (every browser does) gets it; an object
    can still refuse it for one socket by answering the upgrade with the header
    ``Sec-WebSocket-Extensions: ""`` (as on Cloudflare). Inbound messages are inflated
    within ``Limits.max_message_bytes`` and the host's memory budget (a decompression
    bomb gets Close 1009, or 1013 when the budget is the limit that is hit).

    Without context takeover (the default) both sides compress every message on its own:
    a socket keeps no compression state between messages, so an idle (hibernated)
    socket costs about 130 bytes more than without compression, and a broadcast
    compresses its message once for every socket. With context takeover each socket
    keeps its compressor and decompressor (and a client its own), so messages that
    resemble earlier ones shrink far more, at about 300 KB per socket at 15-bit windows
    (about 50 KB with ``window_bits=12``; ``docs/operations.md`` has the measurements).
    """

    context_takeover: bool = attrs.field(default=False, validator=_boolean)
    """Keep each socket's compression context between messages (better ratio, memory
    per socket); negotiated with ``server_no_context_takeover`` and
    ``client_no_context_takeover`` when False."""
    window_bits: int = attrs.field(default=15, validator=_window_bits)
    """The largest LZ77 window (2**bits bytes) the server compresses with, and asks a
    client that offers ``client_max_window_bits`` to compress with: 9 to 15. Smaller
    saves memory (mostly with context takeover) and compresses less."""
    min_message_bytes: int = attrs.field(default=128, validator=_size)
    """Messages shorter than this (characters of a ``str``, bytes otherwise) are sent
    uncompressed: deflate gains little on them and costs a few microseconds."""
