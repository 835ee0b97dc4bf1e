"""A host's membership lease: join, renew, self-fence, leave.

The host renews its lease every quarter of ``lease_ttl`` (``expires_at`` is computed by
the database's clock). If it has not renewed it for ``FENCE_FRACTION`` of ``lease_ttl``
by its own monotonic clock (the process was paused, or PostgreSQL was unreachable), it
fences itself before the lease can expire in the database and another host take its
objects over: it stops serving. Even a host that does not (a frozen process) cannot
corrupt an object: every commit checks the object's epoch first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from .._errors import StorageError
from . import store

if TYPE_CHECKING:
    from .pg import Postgres
    from .store import Held, HostRow

__all__ = ["FENCE_FRACTION", "Lease"]

log = logging.getLogger("trio_hibernate.cluster")

#: A host that has not renewed its lease for this part of ``lease_ttl`` fences itself.
FENCE_FRACTION: Final = 0.75


class Lease:
    """This host's lease (see the module). ``on_fenced(why)`` is called once, when the
    host must stop serving."""

    def __init__(
        self, db: Postgres, host_id: str, ttl: float, on_fenced: Callable[[str], None]
    ) -> None:
        self._db = db
        self.host_id = host_id
        self.ttl = ttl
        self._on_fenced = on_fenced
        self.held: Held | None = None
        """This process's hold (host id, incarnation) once joined."""
        self.joined = trio.Event()
        self.fenced = trio.Event()
        self.fenced_because: str | None = None
        self.leaving = False
        """Set by :meth:`leave`: the lease ends on purpose."""
        self.hosts: list[HostRow] = []
        """Every host of the cluster, as of the last renewal."""
        self.renewals = 0
        self.renewal_failures = 0
        self._deadline = math.inf

    async def join(self, address: str) -> Held:
        """Take the lease with a new incarnation, advertising ``address``. If a live
        process holds this host id, wait for its lease to expire (a restart after a
        crash), at most twice the TTL.

        Raises:
            StorageError: another process still holds the host id's lease after that.
        """
        give_up = trio.current_time() + 2 * self.ttl
        while True:
            started = trio.current_time()
            answer = await self._db.run(store.join, self.host_id, address, self.ttl)
            if isinstance(answer, store.Held):
                break
            if started + answer > give_up:
                raise StorageError(
                    f"cluster host id {self.host_id!r} is in use by a live process (its "
                    f"lease is renewed; {answer:.1f} s left): give this host another "
                    "--host-id, or stop the other one",
                    path=Path("postgresql"),
                )
            log.info(
                "cluster host id %s is held by a previous process for %.1f s more; waiting",
                self.host_id,
                answer,
            )
            await trio.sleep(min(answer + 0.05, max(0.0, give_up - started)))
        self.held = held = answer
        self._deadline = started + self.ttl * FENCE_FRACTION
        self.hosts = await self._db.run(store.hosts)
        self.joined.set()
        return held

    async def keep(self) -> None:
        """Renew the lease until the host leaves or is fenced (a host nursery task)."""
        held = self.held
        assert held is not None
        while not self.leaving:
            await trio.sleep(self.ttl / 4)
            started = trio.current_time()
            if self._stopped():
                return
            try:
                ok = await self._db.run(store.renew, held, self.ttl)
            except OSError as exc:  # PostgreSQL unreachable: the watch decides
                self.renewal_failures += 1
                log.warning("could not renew the lease of %s: %s", held.host_id, exc)
                continue
            if not ok:
                if not self.leaving:
                    self.fence("its lease was taken over (another process joined as this host id)")
                return
            self.renewals += 1
            self._deadline = started + self.ttl * FENCE_FRACTION
            try:
                self.hosts = await self._db.run(store.hosts)
            except OSError as exc:
                log.warning("could not read the cluster's hosts: %s", exc)

    async def watch(self) -> None:
        """Fence the host once its lease may be about to expire unrenewed."""
        while not self.leaving and not self.fenced.is_set():
            deadline = self._deadline
            if trio.current_time() >= deadline:
                self.fence(
                    f"its lease was not renewed for {self.ttl * FENCE_FRACTION:g} s (the "
                    "process was paused, or PostgreSQL was unreachable)"
                )
                return
            await trio.sleep_until(deadline)

    def _stopped(self) -> bool:
        return self.leaving or self.fenced.is_set()

    def valid(self) -> bool:
        """Whether this host holds its lease, by its own clock."""
        return not self.fenced.is_set() and trio.current_time() < self._deadline

    def fence(self, why: str) -> None:
        """Stop serving: this host may no longer own anything."""
        if self.fenced.is_set():
            return
        self.fenced_because = why
        log.critical("cluster host %s fenced itself: %s", self.host_id, why)
        self._on_fenced(why)
        self.fenced.set()

    async def leave(self) -> int | None:
        """Release every object and end the lease (after the last activation ended).
        Returns how many objects were released, None if that failed or was not due."""
        held = self.held
        self.leaving = True
        if held is None:
            return None
        try:  # a fenced host too: what it still owns is released (every epoch check holds)
            return await self._db.run(store.leave, held)
        except OSError:
            log.exception("could not release this host's objects; they move when its lease ends")
            return None
