"""Limits: the numbers the runtime enforces, as one validated value."""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["Limits"]

#: The close reason is carried in a control frame: 125 bytes minus the 2-byte code.
MAX_CLOSE_REASON_BYTES: Final = 123
#: ``set_hibernatable_websocket_event_timeout`` accepts at most a week, as workerd does.
MAX_EVENT_TIMEOUT_MS: Final = 604_800_000
#: A connection id a client gives (``?_pk=``) has at most this many characters (all ASCII).
#: A UUID has 36, partyserver's nanoid 21, ours 22.
MAX_CONNECTION_ID_LENGTH: Final = 128


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Limits.{attribute.name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"Limits.{attribute.name} must be at least 1, got {value}")


@attrs.frozen(kw_only=True)
class Limits:
    """The limits a host enforces. Defaults follow the seed document and workerd.

    Every error raised for a limit names the field, the limit and the offered value.
    """

    max_tags_per_websocket: int = attrs.field(default=10, validator=_positive)
    """Distinct tags one WebSocket may carry (workerd: 10)."""
    max_tag_bytes: int = attrs.field(default=256, validator=_positive)
    """UTF-8 bytes in one tag (workerd: 256, counted in bytes)."""
    max_attachment_bytes: int = attrs.field(default=2048, validator=_positive)
    """Encoded size of one attachment (seed: 2,048; workerd raised it to 16,384 in 2026)."""
    max_auto_response_bytes: int = attrs.field(default=2048, validator=_positive)
    """UTF-8 bytes of the auto-response request and of the response, each."""
    max_websockets_per_object: int = attrs.field(default=32_768, validator=_positive)
    """WebSockets accepted on one object at once, including ones still closing."""
    max_message_bytes: int = attrs.field(default=32 * 1024 * 1024, validator=_positive)
    """Largest inbound message (after reassembly). Bigger: Close 1009 and ``websocket_error``."""
    max_queued_messages_per_websocket: int = attrs.field(default=64, validator=_positive)
    """Inbound messages of one socket waiting for the object before the runtime stops
    reading that socket (backpressure to the peer; nothing is dropped)."""
    max_queued_bytes_per_websocket: int = attrs.field(default=1024 * 1024, validator=_positive)
    """Bytes of inbound messages of one socket waiting for the object before the runtime
    stops reading that socket (as ``max_queued_messages_per_websocket``; a message is
    always taken whole, so one message may go past it)."""
    max_send_buffer_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    """Outbound bytes piling up for one socket whose peer is not reading (on top of what
    the last write left). Past it the connection is dropped, the object gets
    ``websocket_error`` (1011) and a warning is logged."""
    max_buffered_bytes: int = attrs.field(default=256 * 1024 * 1024, validator=_positive)
    """Host-wide bytes held for clients: messages being received or queued for objects,
    request bodies, outbound buffers. The connection that would pass it is refused:
    its message gets Close 1013, its request 503, a slow reader is dropped."""
    max_request_body_bytes: int = attrs.field(default=1024 * 1024, validator=_positive)
    """Body of a plain HTTP request handed to ``fetch``. Bigger: 413."""
    max_storage_key_bytes: int = attrs.field(default=2048, validator=_positive)
    """UTF-8 bytes of one storage key (Durable Objects: 2 KiB)."""
    max_storage_value_bytes: int = attrs.field(default=128 * 1024, validator=_positive)
    """Encoded size of one storage value (Durable Objects KV: 128 KiB)."""
    max_storage_keys_per_call: int = attrs.field(default=128, validator=_positive)
    """Keys in one ``get``/``put``/``delete`` batch (Durable Objects: 128)."""
    max_sql_statement_bytes: int = attrs.field(default=100_000, validator=_positive)
    """UTF-8 bytes of the query given to one ``sql.exec``, all its statements together
    (Durable Objects: 100 KB; like workerd, which hands SQLite the rest of the query at
    each statement)."""
    max_sql_bound_parameters: int = attrs.field(default=100, validator=_positive)
    """Bindings given to one ``sql.exec``, and the highest parameter number (``?100``) a
    statement may use (Durable Objects: 100 bound parameters per query)."""
    max_sql_columns: int = attrs.field(default=100, validator=_positive)
    """Columns of a table, and of an index, a result row, a ``GROUP BY`` or ``ORDER BY``
    (SQLite's ``SQLITE_LIMIT_COLUMN``; Durable Objects: 100 columns per table). SQLite's
    own compile-time maximum (2,000) still applies above it."""
    max_sql_row_bytes: int = attrs.field(default=2_000_000, validator=_positive)
    """Bytes of one string or BLOB, bound or computed, and of one table row (SQLite's
    ``SQLITE_LIMIT_LENGTH``; Durable Objects: 2 MB)."""
