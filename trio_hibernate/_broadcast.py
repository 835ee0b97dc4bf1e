"""One message to many sockets of an object: what ``ctx.broadcast`` does.

The loop users write first (``for ws in ctx.get_websockets(): ws.send(m)``) breaks on
the first socket the object has closed (``send()`` after ``close()`` raises, spec 7) and
the rest miss the message. Here, the sockets that cannot take a message are skipped:

* only ``OPEN`` sockets are sent to: not one the object closed (``CLOSING``), nor one
  whose end is decided (the peer's Close, a drop) but whose handler has not run yet;
* the message is converted once, and the same ``str``/``bytes`` object goes to every
  connection, which encode it into the same frame (the runtime keeps the last frame it
  encoded, so a broadcast encodes once);
* a send that raises (a bug of ours in one connection) is logged and skipped: the other
  sockets still get the message;
* under the output gate (a storage write in this turn), the whole broadcast is held as
  one action and runs when the write is durable, or is dropped if it fails, exactly
  where the same ``send`` calls would have been held.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Final

from ._containment import Containment, object_label, object_log
from ._core.sockets import SocketRecord, SocketState
from ._websocket import WebSocket, check_text, record_of

if TYPE_CHECKING:
    from ._core.gate import OutputGate
    from ._core.sockets import SocketRegistry
    from ._ids import ObjectId

__all__ = ["broadcast"]

_OPEN: Final = SocketState.OPEN


def _data(message: object) -> str | bytes:
    """``message`` as ``str`` or ``bytes``, checked to be sendable."""
    if isinstance(message, str):
        check_text(message)  # now, not in every connection (nor when the gate opens)
        return message
    if isinstance(message, bytes):
        return message
    if isinstance(message, bytearray | memoryview):
        return bytes(message)
    raise TypeError(f"broadcast() takes str or bytes, not {type(message).__name__}")


def _excluded(
    registry: SocketRegistry, exclude: WebSocket | str | Iterable[WebSocket | str]
) -> set[SocketRecord]:
    items: Iterable[object] = (exclude,) if isinstance(exclude, WebSocket | str) else exclude
    records: set[SocketRecord] = set()
    for item in items:
        if isinstance(item, WebSocket):
            record = record_of(item)
        elif isinstance(item, str):
            record = registry.by_id(item)
        else:
            raise TypeError(
                f"exclude takes WebSockets and connection ids (str), not {type(item).__name__}"
            )
        if record is not None:
            records.add(record)
    return records


def _send_all(records: list[SocketRecord], data: str | bytes, contained: Containment) -> int:
    sent = 0
    for record in records:
        with contained:
            record.transport.send_message(data)
            sent += 1
    return sent


def _send_held(records: list[SocketRecord], data: str | bytes, contained: Containment) -> None:
    _send_all(records, data, contained)  # the gate opened: nobody is there to count


def broadcast(
    registry: SocketRegistry,
    gate: OutputGate | None,
    message: object,
    tag: str | None,
    exclude: WebSocket | str | Iterable[WebSocket | str],
    where: tuple[str, ObjectId],
) -> int:
    """Send ``message`` to the ``OPEN`` sockets of ``registry`` (those with ``tag``, if
    given) but ``exclude``; returns how many it was sent to, or held for (see the module).

    ``where`` (namespace, object id) names the object in the log line of a failed send.

    Raises:
        TypeError: ``message`` is not ``str`` or bytes-like, ``tag`` is not a ``str``, or
            ``exclude`` holds something other than WebSockets and ``str`` ids.
        UnicodeEncodeError: ``message`` holds a lone surrogate (no UTF-8 for it).
    """
    data = _data(message)
    if tag is not None and not isinstance(tag, str):
        raise TypeError(f"a tag is a str, not {type(tag).__name__}")
    skip = _excluded(registry, exclude) if exclude else None
    records = [
        record
        for record in registry.sockets(tag)
        if record.state is _OPEN and (skip is None or record not in skip)
    ]
    if not records:
        return 0
    contained = Containment(
        object_log(*where),
        "broadcast() of %s: a send failed; the socket is skipped, the others get the message",
        object_label(*where),
    )
    if gate is not None and gate.closed:
        gate.hold(partial(_send_held, records, data, contained))
        return len(records)
    return _send_all(records, data, contained)
