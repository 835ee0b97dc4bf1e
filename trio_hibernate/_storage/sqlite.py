"""SQLite storage: one database per object, as Durable Objects have.

The key-value API lives in a table of that database (``_th_kv``), next to whatever tables
the object creates with ``sql.exec``; the alarm lives in ``_th_meta``. Statements run on
the caller's thread inside one open transaction per turn (no disk flush happens there);
only ``COMMIT`` flushes, and the runtime runs it in a worker thread.

Every method here is synchronous and not thread-safe; the runtime never uses one
database from two threads at once.

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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from .._descriptors import default_max_open_databases
from .._errors import LimitExceededError, StorageError
from .._ids import ObjectId
from .backend import ObjectDatabase

__all__ = ["DESCRIPTORS_PER_DATABASE", "SqliteBackend", "SqliteDatabase"]

#: Descriptors held by one open file database in WAL mode: the database, -wal and -shm.
DESCRIPTORS_PER_DATABASE: Final = 3

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS _th_kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _th_meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""
_SURROGATES: Final = range(0xD800, 0xE000)
#: Authorizer actions whose first argument (or second, for indexes) names a table.
_TABLE_ARG_ACTIONS: Final = frozenset(
    {
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_ALTER_TABLE,
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_CREATE_TRIGGER,
    }
)

SqlValue = None | int | float | str | bytes


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

    __slots__ = ("_commit_lock", "_conn", "_pool", "_reconnect")

    def __init__(
        self,
        conn: sqlite3.Connection | None = None,
        *,
        reconnect: Callable[[], sqlite3.Connection] | None = None,
        pool: _ConnectionPool | None = None,
    ) -> None:
        if conn is None and (reconnect is None or pool is None):
            raise ValueError("a SqliteDatabase needs a connection, or reconnect and a pool")
        self._conn = conn
        self._reconnect = reconnect
        self._pool = pool
        # Held by a commit (in its worker thread): the pool never closes a connection
        # whose commit is still returning.
        self._commit_lock = threading.Lock()
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
            conn = self._conn
            if conn is None or conn.in_transaction:
                return False
            self._conn = None
            conn.close()
            return True
        finally:
            self._commit_lock.release()

    @property
    def total_changes(self) -> int:
        """Rows changed through this connection so far (it restarts at 0 when the pool
        reconnects, which happens only between transactions)."""
        return self._connection().total_changes

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
        """Make the turn's writes durable. Flushes to disk: run it in a worker thread.

        Never reconnects (nor touches the pool, which belongs to the event loop thread):
        a closed connection had no transaction to commit.
        """
        with self._commit_lock:
            conn = self._conn
            if conn is not None and conn.in_transaction:
                conn.execute("COMMIT")

    def rollback(self) -> None:
        """Forget the turn's writes."""
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
        return self._connection().execute(sql, args).fetchall()

    def delete_all(self) -> None:
        """Delete every key, the alarm and every table the object made with SQL."""
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

    def execute_user(self, query: str, bindings: Sequence[SqlValue]) -> sqlite3.Cursor:
        """Run one statement of the object's inside the turn's transaction.

        Tables named ``_th_*`` are the runtime's: SQLite's authorizer refuses the
        statement if it would read or change one (raised as ValueError).
        """
        self.begin()
        touched: list[str] = []

        def authorize(
            action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
        ) -> int:
            for name in (arg1, arg2) if action in _TABLE_ARG_ACTIONS else ():
                if name is not None and name.lower().startswith("_th_"):
                    touched.append(name)
                    return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK

        conn = self._connection()
        conn.set_authorizer(authorize)
        try:
            return conn.execute(query, bindings)
        except sqlite3.DatabaseError:
            if touched:
                raise ValueError(
                    f"table {touched[0]!r} is reserved for trio-hibernate (names starting "
                    "with _th_ hold the key-value data and the alarm)"
                ) from None
            raise
        finally:
            conn.set_authorizer(None)

    def close(self) -> None:
        """Roll back anything uncommitted and close for good."""
        self._reconnect = None
        if self._pool is not None:
            self._pool.forget(self)
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()


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
        """``3 * max_open_databases`` for files; 0 in memory."""
        return 0 if self.data_dir is None else DESCRIPTORS_PER_DATABASE * self._pool.limit

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
                conn.execute("PRAGMA synchronous = FULL")
            except BaseException:
                conn.close()
                raise
            return conn

        db = SqliteDatabase(reconnect=connect, pool=self._pool)
        db._connection()  # room is made before it connects: the budget is never passed
        return db

    def release(self, namespace: str, object_id: ObjectId, db: ObjectDatabase) -> None:
        """The object hibernated: close a file database (memory ones stay open)."""
        if self.data_dir is not None:
            db.close()

    def close(self) -> None:
        """Close every database still open (memory ones are lost)."""
        for db in [*self._memory.values(), *self._pool.databases()]:
            db.close()
        self._memory.clear()
