"""A host's fenced commits: each object's flush (``storage.py``) ends here, in the
object's worker thread, and is batched with those of other objects (``batch.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import store
from .batch import CommitBatcher

if TYPE_CHECKING:
    from .lease import Lease
    from .pg import Postgres
    from .store import Writes

__all__ = ["FencedCommits"]


class FencedCommits:
    """Applies objects' writes to PostgreSQL, each fenced by its object's epoch."""

    def __init__(self, db: Postgres, lease: Lease, *, audit: bool) -> None:
        self._db = db
        self._lease = lease
        self._audit = audit
        self.batcher: CommitBatcher[store.BatchItem] = CommitBatcher(self._commit_batch)
        """Commits of several objects share a PostgreSQL transaction."""

    def flush_to(
        self, namespace: str, hex_id: str, name: str | None, epoch: int, writes: Writes
    ) -> bool:
        """A fenced commit (a worker thread): False when fenced (or this host is).
        Batched with other objects' commits unless it follows a ``delete_all``."""
        held = self._lease.held
        if held is None or self._lease.fenced.is_set():
            return False
        if writes.cleared:
            return self._db.call(
                store.commit_writes,
                held,
                namespace,
                hex_id,
                name,
                epoch,
                writes,
                audit=self._audit,
            )
        return self.batcher.commit((namespace, hex_id, name, epoch, writes))

    def _commit_batch(self, items: Sequence[store.BatchItem]) -> list[bool]:
        """One batch (its leader's worker thread)."""
        held = self._lease.held
        if held is None or self._lease.fenced.is_set():
            return [False] * len(items)
        return self._db.call(store.commit_batch, held, list(items), audit=self._audit)
