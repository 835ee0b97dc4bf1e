"""The per-object supervisor: one activation of an object, from constructor to eviction.

An activation is a task in the host's object nursery. It opens the object's own nursery
(for ``ctx.start_soon`` tasks) inside a cancel scope the host can cancel, builds the
instance, and runs the object's events one turn at a time. When the object has been idle
for ``idle_timeout`` seconds (or a hook asks), it returns: the instance, its context and
its socket handles are dropped, while the sockets' connection tasks, which live in the
host nursery, keep running. This module is the only place that contains an exception
raised by application code.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from ._context import ObjectContext
from ._core.codec import decode_data
from ._core.events import (
    AlarmEvent,
    CallEvent,
    CloseEvent,
    ErrorEvent,
    Event,
    FetchEvent,
    MessageEvent,
)
from ._core.gate import OutputGate
from ._errors import LimitExceededError, StorageCommitError
from ._http import Request, Response
from ._storage.alarms import AlarmInfo
from ._storage.api import Storage
from ._stubs import waiting_turns

if TYPE_CHECKING:
    from ._host import Host, ObjectEntry
    from ._object import DurableObject

__all__ = ["Activation", "run_app_hook", "supervise"]

log = logging.getLogger("trio_hibernate.object")

_TURNS_PER_CHECKPOINT: Final = 16


def _olog(entry: ObjectEntry) -> logging.LoggerAdapter[logging.Logger]:
    """The object logger, with ``namespace`` and ``object_id`` on every record."""
    return logging.LoggerAdapter(
        log, {"namespace": entry.namespace, "object_id": entry.object_id.hex}
    )


_LOST_TEXT = "the storage commit of this turn failed; its writes were rolled back"
_LOST = Response(status=500, body=f"Internal Server Error: {_LOST_TEXT}\n")


class Activation:
    """The live part of an object: its scope, wake-up lot, gate, storage, bookkeeping."""

    __slots__ = (
        "background",
        "gate",
        "idle",
        "lot",
        "owner",
        "scope",
        "stop_requested",
        "stopped",
        "storage",
        "turn_lock",
    )

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.lot = trio.lowlevel.ParkingLot()
        self.gate = OutputGate()
        self.storage: Storage | None = None
        self.turn_lock = trio.Lock()  # a turn and its commit, or an outside-turn commit
        self.background = 0  # ctx.start_soon tasks still running
        self.idle = False  # parked, waiting for an event
        #: The task whose writes belong to the current turn (the supervisor during a
        #: handler, or a start_soon task inside a transaction); others commit at once.
        self.owner: trio.lowlevel.Task | None = None
        self.stop_requested = False  # hibernate after the current turn
        self.stopped = trio.Event()

    def request_stop(self) -> None:
        """Hibernate as soon as the current turn (if any) is over.

        Graceful: nothing is cancelled (a cancellation could interrupt a turn or its
        commit); an idle supervisor is woken up to notice.
        """
        self.stop_requested = True
        self.lot.unpark_all()


async def supervise(host: Host, entry: ObjectEntry) -> None:
    """Run activations of ``entry`` until it has nothing left to do.

    Once the host is closing no instance is constructed: the queued events are answered
    instead (a fetch 503, a call an error, an alarm its ``on_done``), so that no caller
    waits for an event shutdown cancelled.
    """
    core = entry.core
    while True:
        if host._closing or entry.namespace not in host.app.objects:
            # STARTING -> STOPPING -> HIBERNATED with the mailbox handed back: the
            # lifecycle's path for an instance that cannot be constructed. (A namespace
            # a live code update removed has its sockets closed already.)
            for event in core.on_failed():
                host._refuse_unrun_event(entry, event)
            core.on_stopped()
            host._forget_if_unused(entry)
            return
        activation = Activation()
        entry.activation = activation
        # This task's own context (copied from whoever woke the object): its turns
        # wait for what they call.
        waiting_turns.set(((entry.namespace, entry.object_id, None),))
        started_at = trio.current_time()
        try:
            with activation.scope:
                await _activate(host, entry, activation)
        finally:
            entry.activation = None
            host.counters.seconds_in_memory += trio.current_time() - started_at
            _release_storage(host, entry, activation)
            activation.stopped.set()
        if not core.on_stopped():
            host._forget_if_unused(entry)
            return


async def _activate(host: Host, entry: ObjectEntry, activation: Activation) -> None:
    core = entry.core

    def spawn(async_fn: Callable[[], Awaitable[object]]) -> None:
        activation.background += 1
        nursery.start_soon(_background, entry, activation, async_fn)

    def make_storage() -> Storage:
        storage = Storage(
            open_db=lambda: host.storage_backend.open(entry.namespace, entry.object_id),
            limits=host.limits,
            gate=activation.gate,
            finish_outside_turn=lambda: _commit_outside_turn(host, entry, activation),
            in_turn=lambda: activation.owner is trio.lowlevel.current_task(),
            exclusive=lambda: _exclusive(host, entry, activation),
        )
        activation.storage = storage
        return storage

    async with trio.open_nursery() as nursery:
        ctx = ObjectContext(
            namespace=entry.namespace,
            object_id=entry.object_id,
            core=core,
            spawn=spawn,
            gate=activation.gate,
            storage=make_storage,
            namespaces=host.get_namespace,
            wall_clock=host.wall_clock,
        )
        try:
            instance = entry.cls(ctx, host.env)
        except Exception:  # contained here (house rule 5): logged, sockets closed 1011
            _olog(entry).exception(
                "constructor of %s %s raised; closing its WebSockets with 1011",
                entry.namespace,
                entry.object_id,
            )
            host._fail_object(entry, core.on_failed())
            return
        core.on_started()
        host.counters.wakes += 1
        try:
            await _run_turns(host, entry, activation, instance, ctx)
        finally:
            if host._closing:
                # Shutdown cancelled the activation (here, not in supervise: the host
                # nursery's cancellation may carry the Cancelled past supervise's loop).
                while (event := core.pop_event()) is not None:
                    host._refuse_unrun_event(entry, event)
            core.begin_stop()
            host.counters.hibernations += 1
            nursery.cancel_scope.cancel()


def _release_storage(host: Host, entry: ObjectEntry, activation: Activation) -> None:
    storage = activation.storage
    if storage is None:
        return
    if storage.dirty:
        # Cancelled mid-turn (shutdown, forced eviction): the writes were never
        # acknowledged (the output gate held every reply), so they are dropped.
        storage.failed()
    db = storage.detach()
    if db is not None:
        host.storage_backend.release(entry.namespace, entry.object_id, db)


async def _commit(host: Host, entry: ObjectEntry, activation: Activation) -> None:
    """Make the activation's pending writes durable (caller holds the turn lock).

    Raises the storage error after dropping the held messages and asking for a reset.
    """
    storage = activation.storage
    if storage is None or not storage.dirty:
        return
    change = storage.take_alarm_change()
    key = entry.alarm_key

    def work() -> None:
        # A new alarm reaches the index before the object's commit, a deletion after it:
        # the index may be stale, never missing (see _storage/alarms.py).
        if isinstance(change, float):
            host.alarm_index.record(key, change)
        storage.commit_sync()
        if change is None:
            host.alarm_index.record(key, None)

    storage.committing = True
    try:
        if host.storage_backend.durable:
            await trio.to_thread.run_sync(work)
        else:
            # In memory there is no disk flush to keep off the event loop. (It also keeps
            # Trio's autojump clock from jumping while a worker thread commits.)
            work()
            await trio.lowlevel.checkpoint()
    except (sqlite3.Error, OSError):
        dropped = storage.failed()
        activation.request_stop()
        _olog(entry).exception(
            "storage commit of %s %s failed: %d held message(s) dropped, the instance is reset",
            entry.namespace,
            entry.object_id,
            dropped,
        )
        raise
    finally:
        storage.committing = False
    storage.committed()
    host.counters.storage_commits += 1
    if change is not ...:
        assert change is None or isinstance(change, float)
        host.alarms.schedule(key, change)


@asynccontextmanager
async def _exclusive(host: Host, entry: ObjectEntry, activation: Activation) -> AsyncIterator[None]:
    """A background task's transaction: a turn of its own, committed at the end."""
    async with activation.turn_lock:
        activation.owner = trio.lowlevel.current_task()
        # Like a turn, the transaction holds the object until it ends.
        token = waiting_turns.set((*waiting_turns.get(), (entry.namespace, entry.object_id, None)))
        try:
            yield
        finally:
            waiting_turns.reset(token)
            activation.owner = None
            await _commit(host, entry, activation)


async def _commit_outside_turn(host: Host, entry: ObjectEntry, activation: Activation) -> None:
    async with activation.turn_lock:
        await _commit(host, entry, activation)


async def _end_turn(host: Host, entry: ObjectEntry, activation: Activation) -> None:
    storage = activation.storage
    if storage is None:
        return
    if storage.dirty:
        with contextlib.suppress(sqlite3.Error, OSError):  # logged and reset by _commit
            await _commit(host, entry, activation)
    else:
        storage.end_read_only_turn()


async def _run_turns(
    host: Host,
    entry: ObjectEntry,
    activation: Activation,
    instance: DurableObject,
    ctx: ObjectContext,
) -> None:
    core = entry.core
    turns = 0
    while True:
        if not core.queued:
            if activation.stop_requested:
                return
            activation.idle = True
            if not activation.background:
                host._idle_from(activation)  # the host's reaper stops it when it expires
            try:
                await activation.lot.park()
            finally:
                activation.idle = False
                host._busy_again(activation)
            continue
        lock = activation.turn_lock
        if lock.locked():  # a background transaction or commit holds the object
            await lock.acquire()
        else:
            lock.acquire_nowait()  # the common case, without a trip through the scheduler
        try:
            # Popped only once the turn is ours: a cancellation while waiting for the
            # lock (shutdown) must not lose an event taken off the mailbox.
            event = core.pop_event()
            if event is None:
                continue
            activation.owner = trio.lowlevel.current_task()
            try:
                await _dispatch(host, entry, activation, instance, ctx, event)
            finally:
                activation.owner = None
                await _end_turn(host, entry, activation)
        finally:
            lock.release()
        if host.hibernate_after_every_event or activation.stop_requested:
            return
        turns += 1
        if turns % _TURNS_PER_CHECKPOINT == 0:
            # Handlers that never await would otherwise let one busy object hold the
            # event loop for as long as its mailbox refills.
            await trio.lowlevel.checkpoint()


async def _dispatch(
    host: Host,
    entry: ObjectEntry,
    activation: Activation,
    instance: DurableObject,
    ctx: ObjectContext,
    event: Event,
) -> None:
    kind = type(event)
    if kind is FetchEvent or kind is CallEvent:
        assert isinstance(event, FetchEvent | CallEvent)
        token = None
        if event.chain:  # made in a turn of another object, which waits for this one
            token = waiting_turns.set((*event.chain, (entry.namespace, entry.object_id, None)))
        try:
            if isinstance(event, FetchEvent):
                await _dispatch_fetch(entry, activation, instance, event)
            else:
                await _dispatch_call(host, entry, activation, instance, event)
        finally:
            if token is not None:
                waiting_turns.reset(token)
        return
    if kind is AlarmEvent:
        assert isinstance(event, AlarmEvent)
        try:
            await _dispatch_alarm(host, entry, instance, ctx, event)
        finally:
            if event.on_done is not None:
                event.on_done()
        return
    assert isinstance(event, MessageEvent | CloseEvent | ErrorEvent)
    record = event.record
    ws = ctx._handle(record)
    call: Awaitable[None]
    if kind is MessageEvent:
        assert isinstance(event, MessageEvent)
        host.buffers.give(event.size)  # (pop_event resumed its socket's reading if due)
        call = instance.websocket_message(ws, event.data)
    elif kind is CloseEvent:
        assert isinstance(event, CloseEvent)
        call = instance.websocket_close(ws, event.code, event.reason, event.was_clean)
    else:
        assert isinstance(event, ErrorEvent)
        call = instance.websocket_error(ws, event.error)
    timeout_ms = entry.core.event_timeout_ms
    try:
        if timeout_ms is None:
            await call
        else:
            with trio.move_on_after(timeout_ms / 1000) as limit:
                await call
            if limit.cancelled_caught:
                _olog(entry).error(
                    "%s handler of %s %s exceeded the event timeout of %d ms and was "
                    "cancelled; the instance is dropped (sockets stay connected)",
                    kind.__name__,
                    entry.namespace,
                    entry.object_id,
                    timeout_ms,
                )
                activation.stop_requested = True
    except Exception:  # contained here (house rule 5): logged, the socket stays open
        _olog(entry).exception(
            "%s handler of %s %s raised; the socket stays open",
            kind.__name__,
            entry.namespace,
            entry.object_id,
        )
    finally:
        if kind is not MessageEvent:
            entry.core.release(record)


async def _dispatch_fetch(
    entry: ObjectEntry, activation: Activation, instance: DurableObject, event: FetchEvent
) -> None:
    response: Response | None = None
    try:
        result: object = await instance.fetch(event.request)
        if isinstance(result, Response):
            response = result
        else:
            _olog(entry).error(
                "fetch() of %s %s returned %r, not a Response; answering 500",
                entry.namespace,
                entry.object_id,
                result,
            )
    except LimitExceededError as exc:
        if exc.limit_name != "max_websockets_per_object":
            _olog(entry).exception("fetch() of %s %s raised", entry.namespace, entry.object_id)
        else:
            # Spec 2, Rule: refuse the upgrade clearly, disturb nothing else.
            response = Response(status=503, body=f"Service Unavailable: {exc}\n")
    except Exception:  # contained here (house rule 5): logged, answered 500
        _olog(entry).exception("fetch() of %s %s raised", entry.namespace, entry.object_id)
    finally:
        if response is None:
            response = Response(status=500, body="Internal Server Error\n")
        # Output gate: the response waits for the turn's writes; if they fail, the
        # client gets a 500 instead of a reply whose effects were lost.
        activation.gate.hold(partial(event.reply, response), partial(event.reply, _LOST))


async def _dispatch_call(
    host: Host,
    entry: ObjectEntry,
    activation: Activation,
    instance: DurableObject,
    event: CallEvent,
) -> None:
    outcome: tuple[bool, object] | None = None
    try:
        method = getattr(instance, event.method, None)
        if method is None or not callable(method):
            raise AttributeError(
                f"{entry.cls.__name__} has no public method {event.method!r} to call"
            )
        result = method(*event.args, **event.kwargs)
        if inspect.isawaitable(result):
            result = await result
        outcome = (True, decode_data(host._encode_call(result)))
    except Exception as exc:
        # Not contained: the caller's ``await stub.call(...)`` raises it.
        outcome = (False, exc)
    finally:
        if outcome is None:  # cancelled: only shutdown cancels a turn
            failure = RuntimeError(
                f"the host shut down while {event.method}() of {entry.namespace} "
                f"{entry.object_id} ran"
            )
            outcome = (False, failure)
        lost = (False, StorageCommitError(f"{entry.namespace} {entry.object_id}: {_LOST_TEXT}"))
        activation.gate.hold(partial(event.reply, outcome), partial(event.reply, lost))


async def run_app_hook(
    what: str, hook: Callable[[Request], Awaitable[Response | None]], request: Request
) -> Response | None:
    """Run an app-level hook (``App.authorize``, ``App.fetch``), containing its crash."""
    try:
        result: object = await hook(request)
    except Exception:  # contained here (house rule 5): logged, answered 500
        log.exception("%s raised for %s %s; answering 500", what, request.method, request.path)
        return Response(status=500, body="Internal Server Error\n")
    if result is not None and not isinstance(result, Response):
        log.error("%s returned %r, not a Response or None; answering 500", what, result)
        return Response(status=500, body="Internal Server Error\n")
    return result


async def _dispatch_alarm(
    host: Host, entry: ObjectEntry, instance: DurableObject, ctx: ObjectContext, event: AlarmEvent
) -> None:
    storage = ctx.storage
    current: float | None = None
    try:
        # Reading the alarm may fail too (the database cannot be opened: the pool is
        # full of transactions, the disk is gone): that is a failed run, retried.
        current = storage._database().get_alarm()
        if current is None or current > event.scheduled:
            return  # deleted or moved since it was scheduled: a stale index entry
        await instance.alarm(AlarmInfo(event.retry_count, event.retry_count > 0))
        if storage._database().get_alarm() == current:
            await storage.delete_alarm()  # done; unless the handler set a new one
    except Exception:  # contained here (house rule 5): logged, retried with backoff
        delay = host.alarms.retry_delay(event.retry_count)
        if delay is not None:
            _olog(entry).exception(
                "alarm() of %s %s failed; retry %d in %g s",
                entry.namespace,
                entry.object_id,
                event.retry_count + 1,
                delay,
            )
            retry_at = host.wall_clock() + delay
            host.alarms.schedule(entry.alarm_key, retry_at, event.retry_count + 1)
            return
        _olog(entry).exception(
            "alarm() of %s %s failed on its last retry (%d); giving up",
            entry.namespace,
            entry.object_id,
            event.retry_count,
        )
        try:
            if current is not None and storage._database().get_alarm() == current:
                await storage.delete_alarm()
        except Exception:  # contained here too: the alarm stays set, to fire on restart
            _olog(entry).exception(
                "could not delete the alarm of %s %s after its last retry",
                entry.namespace,
                entry.object_id,
            )


async def _background(
    entry: ObjectEntry, activation: Activation, async_fn: Callable[[], Awaitable[object]]
) -> None:
    waiting_turns.set(())  # no turn waits for this task (its context is its own copy)
    try:
        await async_fn()
    except Exception:  # contained here (house rule 5): logged; the object goes on
        _olog(entry).exception(
            "a task started by %s %s with ctx.start_soon raised", entry.namespace, entry.object_id
        )
    finally:
        activation.background -= 1
        activation.lot.unpark_all()
