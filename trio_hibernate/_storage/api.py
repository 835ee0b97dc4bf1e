"""``ctx.storage``: the Transactional Storage API of one object.

Semantics, as in Durable Objects:

* Every operation is atomic: a batch ``put``/``delete`` is validated whole before anything
  changes, and ``transaction(fn)`` is all or nothing.
* Writes in one turn (one event handler) are coalesced: they go into the object's open
  SQLite transaction, which the runtime commits once when the turn ends, in a worker
  thread (the event loop never waits on a disk flush). Reads see the turn's own writes.
* Output gate: messages the object sends after a write are held until that write is
  durable; if the commit fails they are dropped and the instance is reset.
* Input gate: events run one turn at a time and the next turn starts only after the
  commit, so no other event reaches the object while its writes are in flight.

Writes made outside a turn (by a ``ctx.start_soon`` task) are committed before the call
returns.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar, final, overload

import attrs
import trio

from .._core.codec import decode_data, encode_data
from .._errors import LimitExceededError
from .backend import ObjectDatabase, SqlValue

if TYPE_CHECKING:
    from .._core.gate import OutputGate
    from .._limits import Limits

__all__ = ["SqlCursor", "SqlStorage", "Storage", "stored_alarm"]

T = TypeVar("T")


@final
@attrs.frozen
class SqlCursor:
    """The result of :meth:`SqlStorage.exec`: column names, rows, and rows written."""

    columns: tuple[str, ...]
    """Column names of the result (empty for statements that return nothing)."""
    rows: list[tuple[SqlValue, ...]]
    """Result rows as tuples."""
    rows_written: int
    """Rows inserted, updated or deleted by the statement."""

    def __iter__(self) -> Iterator[dict[str, SqlValue]]:
        for row in self.rows:
            yield dict(zip(self.columns, row, strict=True))

    def to_list(self) -> list[dict[str, SqlValue]]:
        """Rows as dicts of column name to value."""
        return list(self)

    def one(self) -> dict[str, SqlValue]:
        """The only row. Raises ValueError if there is not exactly one."""
        if len(self.rows) != 1:
            raise ValueError(f"expected exactly one row, got {len(self.rows)}")
        return dict(zip(self.columns, self.rows[0], strict=True))


@final
class SqlStorage:
    """``ctx.storage.sql``: SQL on the object's own SQLite database."""

    __slots__ = ("_storage",)

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def exec(self, query: str, *bindings: SqlValue) -> SqlCursor:
        """Run one SQL statement with ``?`` bindings, inside the turn's transaction.

        Synchronous, like Durable Objects' ``sql.exec``: statements run against the local
        database without a disk flush; the turn's commit makes them durable. Table names
        starting with ``_th_`` are reserved.

        Raises:
            ValueError: the statement touches a table whose name starts with ``_th_``
                (reserved for the key-value API and the alarm).
            sqlite3.Error: the statement failed (nothing it did is kept).
        """
        storage = self._storage
        db = storage._database()
        before = db.total_changes
        cursor = db.execute_user(query, bindings)
        rows = cursor.fetchall()
        columns = tuple(d[0] for d in cursor.description or ())
        written = db.total_changes - before
        if written or not query.lstrip()[:6].upper().startswith("SELECT"):
            storage._wrote()
        return SqlCursor(columns=columns, rows=rows, rows_written=written)


@final
class Storage:
    """Durable key-value storage, SQL and the alarm of one object (``ctx.storage``).

    Keys are strings ordered by their UTF-8 bytes; values are data (the attachment codec).
    Every method is a checkpoint.
    """

    __slots__ = (
        "_alarm_set",
        "_commit_done",
        "_db",
        "_dirty",
        "_exclusive",
        "_finish_outside_turn",
        "_gate",
        "_in_turn",
        "_limits",
        "_open_db",
        "_savepoints",
        "sql",
    )

    def __init__(
        self,
        *,
        open_db: Callable[[], ObjectDatabase],
        limits: Limits,
        gate: OutputGate,
        finish_outside_turn: Callable[[], Awaitable[None]],
        in_turn: Callable[[], bool],
        exclusive: Callable[[], AbstractAsyncContextManager[None]],
    ) -> None:
        # Made by the runtime for each activation.
        self._open_db = open_db
        self._db: ObjectDatabase | None = None
        self._limits = limits
        self._gate = gate
        self._finish_outside_turn = finish_outside_turn
        self._dirty = False
        self._commit_done: trio.Event | None = None
        self._savepoints = 0
        #: The alarm value written in this turn (float or None), or ``...`` if untouched.
        self._alarm_set: float | object | None = ...
        self._in_turn = in_turn
        self._exclusive = exclusive
        self.sql = SqlStorage(self)
        """SQL on this object's database."""

    # -- bookkeeping for the runtime -----------------------------------------------------

    def _database(self) -> ObjectDatabase:
        if self._commit_done is not None:
            raise RuntimeError(
                "storage used synchronously while a commit is in flight (from a "
                "ctx.start_soon task?): await ctx.storage.sync() first"
            )
        if self._db is None:
            self._db = self._open_db()
        return self._db

    def _wrote(self) -> None:
        self._dirty = True
        self._gate.closed = True

    async def _after_write(self) -> None:
        if self._in_turn():
            await trio.lowlevel.checkpoint()
        else:
            await self._finish_outside_turn()

    async def _settled(self) -> None:
        """Wait for an in-flight commit (only a background task can meet one)."""
        while self._commit_done is not None:
            await self._commit_done.wait()

    @property
    def committing(self) -> bool:
        """True while a commit runs in a worker thread."""
        return self._commit_done is not None

    @committing.setter
    def committing(self, value: bool) -> None:
        if value:
            self._commit_done = trio.Event()
        elif self._commit_done is not None:
            self._commit_done.set()
            self._commit_done = None

    @property
    def dirty(self) -> bool:
        """True when writes are waiting for the turn's commit."""
        return self._dirty

    def take_alarm_change(self) -> float | object | None:
        """The alarm written since the last call (``...`` if none); resets it."""
        change, self._alarm_set = self._alarm_set, ...
        return change

    def commit_sync(self) -> None:
        """Commit in the calling thread (the runtime calls it in a worker thread)."""
        if self._db is not None:
            self._db.commit()

    def committed(self) -> None:
        """The commit succeeded: release the held messages."""
        self._dirty = False
        self._gate.open()

    def failed(self) -> int:
        """The commit failed: roll back, drop held messages. Returns how many."""
        self._dirty = False
        self._alarm_set = ...
        if self._db is not None:
            self._db.rollback()
        return self._gate.drop()

    def end_read_only_turn(self) -> None:
        """Close a transaction that only read (no disk flush needed)."""
        if self._db is not None and not self._dirty and self._db.in_transaction:
            self._db.commit()

    def detach(self) -> ObjectDatabase | None:
        """The activation ends: hand back the database to release."""
        db, self._db = self._db, None
        return db

    # -- validation ----------------------------------------------------------------------

    def _key(self, key: object) -> str:
        if not isinstance(key, str):
            raise TypeError(f"storage keys are str, not {type(key).__name__}: {key!r}")
        size = len(key.encode("utf-8"))
        limit = self._limits.max_storage_key_bytes
        if size > limit:
            raise LimitExceededError(
                f"a storage key cannot be larger than {limit} bytes; this one is {size} "
                "bytes (Limits.max_storage_key_bytes)",
                limit_name="max_storage_key_bytes",
                limit=limit,
                value=size,
            )
        return key

    def _keys(self, keys: Sequence[str]) -> list[str]:
        if isinstance(keys, str | bytes):
            raise TypeError("expected a key or a sequence of keys")
        checked = [self._key(k) for k in keys]
        limit = self._limits.max_storage_keys_per_call
        if len(checked) > limit:
            raise LimitExceededError(
                f"at most {limit} keys per call; got {len(checked)} "
                "(Limits.max_storage_keys_per_call)",
                limit_name="max_storage_keys_per_call",
                limit=limit,
                value=len(checked),
            )
        return checked

    def _encode(self, value: object) -> bytes:
        return encode_data(
            value,
            what="A storage value",
            limit_name="max_storage_value_bytes",
            limit_bytes=self._limits.max_storage_value_bytes,
        )

    # -- key-value -----------------------------------------------------------------------

    @overload
    async def get(self, key: str) -> object | None: ...  # type: ignore[overload-overlap]
    @overload
    async def get(self, key: Sequence[str]) -> dict[str, object]: ...

    async def get(self, key: str | Sequence[str]) -> object | dict[str, object] | None:
        """The value of ``key`` (None if absent), or a dict for a sequence of keys.

        The dict holds the keys that exist, in key order. Values are fresh copies.
        """
        await self._settled()
        if isinstance(key, str):
            found = self._database().get_many([self._key(key)])
            await trio.lowlevel.checkpoint()
            raw = found.get(key)
            return None if raw is None else decode_data(raw)
        keys = self._keys(key)
        found = self._database().get_many(keys)
        await trio.lowlevel.checkpoint()
        return {k: decode_data(v) for k, v in found.items()}

    @overload
    async def put(self, key: str, value: object) -> None: ...
    @overload
    async def put(self, key: Mapping[str, object]) -> None: ...

    async def put(self, key: str | Mapping[str, object], value: object = None) -> None:
        """Store ``value`` under ``key``, or every item of a mapping (all or nothing).

        Raises:
            DataCloneError: a value is not data.
            LimitExceededError: a key, a value or the batch is over its limit.
            Nothing is stored when any of these is raised.
        """
        await self._settled()
        if isinstance(key, str):
            items = [(self._key(key), self._encode(value))]
        elif isinstance(key, Mapping):
            keys = self._keys(list(key))
            items = [(k, self._encode(key[k])) for k in keys]
        else:
            raise TypeError(f"put() takes a key and a value, or a mapping; got {key!r}")
        self._database().put_many(items)
        self._wrote()
        await self._after_write()

    @overload
    async def delete(self, key: str) -> bool: ...
    @overload
    async def delete(self, key: Sequence[str]) -> int: ...

    async def delete(self, key: str | Sequence[str]) -> bool | int:
        """Delete ``key`` (returns whether it existed) or keys (returns how many did)."""
        await self._settled()
        if isinstance(key, str):
            count = self._database().delete_many([self._key(key)])
            result: bool | int = count > 0
        else:
            count = self._database().delete_many(self._keys(key))
            result = count
        self._wrote()
        await self._after_write()
        return result

    async def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> dict[str, object]:
        """Entries in key order (``start <= key < end``, with ``prefix``), as a dict.

        ``reverse`` lists from the highest key down; ``limit`` caps the count.
        """
        await self._settled()
        for name, bound in (("prefix", prefix), ("start", start), ("end", end)):
            if bound is not None and not isinstance(bound, str):
                raise TypeError(f"list({name}=...) takes a str, not {bound!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"list(limit=...) takes an int, not {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"list(limit=...) must be at least 1, got {limit}")
        rows = self._database().list(
            prefix=prefix, start=start, end=end, reverse=reverse, limit=limit
        )
        await trio.lowlevel.checkpoint()
        return {k: decode_data(v) for k, v in rows}

    async def delete_all(self) -> None:
        """Delete every key, every SQL table and the alarm."""
        await self._settled()
        self._database().delete_all()
        self._alarm_set = None
        self._wrote()
        await self._after_write()

    async def transaction(self, fn: Callable[[Storage], Awaitable[T]]) -> T:
        """Run ``await fn(storage)`` all or nothing: if it raises, its writes are undone.

        The exception propagates. Transactions nest. Called from a ``ctx.start_soon``
        task, the transaction waits for the current turn to end and no turn starts until
        it is over and committed (so it is all or nothing there too).
        """
        await self._settled()
        if self._in_turn():
            return await self._in_savepoint(fn)
        async with self._exclusive():
            return await self._in_savepoint(fn)

    async def _in_savepoint(self, fn: Callable[[Storage], Awaitable[T]]) -> T:
        db = self._database()
        name = f"th_txn_{self._savepoints}"
        alarm_before = self._alarm_set
        db.savepoint(name)
        self._savepoints += 1
        try:
            result = await fn(self)
        except BaseException:
            db.rollback_to(name)
            self._alarm_set = alarm_before
            raise
        finally:
            self._savepoints -= 1
        db.release(name)
        await trio.lowlevel.checkpoint()
        return result

    async def sync(self) -> None:
        """Wait until every write so far is durable."""
        if self._dirty and not self._in_turn():
            await self._finish_outside_turn()
        else:
            await trio.lowlevel.checkpoint()

    # -- alarm ---------------------------------------------------------------------------

    async def get_alarm(self) -> datetime | None:
        """When the alarm is set to fire (UTC), or None."""
        await self._settled()
        when = self._database().get_alarm()
        await trio.lowlevel.checkpoint()
        return None if when is None else datetime.fromtimestamp(when, UTC)

    async def set_alarm(self, when: datetime | float) -> None:
        """Run the object's ``alarm()`` at ``when`` (an aware datetime or epoch seconds).

        One alarm per object: setting replaces the previous one. The alarm wakes a
        hibernated object and survives restarts; a past time fires at once.
        """
        await self._settled()
        value: object = when
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError("set_alarm() needs an aware datetime (add a tzinfo)")
            seconds = value.timestamp()
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            raise TypeError(f"set_alarm() takes a datetime or epoch seconds, not {when!r}")
        if not math.isfinite(seconds):
            raise ValueError(f"the alarm time must be finite, got {seconds}")
        self._database().set_alarm(seconds)
        self._alarm_set = seconds
        self._wrote()
        await self._after_write()

    async def delete_alarm(self) -> None:
        """Cancel the alarm, if any."""
        await self._settled()
        self._database().set_alarm(None)
        self._alarm_set = None
        self._wrote()
        await self._after_write()


def stored_alarm(storage: Storage) -> float | None:
    """For the runtime: the alarm in the object's database (epoch seconds), or None.

    Synchronous (no checkpoint): the supervisor checks an alarm against it before running
    the handler (a stale index entry) and after (delete it unless the handler set a new
    one).

    Raises:
        RuntimeError: a commit is in flight.
        sqlite3.Error, OSError: the database cannot be opened or read.
    """
    return storage._database().get_alarm()
