"""The storage backend interface: what the runtime needs from a place to keep data.

SQLite (``sqlite.py``) is the implementation; a second one (PostgreSQL, to run hosts on
several machines) implements these protocols and is passed to ``open_host`` as
``storage_backend``. Objects never see a backend: they use ``ctx.storage``.

Threading contract: the runtime calls every method of an :class:`ObjectDatabase` from the
event loop thread, except :meth:`ObjectDatabase.flush`, which it runs in a worker thread
when the backend is :attr:`StorageBackend.durable`, while the event loop thread goes on
using the database (the next turns read, write and commit): ``flush`` must not use what
those calls use (the SQLite one syncs the write-ahead log through a descriptor of its
own). :meth:`ObjectDatabase.commit` runs on the event loop thread, so it must not wait
for the disk: it makes the writes visible to later reads, and :meth:`ObjectDatabase.flush`
makes them durable (group commit: one flush for the commits of several turns). A backend
may do work of its own on a database between the runtime's calls (the SQLite one closes
idle connections to stay within its descriptor budget), as long as the database object
the runtime holds keeps working.

Descriptor contract: the server budgets file descriptors (``_descriptors.py``), so a
backend must bound the descriptors its open databases hold, report the bound as
:attr:`StorageBackend.max_descriptors` before the first ``open``, and never exceed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .._ids import ObjectId

if TYPE_CHECKING:
    from .._limits import Limits

__all__ = ["ObjectDatabase", "StorageBackend", "UserCursor"]

SqlValue = None | int | float | str | bytes


class UserCursor(Protocol):
    """The rows of the object's SQL (:meth:`ObjectDatabase.execute_user`).

    Statements that may write have run to completion when it is returned; a read may
    still be stepping, until :meth:`close` or its last row. When the database's
    transaction ends (commit, rollback, close, ``delete_all``) a cursor with rows left
    is closed and says why in :attr:`closed_because` (so is one left when the turn
    that made it ends: :meth:`ObjectDatabase.close_cursors`).
    """

    @property
    def closed_because(self) -> str | None:
        """Why the transaction's end closed the cursor with rows left, or None."""
        ...

    @property
    def column_names(self) -> tuple[str, ...]:
        """Column names of the result (empty when the statement returns no rows)."""
        ...

    @property
    def rows_written(self) -> int:
        """Rows the last statement inserted, updated or deleted."""
        ...

    @property
    def wrote(self) -> bool:
        """Whether the call may have written anything (the turn must then commit)."""
        ...

    def fetchone(self) -> tuple[SqlValue, ...] | None:
        """The next row, or None after the last one or :meth:`close`."""
        ...

    def close(self) -> None:
        """Drop the rows not read yet (idempotent)."""
        ...


class ObjectDatabase(Protocol):
    """One object's data: key-value entries, the alarm, SQL, in one transaction per turn."""

    @property
    def in_transaction(self) -> bool: ...
    def begin(self) -> None: ...
    def commit(self) -> None:
        """Commit the open transaction: its writes are kept, and durable once
        :meth:`flush` returns (or the database is closed). Never waits for the disk."""
        ...

    def flush(self) -> bool:
        """Make every commit so far durable (a worker thread; see the module).
        Returns whether the database asks for a :meth:`checkpoint`."""
        ...

    def checkpoint(self) -> None:
        """Maintenance a flush asked for; run in a worker thread at a turn boundary,
        no transaction open, the database not used meanwhile."""
        ...

    def close_cursors(self) -> None:
        """Close the object's cursors with rows left, as :meth:`commit` would."""
        ...

    def rollback(self) -> None: ...
    def savepoint(self, name: str) -> None: ...
    def release(self, name: str) -> None: ...
    def rollback_to(self, name: str) -> None: ...
    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]: ...
    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None: ...
    def delete_many(self, keys: Sequence[str]) -> int: ...
    def list(
        self,
        *,
        prefix: str | None,
        start: str | None,
        end: str | None,
        reverse: bool,
        limit: int | None,
    ) -> list[tuple[str, bytes]]: ...
    def delete_all(self) -> None: ...
    def get_alarm(self) -> float | None: ...
    def set_alarm(self, when: float | None) -> None: ...
    def execute_user(
        self, query: str, bindings: Sequence[SqlValue], limits: Limits
    ) -> UserCursor: ...
    def database_size(self) -> int: ...
    def close(self) -> None: ...


class StorageBackend(Protocol):
    """Where object databases live."""

    @property
    def durable(self) -> bool:
        """True when data outlives the process (commits are then flushed in worker
        threads; otherwise the runtime never calls :meth:`ObjectDatabase.flush`)."""
        ...

    @property
    def alarm_index_path(self) -> Path | None:
        """Where the host keeps its index of pending alarms (None: in memory only)."""
        ...

    @property
    def max_descriptors(self) -> int:
        """The most file descriptors this backend's open databases will hold at once.

        Fixed for the backend's life; the server keeps them out of ``max_connections``,
        so that connections and databases together stay within the process's limit. 0
        for a backend that holds none (memory).
        """
        ...

    @property
    def open_descriptors(self) -> int:
        """File descriptors its open databases hold now (at most :attr:`max_descriptors`)."""
        ...

    def open(self, namespace: str, object_id: ObjectId) -> ObjectDatabase:
        """The object's database, created if needed; released with :meth:`release`.

        Raises:
            LimitExceededError: opening it would pass :attr:`max_descriptors` and no open
                database can be closed to make room (``limit_name`` names the option).
        """
        ...

    async def prepare(self, namespace: str, object_id: ObjectId) -> None:
        """Awaited before each activation of the object, before :meth:`open` (cluster
        mode claims and loads the object there). Raises ``sqlite3.Error`` or
        ``OSError``: the activation fails (its sockets closed with 1011)."""
        ...

    def release(self, namespace: str, object_id: ObjectId, db: ObjectDatabase) -> None: ...
    def close(self) -> None: ...
