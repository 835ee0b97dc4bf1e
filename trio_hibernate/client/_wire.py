"""The wire format of at-least-once delivery: ops and their acknowledgements.

Both are text messages holding one JSON object (``docs/client.md``):

- an op, client to server: ``{"_op": "<op id>", "data": "<the message>"}``;
- its acknowledgement, server to client: ``{"_ack": "<op id>"}``.

An op id is 1 to :data:`MAX_OP_ID_LENGTH` characters of ``A-Z a-z 0-9 - _``; the client
makes a random one per op. Any other message is an application message, passed on as
it is.
"""

from __future__ import annotations

import json
import re
from typing import Final

__all__ = ["MAX_OP_ID_LENGTH", "decode_ack", "decode_op", "encode_ack", "encode_op"]

#: The longest op id a server accepts.
MAX_OP_ID_LENGTH: Final = 64
_OP_ID: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_OP_ID_LENGTH}}}")
_OP_KEYS: Final = frozenset({"_op", "data"})


def encode_op(op_id: str, data: str) -> str:
    """The text message that carries ``data`` as the op ``op_id``."""
    return json.dumps({"_op": op_id, "data": data}, ensure_ascii=False, separators=(",", ":"))


def encode_ack(op_id: str) -> str:
    """The text message that acknowledges the op ``op_id``."""
    return json.dumps({"_ack": op_id}, separators=(",", ":"))


def _object_of(message: str | bytes, first_key: str) -> dict[str, object] | None:
    # A cheap test first: most application messages are not JSON objects of ours.
    if not isinstance(message, str) or not message.startswith('{"' + first_key + '"'):
        return None
    try:
        value = json.loads(message)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def decode_op(message: str | bytes) -> tuple[str, str] | None:
    """``(op id, data)`` if ``message`` is an op, else None (an application message)."""
    value = _object_of(message, "_op")
    if value is None or value.keys() != _OP_KEYS:
        return None
    op_id, data = value["_op"], value["data"]
    if not isinstance(op_id, str) or _OP_ID.fullmatch(op_id) is None or not isinstance(data, str):
        return None
    return op_id, data


def decode_ack(message: str | bytes) -> str | None:
    """The op id ``message`` acknowledges, or None if it is not an acknowledgement."""
    value = _object_of(message, "_ack")
    if value is None or value.keys() != {"_ack"}:
        return None
    op_id = value["_ack"]
    return op_id if isinstance(op_id, str) and _OP_ID.fullmatch(op_id) else None
