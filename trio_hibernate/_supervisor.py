"""The per-object supervisor: one activation of an object, from constructor to eviction.

An activation is a task in the host's object nursery. It opens the object's own nursery
(for ``ctx.start_soon`` tasks) inside a cancel scope the host can cancel, builds the
instance, and runs the object's events one turn at a time. When the object has been idle
for ``idle_timeout`` seconds (or a hook asks), it returns: the instance, its context and
its socket handles are dropped, while the sockets' connection tasks, which live in the
host nursery, keep running.

What an application handler raises is contained by :class:`~._containment.Containment`
(logged once; the caller sees a 500, the socket stays open, the alarm is retried); a turn's
writes are committed by :class:`~._storage.commit.TurnCommit`; critical sections
(``ctx.block_concurrency_while``) and resets (``ctx.abort``) follow the rules of
:mod:`._critical`: a reset activation runs no further event, and when it ends its queued
events are answered with an error and its sockets closed with 1011.
"""

from __future__ import annotations

import inspect
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

import outcome
import trio

from ._activation import Activation, TurnRunner
from ._containment import Containment, ObjectLog, abort_ends_here, object_label, object_log
from ._context import ObjectContext, handles_of
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
from ._critical import CriticalSections
from ._errors import ConnectionIdError, LimitExceededError, StorageCommitError
from ._http import Response
from ._storage.alarms import AlarmInfo
from ._storage.api import stored_alarm
from ._storage.commit import TurnCommit
from ._stubs import waiting_turns

if TYPE_CHECKING:
    from ._app import App
    from ._core.budget import MemoryBudget
    from ._core.lifecycle import ObjectCore
    from ._ids import ObjectId
    from ._limits import Limits
    from ._object import DurableObject
    from ._reaper import IdleReaper
    from ._statistics import Counters
    from ._storage.alarms import AlarmIndex, AlarmKey, AlarmScheduler
    from ._storage.api import Storage
    from ._storage.backend import StorageBackend
    from ._stubs import Namespace

__all__ = ["SupervisedEntry", "Supervisor", "SupervisorServices"]

_TURNS_PER_CHECKPOINT: Final = 16

_LOST_TEXT = "the storage commit of this turn failed; its writes were rolled back"
_HANDLER_RAISED: Final = "%s handler of %s raised; the socket stays open"
#: The handler each socket event runs (log lines and ``/_metrics`` name it so).
_HOOKS: Final = {
    MessageEvent: "websocket_message",
    CloseEvent: "websocket_close",
    ErrorEvent: "websocket_error",
}


class SupervisedEntry(Protocol):
    """The object a supervisor runs, as the runtime keeps it."""

    namespace: str
    object_id: ObjectId
    cls: type[DurableObject]
    core: ObjectCore
    activation: Activation | None

    @property
    def alarm_key(self) -> AlarmKey:
        """How the alarm index names this object."""
        ...

    def forget_if_unused(self) -> None:
        """Drop the object from memory if it has nothing left to do."""

    def fail(self, dropped: list[Event], why: str) -> None:
        """The constructor raised, or the object is reset (``why``): answer ``dropped``,
        close the sockets with 1011."""

    def refuse_unrun_event(self, event: Event) -> None:
        """Answer an event that will not run (shutdown, or its namespace was removed)."""


class SupervisorServices(Protocol):
    """What a supervisor needs from the runtime that runs it."""

    @property
    def app(self) -> App: ...
    @property
    def env(self) -> object: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def counters(self) -> Counters: ...
    @property
    def buffers(self) -> MemoryBudget: ...
    @property
    def closing(self) -> bool: ...
    @property
    def hibernate_after_every_event(self) -> bool: ...
    @property
    def wall_clock(self) -> Callable[[], float]: ...
    @property
    def storage_backend(self) -> StorageBackend: ...
    @property
    def alarm_index(self) -> AlarmIndex: ...
    @property
    def alarms(self) -> AlarmScheduler: ...

    def get_namespace(self, name: str) -> Namespace:
        """The namespace ``name`` of the app (``ctx.get_namespace``)."""
        ...

    def encode_call(self, value: object) -> bytes:
        """A stub call's result as data (checked against the size limit)."""
        ...

    @property
    def reaper(self) -> IdleReaper:
        """Told when an activation is idle (it stops those idle for ``idle_timeout``)."""
        ...


class Supervisor:
    """Runs the activations of one object until it has nothing left to do.

    The runtime makes one when an event wakes a hibernated object and runs :meth:`run` in
    the host's object nursery. It owns the activation's lifecycle and its turn loop; a
    :class:`_Dispatcher` made per activation runs each event against the instance.
    """

    __slots__ = ("_entry", "_label", "_log", "_services")

    def __init__(self, services: SupervisorServices, entry: SupervisedEntry) -> None:
        self._services = services
        self._entry = entry
        self._label = object_label(entry.namespace, entry.object_id)
        self._log = object_log(entry.namespace, entry.object_id)

    async def run(
        self, *, task_status: trio.TaskStatus[Activation | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run activations of the object until it has nothing left to do.

        Reports the first activation through ``task_status`` once it is
        ``entry.activation`` (None if none is made), so ``await nursery.start(run)`` returns
        it. The runtime uses ``start_soon``: ``deliver`` is synchronous, and a task to
        await ``nursery.start`` would add a scheduling round trip to every wake.

        Once the host is closing no instance is constructed: the queued events are
        answered instead (a fetch 503, a call an error, an alarm its ``on_done``), so that
        no caller waits for an event shutdown cancelled.
        """
        services = self._services
        entry = self._entry
        core = entry.core
        while True:
            if services.closing or entry.namespace not in services.app.objects:
                # STARTING -> STOPPING -> HIBERNATED with the mailbox handed back: the
                # lifecycle's path for an instance that cannot be constructed. (A namespace
                # a live code update removed has its sockets closed already.)
                for event in core.on_failed():
                    entry.refuse_unrun_event(event)
                core.on_stopped()
                entry.forget_if_unused()
                services.reaper.rests.object_rested()
                task_status.started(None)
                return
            if not await _prepare_storage(services, entry, self._label, self._log):
                task_status.started(None)
                return
            activation = Activation()
            entry.activation = activation
            task_status.started(activation)
            task_status = trio.TASK_STATUS_IGNORED  # only the first activation is reported
            # This task's own context (copied from whoever woke the object): its turns
            # wait for what they call.
            waiting_turns.set(((entry.namespace, entry.object_id, None),))
            started_at = trio.current_time()
            try:
                with activation.scope:
                    await self._activate(activation)
            finally:
                entry.activation = None
                services.counters.spent_in_memory(trio.current_time() - started_at)
                if activation.commit is not None:
                    activation.commit.release()
                    activation.commit = None  # it points back at the activation
                activation.stopped.set()
            if not core.on_stopped():
                entry.forget_if_unused()
                services.reaper.rests.object_rested()
                return

    async def _activate(self, activation: Activation) -> None:
        services = self._services
        entry = self._entry
        core = entry.core

        def spawn(async_fn: Callable[[], Awaitable[object]]) -> None:
            activation.background += 1
            nursery.start_soon(self._background, activation, async_fn)

        async with trio.open_nursery() as nursery:
            sections = CriticalSections(
                activation,
                label=self._label,
                holds=self._holds,
                holding=self._holding,
                log=self._log,
            )
            ctx = ObjectContext(
                namespace=entry.namespace,
                object_id=entry.object_id,
                core=core,
                spawn=spawn,
                gate=activation.gate,
                storage=partial(self._open_storage, activation, nursery),
                namespaces=services.get_namespace,
                wall_clock=services.wall_clock,
                block=sections.block,
                abort=sections.abort,
            )
            instance = await self._construct(activation, ctx, sections)
            if instance is None:
                return
            services.counters.woke()
            dispatcher = _Dispatcher(services, entry, activation, instance, ctx, self._log)
            runner = TurnRunner(
                activation,
                dispatcher.dispatch,
                core,
                services.reaper,
                ((entry.namespace, entry.object_id, None),),
                strict=lambda: services.hibernate_after_every_event,
                turn_took=services.counters.turn_took,
            )
            activation.runner = runner  # connections may run turns inline
            try:
                await self._run_turns(activation, runner)
            finally:
                activation.runner = None
                await activation.inline_turn_over()
                activation.let_connections_go()  # they hold no scope while it hibernates
                if services.closing:
                    # Shutdown cancelled the activation (here, not in run: the host
                    # nursery's cancellation may carry the Cancelled past run's loop).
                    while (event := core.pop_event()) is not None:
                        entry.refuse_unrun_event(event)
                elif activation.reset_because is not None:
                    dropped = []
                    while (event := core.pop_event()) is not None:
                        dropped.append(event)
                    entry.fail(dropped, f"{self._label} was reset: {activation.reset_because}")
                core.begin_stop()
                services.counters.hibernated()
                nursery.cancel_scope.cancel()

    async def _construct(
        self, activation: Activation, ctx: ObjectContext, sections: CriticalSections
    ) -> DurableObject | None:
        """Build the instance and run the critical sections its constructor scheduled.

        STARTING -> LIVE; if the constructor raises or aborts, or a section fails (all
        logged), STARTING -> STOPPING with the queued events answered and the sockets
        closed with 1011 (spec 9), and None is returned.
        """
        services = self._services
        entry = self._entry
        core = entry.core
        instance: DurableObject | None = None
        why: str | None = None
        try:
            with (
                abort_ends_here,
                Containment(
                    self._log,
                    "constructor of %s raised; closing its WebSockets with 1011",
                    self._label,
                    on_error=partial(services.counters.handler_error, "constructor"),
                ),
            ):
                sections.constructing = True
                try:
                    instance = entry.cls(ctx, services.env)
                finally:
                    sections.constructing = False
            if instance is None:
                why = activation.reset_because or f"the constructor of {entry.cls.__name__} raised"
            else:
                why = await sections.run_startup()
        except BaseException:
            # The sections were cancelled: by shutdown, or by ctx.abort() in a task.
            dropped = core.on_failed()
            if activation.is_reset():
                entry.fail(dropped, f"{self._label} was reset: {activation.reset_because}")
            else:
                for event in dropped:
                    entry.refuse_unrun_event(event)
            raise
        if why is not None:
            entry.fail(core.on_failed(), why)
            return None
        core.on_started()
        return instance

    def _open_storage(self, activation: Activation, nursery: trio.Nursery) -> Storage:
        commit = TurnCommit(
            activation,
            self._services,
            self._entry,
            nursery=nursery,  # where its flusher runs
            holding=self._holding,
            on_committed=self._services.counters.committed,
            on_failed=self._services.counters.storage_failed,
            log=self._log,
        )
        activation.commit = commit
        return commit.storage

    @contextmanager
    def _holding(self) -> Iterator[None]:
        """Mark the current task as holding the object (a background transaction)."""
        entry = self._entry
        token = waiting_turns.set((*waiting_turns.get(), (entry.namespace, entry.object_id, None)))
        try:
            yield
        finally:
            waiting_turns.reset(token)

    def _holds(self) -> bool:
        """Whether the current task holds the object: it runs a turn (or a task the turn
        waits for), or a background transaction or critical section."""
        entry = self._entry
        return any(
            ns == entry.namespace and oid == entry.object_id for ns, oid, _ in waiting_turns.get()
        )

    async def _run_turns(self, activation: Activation, runner: TurnRunner) -> None:
        services = self._services
        core = self._entry.core
        reaper = services.reaper
        rests = reaper.rests
        run_turn = runner.run
        turns = 0
        while True:
            if activation.stop_requested:  # asked for between turns, or a reset
                if not activation.is_reset():
                    await self._end_of_sections(activation)
                return
            if not core.queued:
                activation.idle = True
                rests.object_rested()
                if not activation.background and not activation.inline_running:
                    reaper.idle_from(activation)  # the reaper stops it when it expires
                try:
                    await activation.lot.park()
                finally:
                    activation.idle = False
                    reaper.busy_again(activation)
                continue
            lock = activation.turn_lock
            if lock.locked():  # a background transaction or commit holds the object
                await lock.acquire()
            else:
                lock.acquire_nowait()  # the common case, without a trip through the scheduler
            try:
                if activation.is_reset():
                    return  # reset by a critical section that held the object
                # Popped only once the turn is ours: a cancellation while waiting for the
                # lock (shutdown) must not lose an event taken off the mailbox.
                event = core.pop_event()
                if event is None:
                    continue
                await run_turn(event)
            finally:
                lock.release()
            if services.hibernate_after_every_event or activation.stop_requested:
                if not activation.is_reset():
                    await self._end_of_sections(activation)
                return
            turns += 1
            if turns % _TURNS_PER_CHECKPOINT == 0:
                # Handlers that never await would otherwise let one busy object hold the
                # event loop for as long as its mailbox refills.
                await trio.lowlevel.checkpoint()

    @staticmethod
    async def _end_of_sections(activation: Activation) -> None:
        """Before a stop: wait for the critical sections of ``ctx.start_soon`` tasks that
        hold or wait for the object (an object is not evicted mid-section)."""
        while activation.blocking and not activation.is_reset():
            async with activation.turn_lock:
                pass

    async def _background(
        self, activation: Activation, async_fn: Callable[[], Awaitable[object]]
    ) -> None:
        waiting_turns.set(())  # no turn waits for this task (its context is its own copy)
        try:
            with (
                abort_ends_here,
                Containment(
                    self._log,
                    "a task started by %s with ctx.start_soon raised",
                    self._label,
                    on_error=partial(self._services.counters.handler_error, "start_soon"),
                ),
            ):
                await async_fn()
        finally:
            activation.background -= 1
            activation.lot.unpark_all()


class _Dispatcher:
    """Runs the events of one activation against its instance, one turn at a time.

    Made by the supervisor once the instance is constructed, dropped (with the instance,
    its context and the context's socket handles) when the activation ends.
    """

    __slots__ = (
        "_activation",
        "_counters",
        "_ctx",
        "_entry",
        "_handle",
        "_instance",
        "_label",
        "_log",
        "_on_message",
        "_services",
    )

    def __init__(
        self,
        services: SupervisorServices,
        entry: SupervisedEntry,
        activation: Activation,
        instance: DurableObject,
        ctx: ObjectContext,
        log: ObjectLog,
    ) -> None:
        self._services = services
        self._entry = entry
        self._activation = activation
        self._instance = instance
        self._ctx = ctx
        self._handle = handles_of(ctx)
        self._log = log
        self._counters = services.counters
        self._label = object_label(entry.namespace, entry.object_id)
        # Made once: a message costs no containment of its own.
        self._on_message = self._contained("websocket_message")

    def _contained(self, hook: str) -> Containment:
        """The containment of a socket event's handler: logged, counted as ``hook``."""
        return Containment(
            self._log,
            _HANDLER_RAISED,
            hook,
            self._label,
            on_error=partial(self._counters.handler_error, hook),
        )

    async def dispatch(self, event: Event) -> None:
        """Run ``event`` (the caller holds the turn lock and commits after)."""
        entry = self._entry
        kind = type(event)
        call: Awaitable[None]
        if kind is MessageEvent:  # the hot path first
            assert isinstance(event, MessageEvent)
            record = event.record
            ws = self._handle(record)
            self._services.buffers.give(event.size)  # (pop_event resumed reading if due)
            self._counters.messages_in += 1  # a plain int: the hot path
            call = self._instance.websocket_message(ws, event.data)
            contained = self._on_message
        elif kind is CloseEvent or kind is ErrorEvent:
            assert isinstance(event, CloseEvent | ErrorEvent)
            record = event.record
            ws = self._handle(record)
            if isinstance(event, CloseEvent):
                call = self._instance.websocket_close(ws, event.code, event.reason, event.was_clean)
            else:
                call = self._instance.websocket_error(ws, event.error)
            contained = self._contained(_HOOKS[kind])
        elif kind is AlarmEvent:
            assert isinstance(event, AlarmEvent)
            try:
                await self._alarm(event)
            finally:
                if event.on_done is not None:
                    event.on_done()
            return
        else:
            assert isinstance(event, FetchEvent | CallEvent)
            token = None
            if event.chain:  # made in a turn of another object, which waits for this one
                token = waiting_turns.set((*event.chain, (entry.namespace, entry.object_id, None)))
            try:
                if isinstance(event, FetchEvent):
                    await self._fetch(event)
                else:
                    await self._call(event)
            finally:
                if token is not None:
                    waiting_turns.reset(token)
            return
        timeout_ms = entry.core.event_timeout_ms
        try:
            with contained:  # the socket stays open
                if timeout_ms is None:
                    await call
                else:
                    with trio.move_on_after(timeout_ms / 1000) as limit:
                        await call
                    if limit.cancelled_caught:
                        hook = _HOOKS[kind]
                        self._counters.handler_error(hook)
                        self._log.error(
                            "%s handler of %s exceeded the event timeout of %d ms and was "
                            "cancelled; the instance is dropped (sockets stay connected)",
                            hook,
                            self._label,
                            timeout_ms,
                        )
                        self._activation.stop_requested = True
        finally:
            if kind is not MessageEvent:
                entry.core.release(record)

    async def _fetch(self, event: FetchEvent) -> None:
        response: Response | None = None
        try:
            with Containment(
                self._log,
                "fetch() of %s raised",
                self._label,
                on_error=partial(self._counters.handler_error, "fetch"),
            ):
                try:
                    result: object = await self._instance.fetch(event.request)
                except LimitExceededError as exc:
                    if exc.limit_name != "max_websockets_per_object":
                        raise
                    # Spec 2, Rule: refuse the upgrade clearly, disturb nothing else.
                    self._counters.refused("websocket_limit")
                    response = Response(status=503, body=f"Service Unavailable: {exc}\n")
                except ConnectionIdError as exc:
                    # The client's _pk: a malformed one gets 400, one in use 409.
                    what = "Conflict" if exc.status == 409 else "Bad Request"
                    response = Response(status=exc.status, body=f"{what}: {exc}\n")
                else:
                    if isinstance(result, Response):
                        response = result
                    else:
                        self._counters.handler_error("fetch")
                        self._log.error(
                            "fetch() of %s returned %r, not a Response; answering 500",
                            self._label,
                            result,
                        )
        finally:
            if response is None:
                response = Response(status=500, body="Internal Server Error\n")
            # Output gate: the response waits for the turn's writes; if they fail, the
            # client gets a 500 instead of a reply whose effects were lost.
            self._activation.gate.hold(
                partial(event.reply.send, response), partial(self._drop_fetch, event)
            )

    def _drop_fetch(self, event: FetchEvent) -> None:
        """The fetch's writes were not kept: the client gets a 500 saying so."""
        event.reply.send(Response(status=500, body=f"Internal Server Error: {self._lost_text()}\n"))

    def _lost_text(self) -> str:
        """Why the turn's writes were not kept (a reply held for them is dropped)."""
        why = self._activation.reset_because
        if why is None:
            return _LOST_TEXT
        return f"the object was reset ({why}); the writes of this turn were rolled back"

    async def _call(self, event: CallEvent) -> None:
        entry = self._entry
        result: outcome.Outcome[object] | None = None
        try:
            method = getattr(self._instance, event.method, None)
            if method is None or not callable(method):
                raise AttributeError(
                    f"{entry.cls.__name__} has no public method {event.method!r} to call"
                )
            value = method(*event.args, **event.kwargs)
            if inspect.isawaitable(value):
                value = await value
            result = outcome.Value(decode_data(self._services.encode_call(value)))
        except Exception as exc:
            # Not contained: the caller's ``await stub.call(...)`` raises it.
            result = outcome.Error(exc)
        finally:
            reset = self._activation.reset_because
            if result is None:  # cancelled (shutdown), or unwound by ctx.abort()
                what = "the host shut down" if reset is None else f"the object was reset ({reset})"
                result = outcome.Error(
                    RuntimeError(f"{what} while {event.method}() of {self._label} ran")
                )
            self._activation.gate.hold(
                partial(event.reply.settle, result), partial(self._drop_call, event, result)
            )

    def _drop_call(self, event: CallEvent, result: outcome.Outcome[object]) -> None:
        """The call's writes were not kept: the caller gets the method's own exception
        if the object was reset while it raised (Cloudflare: it propagates), else a
        :class:`StorageCommitError`."""
        if self._activation.reset_because is not None and isinstance(result, outcome.Error):
            event.reply.settle(result)
            return
        event.reply.fail(StorageCommitError(f"{self._label}: {self._lost_text()}"))

    async def _alarm(self, event: AlarmEvent) -> None:
        entry = self._entry
        alarms = self._services.alarms
        storage = self._ctx.storage
        retry_count = event.retry_count
        delay = alarms.retry_delay(retry_count)
        counted = partial(self._counters.handler_error, "alarm")
        if delay is not None:
            failed = Containment(
                self._log,
                "alarm() of %s failed; retry %d in %g s",
                self._label,
                retry_count + 1,
                delay,
                on_error=counted,
            )
        else:
            failed = Containment(
                self._log,
                "alarm() of %s failed on its last retry (%d); giving up",
                self._label,
                retry_count,
                on_error=counted,
            )
        current: float | None = None
        try:
            with failed:
                # Reading the alarm may fail too (the database cannot be opened: the pool
                # is full of transactions, the disk is gone): that is a failed run, retried.
                current = stored_alarm(storage)
                if current is None or current > event.scheduled:
                    return  # deleted or moved since it was scheduled: a stale index entry
                await self._instance.alarm(AlarmInfo(retry_count, retry_count > 0))
                if stored_alarm(storage) == current:
                    await storage.delete_alarm()  # done; unless the handler set a new one
                return
        except BaseException:
            if self._activation.reset_because is not None:
                alarms.retry(entry.alarm_key, retry_count)  # interrupted by ctx.abort()
            raise
        # The run failed (logged above): schedule the next retry, or give up.
        alarms.retry(entry.alarm_key, retry_count)
        if delay is None and current is not None:
            with Containment(  # the alarm then stays set, to fire on restart
                self._log, "could not delete the alarm of %s after its last retry", self._label
            ):
                if stored_alarm(storage) == current:
                    await storage.delete_alarm()


async def _prepare_storage(
    services: SupervisorServices, entry: SupervisedEntry, label: str, log: ObjectLog
) -> bool:
    """The backend's preparation for an activation (cluster mode claims and loads the
    object). If it fails no instance can run: the queued events are answered and the
    sockets closed (1011), as for a constructor that raised."""
    try:
        await services.storage_backend.prepare(entry.namespace, entry.object_id)
    except (sqlite3.Error, OSError) as exc:
        log.error("cannot prepare the storage of %s: %s", label, exc)
        core = entry.core
        entry.fail(core.on_failed(), f"the storage of {label} is unavailable: {exc}")
        core.on_stopped()
        entry.forget_if_unused()
        services.reaper.rests.object_rested()
        return False
    return True
