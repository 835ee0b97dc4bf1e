"""PostgreSQL from Trio: a pool of blocking psycopg connections used in worker threads.

psycopg's async API needs asyncio; its blocking API runs under Trio through
``trio.to_thread.run_sync``, one pooled connection per call, at most ``size`` calls at
once (a capacity limiter in front of the pool, so that no thread waits for a connection).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import trio

if TYPE_CHECKING:
    import psycopg

__all__ = ["Postgres"]

P = ParamSpec("P")
T = TypeVar("T")


class Postgres:
    """A pool of ``size`` connections to ``dsn`` (opened by :meth:`open`)."""

    def __init__(self, dsn: str, size: int) -> None:
        from psycopg_pool import ConnectionPool  # only cluster mode needs psycopg

        self._dsn = dsn
        self._pool = ConnectionPool(
            dsn,
            min_size=min(2, size),
            max_size=size,
            open=False,
            kwargs={"autocommit": True},
            name="trio-hibernate",
        )
        self._limiter = trio.CapacityLimiter(size)

    def open(self, timeout: float) -> None:
        """Connect (blocking). One connection is tried first, so that a wrong address or
        password raises psycopg's own error at once; then the pool fills (raises
        ``psycopg_pool.PoolTimeout`` past ``timeout``)."""
        import psycopg

        psycopg.connect(self._dsn, connect_timeout=max(2, int(timeout))).close()
        self._pool.open(wait=True, timeout=timeout)

    def call(
        self, fn: Callable[Concatenate[psycopg.Connection, P], T], *args: P.args, **kw: P.kwargs
    ) -> T:
        """``fn(connection, *args)`` on a pooled connection, in this (worker) thread."""
        with self._pool.connection() as conn:
            return fn(conn, *args, **kw)

    async def run(
        self, fn: Callable[Concatenate[psycopg.Connection, P], T], *args: P.args, **kw: P.kwargs
    ) -> T:
        """``fn(connection, *args)`` in a worker thread. Not abandoned when cancelled:
        the caller waits for the statement to finish (its outcome must be known)."""
        return await trio.to_thread.run_sync(
            partial(self.call, fn, *args, **kw), limiter=self._limiter
        )

    def close(self) -> None:
        """Close every connection (blocking)."""
        self._pool.close()
