"""The process's file descriptor budget: who may hold how many.

A server spends descriptors on three things. Each has its own share of the soft
``RLIMIT_NOFILE`` limit, so that together they can never pass it:

* the reserve (:func:`fd_reserve`): the listener, the spare descriptor the accept loop
  keeps for answering 503 at ``EMFILE``, the alarm index, Trio's own, stdio and logs,
  SQLite's temporary files, clients past the connection limit while they are answered,
  and whatever the application opens itself;
* object databases: what the storage backend reports as its
  :attr:`~trio_hibernate._storage.backend.StorageBackend.max_descriptors` (SQLite:
  ``max_open_databases`` times 3, the database, ``-wal`` and ``-shm``; 0 in memory);
* client connections: at most ``max_connections``, one descriptor each.

The shares are fixed rather than pooled: a flood of connections cannot starve storage,
and objects woken later (by a message on a socket already counted, an alarm or a stub
call) cannot take descriptors that connections were promised.

Plain functions of the limit; nothing here imports Trio.
"""

from __future__ import annotations

import resource
from typing import Final

__all__ = [
    "DATABASE_SHARE",
    "FD_RESERVE",
    "default_max_connections",
    "default_max_open_databases",
    "descriptor_limit",
    "fd_reserve",
]

#: Descriptors kept out of every budget (a quarter of the limit if that is smaller).
FD_RESERVE: Final = 256
#: By default object databases get 1/DATABASE_SHARE of what the reserve leaves: many
#: hibernated connections and few live objects is what this server is for, and a database
#: past the share is closed while idle and reopened on use, not refused.
DATABASE_SHARE: Final = 8
#: What an unlimited soft limit counts as (Linux never allows one; macOS may report it).
_UNLIMITED: Final = 1 << 20


def descriptor_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` limit of this process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED if soft == resource.RLIM_INFINITY else soft


def fd_reserve(limit: int) -> int:
    """Descriptors kept out of the connection and database budgets for ``limit``:
    :data:`FD_RESERVE`, or a quarter of a limit smaller than 1024."""
    return min(FD_RESERVE, limit // 4)


def default_max_open_databases(descriptors_per_database: int, limit: int | None = None) -> int:
    """Object databases open at once by default: 1/:data:`DATABASE_SHARE` of the limit
    less the reserve, in databases (at least 1)."""
    if limit is None:
        limit = descriptor_limit()
    share = (limit - fd_reserve(limit)) // DATABASE_SHARE
    return max(1, share // max(1, descriptors_per_database))


def default_max_connections(storage_descriptors: int, limit: int | None = None) -> int:
    """Client connections by default: the limit less the reserve and the descriptors that
    object databases may hold (at least 1)."""
    if limit is None:
        limit = descriptor_limit()
    return max(1, limit - fd_reserve(limit) - storage_descriptors)
