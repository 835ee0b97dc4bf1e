"""What the connection layer needs from the runtime that runs it, as Protocols.

This is the only way ``_net`` knows the runtime: the runtime meets these structurally,
with public methods. Nothing here blocks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

    from .._app import App
    from .._core.budget import MemoryBudget
    from .._core.deflate import Compression
    from .._core.events import Event, MessageEvent
    from .._core.lifecycle import ObjectCore
    from .._http import Request, Response
    from .._ids import ObjectId
    from .._limits import Limits
    from .._statistics import Counters
    from .._stubs import Namespace

__all__ = [
    "Connection",
    "ConnectionOwner",
    "InlineTurns",
    "ListenerOwner",
    "ObjectLink",
    "ObjectTable",
]


class Connection(Protocol):
    """A connection, as the runtime that owns it sees it."""

    def begin_shutdown(self, code: int, reason: str) -> None:
        """Host shutdown: close with ``code`` and run no handler."""


class InlineTurns(Protocol):
    """Runs a message's turn in the connection's own task (see ``_activation.py``)."""

    def adopt(self, scope: trio.CancelScope) -> None:
        """The connection reads in ``scope`` while it runs this object's turns: the
        object cancels it when it is reset, shut down, or hibernates."""

    def disown(self, scope: trio.CancelScope) -> None:
        """The connection left ``scope``."""

    async def run_inline(self, event: MessageEvent) -> None:
        """Run the turn now, in a scope given to :meth:`adopt`."""


class ObjectLink(Protocol):
    """An object, as a connection sees it: the one a request was routed to, or the one
    that accepted its WebSocket."""

    namespace: str
    object_id: ObjectId
    """With ``namespace``, names the object in log lines (``_containment.object_label``)."""

    def inline_turns(self) -> InlineTurns | None:
        """What runs a message's turn in the connection's task, when the object can take
        one now (live, idle, nothing queued); None: deliver it instead."""
        ...

    @property
    def core(self) -> ObjectCore:
        """The object's sans-IO core (its sockets, auto-response, mailbox)."""
        ...

    def deliver(self, event: Event) -> None:
        """Queue ``event`` for the object, waking it if it is hibernated."""

    def forget_if_unused(self) -> None:
        """Drop the object from memory if it has nothing left to do."""


class ObjectTable(Protocol):
    """The objects a runtime knows, by namespace and id."""

    def get(self, namespace: str, object_id: ObjectId) -> ObjectLink | None:
        """The object, or None if the runtime does not know it (it has no socket then)."""
        ...


class ConnectionOwner(Protocol):
    """What a connection needs from the runtime that runs it."""

    @property
    def app(self) -> App: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def counters(self) -> Counters: ...
    @property
    def buffers(self) -> MemoryBudget: ...
    @property
    def handshake_timeout(self) -> float: ...
    @property
    def request_timeout(self) -> float: ...
    @property
    def partial_message_timeout(self) -> float: ...
    @property
    def close_timeout(self) -> float: ...
    @property
    def wall_clock(self) -> Callable[[], float]: ...
    @property
    def allowed_origins(self) -> frozenset[str] | None:
        """Origins whose pages may open WebSockets (None: the same origin only)."""
        ...

    @property
    def frame_encoder(self) -> Callable[[str | bytes], bytes]:
        """The function giving the WebSocket frame of a data message: one object for
        the host, which every transport refers to (no bound method per socket)."""
        ...

    @property
    def compression(self) -> Compression | None:
        """permessage-deflate for the host's WebSockets (None: off)."""
        ...

    @property
    def env(self) -> Any:
        """The app's ``env`` (for the hooks' ``AppContext``)."""
        ...

    @property
    def objects(self) -> ObjectTable:
        """The objects the runtime knows (to find the one that accepted a socket)."""
        ...

    def get_namespace(self, name: str) -> Namespace:
        """The namespace ``name`` (for the hooks' ``AppContext``). KeyError if unknown."""
        ...

    def operations(self, request: Request) -> Response:
        """The answer for the server's own paths (``/_health``, ``/_metrics``)."""
        ...

    @property
    def relay_key(self) -> str | None:
        """The key peer hosts relay with (cluster mode; see ``relayed.py``). None: the
        relay paths answer 404."""
        ...

    def deliver_relayed(self, namespace: str, object_id: ObjectId, event: Event) -> None:
        """Queue an event a peer host relayed for a local object (no app hook runs).

        Raises:
            LookupError: the namespace is not in the app.
        """

    def route(self, path: str) -> ObjectLink | Response | None:
        """The object ``path`` names, a refusal, or None when no namespace matches."""
        ...

    def spawn(self, async_fn: Callable[[], Awaitable[Any]]) -> None:
        """Run a helper task of the connection (a flusher, a watchdog)."""

    def connection_ended(self, conn: Connection) -> None:
        """The connection has ended (it closes its byte channel right after)."""


class ListenerOwner(Protocol):
    """What the accept loop asks the runtime it feeds clients to."""

    @property
    def connection_count(self) -> int:
        """Open client connections."""
        ...

    @property
    def counters(self) -> Counters:
        """Where clients refused past the connection limit are counted."""
        ...

    def operations(self, request: Request) -> Response:
        """The answer for the server's own paths (``/_health``, ``/_metrics``)."""
        ...
