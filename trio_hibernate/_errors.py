"""Exceptions raised by trio-hibernate.

Every error says whose fault it is: :class:`LimitExceededError`, :class:`DataCloneError`,
:class:`InvalidCloseCodeError`, :class:`WebSocketStateError` and
:class:`ReentrantCallError` are raised to the *caller* (application code misused the API
or passed a value over a limit), and nothing has changed when they are raised. Failures
caused by the *peer* are never raised into object code; they arrive as
``websocket_close`` / ``websocket_error`` events instead. :class:`StorageError` is the
*operator's*: the data directory, or a file in it, cannot be used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._ids import ObjectId

__all__ = [
    "DataCloneError",
    "HibernateError",
    "InvalidCloseCodeError",
    "LimitExceededError",
    "ReentrantCallError",
    "StorageCommitError",
    "StorageError",
    "WebSocketStateError",
]


class HibernateError(Exception):
    """Base class of every error trio-hibernate raises on purpose."""


class LimitExceededError(HibernateError, ValueError):
    """A value is over one of the configured :class:`~trio_hibernate.Limits`.

    Attributes:
        limit_name: The :class:`~trio_hibernate.Limits` field that was exceeded.
        limit: The configured maximum.
        value: The size (or count) that was offered.
    """

    def __init__(self, message: str, *, limit_name: str, limit: int, value: int) -> None:
        super().__init__(message)
        self.limit_name = limit_name
        self.limit = limit
        self.value = value


class DataCloneError(HibernateError, TypeError):
    """A value is not *data* and cannot be stored (attachments, storage).

    Data is what the structured-clone algorithm accepts: ``None``, ``bool``, ``int``,
    ``float``, ``str``, ``bytes``, lists, tuples, dicts, sets, timezone-aware datetimes and
    the like, with shared references and cycles. Functions, sockets and arbitrary class
    instances are not data.
    """


class StorageError(HibernateError):
    """The storage cannot be used: the data directory is not a writable directory, or a
    database file in it is not a valid SQLite database (corrupt, or something else).

    Raised by :func:`~trio_hibernate.open_host` (and the servers built on it) at
    start-up, before anything listens; the message names the file and the cause.

    Attributes:
        path: The directory or file at fault.
    """

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class StorageCommitError(HibernateError):
    """A turn's storage writes could not be made durable and were rolled back.

    Raised to a stub caller whose call's writes were lost; the object was reset.
    """


class InvalidCloseCodeError(HibernateError, ValueError):
    """``WebSocket.close()`` was given a code or reason the protocol does not allow."""


class WebSocketStateError(HibernateError, RuntimeError):
    """A WebSocket operation is not allowed in the socket's current state.

    For example ``send()`` after ``close()``, accepting a socket twice, or asking for the
    tags of a socket this object never accepted.
    """


class ReentrantCallError(HibernateError, RuntimeError):
    """A stub call would wait for a turn that is itself waiting for this call.

    An object runs one turn at a time, and a turn that awaits a stub call holds its object
    until the answer comes. So an object calling itself from a turn, or a cycle such as
    A's turn calling B whose turn calls A, could never be answered: the call is refused
    at once, in the caller, and nothing is queued. A ``ctx.start_soon`` task is not part
    of a turn: its calls, even to its own object, queue behind the current turn.

    Attributes:
        chain: The objects whose turns are waiting, outermost first, then the object
            called: ``(namespace, id)`` pairs, so ``chain[0] == chain[-1]`` for A -> B -> A.
    """

    def __init__(self, message: str, *, chain: tuple[tuple[str, ObjectId], ...]) -> None:
        super().__init__(message)
        self.chain = chain
