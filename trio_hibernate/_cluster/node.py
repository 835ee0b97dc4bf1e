"""One host's part in a cluster: the objects it claims, where events for objects it
does not own go, its commits, the alarm sweeper, ``/_cluster``.

Ownership (see ``docs/cluster.md``): an event for an object this host has not claimed
(``entry.placed`` is None) waits here while a claim runs in PostgreSQL
(``store.claim``). Claimed: the object's data is installed in the storage backend, its
alarm scheduled, and the events delivered as in single-host mode. Owned by another live
host: ``elsewhere.py`` relays them or answers 503. The lease is ``lease.py``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from .._core.events import CallEvent, Event, FetchEvent
from .._errors import ClusterCommitError, FencedError, StorageError
from .._ids import ObjectId
from . import store
from .commits import FencedCommits
from .elsewhere import drop_socket_event, relay_or_refuse, unavailable
from .lease import Lease
from .pg import Postgres
from .status import COUNTER_HELP
from .storage import ClusterBackend
from .store import Claimed, Held, OwnedElsewhere
from .sweeper import sweep_alarms

if TYPE_CHECKING:
    from .._directory import ObjectEntry
    from .config import ClusterConfig
    from .runtime import ClusterRuntime


__all__ = ["COUNTERS", "ClusterNode"]

log = logging.getLogger("trio_hibernate.cluster")

#: The counters of a node.
COUNTERS: Final = tuple(name for name in COUNTER_HELP if not name.startswith("lease_"))
#: Seconds an event waits for the host to join the cluster before it is refused.
JOIN_WAIT_SECONDS: Final = 10.0
#: Seconds the first connection to PostgreSQL may take.
CONNECT_TIMEOUT: Final = 30.0


class ClusterNode:
    """Cluster mode of one host (see the module). Made by ``open_host``."""

    def __init__(self, config: ClusterConfig, wall_clock: Callable[[], float]) -> None:
        self.config = config
        self.db = Postgres(config.dsn, config.pool_size, config.lease_ttl)
        # The lease has a connection (and a worker thread) of its own: a crowd of claims
        # after a peer's death must not delay the renewals and fence this host too.
        self._lease_db = Postgres(config.dsn, 1, config.lease_ttl)
        self.lease = Lease(self._lease_db, config.host_id, config.lease_ttl, self._fenced)
        self.commits = FencedCommits(self.db, self.lease, audit=config.audit)
        """Every fenced commit of this host's objects (``commits.py``)."""
        self.backend = ClusterBackend(self.commits.flush_to, self._reclaim, self._poisoned)
        self._wall_clock = wall_clock
        self._runtime: ClusterRuntime | None = None
        self._fence_runtime: Callable[[str], None] | None = None
        self._pending: dict[tuple[str, str], list[tuple[Event, bool]]] = {}
        self._claiming: dict[tuple[str, str], trio.Event] = {}
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        """What the node did so far (``/_cluster`` and ``/_metrics`` show them)."""

    # -- start, join, leave ----------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to PostgreSQL and create the tables if missing (raises psycopg's
        errors, or ``psycopg_pool.PoolTimeout``)."""
        await trio.to_thread.run_sync(self.db.open, CONNECT_TIMEOUT)
        await trio.to_thread.run_sync(self._lease_db.open, CONNECT_TIMEOUT)
        await self.db.run(store.create_schema)

    def attach(self, runtime: ClusterRuntime, fence: Callable[[str], None]) -> None:
        """Serve ``runtime``'s objects (once, before :meth:`join`); ``fence(why)``
        makes it stop serving (the lease is lost)."""
        self._runtime = runtime
        self._fence_runtime = fence

    @property
    def incarnation(self) -> int | None:
        """This process's incarnation in the cluster once joined (None before)."""
        held = self.lease.held
        return None if held is None else held.incarnation

    @property
    def held(self) -> Held | None:
        """This process's hold on the cluster once joined."""
        return self.lease.held

    async def join(self, address: str) -> None:
        """Take this host's lease, advertising ``address`` (unless ``advertise`` was
        set); renew it, and sweep alarms, in the host nursery. Once only."""
        if self.lease.joined.is_set():
            return
        self.config = config = self.config.with_advertise(address)
        assert config.advertise is not None
        try:
            held = await self.lease.join(config.advertise)
        except OSError as exc:  # PostgreSQL went away since the host connected
            raise StorageError(
                f"cannot join the cluster as {config.host_id}: {exc}", path=Path("postgresql")
            ) from exc
        log.info(
            "cluster host %s joined as incarnation %d (advertising %s, lease %g s)",
            config.host_id,
            held.incarnation,
            config.advertise,
            config.lease_ttl,
        )
        runtime = self._runtime
        assert runtime is not None
        runtime.spawn(self.lease.keep)
        runtime.spawn(self.lease.watch)
        runtime.spawn(partial(sweep_alarms, self, runtime, self._wall_clock))

    async def leave(self, grace: float) -> None:
        """Graceful leave: wait (at most ``grace`` seconds) until every activation has
        ended and flushed its commits, then release every object this host owns and end
        the lease, so that other hosts claim them at once. A fenced host ends its lease
        too (its objects can then be claimed without waiting for it to expire)."""
        runtime = self._runtime
        if runtime is not None:
            with trio.move_on_after(grace):
                # Every end of an activation signals ``rests`` (after its flusher ran).
                while any(entry.activation is not None for entry in runtime.objects):
                    await runtime.reaper.rests.wait()
        released = await self.lease.leave()
        if released is not None:
            log.info("cluster host %s left, releasing %d objects", self.config.host_id, released)

    async def wait_fenced(self) -> str:
        """Wait until this host has fenced itself; returns why."""
        await self.lease.fenced.wait()
        return self.lease.fenced_because or "fenced"

    def _fenced(self, why: str) -> None:
        if self._fence_runtime is not None:
            self._fence_runtime(why)

    def close(self) -> None:
        """Close the connections to PostgreSQL (blocking)."""
        self.backend.close()
        self.db.close()
        self._lease_db.close()

    # -- placement -------------------------------------------------------------------------

    def place(self, entry: ObjectEntry, event: Event, *, relayed: bool = False) -> None:
        """Deliver ``event`` once it is known where the object lives (see the module).
        An event a peer ``relayed`` here is never relayed again: if yet another host
        owns the object it is answered 503 (the client's retry goes to the owner)."""
        key = (entry.namespace, entry.object_id.hex)
        pending = self._pending.get(key)
        if pending is not None:
            pending.append((event, relayed))
            return
        self._pending[key] = [(event, relayed)]
        runtime = self._runtime
        assert runtime is not None
        runtime.spawn(partial(self._resolve, entry.namespace, entry.object_id))

    async def _resolve(self, namespace: str, object_id: ObjectId) -> None:
        """Claim the object (unless this host holds it already), then deliver the events
        waiting for it here, or send them to the owner."""
        runtime = self._runtime
        assert runtime is not None
        key = (namespace, object_id.hex)
        try:
            outcome = await self._ensure_claimed(namespace, object_id)
        except Exception as exc:  # whatever it was, the waiting events are answered
            log.error("cannot claim %s %s: %s", namespace, object_id, exc)
            entry = runtime.entry_for(namespace, object_id)
            for event, _relayed in self._pending.pop(key, []):
                self.counters["unavailable"] += 1
                unavailable(runtime, entry, event, 1.0, f"PostgreSQL is unreachable: {exc}")
            runtime.forget_if_unused(entry)  # no entry stays for an object not held here
            return
        events = self._pending.pop(key, [])
        # The entry the events were for may have been forgotten meanwhile: use the
        # object's entry now (made again if needed).
        entry = runtime.entry_for(namespace, object_id)
        if isinstance(outcome, OwnedElsewhere):
            for event, relayed in events:
                if relayed:
                    self.counters["unavailable"] += 1
                    why = f"{namespace} {object_id} moved to host {outcome.host_id}"
                    unavailable(runtime, entry, event, 1.0, why)
                elif isinstance(event, FetchEvent | CallEvent):
                    runtime.spawn(partial(self._relay, entry, event, outcome))
                else:
                    drop_socket_event(runtime, entry, event)
            runtime.forget_if_unused(entry)  # no entry stays for an object not held here
            return
        entry.placed = self.backend.epoch_of(namespace, object_id)
        for event, _relayed in events:
            runtime.deliver(entry, event)
        if not events and self.backend.alarm_of(namespace, object_id) is None:
            runtime.forget_if_unused(entry)  # a sweep's claim for an alarm deleted since

    async def _relay(
        self, entry: ObjectEntry, event: FetchEvent | CallEvent, owner: OwnedElsewhere
    ) -> None:
        runtime = self._runtime
        assert runtime is not None
        key, patience = self.config.key, self.config.lease_ttl
        if await relay_or_refuse(runtime, entry, event, owner, key, patience):
            self.counters["relayed"] += 1
        else:
            self.counters["unavailable"] += 1

    async def _ensure_claimed(
        self, namespace: str, object_id: ObjectId
    ) -> Claimed | OwnedElsewhere | None:
        """Claim the object and install its data, unless this host holds a valid copy
        (None). One claim per object at a time: a second caller waits for the first,
        so that no stale epoch is ever installed over a newer one."""
        key = (namespace, object_id.hex)
        while (claiming := self._claiming.get(key)) is not None:
            await claiming.wait()
        if self.backend.epoch_of(namespace, object_id) is not None:
            return None
        self._claiming[key] = done = trio.Event()
        try:
            outcome = await self._claim(namespace, object_id)
            if isinstance(outcome, Claimed):
                data = outcome.data
                self.backend.install(namespace, object_id, data)
                runtime = self._runtime
                if data.alarm is not None and runtime is not None:
                    alarm_key = (namespace, object_id.hex, object_id.name)
                    runtime.alarms.schedule(alarm_key, data.alarm)
            return outcome
        finally:
            del self._claiming[key]
            done.set()

    async def _claim(self, namespace: str, object_id: ObjectId) -> Claimed | OwnedElsewhere:
        with trio.move_on_after(JOIN_WAIT_SECONDS):
            await self.lease.joined.wait()
        if not self.lease.joined.is_set():
            raise ClusterCommitError(
                "this host has not joined the cluster: give ClusterConfig.advertise, or "
                "serve the host with serve_objects / open_server, which join it"
            )
        if self.lease.fenced.is_set():
            raise ClusterCommitError("this host is fenced")
        held = self.held
        assert held is not None
        try:
            outcome = await self.db.run(store.claim, held, namespace, object_id.hex, object_id.name)
        except OSError as exc:  # PostgreSQL failed or is unreachable (pg.py)
            raise ClusterCommitError(f"cannot claim {namespace} {object_id}: {exc}") from exc
        if outcome is None:
            self.lease.fence("its lease had expired when it tried to claim an object")
            raise ClusterCommitError("this host's lease has expired")
        if isinstance(outcome, Claimed):
            self.counters["claims"] += 1
        return outcome

    async def _reclaim(self, namespace: str, object_id: ObjectId) -> None:
        """Before an activation whose copy is gone (a poisoned commit): claim again.

        Raises:
            FencedError: another host owns the object now.
        """
        outcome = await self._ensure_claimed(namespace, object_id)
        if isinstance(outcome, OwnedElsewhere):
            raise FencedError(f"{namespace} {object_id} is owned by host {outcome.host_id} now")
        runtime = self._runtime
        entry = None if runtime is None else runtime.objects.get(namespace, object_id)
        if entry is not None:
            entry.placed = self.backend.epoch_of(namespace, object_id)

    def _poisoned(self, namespace: str, object_id: ObjectId, why: str) -> None:
        """A flush failed: the object must be claimed and loaded again."""
        self.counters["claims_lost"] += 1
        runtime = self._runtime
        entry = None if runtime is None else runtime.objects.get(namespace, object_id)
        if entry is not None:
            entry.placed = None
        if why.startswith("fenced"):
            self.counters["fenced_commits"] += 1
            if self.lease.leaving:  # released by leave() while a flush ran: not a fence
                return
            self.lease.fence(f"a commit of {namespace} {object_id} was fenced ({why})")

    def forgotten(self, entry: ObjectEntry) -> None:
        """The runtime dropped ``entry`` (nothing left to do): give the object up."""
        epoch = entry.placed
        if epoch is None:
            return
        entry.placed = None
        self.backend.drop(entry.namespace, entry.object_id, epoch)
        held = self.held
        runtime = self._runtime
        if held is None or runtime is None or self.lease.fenced.is_set():
            return  # nothing to release (a fenced host owns nothing any more)
        # Also while the host shuts down: each object is released as soon as its last
        # activation has ended, so clients that reconnect elsewhere are served at once.
        runtime.spawn(partial(self._release, held, entry.namespace, entry.object_id.hex, epoch))

    async def _release(self, held: Held, namespace: str, hex_id: str, epoch: int) -> None:
        try:
            await self.db.run(store.release, held, namespace, hex_id, epoch)
        except OSError as exc:  # harmless: the object moves when the lease ends
            log.warning("could not release %s %s: %s", namespace, hex_id, exc)
        else:
            self.counters["releases"] += 1

    # -- commits ---------------------------------------------------------------------------

    # -- alarms of objects nobody owns (sweeper.py) ----------------------------------------

    def claim_for_alarm(self, namespace: str, object_id: ObjectId) -> bool:
        """A sweep found the object's alarm due and its owner gone: claim it (which
        schedules the alarm here), unless this host holds it or is claiming it."""
        runtime = self._runtime
        assert runtime is not None
        key = (namespace, object_id.hex)
        if runtime.entry_for(namespace, object_id).placed is not None or key in self._pending:
            return False
        self._pending[key] = []
        runtime.spawn(partial(self._resolve, namespace, object_id))
        return True

    def owned(self) -> list[ObjectEntry]:
        """The entries of the objects this host owns."""
        runtime = self._runtime
        assert runtime is not None
        return [entry for entry in runtime.objects if entry.placed is not None]
