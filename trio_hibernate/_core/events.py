"""Events queued for an object. Plain data; the supervisor dispatches them in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

import outcome

from .._ids import ObjectId

if TYPE_CHECKING:
    from .._http import Request, Response
    from .sockets import SocketRecord

__all__ = [
    "AlarmEvent",
    "CallChain",
    "CallEvent",
    "CloseEvent",
    "ErrorEvent",
    "Event",
    "FetchEvent",
    "MessageEvent",
    "Reply",
    "Waiting",
]

T = TypeVar("T")


class Reply(Generic[T]):
    """The one answer to a :class:`FetchEvent` or :class:`CallEvent`.

    Settled exactly once, with a value (:meth:`send`) or an exception (:meth:`fail`);
    the outcome goes to ``deliver``, which the asking side provides (it usually wakes a
    waiting task). A second answer is a bug of ours and raises ``RuntimeError``.
    """

    __slots__ = ("_deliver", "settled")

    def __init__(self, deliver: Callable[[outcome.Outcome[T]], None]) -> None:
        # Dropped once answered: ``deliver`` is usually a method of the object that holds
        # this reply, a cycle the collector would otherwise have to find.
        self._deliver: Callable[[outcome.Outcome[T]], None] | None = deliver
        #: True once answered.
        self.settled = False

    def send(self, value: T) -> None:
        """Answer with ``value``."""
        self.settle(outcome.Value(value))

    def fail(self, error: BaseException) -> None:
        """Answer with ``error`` (the asking side raises it)."""
        self.settle(outcome.Error(error))

    def settle(self, result: outcome.Outcome[T]) -> None:
        """Answer with ``result``."""
        deliver = self._deliver
        if deliver is None:
            raise RuntimeError("an event was answered twice; please report")
        self._deliver = None
        self.settled = True
        deliver(result)


class Waiting:
    """Whether a stub call's caller still waits for its answer (cleared when it stops
    waiting: answered, timed out or cancelled)."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = True


#: The objects whose turns wait for a call, outermost first (see ``ReentrantCallError``):
#: (namespace, id, how it waits). ``None``: the current task's own turn, which waits as
#: long as it runs; a :class:`Waiting`: a caller that may give up (``call_timeout``).
CallChain = tuple[tuple[str, ObjectId, Waiting | None], ...]


class MessageEvent:
    """A whole text (``str``) or binary (``bytes``) message from a socket.

    ``size`` is its length in bytes (UTF-8 for text), counted in the socket's queue and
    in the host's memory budget until the event is taken off the mailbox.
    """

    __slots__ = ("data", "record", "size")

    def __init__(self, record: SocketRecord, data: str | bytes, size: int) -> None:
        self.record = record
        self.data = data
        self.size = size


class CloseEvent:
    """The socket's terminal close: the peer's code and reason, or 1006 on a drop."""

    __slots__ = ("code", "reason", "record", "was_clean")

    def __init__(self, record: SocketRecord, code: int, reason: str, was_clean: bool) -> None:
        self.record = record
        self.code = code
        self.reason = reason
        self.was_clean = was_clean


class ErrorEvent:
    """The socket's terminal error (protocol violation, oversize message, slow peer)."""

    __slots__ = ("error", "record")

    def __init__(self, record: SocketRecord, error: Exception) -> None:
        self.record = record
        self.error = error


class FetchEvent:
    """An HTTP request (maybe a WebSocket upgrade) for the object's ``fetch`` handler.

    ``reply`` is answered exactly once, with the response.
    ``chain``: the objects whose turns wait for it (empty unless it came from a stub).
    """

    __slots__ = ("chain", "reply", "request")

    def __init__(self, request: Request, reply: Reply[Response], chain: CallChain = ()) -> None:
        self.request = request
        self.reply = reply
        self.chain = chain


class AlarmEvent:
    """The object's alarm came due (``scheduled`` epoch seconds; ``retry_count``)."""

    __slots__ = ("on_done", "retry_count", "scheduled")

    def __init__(
        self, scheduled: float, retry_count: int, on_done: Callable[[], None] | None = None
    ) -> None:
        self.scheduled = scheduled
        self.retry_count = retry_count
        #: Called when the alarm's turn is over (test helpers wait on it).
        self.on_done = on_done


class CallEvent:
    """A stub called one of the object's public async methods.

    ``reply`` is answered exactly once, with the result or the exception to raise.
    ``chain``: the objects whose turns wait for it (empty from outside any turn).
    """

    __slots__ = ("args", "chain", "kwargs", "method", "reply")

    def __init__(
        self,
        method: str,
        args: tuple[object, ...],
        kwargs: dict[str, object],
        reply: Reply[object],
        chain: CallChain = (),
    ) -> None:
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.reply = reply
        self.chain = chain


Event = MessageEvent | CloseEvent | ErrorEvent | FetchEvent | AlarmEvent | CallEvent
