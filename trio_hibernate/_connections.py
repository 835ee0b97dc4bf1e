"""The open client connections of a host, and how they are closed at shutdown."""

from __future__ import annotations

import logging
import math

import trio

from ._net.owner import Connection

__all__ = ["ConnectionSet"]

log = logging.getLogger("trio_hibernate.host")


class ConnectionSet:
    """The connections a host serves; :meth:`close_all` ends them within a grace period.

    Shutdown may be started by one task (the signal helper) and finished by another
    (leaving ``open_host``); both share the first call's deadline, and a forced exit
    (:meth:`stop_waiting`) ends every wait at once.
    """

    __slots__ = ("_all_done", "_connections", "_deadline", "_reported", "_wait")

    def __init__(self) -> None:
        self._connections: set[Connection] = set()
        self._all_done: trio.Event | None = None
        self._deadline: float | None = None  # trio time; set by the first close_all
        self._wait: trio.CancelScope | None = None
        self._reported = False

    def __len__(self) -> int:
        return len(self._connections)

    def add(self, conn: Connection) -> None:
        """``conn`` is being served."""
        self._connections.add(conn)

    def ended(self, conn: Connection) -> None:
        """``conn`` has ended (it closes its byte channel right after)."""
        self._connections.discard(conn)
        if self._all_done is not None and not self._connections:
            self._all_done.set()

    def begin_shutdown(self, code: int, reason: str, grace: float) -> None:
        """Close every connection with ``code`` (no handler runs); the wait of
        :meth:`wait_closed` ends ``grace`` seconds from now. Called once."""
        if self._deadline is None:  # else stop_waiting came first
            self._deadline = trio.current_time() + grace
        for conn in list(self._connections):
            conn.begin_shutdown(code, reason)

    async def wait_closed(self, grace: float) -> None:
        """Wait until every connection has ended, or the deadline, logging how many
        remain once a second; then log the ones that will be dropped (once)."""
        deadline = self._deadline
        assert deadline is not None, "begin_shutdown first"
        connections = self._connections
        with trio.CancelScope() as self._wait:
            while connections and trio.current_time() < self._deadline_now():
                self._all_done = trio.Event()
                with trio.move_on_at(min(self._deadline_now(), trio.current_time() + 1)):
                    await self._all_done.wait()
                if connections and trio.current_time() < self._deadline_now():
                    log.info("shutdown: %d connection(s) still closing", len(connections))
        if connections and not self._reported:
            self._reported = True
            log.warning(
                "shutdown: %d connection(s) did not close within %g s (close_timeout); "
                "dropping them",
                len(connections),
                grace,
            )

    def _deadline_now(self) -> float:
        assert self._deadline is not None
        return self._deadline

    def stop_waiting(self) -> int:
        """Forced exit: stop waiting for connections (now and if waited for again); they
        are dropped when the host exits. Returns how many there are."""
        self._deadline = -math.inf
        self._reported = True
        if self._wait is not None:
            self._wait.cancel()
        return len(self._connections)
