"""Events for objects another host owns: relayed to the owner, or answered 503.

A fetch (a WebSocket upgrade too) or a stub call goes to the owner over the internal
hop (``relay.py``); when that cannot be done (no cluster key, the owner unreachable
while its lease runs), a fetch is answered ``503`` with ``Retry-After`` and a call
raises :class:`~trio_hibernate.ObjectUnavailableError`. A due alarm is left to the
owner, which scheduled it when it claimed the object. Socket events mean this host's
sockets belong to an object that moved: they are closed with 1012 and their clients
reconnect, to be relayed.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from .._core.events import AlarmEvent, CallEvent, Event, FetchEvent, MessageEvent
from .._errors import ObjectUnavailableError
from .._http import Response

if TYPE_CHECKING:
    from .._directory import ObjectEntry
    from .runtime import ClusterRuntime
    from .store import OwnedElsewhere

__all__ = ["drop_socket_event", "relay_or_refuse", "unavailable"]

log = logging.getLogger("trio_hibernate.cluster")


def drop_socket_event(runtime: ClusterRuntime, entry: ObjectEntry, event: Event) -> None:
    """A socket event (or an alarm) for an object this host cannot run: close its
    sockets with 1012 (clients reconnect), leave the alarm to its owner."""
    if isinstance(event, AlarmEvent):
        if event.on_done is not None:
            event.on_done()
        return
    if isinstance(event, MessageEvent):
        runtime.buffers.give(event.size)
    entry.core.shut_down_sockets(1012, "the object moved to another host")
    runtime.forget_if_unused(entry)


def unavailable(
    runtime: ClusterRuntime, entry: ObjectEntry, event: Event, retry_after: float, why: str
) -> None:
    """Answer ``event``, which cannot be served now: 503 with Retry-After (a call
    raises ObjectUnavailableError); socket events as :func:`drop_socket_event`."""
    seconds = max(1, math.ceil(retry_after))
    if isinstance(event, FetchEvent):
        event.reply.send(
            Response(
                status=503,
                headers={"retry-after": str(seconds)},
                body=f"Service Unavailable: {why}; retry in {seconds} s\n",
            )
        )
    elif isinstance(event, CallEvent):
        event.reply.fail(ObjectUnavailableError(why, retry_after=seconds))
    else:
        drop_socket_event(runtime, entry, event)


async def relay_or_refuse(
    runtime: ClusterRuntime,
    entry: ObjectEntry,
    event: FetchEvent | CallEvent,
    owner: OwnedElsewhere,
    key: str | None,
) -> bool:
    """Send ``event`` to its owner (a host nursery task). Returns whether it was
    relayed; if not it was answered as :func:`unavailable` says."""
    why = (
        f"{entry.namespace} {entry.object_id} is owned by host {owner.host_id} "
        f"({owner.address}), which this host cannot relay to"
    )
    if key is None:
        unavailable(runtime, entry, event, owner.expires_in, why + " (no cluster key)")
        return False
    unavailable(runtime, entry, event, owner.expires_in, why)
    return False
