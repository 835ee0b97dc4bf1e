"""``ctx.storage``: the Transactional Storage API of one object.

Semantics, as in Durable Objects:

* Every operation is atomic: a batch ``put``/``delete`` is validated whole before anything
  changes, and ``transaction(fn)`` is all or nothing.
* Writes in one turn (one event handler) are coalesced: they go into the object's open
  SQLite transaction, committed when the turn ends. Reads see every write made before
  them, by this turn or an earlier one, durable yet or not.
* Group commit: events run one turn at a time, but the next turn does not wait for the
  previous turn's disk flush; the turns that run while one flush is in flight share the
  next commit (``commit.py`` has the rules). The event loop never waits on the disk.
* Output gate: messages the object sends after a write (its own turn's or an earlier
  turn's) are held until that write is durable; if the commit fails they are dropped
  and the instance is reset.

Writes made outside a turn (by a ``ctx.start_soon`` task) are committed before the call
returns.

SQL (``storage.sql``) is Cloudflare's ``SqlStorage``: several statements per ``exec``, a
lazy cursor that lasts as long as the object's transaction (the database closes the
cursors left unread when it commits or rolls back), ``database_size``, and Cloudflare's
SQL limits. ``docs/sql.md`` has the details.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TypeVar, final, overload

import trio

from .._core.codec import decode_data, encode_data
from .._errors import LimitExceededError
from .backend import ObjectDatabase, SqlValue, UserCursor

if TYPE_CHECKING:
    from .._core.gate import OutputGate
    from .._limits import Limits

__all__ = ["SqlCursor", "SqlStorage", "Storage", "stored_alarm"]

T = TypeVar("T")


@final
class SqlCursor:
    """The rows of :meth:`SqlStorage.exec`, read as they are asked for (Cloudflare's
    ``SqlStorageCursor``).

    An iterator: ``for row in cursor`` and ``next(cursor)`` give rows as dicts of column
    name to value (a repeated column name keeps its last value, as on Cloudflare);
    :meth:`raw` gives them as tuples. Every way of reading takes rows from the same
    position, so each row is read once: after :meth:`to_list`, :meth:`one` or a loop
    that ran to the end, the cursor is empty.

    Lazy: a ``SELECT`` (or ``VALUES``, ``EXPLAIN``) is stepped as rows are asked for,
    one row ahead (as on Cloudflare, where the row after the one returned is already
    read). Any other statement ran to completion in ``exec`` (its ``RETURNING`` rows are
    held in memory, as SQLite itself holds them).

    Lifetime: a cursor lasts as long as the object's transaction, which ends when the
    turn (the event handler) that made it ends, or when a write made outside a turn (a
    ``ctx.start_soon`` task) commits, or at ``storage.delete_all()``. Rows not read by
    then are gone: reading on raises :class:`RuntimeError`. Within the turn the cursor
    may be read across ``await`` (no other event runs meanwhile). Cloudflare documents
    the same rule, "consume cursors synchronously", without enforcing it; ``to_list()``
    keeps rows for later.

    Made by :meth:`SqlStorage.exec` only.
    """

    __slots__ = ("_closed_by", "_columns", "_error", "_next", "_rows_read", "_source")

    def __init__(self, source: UserCursor) -> None:
        self._source = source
        self._columns = source.column_names
        self._rows_read = 0
        self._closed_by: str | None = None
        self._error: Exception | None = None
        self._next: tuple[SqlValue, ...] | None = source.fetchone()
        if self._next is not None:
            self._rows_read = 1

    def _advance(self) -> None:
        """Read the row after the current one (the cursor stays one row ahead).

        If SQLite fails computing it, the error is kept for the next read: the row
        already read is still returned.
        """
        try:
            self._next = self._source.fetchone()
        except (sqlite3.Error, LimitExceededError) as exc:  # raised by the next read
            self._next = None
            self._error = exc
            self._source.close()
        else:
            if self._next is not None:
                self._rows_read += 1

    def _take(self) -> tuple[SqlValue, ...] | None:
        """The next row (None at the end), keeping the one after it ready."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        row = self._next
        if row is not None and self._closed_by is None:
            self._closed_by = self._source.closed_because
        if self._closed_by is not None:
            self._next = None
            raise RuntimeError(
                f"this SQL cursor was closed with rows left unread: {self._closed_by}; "
                "read a cursor within the turn that made it (to_list() keeps its rows)"
            )
        if row is not None:
            self._advance()
        return row

    def _as_dict(self, row: tuple[SqlValue, ...]) -> dict[str, SqlValue]:
        return dict(zip(self._columns, row, strict=True))

    @property
    def column_names(self) -> list[str]:
        """Column names of the result, in order (empty for a statement that returns no
        rows); Cloudflare's ``columnNames``. A fresh list each time."""
        return list(self._columns)

    @property
    def columns(self) -> tuple[str, ...]:
        """The column names as a tuple (:attr:`column_names`)."""
        return self._columns

    @property
    def rows_read(self) -> int:
        """Rows read from the result so far, counting the one the cursor holds ahead.

        Cloudflare's ``rowsRead`` counts the rows SQLite visited, which Python's
        ``sqlite3`` does not expose: there, ``SELECT count(*) FROM t`` on 1,000 rows
        reads 1,000 rows and an ``UPDATE`` reads the rows it scans; here they read 1
        and 0. Equal for a ``SELECT`` that returns every row it visits.
        """
        return self._rows_read

    @property
    def rows_written(self) -> int:
        """Rows inserted, updated or deleted by the last statement (by its triggers and
        foreign-key actions too); Cloudflare's ``rowsWritten``.

        Counted as SQLite's ``changes()`` counts (so ``CREATE TABLE`` writes 0).
        Cloudflare counts inside its storage engine (a patched SQLite) and can count
        more, for example rows written to indexes.
        """
        return self._source.rows_written

    def __iter__(self) -> SqlCursor:
        """The cursor itself: iterating reads its remaining rows, as dicts."""
        return self

    def __next__(self) -> dict[str, SqlValue]:
        """The next row as a dict (Cloudflare's ``next()``).

        Raises:
            StopIteration: no rows are left.
            RuntimeError: the cursor was closed with rows unread (see the class).
        """
        row = self._take()
        if row is None:
            raise StopIteration
        return self._as_dict(row)

    def raw(self) -> Iterator[tuple[SqlValue, ...]]:
        """The remaining rows as tuples, in column order (Cloudflare's ``raw()``)."""
        while (row := self._take()) is not None:
            yield row

    @property
    def rows(self) -> list[tuple[SqlValue, ...]]:
        """The remaining rows as tuples: ``list(cursor.raw())`` (reads them)."""
        return list(self.raw())

    def to_list(self) -> list[dict[str, SqlValue]]:
        """The remaining rows as dicts (Cloudflare's ``toArray()``)."""
        return [self._as_dict(row) for row in self.raw()]

    def one(self) -> dict[str, SqlValue]:
        """The only remaining row (Cloudflare's ``one()``).

        Raises:
            ValueError: no row is left, or more than one (all of them are then read,
                to say how many).
        """
        row = self._take()
        if row is None:
            raise ValueError("expected exactly one row, got 0")
        if self._next is not None:
            extra = sum(1 for _ in self.raw())
            raise ValueError(f"expected exactly one row, got {1 + extra}")
        return self._as_dict(row)


@final
class SqlStorage:
    """``ctx.storage.sql``: SQL on the object's own SQLite database (Cloudflare's
    ``SqlStorage``)."""

    __slots__ = ("_state",)

    def __init__(self, state: StorageState) -> None:
        self._state = state

    def exec(self, query: str, *bindings: SqlValue) -> SqlCursor:
        """Run the SQL statements of ``query`` inside the turn's transaction.

        Synchronous, like Durable Objects' ``sql.exec``: statements run against the
        local database without a disk flush; the turn's commit makes them durable.

        As on Cloudflare, ``query`` may hold several statements separated by ``;``
        (``"CREATE TABLE t (x); INSERT INTO t VALUES (1)"``). They run in order; the
        ``?`` bindings go to the last one, and the cursor reads its rows and counts.
        Only whitespace may follow the last statement (a trailing comment is an
        error, as there). Unlike Cloudflare, the call is all or nothing: if a
        statement fails, what the earlier ones did is undone (Cloudflare keeps it).
        Table names starting with ``_th_`` are reserved; transactions are
        ``ctx.storage.transaction()``'s.

        Limits (``Limits.max_sql_*``, Cloudflare's by default): the query's size, the
        bindings, the columns of a table, the size of a string, BLOB or row.

        Nothing the call did is kept when it raises.

        Raises:
            LimitExceededError: the query, the bindings, a column count or a value is
                over its limit.
            ValueError: a statement touches a ``_th_*`` table, or is transaction
                control (``BEGIN``, ``COMMIT``, ``ROLLBACK``, ``SAVEPOINT``,
                ``RELEASE``).
            sqlite3.Error: the query holds no statement, a statement before the last
                has parameters, or a statement failed.
            RuntimeError: a checkpoint is running (from a ``ctx.start_soon`` task).
        """
        state = self._state
        limits = state.limits
        if not isinstance(query, str):
            raise TypeError(f"sql.exec() takes the query as a str, not {type(query).__name__}")
        _check_sql_limit(
            limits, "max_sql_statement_bytes", len(query.encode("utf-8")), "bytes in the query"
        )
        _check_sql_limit(limits, "max_sql_bound_parameters", len(bindings), "bindings")
        for number, value in enumerate(bindings, start=1):
            size = _value_bytes(value, limits.max_sql_row_bytes)
            _check_sql_limit(limits, "max_sql_row_bytes", size, f"bytes in binding {number}")
        source = state.database().execute_user(query, bindings, limits)
        if source.wrote:
            state.wrote()
        return SqlCursor(source)

    @property
    def database_size(self) -> int:
        """Bytes the object's database takes: its pages in use times the page size
        (Cloudflare's ``databaseSize``). It includes the key-value data and the alarm,
        and the writes not yet committed.

        Raises:
            RuntimeError: a checkpoint is running (from a ``ctx.start_soon`` task).
        """
        return self._state.database().database_size()


def _value_bytes(value: object, limit: int) -> int:
    """The size SQLite gives a bound value (0 for numbers and NULL)."""
    if isinstance(value, str):
        # A str of n code points is at most 4n bytes of UTF-8: encode only if it matters.
        return len(value) if len(value) * 4 <= limit else len(value.encode("utf-8"))
    if isinstance(value, memoryview):
        return value.nbytes
    if isinstance(value, bytes | bytearray):
        return len(value)
    return 0


def _check_sql_limit(limits: Limits, name: str, value: int, what: str) -> None:
    limit: int = getattr(limits, name)
    if value > limit:
        raise LimitExceededError(
            f"sql.exec() allows at most {limit} {what}; got {value} (Limits.{name}, as on "
            "Cloudflare)",
            limit_name=name,
            limit=limit,
            value=value,
        )


_DROPPED: Final = (
    "this storage belongs to an instance that was dropped (hibernated, reset or shut "
    "down); use the storage of the object's current instance"
)


def _instance_dropped() -> ObjectDatabase:
    raise RuntimeError(_DROPPED)


async def _finish_dropped() -> None:
    raise RuntimeError(_DROPPED)


def _not_in_turn() -> bool:
    return False


def _exclusive_dropped() -> AbstractAsyncContextManager[None]:
    raise RuntimeError(_DROPPED)


@final
class StorageState:
    """The runtime's side of one activation's storage: the database connection, the
    writes not yet committed and their alarm change, the checks of keys and values.

    Not for object code (:class:`Storage` is the API it sees); the commit protocol
    (``commit.py``) drives it.
    """

    __slots__ = (
        "_busy_done",
        "_db",
        "_open_db",
        "alarm_set",
        "committing",
        "dirty",
        "exclusive",
        "finish_outside_turn",
        "gate",
        "in_turn",
        "limits",
        "savepoints",
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
        self._open_db = open_db
        self._db: ObjectDatabase | None = None
        self._busy_done: trio.Event | None = None
        self.limits = limits
        self.gate = gate
        self.finish_outside_turn = finish_outside_turn
        """Commit a write made outside any turn (a background task's)."""
        self.in_turn = in_turn
        """True when the calling task runs the object's current turn."""
        self.exclusive = exclusive
        """A background task's transaction: a turn of its own, committed at the end."""
        self.dirty = False
        """True when the open transaction holds writes (of this turn, or of turns that
        ended while the previous commit was being flushed) not yet committed."""
        self.committing = False
        """True while a commit is being made durable (flushed in a worker thread), or
        writes wait to join the next one: outputs may be held though no turn runs."""
        self.savepoints = 0
        """Nested ``transaction()`` calls open now."""
        self.alarm_set: float | object | None = ...
        """The alarm value written in this turn (float or None), or ``...`` if untouched."""

    def database(self) -> ObjectDatabase:
        """The object's database, opened on first use.

        Raises:
            RuntimeError: a worker thread uses the connection (a checkpoint; storage used
                synchronously from a ``ctx.start_soon`` task).
        """
        if self._busy_done is not None:
            raise RuntimeError(
                "storage used synchronously while its database is checkpointed (from a "
                "ctx.start_soon task?): await ctx.storage.sync() first"
            )
        if self._db is None:
            self._db = self._open_db()
        return self._db

    def wrote(self) -> None:
        """A write happened: it waits for the commit, and so do outgoing messages."""
        self.dirty = True
        self.gate.wrote()

    async def after_write(self) -> None:
        """A write's checkpoint; outside a turn, its commit."""
        if self.in_turn():
            await trio.lowlevel.checkpoint()
        else:
            await self.finish_outside_turn()

    async def settled(self) -> None:
        """Wait while a worker thread uses the connection (a checkpoint, made at a turn
        boundary: only a background task can meet one)."""
        while self._busy_done is not None:
            await self._busy_done.wait()

    @property
    def busy(self) -> bool:
        """True while a worker thread uses the connection (a checkpoint)."""
        return self._busy_done is not None

    @busy.setter
    def busy(self, value: bool) -> None:
        if value:
            self._busy_done = trio.Event()
        elif self._busy_done is not None:
            self._busy_done.set()
            self._busy_done = None

    def take_alarm_change(self) -> float | object | None:
        """The alarm written since the last call (``...`` if none); resets it."""
        change, self.alarm_set = self.alarm_set, ...
        return change

    def commit_sync(self) -> None:
        """Commit the open transaction (``COMMIT``, no disk flush: see :meth:`flush_sync`)."""
        if self._db is not None:
            self._db.commit()

    def flush_sync(self) -> bool:
        """Make every commit so far durable (the runtime runs it in a worker thread).
        Returns whether the database asks for a checkpoint."""
        return self._db is not None and self._db.flush()

    def checkpoint_sync(self) -> None:
        """Checkpoint the database (in a worker thread, while :attr:`busy`)."""
        if self._db is not None:
            self._db.checkpoint()

    def committed(self) -> None:
        """Every commit is durable: release the held messages."""
        self.dirty = False
        self.gate.open()

    def rollback(self) -> None:
        """Forget the writes not yet committed (and their alarm change)."""
        self.dirty = False
        self.alarm_set = ...
        if self._db is not None:
            self._db.rollback()

    def failed(self) -> int:
        """The commit failed: roll back, drop held messages. Returns how many."""
        self.rollback()
        return self.gate.drop()

    def close_cursors(self) -> None:
        """The turn ended but its writes wait for the next commit: its cursors end
        now all the same (a cursor lasts one turn)."""
        if self._db is not None:
            self._db.close_cursors()

    def end_read_only_turn(self) -> None:
        """Close a transaction that only read (no disk flush needed)."""
        if self._db is not None and not self.dirty and self._db.in_transaction:
            self._db.commit()

    def detach(self) -> ObjectDatabase | None:
        """The activation ends: hand back the database to release. The storage is
        unusable from then on (its instance was dropped): the callbacks into the commit
        protocol, which point back here, are let go of (no cycle for the collector)."""
        db, self._db = self._db, None
        self._open_db = _instance_dropped
        self.finish_outside_turn = _finish_dropped
        self.in_turn = _not_in_turn
        self.exclusive = _exclusive_dropped
        return db

    # -- validation ----------------------------------------------------------------------

    def key(self, key: object) -> str:
        """``key``, checked: a str within ``Limits.max_storage_key_bytes``."""
        if not isinstance(key, str):
            raise TypeError(f"storage keys are str, not {type(key).__name__}: {key!r}")
        size = len(key.encode("utf-8"))
        limit = self.limits.max_storage_key_bytes
        if size > limit:
            raise LimitExceededError(
                f"a storage key cannot be larger than {limit} bytes; this one is {size} "
                "bytes (Limits.max_storage_key_bytes)",
                limit_name="max_storage_key_bytes",
                limit=limit,
                value=size,
            )
        return key

    def keys(self, keys: Sequence[str]) -> list[str]:
        """``keys``, checked one by one and as a batch (``max_storage_keys_per_call``)."""
        if isinstance(keys, str | bytes):
            raise TypeError("expected a key or a sequence of keys")
        checked = [self.key(k) for k in keys]
        limit = self.limits.max_storage_keys_per_call
        if len(checked) > limit:
            raise LimitExceededError(
                f"at most {limit} keys per call; got {len(checked)} "
                "(Limits.max_storage_keys_per_call)",
                limit_name="max_storage_keys_per_call",
                limit=limit,
                value=len(checked),
            )
        return checked

    def encode(self, value: object) -> bytes:
        """``value`` as data, within ``Limits.max_storage_value_bytes``."""
        return encode_data(
            value,
            what="A storage value",
            limit_name="max_storage_value_bytes",
            limit_bytes=self.limits.max_storage_value_bytes,
        )


@final
class Storage:
    """Durable key-value storage, SQL and the alarm of one object (``ctx.storage``).

    Keys are strings ordered by their UTF-8 bytes; values are data (the attachment codec).
    Every method is a checkpoint.
    """

    __slots__ = ("_state", "sql")

    def __init__(self, state: StorageState) -> None:
        # Made by the runtime for each activation.
        self._state = state
        self.sql = SqlStorage(state)
        """SQL on this object's database."""

    # -- key-value -----------------------------------------------------------------------

    @overload
    async def get(self, key: str) -> object | None: ...  # type: ignore[overload-overlap]
    @overload
    async def get(self, key: Sequence[str]) -> dict[str, object]: ...

    async def get(self, key: str | Sequence[str]) -> object | dict[str, object] | None:
        """The value of ``key`` (None if absent), or a dict for a sequence of keys.

        The dict holds the keys that exist, in key order. Values are fresh copies.
        """
        await self._state.settled()
        if isinstance(key, str):
            found = self._state.database().get_many([self._state.key(key)])
            await trio.lowlevel.checkpoint()
            raw = found.get(key)
            return None if raw is None else decode_data(raw)
        keys = self._state.keys(key)
        found = self._state.database().get_many(keys)
        await trio.lowlevel.checkpoint()
        return {k: decode_data(v) for k, v in found.items()}

    @overload
    async def put(self, key: str, value: object) -> None: ...
    @overload
    async def put(self, key: Mapping[str, object]) -> None: ...

    async def put(self, key: str | Mapping[str, object], value: object = None) -> None:
        """Store ``value`` under ``key``, or every item of a mapping (all or nothing).

        Nothing is stored when it raises.

        Raises:
            DataCloneError: a value is not data.
            LimitExceededError: a key, a value or the batch is over its limit.
        """
        await self._state.settled()
        if isinstance(key, str):
            items = [(self._state.key(key), self._state.encode(value))]
        elif isinstance(key, Mapping):
            keys = self._state.keys(list(key))
            items = [(k, self._state.encode(key[k])) for k in keys]
        else:
            raise TypeError(f"put() takes a key and a value, or a mapping; got {key!r}")
        self._state.database().put_many(items)
        self._state.wrote()
        await self._state.after_write()

    @overload
    async def delete(self, key: str) -> bool: ...
    @overload
    async def delete(self, key: Sequence[str]) -> int: ...

    async def delete(self, key: str | Sequence[str]) -> bool | int:
        """Delete ``key`` (returns whether it existed) or keys (returns how many did)."""
        await self._state.settled()
        if isinstance(key, str):
            count = self._state.database().delete_many([self._state.key(key)])
            result: bool | int = count > 0
        else:
            count = self._state.database().delete_many(self._state.keys(key))
            result = count
        self._state.wrote()
        await self._state.after_write()
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
        await self._state.settled()
        for name, bound in (("prefix", prefix), ("start", start), ("end", end)):
            if bound is not None and not isinstance(bound, str):
                raise TypeError(f"list({name}=...) takes a str, not {bound!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"list(limit=...) takes an int, not {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"list(limit=...) must be at least 1, got {limit}")
        rows = self._state.database().list(
            prefix=prefix, start=start, end=end, reverse=reverse, limit=limit
        )
        await trio.lowlevel.checkpoint()
        return {k: decode_data(v) for k, v in rows}

    async def delete_all(self) -> None:
        """Delete every key, every SQL table and the alarm."""
        await self._state.settled()
        self._state.database().delete_all()
        self._state.alarm_set = None
        self._state.wrote()
        await self._state.after_write()

    async def transaction(self, fn: Callable[[Storage], Awaitable[T]]) -> T:
        """Run ``await fn(storage)`` all or nothing: if it raises, its writes are undone.

        The exception propagates. Transactions nest. Called from a ``ctx.start_soon``
        task, the transaction waits for the current turn to end and no turn starts until
        it is over and committed (so it is all or nothing there too).
        """
        await self._state.settled()
        if self._state.in_turn():
            return await self._in_savepoint(fn)
        async with self._state.exclusive():
            return await self._in_savepoint(fn)

    async def _in_savepoint(self, fn: Callable[[Storage], Awaitable[T]]) -> T:
        db = self._state.database()
        name = f"th_txn_{self._state.savepoints}"
        alarm_before = self._state.alarm_set
        db.savepoint(name)
        self._state.savepoints += 1
        try:
            result = await fn(self)
        except BaseException:
            db.rollback_to(name)
            self._state.alarm_set = alarm_before
            raise
        finally:
            self._state.savepoints -= 1
        db.release(name)
        await trio.lowlevel.checkpoint()
        return result

    async def sync(self) -> None:
        """Wait until every write so far is durable (in a turn: a checkpoint, as the
        turn's writes are committed when it ends)."""
        state = self._state
        if (state.dirty or state.committing) and not state.in_turn():
            await state.finish_outside_turn()
        else:
            await trio.lowlevel.checkpoint()

    # -- alarm ---------------------------------------------------------------------------

    async def get_alarm(self) -> datetime | None:
        """When the alarm is set to fire (UTC), or None. (One stored past the year 9999,
        by a version that took milliseconds, reads as ``datetime.max``.)"""
        await self._state.settled()
        when = self._state.database().get_alarm()
        await trio.lowlevel.checkpoint()
        return None if when is None else _alarm_datetime(when)

    async def set_alarm(self, when: datetime | float) -> None:
        """Run the object's ``alarm()`` at ``when``: an aware datetime, or epoch
        **seconds** (``ctx.now() + 60``; Cloudflare's ``setAlarm`` takes milliseconds).

        One alarm per object: setting replaces the previous one. The alarm wakes a
        hibernated object and survives restarts; a past time fires at once.

        Raises:
            TypeError: ``when`` is neither a datetime nor a number.
            ValueError: a naive datetime, a time before 1970 or not finite, or over 1e11
                s (year 5138): milliseconds, the message says what to pass.
        """
        await self._state.settled()
        seconds = _alarm_seconds(when)
        self._state.database().set_alarm(seconds)
        self._state.alarm_set = seconds
        self._state.wrote()
        await self._state.after_write()

    async def delete_alarm(self) -> None:
        """Cancel the alarm, if any."""
        await self._state.settled()
        self._state.database().set_alarm(None)
        self._state.alarm_set = None
        self._state.wrote()
        await self._state.after_write()


#: Epoch seconds above this (year 5138) are taken for milliseconds (Cloudflare's unit).
_MAX_ALARM_SECONDS: Final = 1e11


def _alarm_datetime(when: float) -> datetime:
    try:
        return datetime.fromtimestamp(when, UTC)
    except (OverflowError, OSError, ValueError):  # "year 59009 is out of range"
        return (datetime.max if when > 0 else datetime.min).replace(tzinfo=UTC)


def _alarm_seconds(when: object) -> float:
    """``set_alarm``'s argument as epoch seconds, or an error saying what to pass."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError("set_alarm() needs an aware datetime (add a tzinfo)")
        seconds = when.timestamp()
    elif isinstance(when, int | float) and not isinstance(when, bool):
        try:
            seconds = float(when)
        except OverflowError:
            seconds = math.inf
    else:
        raise TypeError(f"set_alarm() takes a datetime or epoch seconds, not {when!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"set_alarm() needs a finite time in epoch seconds, got {when!r}")
    if seconds < 0:
        raise ValueError(
            f"set_alarm() got {when!r}, a time before 1970; pass epoch seconds, e.g. ctx.now() + 60"
        )
    if isinstance(when, datetime):
        return seconds  # a datetime is at most year 9999
    if seconds > _MAX_ALARM_SECONDS:
        if seconds / 1000 <= _MAX_ALARM_SECONDS:
            raise ValueError(
                f"set_alarm() takes epoch seconds, not milliseconds as Cloudflare's "
                f"setAlarm does: {when!r} would be after the year 5138 (over "
                f"{_MAX_ALARM_SECONDS:.0e} s); pass {seconds / 1000!r} (the value / 1000)"
            )
        raise ValueError(
            f"set_alarm() takes epoch seconds up to {_MAX_ALARM_SECONDS:.0e} (the year "
            f"5138), got {when!r}; pass e.g. ctx.now() + 60"
        )
    return seconds


def stored_alarm(storage: Storage) -> float | None:
    """For the runtime: the alarm in the object's database (epoch seconds), or None.

    Synchronous (no checkpoint): the supervisor checks an alarm against it before running
    the handler (a stale index entry) and after (delete it unless the handler set a new
    one).

    Raises:
        RuntimeError: a checkpoint is running.
        sqlite3.Error, OSError: the database cannot be opened or read.
    """
    return storage._state.database().get_alarm()
