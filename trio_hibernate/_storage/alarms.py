"""Alarms: one per object, fired at its time even if the object hibernated or the host
restarted.

The object's own database is the truth (``_th_meta``). The host keeps an index of pending
alarms so that it can wake objects without opening every database: in memory, and for a
durable host also in ``<data_dir>/_alarms.sqlite3``. The index may hold stale entries but
never misses one: a new alarm reaches the index *before* the object's commit, a deletion
only *after* it, and every firing is checked against the object's database.
"""

from __future__ import annotations

import heapq
import itertools
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final, NoReturn

import attrs
import trio

from .._errors import StorageError

__all__ = ["AlarmIndex", "AlarmInfo", "AlarmScheduler"]

#: workerd retries a failing alarm with exponential backoff from 2 s, up to 6 times.
FIRST_RETRY_SECONDS: Final = 2.0
MAX_RETRIES: Final = 6

AlarmKey = tuple[str, str, str | None]  # namespace, id hex, name the id came from


@attrs.frozen
class AlarmInfo:
    """Passed to ``alarm()``: is this a retry of a failed run, and which one."""

    retry_count: int
    """0 for the first run, then 1, 2, ... for retries."""
    is_retry: bool
    """``retry_count > 0``."""


class AlarmIndex:
    """Pending alarms by object; persisted in SQLite for a durable host.

    Thread-safe: commits record into it from worker threads. Once :meth:`close` has run,
    :meth:`load` and :meth:`record` raise ``sqlite3.ProgrammingError`` (the host closes it
    only after its last commit has finished, so that would be a bug of ours).
    """

    def __init__(self, path: Path | None) -> None:
        """Open (creating if needed) the index at ``path``; None keeps it in memory.

        Raises:
            StorageError: the file cannot be opened or is not a valid alarm index
                (not a SQLite database, corrupt, or unwritable).
        """
        self._lock = threading.Lock()
        self._path = path
        self._closed = False
        self._conn: sqlite3.Connection | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            except (OSError, sqlite3.Error) as exc:
                raise self._unusable(exc) from exc
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS alarms (namespace TEXT, id TEXT, name TEXT, "
                    "at REAL NOT NULL, PRIMARY KEY (namespace, id)) WITHOUT ROWID"
                )
            except sqlite3.Error as exc:
                conn.close()
                raise self._unusable(exc) from exc
            self._conn = conn

    def _unusable(self, cause: Exception) -> StorageError:
        assert self._path is not None
        return StorageError(f"cannot use the alarm index {self._path}: {cause}", path=self._path)

    def _check_open(self, what: str) -> None:
        # Called with the lock held, so close() cannot happen between check and use.
        if self._closed:
            where = "in memory" if self._path is None else str(self._path)
            raise sqlite3.ProgrammingError(f"the alarm index ({where}) is closed: cannot {what}")

    def load(self) -> list[tuple[AlarmKey, float]]:
        """Every alarm recorded by an earlier run of the host.

        Raises:
            StorageError: the index cannot be read (a corrupt file).
        """
        with self._lock:
            self._check_open("load the alarms")
            if self._conn is None:
                return []
            try:
                rows = self._conn.execute("SELECT namespace, id, name, at FROM alarms").fetchall()
                return [((ns, hex_id, name), float(at)) for ns, hex_id, name, at in rows]
            except (sqlite3.Error, ValueError, TypeError) as exc:  # TypeError: float(None)
                self._conn.close()
                self._conn = None
                self._closed = True
                raise self._unusable(exc) from exc

    def record(self, key: AlarmKey, when: float | None) -> None:
        """Write (or with None, remove) an entry. Thread-safe; flushes to disk."""
        with self._lock:
            self._check_open(f"record the alarm of {key[0]}/{key[2] or key[1]}")
            if self._conn is None:
                return
            if when is None:
                self._conn.execute(
                    "DELETE FROM alarms WHERE namespace = ? AND id = ?", (key[0], key[1])
                )
            else:
                self._conn.execute(
                    "INSERT INTO alarms (namespace, id, name, at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (namespace, id) DO UPDATE SET at = excluded.at, "
                    "name = excluded.name",
                    (key[0], key[1], key[2], when),
                )

    def close(self) -> None:
        """Close the index database (idempotent)."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class AlarmScheduler:
    """Fires each object's alarm at its wall-clock time (one host task)."""

    def __init__(
        self,
        *,
        wall_clock: Callable[[], float],
        fire: Callable[[AlarmKey, float, int], None],
    ) -> None:
        self._wall_clock = wall_clock
        self._fire = fire
        self._due: dict[AlarmKey, tuple[float, int, int]] = {}  # key -> (when, retry, seq)
        self._heap: list[tuple[float, int, AlarmKey]] = []
        self._seq = itertools.count()
        self._changed = trio.Event()
        self.fired = 0
        """Alarms that came due and were handed to ``fire`` (retries included)."""
        self.retried = 0
        """Retries scheduled after a failed run."""
        self.given_up = 0
        """Alarms whose last retry failed: nothing more is scheduled for them."""

    def __len__(self) -> int:
        return len(self._due)

    def schedule(self, key: AlarmKey, when: float | None, retry_count: int = 0) -> None:
        """Fire ``key`` at ``when`` (replacing any pending time); None cancels."""
        if when is None:
            self._due.pop(key, None)
        else:
            seq = next(self._seq)
            self._due[key] = (when, retry_count, seq)
            heapq.heappush(self._heap, (when, seq, key))
        self._changed.set()

    def pending(self, key: AlarmKey) -> float | None:
        """When ``key`` is due to fire (epoch seconds), or None."""
        due = self._due.get(key)
        return None if due is None else due[0]

    def retry_delay(self, retry_count: int) -> float | None:
        """Seconds before retry number ``retry_count + 1``, or None past the last one."""
        if retry_count >= MAX_RETRIES:
            return None
        return FIRST_RETRY_SECONDS * (1 << retry_count)

    def retry(self, key: AlarmKey, retry_count: int) -> float | None:
        """A run of ``key``'s alarm number ``retry_count`` failed: schedule the next
        retry (see :meth:`retry_delay`). Returns its delay in seconds, or None when that
        was the last retry (nothing is scheduled then)."""
        delay = self.retry_delay(retry_count)
        if delay is None:
            self.given_up += 1
        else:
            self.retried += 1
            self.schedule(key, self._wall_clock() + delay, retry_count + 1)
        return delay

    async def run(self) -> NoReturn:
        """Fire alarms as they come due, forever."""
        while True:
            delay = self._fire_due()
            self._changed = trio.Event()
            with trio.move_on_after(delay):
                await self._changed.wait()

    def _fire_due(self) -> float:
        """Fire what is due; return seconds until the next alarm (inf if none)."""
        heap = self._heap
        while heap:
            when, seq, key = heap[0]
            pending = self._due.get(key)
            if pending is None or pending[2] != seq:
                heapq.heappop(heap)  # replaced or cancelled
                continue
            delay = when - self._wall_clock()
            if delay > 0:
                return delay
            heapq.heappop(heap)
            del self._due[key]
            self.fired += 1
            self._fire(key, when, pending[1])
        return float("inf")
