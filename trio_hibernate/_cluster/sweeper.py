"""The alarm sweeper: alarms of objects whose owner is gone fire on some other host.

The owner of an object schedules its alarm (loaded with the claim). When the owner dies
holding it, or gave the object up and then died, nobody has it scheduled: every host
sweeps ``th_alarms`` every quarter of ``lease_ttl`` for due alarms of objects with no
live owner, and claims them; the claim schedules the alarm on the claimer. Several hosts
may find the same alarm: the claim decides which one fires it (at least once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from .._ids import ObjectId
from . import store

if TYPE_CHECKING:
    from .config import ClusterConfig
    from .lease import Lease
    from .pg import Postgres
    from .runtime import ClusterRuntime

__all__ = ["Sweeping", "sweep_alarms"]

log = logging.getLogger("trio_hibernate.cluster")


class Sweeping(Protocol):
    """What the sweeper needs of the node (``node.ClusterNode`` meets it)."""

    @property
    def config(self) -> ClusterConfig: ...
    @property
    def lease(self) -> Lease: ...
    @property
    def db(self) -> Postgres: ...
    @property
    def counters(self) -> dict[str, int]: ...

    def claim_for_alarm(self, namespace: str, object_id: ObjectId) -> bool:
        """Claim the object for its due alarm; whether a claim was started."""
        ...


async def sweep_alarms(
    node: Sweeping, runtime: ClusterRuntime, wall_clock: Callable[[], float]
) -> None:
    """Sweep until the host is fenced or closing (a host nursery task)."""
    interval = max(0.25, node.config.lease_ttl / 4)
    while True:
        await trio.sleep(interval)
        if node.lease.fenced.is_set() or runtime.closing:
            return
        namespaces = sorted(runtime.app.objects)
        try:
            due = await node.db.run(store.due_orphans, wall_clock(), namespaces)
        except OSError as exc:  # PostgreSQL unreachable: the next sweep tries again
            log.warning("alarm sweep failed: %s", exc)
            continue
        node.counters["sweeps"] += 1
        for namespace, hex_id, name in due:
            if namespace in runtime.app.objects and node.claim_for_alarm(
                namespace, ObjectId(hex_id, name)
            ):
                node.counters["sweep_claims"] += 1
