"""The server's half of at-least-once delivery: handle each op once, acknowledge it
once it is durable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .._core.sockets import ReadyState
from ._wire import decode_op, encode_ack

if TYPE_CHECKING:
    from .._storage.api import Storage
    from .._websocket import WebSocket

__all__ = ["DEFAULT_KEEP_OPS", "deliver_once"]

#: How many op ids :func:`deliver_once` remembers per object by default.
DEFAULT_KEEP_OPS: Final = 1024

_PREFIX: Final = "trio_hibernate.ops"


async def deliver_once(
    storage: Storage,
    ws: WebSocket,
    message: str | bytes,
    *,
    keep: int = DEFAULT_KEEP_OPS,
) -> str | bytes | None:
    """What to handle of ``message`` (from ``websocket_message``), or None: handle nothing.

    Call it first thing in ``websocket_message``::

        async def websocket_message(self, ws, message):
            message = await deliver_once(self.ctx.storage, ws, message)
            if message is None:
                return  # an op this object has handled already
            ...  # handle it; write storage as usual

    - An **op** (a client of :func:`open_client` with ``reliable=True`` sent it; the wire
      format is in ``docs/client.md``) seen for the first time: its id is written to
      ``storage`` and its acknowledgement sent with ``ws.send``; the op's text is
      returned. Both belong to this turn: the output gate holds the acknowledgement until
      the turn's writes (the id and whatever the handler writes) are durable, and drops
      it if they fail, so an acknowledged op is a committed op. A handler that raises
      after this call still commits its turn (and so acknowledges the op).
    - An op whose id is among the last ``keep`` seen by this object (a resend after a
      reconnect: its acknowledgement was lost): acknowledged again, None returned.
    - An op that arrives on a socket no longer open (the object closed it earlier):
      None, nothing recorded; no ack could be sent, so the client sends it again on
      its next connection, where it is handled.
    - Any other message (a plain client, the browser): returned as it is, no ack.

    The ids live in the object's storage under keys starting with
    ``"trio_hibernate.ops"`` (``2 * keep + 1`` keys at most), so they survive hibernation
    and restarts. An op resent after ``keep`` newer ones is handled again.

    Raises:
        ValueError: ``keep`` is less than 1.

    Whatever ``storage.get`` and ``storage.put`` raise propagates.
    """
    if keep < 1:
        raise ValueError(f"deliver_once keeps at least 1 op id, got keep={keep}")
    op = decode_op(message)
    if op is None:
        return message
    op_id, data = op
    if ws.ready_state is not ReadyState.OPEN:
        return None  # closing: no ack can go out, so the client sends it again later
    seen_key = f"{_PREFIX}:id:{op_id}"
    if await storage.get(seen_key) is not None:
        ws.send(encode_ack(op_id))
        return None
    last = await storage.get(f"{_PREFIX}:count")
    count = (last if isinstance(last, int) else 0) + 1
    order_key = f"{_PREFIX}:n:{count:020d}"
    await storage.put({f"{_PREFIX}:count": count, seen_key: count, order_key: op_id})
    if count > keep:  # forget the oldest one: the keys stay bounded
        old_key = f"{_PREFIX}:n:{count - keep:020d}"
        old_id = await storage.get(old_key)
        forget = [old_key]
        if isinstance(old_id, str):
            forget.append(f"{_PREFIX}:id:{old_id}")
        await storage.delete(forget)
    ws.send(encode_ack(op_id))
    return data
