"""The base class of application objects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._http import Response

if TYPE_CHECKING:
    from ._context import ObjectContext
    from ._http import Request
    from ._storage.alarms import AlarmInfo
    from ._websocket import WebSocket

__all__ = ["DurableObject"]


class DurableObject:
    """Subclass this and register the class in an :class:`App` under a namespace.

    The constructor runs on every wake, so keep it cheap and rebuild in-memory state from
    ``ctx.get_websockets()`` and attachments. Handlers run one at a time per object, in
    arrival order (an actor turn): a handler finishes before the next event starts, even
    across ``await``. This differs from workerd, where async handlers may interleave.
    A handler that raises is logged with the object id; the socket stays open.
    """

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        self.ctx = ctx
        """This object's context (sockets, tags, auto-response, event timeout)."""
        self.env = env
        """The app's bindings, as given to :class:`App`."""

    async def fetch(self, request: Request) -> Response:
        """Handle an HTTP request or WebSocket upgrade. Default: 501."""
        return Response(
            status=501, body=f"{type(self).__name__} does not handle requests (no fetch())"
        )

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        """A whole message arrived: ``str`` for text frames, ``bytes`` for binary."""

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        """The socket closed: the peer's code (1005 if none; 1006 on a drop)."""

    async def websocket_error(self, ws: WebSocket, error: Exception) -> None:
        """The socket failed (protocol error, oversize message, slow peer). Terminal."""

    async def alarm(self, info: AlarmInfo) -> None:
        """The alarm set with ``ctx.storage.set_alarm`` came due.

        If this raises, it is retried with exponential backoff (2 s, 4 s, ... up to 6
        retries, ``info.retry_count`` counting them); when it returns, the alarm is
        deleted unless the handler set a new one.
        """
