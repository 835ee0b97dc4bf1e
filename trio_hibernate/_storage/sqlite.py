"""SQLite storage: one database per object, as Durable Objects have.

The key-value API lives in a table of that database (``_th_kv``), next to whatever tables
the object creates with ``sql.exec``; the alarm lives in ``_th_meta``. Statements run on
the caller's thread inside the open transaction.

Durability (group commit): a file database runs in WAL mode with ``synchronous = NORMAL``,
so ``COMMIT`` (on the event loop thread) appends the transaction to the write-ahead log
without a disk flush, and later reads see it at once; :meth:`SqliteDatabase.flush`,
which the runtime runs in a worker thread, then makes every commit so far durable with
one ``fsync`` of the ``-wal`` file, through a descriptor of its own. The connection is
therefore only ever used by one thread, while the next turns go on reading and writing
during a flush. That is what ``synchronous = FULL`` does at each ``COMMIT`` (an ``fsync``
of the log), moved out of the connection so that one flush covers several commits.
The log stays consistent as SQLite keeps it with ``NORMAL``: each commit is appended
whole, with checksums, and a restart of the log syncs its new header. Checkpoints (the
log copied into the database file, both synced) would flush on the committing thread,
so the automatic ones are off: a flush that finds the log past
:data:`CHECKPOINT_WAL_BYTES` asks for one, and the runtime runs
:meth:`SqliteDatabase.checkpoint` in a worker thread at the next commit, while it holds
the object (as commits ran before group commit, once per that many bytes); closing the
last connection checkpoints the rest, as SQLite does.

Every method here except :meth:`SqliteDatabase.flush` is synchronous, not thread-safe,
and called from one thread at a time.

The object's own SQL (``sql.exec``, :meth:`SqliteDatabase.execute_user`) runs under
rules the runtime's statements do not: SQLite's limits are set to the ``Limits.max_sql_*``
ones (Cloudflare's by default) and the authorizer refuses the ``_th_*`` names and
transaction control, only while it is prepared or stepped. A query of several statements
is split as ``statements.py`` says and runs in a savepoint (all or nothing).

Descriptors: a file database in WAL mode holds 3 (the database, ``-wal``, ``-shm``). The
backend keeps at most ``max_open_databases`` connections open, least recently used
first: opening one more closes the connection of the least recently used database that
is between transactions (no transaction open, no commit running). Its
:class:`SqliteDatabase` stays valid and reconnects on its next use, so whoever holds it
never notices, except that connection-level state (``TEMP`` tables, ``PRAGMA`` settings)
does not survive between transactions.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

from .._descriptors import default_max_open_databases
from .._errors import LimitExceededError, StorageError
from .._ids import ObjectId
from .._limits import Limits
from .backend import ObjectDatabase
from .statements import SqlStatement, split_statements

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "CHECKPOINT_WAL_BYTES",
    "DESCRIPTORS_PER_DATABASE",
    "FLUSH_DESCRIPTORS",
    "SqliteBackend",
    "SqliteDatabase",
    "SqliteUserCursor",
]

#: Descriptors held by one open file database in WAL mode: the database, -wal and -shm.
DESCRIPTORS_PER_DATABASE: Final = 3
#: Flushes of one backend that hold a descriptor (their -wal file's) at once; more wait.
FLUSH_DESCRIPTORS: Final = 8
#: A flush that finds the write-ahead log larger than this checkpoints it (SQLite's own
#: automatic checkpoint comes at 1,000 pages, 4 MiB with the default page size); the
#: log is then truncated back to this size when it restarts (``journal_size_limit``).
CHECKPOINT_WAL_BYTES: Final = 4 * 1024 * 1024

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS _th_kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _th_meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""
_SURROGATES: Final = range(0xD800, 0xE000)
#: Authorizer actions whose first or second argument names a table, an index, a view or
#: a trigger (as in workerd's ``getAuthorizorTableName``, TEMP ones included: a TEMP
#: trigger on a reserved table would run the object's SQL inside the runtime's writes).
_TABLE_ARG_ACTIONS: Final = frozenset(
    {
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_TABLE,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_DROP_TEMP_TABLE,
        sqlite3.SQLITE_ALTER_TABLE,
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TEMP_INDEX,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_DROP_TEMP_INDEX,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_DROP_TEMP_TRIGGER,
        sqlite3.SQLITE_CREATE_VIEW,
        sqlite3.SQLITE_CREATE_TEMP_VIEW,
        sqlite3.SQLITE_DROP_VIEW,
        sqlite3.SQLITE_DROP_TEMP_VIEW,
        sqlite3.SQLITE_CREATE_VTABLE,
        sqlite3.SQLITE_DROP_VTABLE,
        sqlite3.SQLITE_ANALYZE,
        sqlite3.SQLITE_REINDEX,
    }
)
#: Authorizer actions that would end, or nest in, the turn's transaction.
_TRANSACTION_ACTIONS: Final = frozenset({sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT})
#: The savepoint that makes a multi-statement ``execute_user`` all or nothing.
_EXEC_SAVEPOINT: Final = "th_exec"
#: Why a cursor with rows left was closed at a commit.
_COMMITTED: Final = (
    "its transaction was committed (at the end of the turn that made it, or for a write "
    "made outside a turn)"
)
_DATABASE_SIZE: Final = (
    "SELECT ((SELECT page_count FROM pragma_page_count)"
    " - (SELECT freelist_count FROM pragma_freelist_count))"
    " * (SELECT page_size FROM pragma_page_size)"
)

SqlValue = None | int | float | str | bytes


def _list_query(
    prefix: str | None, start: str | None, end: str | None, reverse: bool, limit: int | None
) -> tuple[str, list[SqlValue]]:
    """The query of :meth:`SqliteDatabase.list` and its arguments."""
    where: list[str] = []
    args: list[SqlValue] = []
    if prefix:
        where.append("key >= ?")
        args.append(prefix)
        upper = prefix_upper_bound(prefix)
        if upper is not None:
            where.append("key < ?")
            args.append(upper)
    if start is not None:
        where.append("key >= ?")
        args.append(start)
    if end is not None:
        where.append("key < ?")
        args.append(end)
    sql = "SELECT key, value FROM _th_kv"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY key DESC" if reverse else " ORDER BY key"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    return sql, args


@final
class _LogSync:
    """``fsync`` of the write-ahead log of the database at ``path`` (see ``flush``)."""

    __slots__ = ("_path", "_synced")

    def __init__(self, path: Path) -> None:
        self._path = path
        self._synced: tuple[int, int] | None = None  # the log whose folder is synced

    def __call__(self) -> int:
        """Sync the log; return its size in bytes (0 if there is none: closing the last
        connection checkpointed it into the database file, synced that, and deleted it).

        A log that is not the one synced before (it was created since: the first flush
        after the database was opened) also has its folder synced, so that the new file's
        name survives a power loss, as SQLite itself does for a log it creates.
        """
        try:
            fd = os.open(f"{self._path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            os.fsync(fd)
            status = os.fstat(fd)
        finally:
            os.close(fd)
        identity = (status.st_dev, status.st_ino)
        if identity != self._synced:
            folder = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
            self._synced = identity
        return status.st_size


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``.

    SQLite compares TEXT as UTF-8 bytes, which orders like code points, so bumping the
    last code point (skipping surrogates, carrying past U+10FFFF) gives the bound; None
    when there is none (the prefix is all U+10FFFF).
    """
    chars = list(prefix)
    while chars:
        point = ord(chars.pop()) + 1
        if point in _SURROGATES:
            point = _SURROGATES.stop
        if point <= 0x10FFFF:
            return "".join(chars) + chr(point)
    return None


class SqliteDatabase:
    """One object's database connection.

    A file database is given ``reconnect`` and its backend's pool: the pool may close the
    connection between transactions to stay within ``max_open_databases``, and the next
    call opens a new one. A memory database (no ``reconnect``) is never closed by the pool.
    """

    __slots__ = (
        "_commit_lock",
        "_conn",
        "_flush_lock",
        "_flushes",
        "_pool",
        "_reconnect",
        "_sync_log",
        "_user_cursors",
    )

    def __init__(
        self,
        conn: sqlite3.Connection | None = None,
        *,
        reconnect: Callable[[], sqlite3.Connection] | None = None,
        pool: _ConnectionPool | None = None,
        path: Path | None = None,
        flushes: threading.BoundedSemaphore | None = None,
    ) -> None:
        if conn is None and (reconnect is None or pool is None):
            raise ValueError("a SqliteDatabase needs a connection, or reconnect and a pool")
        self._conn = conn
        self._sync_log = None if path is None else _LogSync(path)  # flush() syncs it
        self._flushes = flushes
        # Held by a flush (in its worker thread): the pool never closes a connection
        # while its log is being synced (the descriptor budget counts it as open).
        self._flush_lock = threading.Lock()
        self._reconnect = reconnect
        self._pool = pool
        # Held by a checkpoint (in its worker thread): the pool never closes a connection
        # in use, and a cursor is not stepped meanwhile.
        self._commit_lock = threading.Lock()
        # The object's cursors with rows left: the transaction's end closes them.
        self._user_cursors: weakref.WeakSet[SqliteUserCursor] = weakref.WeakSet()
        if conn is not None:
            conn.executescript(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        """The open connection, reconnecting (through the pool) if it was closed."""
        conn = self._conn
        if conn is not None:
            if self._pool is not None:
                self._pool.used(self)
            return conn
        if self._reconnect is None or self._pool is None:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        self._pool.admit(self)
        try:
            conn = self._reconnect()
            conn.executescript(_SCHEMA)
        except BaseException:
            self._pool.forget(self)
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        return conn

    def close_if_idle(self) -> bool:
        """Close the connection if no transaction is open and no commit runs (the pool
        calls it; the database reconnects on its next use). Returns whether it did."""
        if not self._commit_lock.acquire(blocking=False):
            return False
        try:
            if not self._flush_lock.acquire(blocking=False):
                return False
            try:
                conn = self._conn
                if conn is None or conn.in_transaction:
                    return False
                self._conn = None
                conn.close()
                return True
            finally:
                self._flush_lock.release()
        finally:
            self._commit_lock.release()

    # -- transactions --------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """True between :meth:`begin` and :meth:`commit`/:meth:`rollback`."""
        conn = self._conn
        return conn is not None and conn.in_transaction

    def begin(self) -> None:
        """Open the turn's transaction if none is open."""
        conn = self._connection()
        if not conn.in_transaction:
            conn.execute("BEGIN")

    def commit(self) -> None:
        """Commit the open transaction: appended to the write-ahead log, no disk flush
        (:meth:`flush` makes it durable). Fast enough for the event loop thread.

        Never reconnects: a closed connection had no transaction to commit.
        """
        with self._commit_lock:
            self._end_user_cursors(_COMMITTED)
            conn = self._conn
            if conn is not None and conn.in_transaction:
                conn.execute("COMMIT")

    def flush(self) -> bool:
        """Make every commit so far durable: ``fsync`` the write-ahead log through a
        descriptor of its own, never the connection (which the event loop thread may use
        meanwhile). Returns whether the log is past :data:`CHECKPOINT_WAL_BYTES` (the
        runtime then runs :meth:`checkpoint`). Raises OSError if the sync failed."""
        sync_log = self._sync_log
        if sync_log is None or self._flushes is None:
            return False  # in memory: nothing outlives the process anyway
        with self._flushes, self._flush_lock:
            # Closed since the commit (by the pool): closing checkpointed and synced.
            return self._conn is not None and sync_log() > CHECKPOINT_WAL_BYTES

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, syncing both (``PASSIVE``;
        the runtime runs it in a worker thread, between transactions, and waits for it).
        Raises sqlite3.Error if it failed (the log keeps the commits)."""
        with self._commit_lock:
            conn = self._conn
            if conn is not None and not conn.in_transaction:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close_cursors(self) -> None:
        """Close the object's cursors with rows left, as :meth:`commit` does (the turn
        that made them ended, its writes wait for the next commit)."""
        self._end_user_cursors(_COMMITTED)

    def rollback(self) -> None:
        """Forget the turn's writes."""
        self._end_user_cursors("its transaction was rolled back")
        conn = self._conn
        if conn is not None and conn.in_transaction:
            conn.execute("ROLLBACK")

    def savepoint(self, name: str) -> None:
        """Start a nested, all-or-nothing group of writes (``transaction()``)."""
        self.begin()
        self._connection().execute(f"SAVEPOINT {name}")

    def release(self, name: str) -> None:
        """Keep the writes since :meth:`savepoint` (still part of the turn)."""
        self._connection().execute(f"RELEASE {name}")

    def rollback_to(self, name: str) -> None:
        """Undo the writes since :meth:`savepoint`."""
        conn = self._connection()
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")

    # -- key-value -----------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Stored values of ``keys`` (missing keys are absent), in key order."""
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        rows = self._connection().execute(
            f"SELECT key, value FROM _th_kv WHERE key IN ({marks}) ORDER BY key", tuple(keys)
        )
        return dict(rows.fetchall())

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Insert or replace each (key, encoded value)."""
        self.begin()
        self._connection().executemany(
            "INSERT INTO _th_kv (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            items,
        )

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete ``keys``; returns how many existed."""
        if not keys:
            return 0
        self.begin()
        marks = ",".join("?" * len(keys))
        cursor = self._connection().execute(
            f"DELETE FROM _th_kv WHERE key IN ({marks})", tuple(keys)
        )
        return cursor.rowcount

    def list(
        self,
        *,
        prefix: str | None,
        start: str | None,
        end: str | None,
        reverse: bool,
        limit: int | None,
    ) -> list[tuple[str, bytes]]:
        """Entries with ``start <= key < end`` and the prefix, in key order."""
        sql, args = _list_query(prefix, start, end, reverse, limit)
        return self._connection().execute(sql, args).fetchall()

    def delete_all(self) -> None:
        """Delete every key, the alarm and every table the object made with SQL."""
        self._end_user_cursors("storage.delete_all() ran")  # they would lock their tables
        self.begin()
        conn = self._connection()
        tables = conn.execute(
            # GLOB, not LIKE: in LIKE "_" matches any character and case is ignored.
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT GLOB 'sqlite_*' AND name NOT GLOB '_th_*'"
        ).fetchall()
        for (table,) in tables:
            conn.execute(f'DROP TABLE "{table}"')
        conn.execute("DELETE FROM _th_kv")
        conn.execute("DELETE FROM _th_meta")

    # -- alarm ---------------------------------------------------------------------------

    def get_alarm(self) -> float | None:
        """The alarm time (epoch seconds), or None."""
        conn = self._connection()
        row = conn.execute("SELECT value FROM _th_meta WHERE name = 'alarm'").fetchone()
        return None if row is None else float(row[0])

    def set_alarm(self, when: float | None) -> None:
        """Set (or with None, delete) the alarm."""
        self.begin()
        conn = self._connection()
        if when is None:
            conn.execute("DELETE FROM _th_meta WHERE name = 'alarm'")
        else:
            conn.execute(
                "INSERT INTO _th_meta (name, value) VALUES ('alarm', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (when,),
            )

    # -- SQL -----------------------------------------------------------------------------

    def execute_user(
        self, query: str, bindings: Sequence[SqlValue] = (), limits: Limits | None = None
    ) -> SqliteUserCursor:
        """Run the object's SQL (``sql.exec``) inside the turn's transaction.

        The query may hold several statements (``statements.py``), run all or nothing;
        the bindings go to the last one, whose rows the cursor reads: a ``SELECT`` (or
        ``VALUES``, ``EXPLAIN``) lazily, as they are fetched; any other statement ran to
        completion (no writing statement is left half-run). The transaction's end
        (:meth:`commit`, :meth:`rollback`, :meth:`close`, :meth:`delete_all`) closes the
        cursor if rows are left. Limits and refusals: see :func:`_as_user`.

        Raises:
            ValueError: a statement touches a ``_th_*`` name, or is ``BEGIN``,
                ``COMMIT``, ``ROLLBACK``, ``SAVEPOINT`` or ``RELEASE``.
            LimitExceededError: SQLite refused a ``Limits.max_sql_*`` limit.
            sqlite3.Error: the query is malformed (no statement, parameters before
                the last statement) or a statement failed.
            Nothing the call did is kept when it raises.
        """
        statements = split_statements(query)
        self.begin()
        cursor = _run_user_sql(
            self._connection(), statements, bindings, limits or Limits(), self._commit_lock
        )
        if cursor.column_names:  # it has rows to read
            self._user_cursors.add(cursor)
        return cursor

    def database_size(self) -> int:
        """Bytes in use: pages not on the free list, times the page size (as workerd's
        ``databaseSize``; the runtime's ``_th_*`` tables count too)."""
        ((size,),) = self._connection().execute(_DATABASE_SIZE).fetchall()
        return int(size)

    def _end_user_cursors(self, because: str) -> None:
        """The transaction ends (``because``): the object's cursors lose unread rows."""
        cursors = list(self._user_cursors)
        self._user_cursors.clear()
        for cursor in cursors:
            cursor.end(because)

    def close(self) -> None:
        """Roll back anything uncommitted and close for good."""
        self._end_user_cursors("the object's database was closed (it hibernated or was reset)")
        self._reconnect = None
        if self._pool is not None:
            self._pool.forget(self)
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()


def _run_user_sql(
    conn: sqlite3.Connection,
    statements: list[SqlStatement],
    bindings: Sequence[SqlValue],
    limits: Limits,
    commit_lock: threading.Lock,
) -> SqliteUserCursor:
    """Run the statements, the last with the bindings, in a savepoint if several."""
    several = len(statements) > 1
    if several:
        conn.execute(f"SAVEPOINT {_EXEC_SAVEPOINT}")
    try:
        with _as_user(conn, limits, preparing=True):
            changes_before = conn.total_changes
            for statement in statements[:-1]:
                # As workerd does: one step (a SELECT's first row is dropped).
                conn.execute(statement.text).close()
            last = statements[-1]
            before = conn.total_changes
            cursor = conn.execute(last.text, bindings)
            rows = None if last.read_only else cursor.fetchall()
            written = conn.total_changes - before
            wrote = conn.total_changes != changes_before or any(
                not statement.read_only for statement in statements
            )
    except BaseException:
        if several:
            conn.execute(f"ROLLBACK TO {_EXEC_SAVEPOINT}")
            conn.execute(f"RELEASE {_EXEC_SAVEPOINT}")
        raise
    if several:
        conn.execute(f"RELEASE {_EXEC_SAVEPOINT}")
    return SqliteUserCursor(
        cursor, rows, limits=limits, commit_lock=commit_lock, rows_written=written, wrote=wrote
    )


@final
class SqliteUserCursor:
    """The rows of an :meth:`SqliteDatabase.execute_user` call (its last statement).

    A ``SELECT`` is stepped as rows are fetched, under the object's SQL limits; other
    statements ran to completion and their rows (``RETURNING``) are handed out from
    memory. The database ends the cursor when its transaction ends (:meth:`end`).

    Threading: :meth:`fetchone` runs in the event loop thread while a commit may run
    in a worker thread (a ``ctx.start_soon`` task reading a cursor): it steps only
    while holding the database's commit lock, which the commit holds while it ends the
    cursors, so the two never touch the connection at once.
    """

    __slots__ = (
        "__weakref__",
        "_commit_lock",
        "_cursor",
        "_limits",
        "_rows",
        "closed_because",
        "column_names",
        "rows_written",
        "wrote",
    )

    def __init__(
        self,
        cursor: sqlite3.Cursor,
        rows: list[tuple[SqlValue, ...]] | None,
        *,
        limits: Limits,
        commit_lock: threading.Lock,
        rows_written: int,
        wrote: bool,
    ) -> None:
        self._cursor: sqlite3.Cursor | None = cursor
        self._rows = None if rows is None else iter(rows)
        self._limits = limits
        self._commit_lock = commit_lock
        self.column_names: tuple[str, ...] = tuple(d[0] for d in cursor.description or ())
        """Column names of the result (empty for a statement that returns no rows)."""
        self.rows_written = rows_written
        """Rows inserted, updated or deleted by the statement (triggers included)."""
        self.wrote = wrote
        """True if any statement of the call may have written (the turn must commit)."""
        self.closed_because: str | None = None
        """Why the cursor was closed with rows left (its transaction ended), or None."""
        if rows is not None or not self.column_names:
            cursor.close()  # ran to completion: nothing is left to step
            self._cursor = None
        if not self.column_names:
            self._rows = None

    def fetchone(self) -> tuple[SqlValue, ...] | None:
        """The next row, or None after the last one, :meth:`close` or :meth:`end`.

        Raises:
            LimitExceededError: the row holds a string or BLOB over
                ``Limits.max_sql_row_bytes``.
            sqlite3.Error: SQLite failed computing the row.
            RuntimeError: a commit of the cursor's transaction is in flight.
        """
        if self._rows is not None:
            row = next(self._rows, None)
        elif (cursor := self._cursor) is None:
            return None
        elif not self._commit_lock.acquire(blocking=False):
            raise RuntimeError(
                "SQL cursor read while its transaction is being committed (from a "
                "ctx.start_soon task?): read it before the write, or await "
                "ctx.storage.sync() and run the query again"
            )
        else:
            try:
                with _as_user(cursor.connection, self._limits, preparing=False):
                    row = cursor.fetchone()
            finally:
                self._commit_lock.release()
        if row is None:
            self.close()
        return row

    def fetchall(self) -> list[tuple[SqlValue, ...]]:
        """Every remaining row."""
        rows = []
        while (row := self.fetchone()) is not None:
            rows.append(row)
        return rows

    def close(self) -> None:
        """Stop reading: the statement is reset and the remaining rows are dropped."""
        cursor, self._cursor, self._rows = self._cursor, None, None
        if cursor is not None:
            cursor.close()

    def end(self, because: str) -> None:
        """The transaction ended: close, noting ``because`` if rows were left."""
        if self._cursor is not None or self._rows is not None:
            self.closed_because = because
            self.close()


#: The SQLite limits the object's SQL is prepared under, and the ``Limits`` fields they
#: come from. Only the first (a string, BLOB or row) is checked while a statement steps.
_SQL_LIMITS: Final = (
    (sqlite3.SQLITE_LIMIT_LENGTH, "max_sql_row_bytes"),
    (sqlite3.SQLITE_LIMIT_COLUMN, "max_sql_columns"),
    (sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, "max_sql_bound_parameters"),
    (sqlite3.SQLITE_LIMIT_SQL_LENGTH, "max_sql_statement_bytes"),
)
#: SQLite's messages for the limits it checks that are not SQLITE_TOOBIG, by field.
_LIMIT_MESSAGES: Final = (
    (("too many columns",), "max_sql_columns", "columns"),
    (
        ("too many SQL variables", "variable number must be between"),
        "max_sql_bound_parameters",
        "parameters",
    ),
)


def _refusal(action: int, arg1: str | None, arg2: str | None) -> str | None:
    """Why the object's SQL may not do ``action`` (None: it may)."""
    if action in _TRANSACTION_ACTIONS:
        return (
            "SQL transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE) is not "
            "allowed: each turn already runs in one transaction, committed when it ends; "
            "use `await ctx.storage.transaction(fn)` for an all-or-nothing group of "
            "writes (Cloudflare refuses these statements too)"
        )
    if action in _TABLE_ARG_ACTIONS:
        for name in (arg1, arg2):
            if name is not None and name.lower().startswith("_th_"):
                return (
                    f"table {name!r} is reserved for trio-hibernate (names starting with "
                    "_th_ hold the key-value data and the alarm)"
                )
    return None


@contextmanager
def _as_user(conn: sqlite3.Connection, limits: Limits, *, preparing: bool) -> Iterator[None]:
    """Run the object's SQL: under its SQLite limits and authorizer, with its errors.

    ``preparing``: statements are prepared (all the limits, and the authorizer); else a
    statement only steps (the length limit: the others apply when preparing, and a
    statement that already stepped is never prepared again). The runtime's own
    statements run without any of this (a batch ``get`` binds up to 128 parameters, and
    the ``_th_*`` tables are the runtime's).
    """
    refusals: list[str] = []

    def authorizer(
        action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        refusal = _refusal(action, arg1, arg2)
        if refusal is None:
            return sqlite3.SQLITE_OK
        refusals.append(refusal)
        return sqlite3.SQLITE_DENY

    categories = _SQL_LIMITS if preparing else _SQL_LIMITS[:1]
    saved = [
        (category, conn.setlimit(category, getattr(limits, field)))
        for category, field in categories
    ]
    if preparing:
        conn.set_authorizer(authorizer)
    try:
        yield
    except sqlite3.Error as exc:
        if refusals:
            raise ValueError(refusals[0]) from None
        error = _limit_error(exc, limits)
        if error is None:
            raise
        raise error from exc
    finally:
        if preparing:
            conn.set_authorizer(None)
        for category, value in saved:
            conn.setlimit(category, value)


def _limit_error(exc: sqlite3.Error, limits: Limits) -> LimitExceededError | None:
    """The :class:`LimitExceededError` for SQLite refusing ``exc`` over a limit, if it did.

    SQLite does not say by how much, so the value given is the limit plus one.
    """
    message = str(exc)
    if message == "statement too long":
        name, unit = "max_sql_statement_bytes", "bytes"
    elif getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_TOOBIG:
        name, unit = "max_sql_row_bytes", "bytes in a string, BLOB or row"
    else:
        found = next((m for m in _LIMIT_MESSAGES if message.startswith(m[0])), None)
        if found is None:
            return None
        _, name, unit = found
    limit: int = getattr(limits, name)
    return LimitExceededError(
        f"SQLite refused the statement ({message}): more than {limit} {unit} "
        f"(Limits.{name}, as on Cloudflare)",
        limit_name=name,
        limit=limit,
        value=limit + 1,
    )


class _ConnectionPool:
    """The file databases with an open connection, least recently used first.

    Never more than ``limit``: :meth:`admit` makes room first by closing the least
    recently used connection that is between transactions. Used from the event loop
    thread only. Invariant: a pooled database is listed here exactly while its
    connection is open.
    """

    __slots__ = ("_open", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # A dict keeps insertion order, and re-inserting moves a key to the end.
        self._open: dict[SqliteDatabase, None] = {}

    def __len__(self) -> int:
        return len(self._open)

    def used(self, db: SqliteDatabase) -> None:
        """``db`` was just used: it becomes the most recently used."""
        del self._open[db]
        self._open[db] = None

    def admit(self, db: SqliteDatabase) -> None:
        """List ``db``, which is about to connect, closing another connection if needed.

        Raises:
            LimitExceededError: ``limit`` connections are open and every one is inside
                a transaction or a commit.
        """
        if len(self._open) >= self.limit:
            victim = next((old for old in self._open if old.close_if_idle()), None)
            if victim is None:
                raise LimitExceededError(
                    f"cannot open another object database: all {self.limit} open ones "
                    f"(max_open_databases) are inside a transaction; {self.limit + 1} "
                    "would pass the file descriptor budget",
                    limit_name="max_open_databases",
                    limit=self.limit,
                    value=self.limit + 1,
                )
            del self._open[victim]
        self._open[db] = None

    def forget(self, db: SqliteDatabase) -> None:
        """``db`` closed its connection."""
        self._open.pop(db, None)

    def databases(self) -> list[SqliteDatabase]:
        """The databases with an open connection, least recently used first."""
        return list(self._open)


def _usable_directory(path: Path) -> Path:
    """``path``, created if missing, after checking that objects can store files there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(
            f"the data directory {path} exists and is not a directory", path=path
        ) from None
    except OSError as exc:
        raise StorageError(
            f"cannot create the data directory {path}: {exc.strerror or exc}", path=path
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise StorageError(
            f"the data directory {path} is not writable by this process (uid {os.geteuid()})",
            path=path,
        )
    return path


class SqliteBackend:
    """Where object databases live: files under ``data_dir``, or memory (tests, demos).

    File names are ``<data_dir>/<namespace>/<id hex>.sqlite3``: namespaces are validated
    identifiers and ids are hex, so no object name can reach outside ``data_dir``.
    In-memory databases live as long as the backend (across hibernation).

    At most ``max_open_databases`` file databases have a connection open at once (3
    descriptors each; default: an eighth of the descriptor limit less the reserve, see
    ``_descriptors.py``). Opening one more closes the least recently used one that is
    between transactions; if every one is inside a transaction, the storage call that
    needed the database raises :class:`~trio_hibernate.LimitExceededError`. Memory
    databases hold no descriptor and are not counted.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        max_open_databases: int | None = None,
    ) -> None:
        """Use ``data_dir`` (created if missing), or memory for None.

        Raises:
            StorageError: ``data_dir`` cannot be created, is not a directory, or is not
                writable.
            ValueError: ``max_open_databases`` is below 1.
        """
        if max_open_databases is not None and max_open_databases < 1:
            raise ValueError(f"max_open_databases must be at least 1, got {max_open_databases}")
        self.data_dir = None if data_dir is None else _usable_directory(Path(data_dir))
        self._memory: dict[tuple[str, str], SqliteDatabase] = {}
        if max_open_databases is None:
            max_open_databases = default_max_open_databases(DESCRIPTORS_PER_DATABASE)
        self._pool = _ConnectionPool(max_open_databases)
        self._flushes = threading.BoundedSemaphore(FLUSH_DESCRIPTORS)

    @property
    def durable(self) -> bool:
        """True when data outlives the process."""
        return self.data_dir is not None

    @property
    def max_open_databases(self) -> int:
        """The most file databases with a connection open at once."""
        return self._pool.limit

    @property
    def open_databases(self) -> int:
        """File databases with a connection open now."""
        return len(self._pool)

    @property
    def max_descriptors(self) -> int:
        """``3 * max_open_databases + FLUSH_DESCRIPTORS`` for files; 0 in memory."""
        if self.data_dir is None:
            return 0
        return DESCRIPTORS_PER_DATABASE * self._pool.limit + FLUSH_DESCRIPTORS

    @property
    def open_descriptors(self) -> int:
        """``3 *`` the file databases with a connection open now."""
        return DESCRIPTORS_PER_DATABASE * len(self._pool)

    @property
    def alarm_index_path(self) -> Path | None:
        """``<data_dir>/_alarms.sqlite3``, or None in memory."""
        return None if self.data_dir is None else self.data_dir / "_alarms.sqlite3"

    def path_for(self, namespace: str, object_id: ObjectId) -> Path:
        """The database file of an object (raises for the memory backend)."""
        assert self.data_dir is not None
        return self.data_dir / namespace / f"{object_id.hex}.sqlite3"

    def exists(self, namespace: str, object_id: ObjectId) -> bool:
        """Whether the object has ever stored anything."""
        if self.data_dir is None:
            return (namespace, object_id.hex) in self._memory
        return self.path_for(namespace, object_id).exists()

    def open(self, namespace: str, object_id: ObjectId) -> SqliteDatabase:
        """Open (creating if needed) the object's database.

        Raises:
            LimitExceededError: ``max_open_databases`` file databases are open and every
                one is inside a transaction (``limit_name="max_open_databases"``).
        """
        if self.data_dir is None:
            key = (namespace, object_id.hex)
            db = self._memory.get(key)
            if db is None:
                conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                db = self._memory[key] = SqliteDatabase(conn)
            return db
        path = self.path_for(namespace, object_id)
        path.parent.mkdir(parents=True, exist_ok=True)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                # COMMIT without a flush; flush() syncs the log (see the module).
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute(f"PRAGMA journal_size_limit = {CHECKPOINT_WAL_BYTES}")
            except BaseException:
                conn.close()
                raise
            return conn

        db = SqliteDatabase(reconnect=connect, pool=self._pool, path=path, flushes=self._flushes)
        db._connection()  # room is made before it connects: the budget is never passed
        return db

    async def prepare(self, namespace: str, object_id: ObjectId) -> None:
        """Nothing to do before an activation: :meth:`open` opens the file."""

    def release(self, namespace: str, object_id: ObjectId, db: ObjectDatabase) -> None:
        """The object hibernated: close a file database (memory ones stay open)."""
        if self.data_dir is not None:
            db.close()

    def close(self) -> None:
        """Close every database still open (memory ones are lost)."""
        for db in [*self._memory.values(), *self._pool.databases()]:
            db.close()
        self._memory.clear()
