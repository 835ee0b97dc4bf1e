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

import h11
import trio

from .._core.events import AlarmEvent, CallEvent, Event, FetchEvent, MessageEvent
from .._errors import (
    DataCloneError,
    LimitExceededError,
    ObjectUnavailableError,
    RemoteCallError,
    StorageCommitError,
)
from .._http import Response
from .relay import RelayTarget, relay_call, relay_fetch

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
        event.reply.send(_unavailable_response(retry_after, why))
    elif isinstance(event, CallEvent):
        event.reply.fail(ObjectUnavailableError(why, retry_after=seconds))
    else:
        drop_socket_event(runtime, entry, event)


def _unavailable_response(retry_after: float, why: str) -> Response:
    """503 with ``Retry-After`` (whole seconds, at least 1)."""
    seconds = max(1, math.ceil(retry_after))
    return Response(
        status=503,
        headers={"retry-after": str(seconds)},
        body=f"Service Unavailable: {why}; retry in {seconds} s\n",
    )


async def relay_or_refuse(
    runtime: ClusterRuntime,
    entry: ObjectEntry,
    event: FetchEvent | CallEvent,
    owner: OwnedElsewhere,
    key: str | None,
    patience: float,
) -> bool:
    """Send ``event`` to its owner (a host nursery task), waiting for its answer at
    most ``patience`` seconds (the lease TTL) or until the owner's lease ends, whichever
    is later. Returns whether it was relayed; if not it was answered as
    :func:`unavailable` says."""
    why = (
        f"{entry.namespace} {entry.object_id} is owned by host {owner.host_id} "
        f"({owner.address}), which this host cannot relay to"
    )
    if key is None:
        unavailable(runtime, entry, event, owner.expires_in, why + " (no cluster key)")
        return False
    # An owner that does not answer while its lease runs may be stopped or dead: 503,
    # Retry-After, and the client's retry finds the lease expired (then claims) or the
    # owner back. So the relay waits about as long as a lease lasts; a plain request the
    # owner got but did not answer by then gets 504 (its outcome is unknown: a client
    # must not take it for "not run"), an upgrade or a request not sent gets 503.
    target = RelayTarget(owner.address, key, timeout=max(1.0, patience, owner.expires_in))
    namespace, object_id = entry.namespace, entry.object_id
    if isinstance(event, FetchEvent):
        lease_ends = trio.current_time() + owner.expires_in
        refused: list[Response] = []

        def refusal() -> Response:
            refused.append(_unavailable_response(lease_ends - trio.current_time(), why))
            return refused[0]

        try:
            response = await relay_fetch(
                target, namespace, object_id, event.request, unreachable=refusal
            )
        except Exception:  # a bug of ours: this request only, answered all the same
            log.exception("relaying %s to %s failed", event.request.path, owner.address)
            response = Response(status=502, body="Bad Gateway\n")
        event.reply.send(response)
        return not refused
    try:
        result = await relay_call(
            target, namespace, object_id, event.method, event.args, event.kwargs, event.chain
        )
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError) as exc:
        unavailable(runtime, entry, event, owner.expires_in, f"{why}: {exc}")
        return False
    except (
        RemoteCallError,
        AttributeError,
        DataCloneError,
        LimitExceededError,
        StorageCommitError,
        ObjectUnavailableError,
    ) as exc:
        event.reply.fail(exc)  # the call's own outcome, for the caller to raise
    except Exception as exc:  # a bug of ours or a garbled answer: answered all the same
        log.exception("relaying %s() to %s failed", event.method, owner.address)
        event.reply.fail(RuntimeError(f"{why}: {exc}"))
    else:
        event.reply.send(result)
    return True
