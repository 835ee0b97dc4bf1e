"""Namespaces and stubs: how application code and objects reach an object."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from functools import partial
from typing import Any, Final, Protocol, TypeVar, final

import outcome
import trio

from ._core.codec import decode_data
from ._core.events import CallChain, CallEvent, Event, FetchEvent, Waiting
from ._errors import ReentrantCallError
from ._http import Request, Response
from ._ids import ObjectId
from ._oneshot import OneShot

T = TypeVar("T")

__all__ = ["Deliverer", "Mailbox", "Namespace", "ObjectStub", "waiting_turns"]


class Mailbox(Protocol):
    """Where a stub's events for one object go."""

    def deliver(self, event: Event) -> None:
        """Queue ``event`` for the object, waking it if it is hibernated."""


class Deliverer(Protocol):
    """What stubs need from the runtime."""

    @property
    def call_timeout(self) -> float:
        """Seconds a call waits for its answer."""
        ...

    def entry_for(self, namespace: str, object_id: ObjectId) -> Mailbox:
        """The mailbox of an object. Raises LookupError for a namespace that is gone."""
        ...

    def encode_call(self, value: object) -> bytes:
        """A call's argument or result as data (checked against the size limit)."""
        ...


#: Methods a stub may not call: the runtime's handlers and the constructor.
RESERVED_METHODS: Final = frozenset(
    {"fetch", "alarm", "websocket_message", "websocket_close", "websocket_error"}
)

#: The objects whose turns wait for the current task, outermost first. The supervisor
#: sets it for its task (the object itself, plus the chain of the call or fetch a turn
#: runs) and for a background transaction; a ``ctx.start_soon`` task starts with it
#: empty, since no turn waits for it. Tasks a turn starts in a nursery of its own inherit
#: it: the turn waits for them.
waiting_turns: Final[ContextVar[CallChain]] = ContextVar("trio_hibernate_waiting_turns", default=())


def _label(namespace: str, object_id: ObjectId) -> str:
    return f"{namespace}/{object_id.name or object_id.hex}"


def _check_reentry(namespace: str, object_id: ObjectId, what: str, waiting: Waiting) -> CallChain:
    """The chain the new call carries (this task's turns now wait through ``waiting``);
    raises if its target is among the turns still waiting for this task."""
    waiters = [(ns, oid) for ns, oid, how in waiting_turns.get() if how is None or how.active]
    if (namespace, object_id) in waiters:
        target = _label(namespace, object_id)
        path = " -> ".join(_label(ns, oid) for ns, oid in (*waiters, (namespace, object_id)))
        raise ReentrantCallError(
            f"re-entrant stub call refused: {what} of {target} would wait for a turn of "
            f"{target} that is itself waiting for this call ({path}); objects run one "
            "turn at a time, so it would deadlock. Make the call from a ctx.start_soon "
            "task instead: it then queues behind the current turn",
            chain=(*waiters, (namespace, object_id)),
        )
    return tuple((ns, oid, waiting if how is None else how) for ns, oid, how in waiting_turns.get())


@final
class Namespace:
    """The objects of one class in an app: make ids, get stubs.

    Get one with :meth:`Host.get_namespace` (application code) or
    :meth:`ObjectContext.get_namespace` (from inside an object).
    """

    __slots__ = ("_host", "name")

    def __init__(self, host: Deliverer, name: str) -> None:
        # Made by Host.namespace(), which checks the name.
        self._host = host
        self.name = name
        """The namespace name."""

    def id_from_name(self, name: str) -> ObjectId:
        """The id of the object called ``name`` (the same every time)."""
        return ObjectId.from_name(self.name, name)

    def new_unique_id(self) -> ObjectId:
        """A fresh random id, for an object no name will ever reach."""
        return ObjectId.unique()

    def id_from_string(self, hex_id: str) -> ObjectId:
        """Rebuild an id from ``str(id)``. Raises ValueError if it is not one."""
        return ObjectId(hex_id)

    def get(self, object_id: ObjectId) -> ObjectStub:
        """A stub for the object ``object_id`` (nothing wakes until it is used)."""
        if not isinstance(object_id, ObjectId):
            raise TypeError(f"expected an ObjectId, got {object_id!r}")
        return ObjectStub(self._host, self.name, object_id)

    def get_by_name(self, name: str) -> ObjectStub:
        """``get(id_from_name(name))``."""
        return self.get(self.id_from_name(name))


@final
class ObjectStub:
    """Calls into one object. Every call is an event for that object, queued in turn
    with its socket events, and wakes it if it hibernated.

    ``await stub.call("method", *args)`` (or ``await stub.method(*args)``) runs a public
    method of the object and returns its result; ``await stub.fetch(...)`` runs its
    ``fetch``, WebSocket upgrades included. Arguments and results are copied as data,
    as between separate objects.

    Calls are not re-entrant: an object runs one turn at a time, so a turn that calls
    its own object, directly or through others (A -> B -> A), could never be answered.
    Such a call raises :class:`~trio_hibernate.ReentrantCallError` at once in the caller
    instead of deadlocking. Calls from a ``ctx.start_soon`` task are not part of a turn:
    they queue behind the current one, even to the task's own object.

    A call waits at most the host's ``call_timeout`` (see
    :func:`~trio_hibernate.open_host`), then raises ``trio.TooSlowError``. Neither the
    timeout nor the caller being cancelled withdraws a call already queued: the object
    still runs it in its turn, and the result is dropped.
    """

    __slots__ = ("_host", "id", "namespace")

    def __init__(self, host: Deliverer, namespace: str, object_id: ObjectId) -> None:
        self._host = host
        self.namespace = namespace
        """The namespace of the object."""
        self.id = object_id
        """The object's id."""

    def __repr__(self) -> str:
        return f"<ObjectStub {self.namespace}/{self.id.name or self.id.hex}>"

    async def call(self, method: str, /, *args: object, **kwargs: object) -> Any:
        """Run ``await object.method(*args, **kwargs)`` in the object's next turn.

        Raises:
            AttributeError: the object has no such public method.
            ReentrantCallError: the object's turn is waiting for this call (see above).
            trio.TooSlowError: no answer within the host's ``call_timeout``.
            DataCloneError: an argument or the result is not data.
            RuntimeError: the host is shutting down (the call was not run, or was
                cancelled while it ran).
            Exception: whatever the method raised.
        """
        name: object = method
        if not isinstance(name, str) or name.startswith("_") or name in RESERVED_METHODS:
            raise AttributeError(f"{method!r} is not a public method a stub can call")
        waiting = Waiting()
        chain = _check_reentry(self.namespace, self.id, f"{method}()", waiting)
        host = self._host
        copied_args = decode_data(host.encode_call(args))
        copied_kwargs = decode_data(host.encode_call(kwargs))
        assert isinstance(copied_args, list)
        assert isinstance(copied_kwargs, dict)
        answer: OneShot[object] = OneShot()
        entry = host.entry_for(self.namespace, self.id)
        entry.deliver(CallEvent(method, tuple(copied_args), copied_kwargs, answer.reply, chain))
        return (await self._answer(answer, f"{method}()", waiting)).unwrap()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        return partial(self.call, name)

    async def fetch(
        self,
        request: Request | str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes | str = b"",
    ) -> Response:
        """Send an HTTP request (a :class:`Request`, or a URL path) to the object's fetch.

        A WebSocket upgrade goes through too: forward the upgrade request (or a copy
        made with ``request.with_context(...)`` or ``with_headers``) from ``App.fetch``
        or from another object's ``fetch``, and return the 101 it answers. The object
        that accepts the socket owns it (its tags, attachment, hibernation and close
        events), whichever object or hook the request passed through first. While the
        host shuts down the answer is a 503.

        Raises:
            ReentrantCallError: the object's turn is waiting for this call.
            trio.TooSlowError: no answer within the host's ``call_timeout``.
        """
        waiting = Waiting()
        chain = _check_reentry(self.namespace, self.id, "fetch()", waiting)
        if isinstance(request, str):
            request = Request(method=method, url=request, headers=headers, body=body)
        answer: OneShot[Response] = OneShot()
        entry = self._host.entry_for(self.namespace, self.id)
        entry.deliver(FetchEvent(request, answer.reply, chain))
        return (await self._answer(answer, "fetch()", waiting)).unwrap()

    async def _answer(self, answer: OneShot[T], what: str, waiting: Waiting) -> outcome.Outcome[T]:
        """Wait for ``answer`` at most the host's ``call_timeout``; from then on (answered,
        timed out or cancelled) the caller's turns no longer wait for the call."""
        timeout = self._host.call_timeout
        result: outcome.Outcome[T] | None = None
        try:
            with trio.move_on_after(timeout):
                result = await answer.wait()
        finally:
            waiting.active = False
        if result is None:
            raise trio.TooSlowError(
                f"{what} of {_label(self.namespace, self.id)} got no answer within "
                f"call_timeout={timeout:g} s; it stays queued and will still run"
            )
        return result
