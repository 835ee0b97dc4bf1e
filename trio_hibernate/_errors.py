"""Exceptions raised by trio-hibernate, by whose fault they are.

- The *caller's* (application code misused the API or passed a value over a limit):
  :class:`LimitExceededError`, :class:`DataCloneError`, :class:`InvalidCloseCodeError`,
  :class:`WebSocketStateError`, :class:`ReentrantCallError`. Nothing has changed when
  they are raised.
- The *client's request*, found when object code acts on it: :class:`ConnectionIdError`
  (``accept_websocket`` of an upgrade whose ``_pk`` is malformed or taken). Left to
  propagate out of ``fetch``, it refuses the upgrade with its HTTP status.
- The *peer's*: never raised into object code. :class:`WebSocketProtocolError` arrives
  as the ``error`` of a ``websocket_error`` event (a closed connection as
  ``websocket_close``); a malformed HTTP request (:class:`BadRequest`, internal) is
  answered with a 4xx.
- The *operator's*: :class:`StorageError` (the data directory, or a file in it, cannot be
  used), :class:`AppLoadError` (the CLI's app spec names no App).
- The *runtime's* own (a bug; please report): :class:`InvalidTransition`.
- Not an error: :class:`ObjectAborted` unwinds the code that called ``ctx.abort()``.
- The *storage's*: :class:`StorageCommitError` (a turn's writes were lost).
- The *owning host's* (cluster mode): :class:`RemoteCallError` (a relayed stub call
  raised on the host that owns the object).
- The reconnecting client's (``trio_hibernate.client``): :class:`ClientClosedError`.
- The test kit's (``trio_hibernate.testing``, raised to the test): :class:`UpgradeRejected`,
  :class:`WebSocketClosed`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._ids import ObjectId

__all__ = [
    "AppLoadError",
    "BadRequest",
    "ClientClosedError",
    "ClusterCommitError",
    "ConnectionIdError",
    "DataCloneError",
    "FencedError",
    "HibernateError",
    "InvalidCloseCodeError",
    "InvalidTransition",
    "LimitExceededError",
    "ObjectAborted",
    "ObjectUnavailableError",
    "ReentrantCallError",
    "RemoteCallError",
    "StorageCommitError",
    "StorageError",
    "UpgradeRejected",
    "WebSocketClosed",
    "WebSocketProtocolError",
    "WebSocketStateError",
]


class HibernateError(Exception):
    """Base class of every error trio-hibernate raises on purpose."""


class LimitExceededError(HibernateError, ValueError):
    """A value is over one of the configured :class:`~trio_hibernate.Limits` (or the
    client's ``max_buffered_messages``, see :func:`trio_hibernate.client.open_client`).

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


class ConnectionIdError(HibernateError, ValueError):
    """The connection id a client asked for (the ``_pk`` query parameter) cannot be used.

    Raised by ``ctx.accept_websocket``; nothing is changed and the socket is still not
    accepted. If ``fetch`` lets it propagate, the runtime answers the upgrade with
    :attr:`status` and the message (nothing is logged: the client is at fault).

    Attributes:
        status: 400 when the id is malformed (given twice, over 128 characters, or a
            character other than ``A-Z a-z 0-9 - . _ ~``); 409 when another socket of
            the object still has it (it is free again once that socket's close or error
            handler has run).
        connection_id: The id asked for.
    """

    def __init__(self, message: str, *, status: int, connection_id: str) -> None:
        super().__init__(message)
        self.status = status
        self.connection_id = connection_id


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


class ClusterCommitError(StorageCommitError, OSError):
    """Cluster mode: a turn's writes could not be committed to PostgreSQL, or the
    commit's outcome is unknown (the connection was lost during ``COMMIT``).

    Nothing the turn sent was delivered (the output gate held it); the object is reset,
    and its next event claims it again and reloads its state from PostgreSQL, so the
    next instance sees exactly what PostgreSQL holds. Logged by the runtime; an
    application sees it only as :class:`StorageCommitError` in a stub caller.
    """


class FencedError(ClusterCommitError):
    """Cluster mode: another host owns the object now (its fencing epoch moved on), so
    this host's commit was refused. The host has lost its lease (it was paused or cut
    off for longer than ``lease_ttl``): it stops serving (see ``docs/cluster.md``)."""


class ObjectUnavailableError(HibernateError, RuntimeError):
    """Cluster mode: the object's owner cannot be reached and its lease has not
    expired yet, so no other host may take the object over. Retry after
    :attr:`retry_after` seconds (HTTP clients get ``503`` with ``Retry-After``).

    Attributes:
        retry_after: Seconds until the owner's lease expires (at least 1).
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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


class RemoteCallError(HibernateError, RuntimeError):
    """A stub call relayed to the host that owns the object (cluster mode) raised there.

    The exception itself stays on that host (it may not be data); the caller gets its
    class name and message. A missing method comes back as :class:`AttributeError`
    instead, as from a local call.

    Attributes:
        remote_type: The class name of the exception raised on the owning host
            (``"ValueError"``), or ``"HTTP <status>"`` when that host refused the call
            itself (a wrong cluster key, an unknown namespace).
        message: Its message (``str(exc)`` there).
    """

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}" if message else remote_type)
        self.remote_type = remote_type
        self.message = message


class WebSocketProtocolError(HibernateError):
    """Passed to ``websocket_error``: the peer broke the protocol or a limit.

    Attributes:
        code: The close code the runtime sent (1002, 1007, 1009, 1008 for a stalled
            message, 1013 past the memory budget, or 1011 for a slow peer).
        reason: The close reason sent with it.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"WebSocket protocol error ({code}): {reason}")
        self.code = code
        self.reason = reason


class BadRequest(Exception):
    """Internal: the peer's HTTP request cannot be served; the connection answers
    ``status`` with the message and closes. Never raised into application code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AppLoadError(HibernateError):
    """The CLI's app spec could not be turned into an :class:`~trio_hibernate.App`."""


class InvalidTransition(RuntimeError):
    """The runtime asked a state table of the core (an object's lifecycle, a socket's
    close state) for a move it does not allow: a bug of the runtime, never of
    application code.

    Attributes:
        state: The state (an ``ObjectState`` or a ``SocketState``).
        what: The refused input (an ``Input`` or ``SocketInput``), or the name of a call
            the state forbids.
    """

    def __init__(self, state: Enum, what: Enum | str) -> None:
        label = f"{type(what).__name__}.{what.name}" if isinstance(what, Enum) else repr(what)
        super().__init__(
            f"{label} is not allowed in state {type(state).__name__}.{state.name}; please report"
        )
        self.state = state
        self.what = what


class ObjectAborted(BaseException):
    """Raised by ``ctx.abort()`` to unwind the object code that called it.

    Internal (not exported): like :class:`trio.Cancelled` it is a :class:`BaseException`,
    so ``except Exception`` lets it through, and application code must let it through
    too. The runtime stops it where the object's code was entered (the constructor, a
    handler's turn, a ``ctx.start_soon`` task), after resetting the object.
    """


class ClientClosedError(HibernateError):
    """A :func:`trio_hibernate.client.open_client` connection is closed for good.

    Raised by its ``send``, ``receive`` (once the messages received before are taken),
    ``flush`` and ``wait_connected``. The message says why: the server closed with a
    code or refused the upgrade with a status that means "do not retry", the client gave
    up after ``max_retries`` failed attempts, or the ``async with`` block ended.

    Attributes:
        code: The Close code that ended the last connection, if that was the cause.
        status: The HTTP status of the last refused upgrade, if that was the cause.
    """

    def __init__(self, message: str, *, code: int | None, status: int | None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class UpgradeRejected(Exception):
    """The test kit's WebSocket upgrade got another answer than 101 (the object's
    ``fetch`` refused it, or the server did)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade rejected with HTTP {status}: {body!r}")
        self.status = status
        self.body = body


class WebSocketClosed(Exception):
    """The server closed the test kit's WebSocket (or the connection dropped: 1006)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"WebSocket closed with {code} {reason!r}")
        self.code = code
        self.reason = reason
