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

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ._context import ObjectContext
from ._errors import LimitExceededError
from ._events import CloseEvent, ErrorEvent, Event, FetchEvent, MessageEvent
from ._http import Response

if TYPE_CHECKING:
    from ._host import Host, ObjectEntry
    from ._object import DurableObject

__all__ = ["Activation", "supervise"]

log = logging.getLogger("trio_hibernate.object")


class Activation:
    """The live part of an object: its scope, wake-up lot and bookkeeping."""

    __slots__ = ("background", "idle", "lot", "scope", "stop_requested", "stopped")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.lot = trio.lowlevel.ParkingLot()
        self.background = 0  # ctx.start_soon tasks still running
        self.idle = False  # parked, waiting for an event
        self.stop_requested = False  # hibernate after the current turn
        self.stopped = trio.Event()

    def request_stop(self) -> None:
        """Hibernate as soon as the current turn (if any) is over."""
        self.stop_requested = True
        if self.idle:
            self.scope.cancel()


async def supervise(host: Host, entry: ObjectEntry) -> None:
    """Run activations of ``entry`` until it has nothing left to do."""
    core = entry.core
    while True:
        activation = Activation()
        entry.activation = activation
        started_at = trio.current_time()
        try:
            with activation.scope:
                await _activate(host, entry, activation)
        finally:
            entry.activation = None
            host._seconds_in_memory += trio.current_time() - started_at
            activation.stopped.set()
        if not core.on_stopped() or host._closing:
            host._forget_if_unused(entry)
            return


async def _activate(host: Host, entry: ObjectEntry, activation: Activation) -> None:
    core = entry.core

    def spawn(async_fn: Callable[[], Awaitable[object]]) -> None:
        activation.background += 1
        nursery.start_soon(_background, entry, activation, async_fn)

    async with trio.open_nursery() as nursery:
        ctx = ObjectContext(
            namespace=entry.namespace, object_id=entry.object_id, core=core, spawn=spawn
        )
        try:
            instance = entry.cls(ctx, host.env)
        except Exception:
            log.exception(
                "constructor of %s %s raised; closing its WebSockets with 1011",
                entry.namespace,
                entry.object_id,
            )
            host._fail_object(entry, core.on_failed())
            return
        core.on_started()
        host._wakes += 1
        try:
            await _run_turns(host, entry, activation, instance, ctx)
        finally:
            core.begin_stop()
            host._hibernations += 1
            nursery.cancel_scope.cancel()


async def _run_turns(
    host: Host,
    entry: ObjectEntry,
    activation: Activation,
    instance: DurableObject,
    ctx: ObjectContext,
) -> None:
    core = entry.core
    strict = host.hibernate_after_every_event
    idle_timeout = host.idle_timeout
    while True:
        event = core.pop_event()
        if event is None:
            if activation.stop_requested:
                return
            activation.idle = True
            try:
                if activation.background:
                    await activation.lot.park()
                else:
                    with trio.move_on_after(idle_timeout) as idle:
                        await activation.lot.park()
                    if idle.cancelled_caught:
                        return
            finally:
                activation.idle = False
            continue
        await _dispatch(host, entry, activation, instance, ctx, event)
        if strict or activation.stop_requested:
            return


async def _dispatch(
    host: Host,
    entry: ObjectEntry,
    activation: Activation,
    instance: DurableObject,
    ctx: ObjectContext,
    event: Event,
) -> None:
    kind = type(event)
    if kind is FetchEvent:
        assert isinstance(event, FetchEvent)
        await _dispatch_fetch(entry, instance, event)
        return
    assert isinstance(event, MessageEvent | CloseEvent | ErrorEvent)
    record = event.record
    ws = ctx._handle(record)
    call: Awaitable[None]
    if kind is MessageEvent:
        assert isinstance(event, MessageEvent)
        if record.queued == host.limits.max_queued_messages_per_websocket - 1:
            record.transport.resume_reading()
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
                log.error(
                    "%s handler of %s %s exceeded the event timeout of %d ms and was "
                    "cancelled; the instance is dropped (sockets stay connected)",
                    kind.__name__,
                    entry.namespace,
                    entry.object_id,
                    timeout_ms,
                )
                activation.stop_requested = True
    except Exception:
        log.exception(
            "%s handler of %s %s raised; the socket stays open",
            kind.__name__,
            entry.namespace,
            entry.object_id,
        )
    finally:
        if kind is not MessageEvent:
            entry.core.release(record)


async def _dispatch_fetch(entry: ObjectEntry, instance: DurableObject, event: FetchEvent) -> None:
    response: Response | None = None
    try:
        result: object = await instance.fetch(event.request)
        if isinstance(result, Response):
            response = result
        else:
            log.error(
                "fetch() of %s %s returned %r, not a Response; answering 500",
                entry.namespace,
                entry.object_id,
                result,
            )
    except LimitExceededError as exc:
        if exc.limit_name != "max_websockets_per_object":
            log.exception("fetch() of %s %s raised", entry.namespace, entry.object_id)
        else:
            # Spec 2, Rule: refuse the upgrade clearly, disturb nothing else.
            response = Response(status=503, body=f"Service Unavailable: {exc}\n")
    except Exception:
        log.exception("fetch() of %s %s raised", entry.namespace, entry.object_id)
    finally:
        if response is None:
            response = Response(status=500, body="Internal Server Error\n")
        event.reply(response)


async def _background(
    entry: ObjectEntry, activation: Activation, async_fn: Callable[[], Awaitable[object]]
) -> None:
    try:
        await async_fn()
    except Exception:
        log.exception(
            "a task started by %s %s with ctx.start_soon raised", entry.namespace, entry.object_id
        )
    finally:
        activation.background -= 1
        activation.lot.unpark_all()
