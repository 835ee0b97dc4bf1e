"""Object settings that outlive an object's last socket, kept off the heap.

An object's auto-response pair and event timeout survive hibernation (spec 1), even once
its last socket is gone. Keeping a record in memory for every object that ever set one
made a long-running server grow with every room ever visited, so the host keeps the
settings of *forgotten* objects here instead: a private temporary SQLite database on
disk (deleted when the host closes), with a small page cache. An object that wakes takes
its row back. Like workerd's, the settings do not survive a restart of the host.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from .._autoresponse import WebSocketRequestResponsePair
from .._core.directory import Settings

__all__ = ["SettingsIndex"]

#: SQLite's page cache for the index, in KiB: what it may hold in memory at most.
CACHE_KIB: Final = 256


class SettingsIndex:
    """(namespace, id) -> (auto-response pair, event timeout in ms) of forgotten objects.

    Used from the event loop thread only.
    """

    def __init__(self) -> None:
        # "" is SQLite's private temporary on-disk database, removed on close.
        self._conn = sqlite3.connect("", isolation_level=None)
        self._conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        self._conn.execute("PRAGMA journal_mode = OFF")
        self._conn.execute("PRAGMA synchronous = OFF")
        self._conn.execute(
            "CREATE TABLE settings (namespace TEXT, id TEXT, request TEXT, response TEXT, "
            "timeout_ms INTEGER, PRIMARY KEY (namespace, id)) WITHOUT ROWID"
        )
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def keep(self, namespace: str, hex_id: str, settings: Settings) -> None:
        """Remember the settings of an object the host forgets."""
        pair, timeout_ms = settings
        key = (namespace, hex_id)
        replaced = self._conn.execute(
            "DELETE FROM settings WHERE namespace = ? AND id = ?", key
        ).rowcount
        self._conn.execute(
            "INSERT INTO settings VALUES (?, ?, ?, ?, ?)",
            (
                *key,
                None if pair is None else pair.request,
                None if pair is None else pair.response,
                timeout_ms,
            ),
        )
        self._rows += 1 - replaced

    def take(self, namespace: str, hex_id: str) -> Settings | None:
        """The settings kept for an object, removed from the index; None if none."""
        if not self._rows:
            return None  # the common case: nothing kept, no query
        row = self._conn.execute(
            "DELETE FROM settings WHERE namespace = ? AND id = ? "
            "RETURNING request, response, timeout_ms",
            (namespace, hex_id),
        ).fetchone()
        if row is None:
            return None
        self._rows -= 1
        request, response, timeout_ms = row
        pair = None if request is None else WebSocketRequestResponsePair(request, response)
        return pair, timeout_ms

    def close(self) -> None:
        """Drop the index (its file goes with it)."""
        self._conn.close()
