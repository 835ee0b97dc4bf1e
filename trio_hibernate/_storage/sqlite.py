"""SQLite storage: one database per object, as Durable Objects have.

The key-value API lives in a table of that database (``_th_kv``), next to whatever tables
the object creates with ``sql.exec``; the alarm lives in ``_th_meta``. Statements run on
the caller's thread inside one open transaction per turn (no disk flush happens there);
only ``COMMIT`` flushes, and the runtime runs it in a worker thread.

Every method here is synchronous and not thread-safe; the runtime never uses one
database from two threads at once.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from .._errors import StorageError
from .._ids import ObjectId
from .backend import ObjectDatabase

__all__ = ["SqliteBackend", "SqliteDatabase"]

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
    """One object's database connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.executescript(_SCHEMA)

    @property
    def total_changes(self) -> int:
        """Rows changed through this connection so far."""
        return self._conn.total_changes

    # -- transactions --------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """True between :meth:`begin` and :meth:`commit`/:meth:`rollback`."""
        return self._conn.in_transaction

    def begin(self) -> None:
        """Open the turn's transaction if none is open."""
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")

    def commit(self) -> None:
        """Make the turn's writes durable. Flushes to disk: run it in a worker thread."""
        if self._conn.in_transaction:
            self._conn.execute("COMMIT")

    def rollback(self) -> None:
        """Forget the turn's writes."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def savepoint(self, name: str) -> None:
        """Start a nested, all-or-nothing group of writes (``transaction()``)."""
        self.begin()
        self._conn.execute(f"SAVEPOINT {name}")

    def release(self, name: str) -> None:
        """Keep the writes since :meth:`savepoint` (still part of the turn)."""
        self._conn.execute(f"RELEASE {name}")

    def rollback_to(self, name: str) -> None:
        """Undo the writes since :meth:`savepoint`."""
        self._conn.execute(f"ROLLBACK TO {name}")
        self._conn.execute(f"RELEASE {name}")

    # -- key-value -----------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Stored values of ``keys`` (missing keys are absent), in key order."""
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        rows = self._conn.execute(
            f"SELECT key, value FROM _th_kv WHERE key IN ({marks}) ORDER BY key", tuple(keys)
        )
        return dict(rows.fetchall())

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Insert or replace each (key, encoded value)."""
        self.begin()
        self._conn.executemany(
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
        cursor = self._conn.execute(f"DELETE FROM _th_kv WHERE key IN ({marks})", tuple(keys))
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
        return self._conn.execute(sql, args).fetchall()

    def delete_all(self) -> None:
        """Delete every key, the alarm and every table the object made with SQL."""
        self.begin()
        tables = self._conn.execute(
            # GLOB, not LIKE: in LIKE "_" matches any character and case is ignored.
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT GLOB 'sqlite_*' AND name NOT GLOB '_th_*'"
        ).fetchall()
        for (table,) in tables:
            self._conn.execute(f'DROP TABLE "{table}"')
        self._conn.execute("DELETE FROM _th_kv")
        self._conn.execute("DELETE FROM _th_meta")

    # -- alarm ---------------------------------------------------------------------------

    def get_alarm(self) -> float | None:
        """The alarm time (epoch seconds), or None."""
        row = self._conn.execute("SELECT value FROM _th_meta WHERE name = 'alarm'").fetchone()
        return None if row is None else float(row[0])

    def set_alarm(self, when: float | None) -> None:
        """Set (or with None, delete) the alarm."""
        self.begin()
        if when is None:
            self._conn.execute("DELETE FROM _th_meta WHERE name = 'alarm'")
        else:
            self._conn.execute(
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

        self._conn.set_authorizer(authorize)
        try:
            return self._conn.execute(query, bindings)
        except sqlite3.DatabaseError:
            if touched:
                raise ValueError(
                    f"table {touched[0]!r} is reserved for trio-hibernate (names starting "
                    "with _th_ hold the key-value data and the alarm)"
                ) from None
            raise
        finally:
            self._conn.set_authorizer(None)

    def close(self) -> None:
        """Roll back anything uncommitted and close."""
        self.rollback()
        self._conn.close()


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
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None) -> None:
        """Use ``data_dir`` (created if missing), or memory for None.

        Raises:
            StorageError: ``data_dir`` cannot be created, is not a directory, or is not
                writable.
        """
        self.data_dir = None if data_dir is None else _usable_directory(Path(data_dir))
        self._memory: dict[tuple[str, str], SqliteDatabase] = {}

    @property
    def durable(self) -> bool:
        """True when data outlives the process."""
        return self.data_dir is not None

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
        """Open (creating if needed) the object's database."""
        if self.data_dir is None:
            key = (namespace, object_id.hex)
            db = self._memory.get(key)
            if db is None:
                conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                db = self._memory[key] = SqliteDatabase(conn)
            return db
        path = self.path_for(namespace, object_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return SqliteDatabase(conn)

    def release(self, namespace: str, object_id: ObjectId, db: ObjectDatabase) -> None:
        """The object hibernated: close a file database (memory ones stay open)."""
        if self.data_dir is not None:
            db.close()

    def close(self) -> None:
        """Close every database still open (memory ones are lost)."""
        for db in self._memory.values():
            db.close()
        self._memory.clear()
