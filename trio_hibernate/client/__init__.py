"""A WebSocket client that stays connected, on trio-websocket (``docs/client.md``).

:func:`open_client` yields a :class:`ReconnectingWebSocket`: it reconnects when the
server says to come back (1001, 1012, 1013, a dropped connection, 503 at its connection
limit, a refused connect) with jittered exponential :class:`Backoff`, buffers what is
sent meanwhile, sends the same client id (``_pk``, the server's ``ws.id``) every time,
and gives up for good (:class:`ClientClosedError`) on answers that mean "do not retry"
(1008, the application's 4xxx, 403 and other 4xx). Its states and their changes:
:class:`ClientState`, :class:`ClientEvent`.

With ``reliable=True`` messages are ops the server acknowledges once durable
(:func:`deliver_once`, for object code), resent after a reconnect until acknowledged:
at-least-once delivery, exactly-once handling (within the ids the server remembers).
"""

from .._errors import ClientClosedError as ClientClosedError
from ._connection import (
    ClientEvent as ClientEvent,
    ClientState as ClientState,
    ReconnectingWebSocket as ReconnectingWebSocket,
    open_client as open_client,
)
from ._delivery import deliver_once as deliver_once
from ._policy import (
    RETRY_CLOSE_CODES as RETRY_CLOSE_CODES,
    RETRY_STATUSES as RETRY_STATUSES,
    Backoff as Backoff,
)

__all__ = [
    "RETRY_CLOSE_CODES",
    "RETRY_STATUSES",
    "Backoff",
    "ClientClosedError",
    "ClientEvent",
    "ClientState",
    "ReconnectingWebSocket",
    "deliver_once",
    "open_client",
]


def _fix_module_names() -> None:
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trio_hibernate."):
            obj.__module__ = "trio_hibernate.client"


_fix_module_names()
del _fix_module_names
