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

from .._errors import ClusterCommitError

if TYPE_CHECKING:
    import psycopg

__all__ = ["Postgres", "connection_options"]

P = ParamSpec("P")
T = TypeVar("T")


def connection_options(patience: float) -> dict[str, object]:
    """libpq and server settings that bound every wait by about ``patience`` seconds
    (the lease TTL): a PostgreSQL (or a peer holding a row lock) that is gone without a
    word is noticed, instead of holding a worker thread and a lock for hours.

    TCP keepalives and ``tcp_user_timeout`` end a connection to a silent server; the
    session's ``statement_timeout`` and ``lock_timeout`` end a statement that waits
    (a claim queued behind a dead host's row lock); ``idle_in_transaction_session_timeout``
    ends the session of a client that died inside a transaction, releasing its locks.
    """
    millis = max(1000, int(patience * 1000))
    return {
        "autocommit": True,
        "connect_timeout": max(2, round(patience)),
        "keepalives": 1,
        "keepalives_idle": max(1, round(patience / 2)),
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": max(1000, millis // 2),
        "options": (
            f"-c statement_timeout={millis} -c lock_timeout={millis} "
            f"-c idle_in_transaction_session_timeout={2 * millis}"
        ),
    }


class Postgres:
    """A pool of ``size`` connections to ``dsn`` (opened by :meth:`open`); every wait
    bounded by about ``patience`` seconds (:func:`connection_options`)."""

    def __init__(self, dsn: str, size: int, patience: float) -> None:
        from psycopg_pool import ConnectionPool  # only cluster mode needs psycopg

        self._dsn = dsn
        self._options = connection_options(patience)
        self._pool = ConnectionPool(
            dsn,
            min_size=min(2, size),
            max_size=size,
            open=False,
            kwargs=self._options,
            timeout=max(1.0, patience),  # waiting for a free connection
            name="trio-hibernate",
        )
        self._limiter = trio.CapacityLimiter(size)

    def open(self, timeout: float) -> None:
        """Connect (blocking). One connection is tried first, so that a wrong address or
        password raises psycopg's own error at once; then the pool fills (raises
        ``psycopg_pool.PoolTimeout`` past ``timeout``)."""
        import psycopg

        options = {**self._options, "connect_timeout": max(2, int(timeout))}
        psycopg.connect(self._dsn, **options).close()  # type: ignore[arg-type]
        self._pool.open(wait=True, timeout=timeout)

    def call(
        self, fn: Callable[Concatenate[psycopg.Connection, P], T], *args: P.args, **kw: P.kwargs
    ) -> T:
        """``fn(connection, *args)`` on a pooled connection, in this (worker) thread.

        Raises:
            ClusterCommitError: PostgreSQL failed the call or cannot be reached (an
                OSError: the callers handle it as the storage failing, which it is).
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn:
                return fn(conn, *args, **kw)
        except (psycopg.Error, PoolTimeout) as exc:
            raise ClusterCommitError(f"PostgreSQL: {exc}") from exc

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
