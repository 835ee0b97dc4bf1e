"""Cluster mode's storage backend: each owned object's data in an in-memory SQLite
database on its owner, every committed turn's writes applied to PostgreSQL by a fenced
transaction before anything that depends on them leaves the host.

How it fits the turn commit protocol (``_storage/commit.py``): the backend is durable,
so ``commit()`` (event loop thread) ends the local SQLite transaction and queues the
turn's writes, and ``flush()`` (a worker thread, one at a time per object) applies every
queued write to PostgreSQL in one transaction that first checks the object's fencing
epoch. The output gate holds each reply until that flush returns. A flush that fails, or
whose outcome is unknown, raises :class:`~trio_hibernate.ClusterCommitError`: the
runtime drops the held outputs and resets the instance, and the database is *poisoned*:
the next activation reloads the object from PostgreSQL (a new claim), so no instance
ever sees a write that PostgreSQL may not have.

The key-value entries and the alarm are shipped as changes (rows of ``th_kv`` and
``th_alarms``). The object's own SQL (``sql.exec``) is shipped as a whole: a commit of
turns that wrote with ``sql.exec`` (or ``delete_all``) takes an image of the local
database (``sqlite3.Connection.serialize``) and the fenced statement stores it in
``th_sql``; a claim restores it (``deserialize``), then puts back the entries and the
alarm from their own tables, which are always at least as new. So a new owner sees the
object's SQL tables exactly as the last acknowledged commit left them. The image costs
its size per such commit: it is capped at :data:`MAX_SQL_IMAGE_BYTES` (a commit past it
fails, and the object is reset to its last commit).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final

from .._errors import ClusterCommitError, FencedError
from .._storage.sqlite import SqliteDatabase
from .store import ObjectData, Writes

if TYPE_CHECKING:
    from .._ids import ObjectId
    from .._limits import Limits
    from .._storage.backend import ObjectDatabase, SqlValue, UserCursor

__all__ = ["MAX_SQL_IMAGE_BYTES", "ClusterBackend", "ClusterDatabase"]

#: The largest SQL database an object may have in cluster mode (its image is shipped
#: whole with each commit of turns that wrote with ``sql.exec``).
MAX_SQL_IMAGE_BYTES: Final = 16 * 1024 * 1024


class ClusterDatabase:
    """One owned object's database (see the module). ``flush_to`` applies queued writes
    to PostgreSQL under ``epoch`` (worker thread); it returns False when fenced."""

    __slots__ = (
        "_conn",
        "_flush_lock",
        "_local",
        "_queued",
        "_savepoints",
        "_turn",
        "epoch",
        "flush_to",
        "poisoned",
    )

    def __init__(self, data: ObjectData, flush_to: Callable[[int, Writes], bool]) -> None:
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        if data.image is not None:
            conn.deserialize(data.image)  # the SQL tables as the last commit left them
        self._conn = conn
        self._local = SqliteDatabase(conn)
        if data.image is not None:  # entries and alarm: their own tables are the newest
            conn.execute("DELETE FROM _th_kv")
            conn.execute("DELETE FROM _th_meta")
        if data.entries:
            self._local.put_many(data.entries)
        if data.alarm is not None:
            self._local.set_alarm(data.alarm)
        self._local.commit()
        self.epoch = data.epoch
        """The fencing token this host claimed the object with."""
        self.flush_to = flush_to
        self._turn = Writes()  # the open transaction's writes
        self._savepoints: list[tuple[str, Writes]] = []
        self._queued = Writes()  # committed locally, not yet in PostgreSQL
        self._flush_lock = threading.Lock()
        self.poisoned: str | None = None
        """Why this copy may differ from PostgreSQL (a failed flush), or None."""

    # -- transactions ----------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        return self._local.in_transaction

    def begin(self) -> None:
        self._local.begin()

    def commit(self) -> None:
        """Commit locally and queue the writes (with an image of the SQL database if a
        turn wrote with ``sql.exec``).

        Raises:
            ClusterCommitError: the SQL database is over :data:`MAX_SQL_IMAGE_BYTES`
                (nothing is committed: the writes are rolled back).
        """
        if self._turn.sql and (size := self._local.database_size()) > MAX_SQL_IMAGE_BYTES:
            self.rollback()
            raise ClusterCommitError(
                f"the object's SQL database would be {size} bytes, over the "
                f"{MAX_SQL_IMAGE_BYTES} bytes cluster mode ships with a commit "
                "(MAX_SQL_IMAGE_BYTES); the turn's writes are rolled back"
            )
        self._local.commit()
        turn, self._turn = self._turn, Writes()
        self._savepoints.clear()
        if turn.sql:
            turn.image = self._conn.serialize()
        if not turn.empty:
            with self._flush_lock:
                self._queued.merge(turn)

    def flush(self) -> bool:
        """Apply the queued writes to PostgreSQL (worker thread). Never asks for a
        checkpoint. Raises ClusterCommitError (FencedError when another host owns it)."""
        with self._flush_lock:
            writes, self._queued = self._queued, Writes()
        if writes.empty:
            return False
        try:
            done = self.flush_to(self.epoch, writes)
        except Exception as exc:
            self.poisoned = f"a commit to PostgreSQL failed or its outcome is unknown: {exc}"
            raise ClusterCommitError(self.poisoned) from exc
        if not done:
            self.poisoned = f"fenced: another host owns the object (epoch {self.epoch} is stale)"
            raise FencedError(self.poisoned)
        return False

    def checkpoint(self) -> None:
        return None

    def close_cursors(self) -> None:
        self._local.close_cursors()

    def rollback(self) -> None:
        self._local.rollback()
        self._turn = Writes()
        self._savepoints.clear()

    def savepoint(self, name: str) -> None:
        self._local.savepoint(name)
        self._savepoints.append((name, self._turn.copy()))

    def release(self, name: str) -> None:
        self._local.release(name)
        while self._savepoints:
            if self._savepoints.pop()[0] == name:
                break

    def rollback_to(self, name: str) -> None:
        self._local.rollback_to(name)
        for i in range(len(self._savepoints) - 1, -1, -1):
            saved_name, snapshot = self._savepoints[i]
            if saved_name == name:
                del self._savepoints[i + 1 :]  # ROLLBACK TO keeps the savepoint itself
                self._turn = snapshot.copy()
                return

    # -- key-value and alarm ---------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        return self._local.get_many(keys)

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        items = list(items)
        self._local.put_many(items)
        self._turn.entries.update(items)

    def delete_many(self, keys: Sequence[str]) -> int:
        deleted = self._local.delete_many(keys)
        for key in keys:
            self._turn.entries[key] = None
        return deleted

    def list(
        self,
        *,
        prefix: str | None,
        start: str | None,
        end: str | None,
        reverse: bool,
        limit: int | None,
    ) -> list[tuple[str, bytes]]:
        return self._local.list(prefix=prefix, start=start, end=end, reverse=reverse, limit=limit)

    def delete_all(self) -> None:
        self._local.delete_all()
        self._turn = Writes(cleared=True, alarm=None, sql=True)  # its tables are gone too

    def get_alarm(self) -> float | None:
        return self._local.get_alarm()

    def set_alarm(self, when: float | None) -> None:
        self._local.set_alarm(when)
        self._turn.alarm = when

    def execute_user(self, query: str, bindings: Sequence[SqlValue], limits: Limits) -> UserCursor:
        cursor = self._local.execute_user(query, bindings, limits)
        if cursor.wrote:
            self._turn.sql = True
        return cursor

    def database_size(self) -> int:
        return self._local.database_size()

    def close(self) -> None:
        self._local.close()


class ClusterBackend:
    """The :class:`~trio_hibernate._storage.backend.StorageBackend` of cluster mode:
    the local copies of the objects this host owns (see the module).

    A copy is installed when a claim has read the object's data (:meth:`install`) and
    dropped when the host gives the object up (:meth:`drop`) or a flush poisons it.
    :meth:`prepare`, awaited before each activation, makes sure a valid copy is there,
    claiming the object again through ``reclaim`` (which installs it) when it is not.
    """

    def __init__(
        self,
        flush_to: Callable[[str, str, str | None, int, Writes], bool],
        reclaim: Callable[[str, ObjectId], Awaitable[None]],
        on_poisoned: Callable[[str, ObjectId, str], None],
    ) -> None:
        self._flush_to = flush_to
        self._reclaim = reclaim
        self._on_poisoned = on_poisoned
        self._copies: dict[tuple[str, str], ClusterDatabase] = {}

    @property
    def durable(self) -> bool:
        return True

    @property
    def alarm_index_path(self) -> None:
        return None

    @property
    def max_descriptors(self) -> int:
        return 0

    @property
    def open_descriptors(self) -> int:
        return 0

    def install(self, namespace: str, object_id: ObjectId, data: ObjectData) -> None:
        """Keep the data a claim read (replacing an older copy)."""
        key = (namespace, object_id.hex)
        old = self._copies.pop(key, None)
        if old is not None:
            old.close()
        flush = partial(self._flush_to, namespace, object_id.hex, object_id.name)
        self._copies[key] = ClusterDatabase(data, flush)

    def drop(self, namespace: str, object_id: ObjectId, epoch: int | None = None) -> None:
        """Forget the copy (of ``epoch`` only, when given)."""
        key = (namespace, object_id.hex)
        copy = self._copies.get(key)
        if copy is not None and (epoch is None or copy.epoch == epoch):
            del self._copies[key]
            copy.close()

    def alarm_of(self, namespace: str, object_id: ObjectId) -> float | None:
        """The alarm time in the valid copy held, or None (no alarm, or no copy)."""
        copy = self._copies.get((namespace, object_id.hex))
        return None if copy is None or copy.poisoned else copy.get_alarm()

    def epoch_of(self, namespace: str, object_id: ObjectId) -> int | None:
        """The epoch of the valid copy held, or None."""
        copy = self._copies.get((namespace, object_id.hex))
        return None if copy is None or copy.poisoned else copy.epoch

    async def prepare(self, namespace: str, object_id: ObjectId) -> None:
        """Before an activation: a valid copy, or claim and load the object again.

        Raises:
            ClusterCommitError: PostgreSQL cannot be reached, or (FencedError) another
                host owns the object now.
        """
        if self.epoch_of(namespace, object_id) is None:
            await self._reclaim(namespace, object_id)

    def open(self, namespace: str, object_id: ObjectId) -> ClusterDatabase:
        copy = self._copies.get((namespace, object_id.hex))
        if copy is None or copy.poisoned:
            raise ClusterCommitError(
                f"{namespace} {object_id}: this host holds no valid copy of the object's "
                "data (it was given up or a commit failed); its next activation reloads it"
            )
        return copy

    def release(self, namespace: str, object_id: ObjectId, db: ObjectDatabase) -> None:
        """The activation ended: keep a valid copy for the next one; a poisoned one is
        dropped, and the object must be claimed again."""
        assert isinstance(db, ClusterDatabase)
        if db.poisoned is not None:
            self.drop(namespace, object_id, db.epoch)
            self._on_poisoned(namespace, object_id, db.poisoned)

    def close(self) -> None:
        for copy in self._copies.values():
            copy.close()
        self._copies.clear()
