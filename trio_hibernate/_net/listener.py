"""Listening and accepting: up to ``max_connections`` clients are served, the rest are
answered and closed at once.

Pure networking: the accept loop hands clients to a ``serve`` function (the public
``Host.serve_socket``), and asks a :class:`~.owner.ListenerOwner` (the runtime) how many
connections are open and, past the limit, for the answer to ``/_health`` and
``/_metrics``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Final, NoReturn, final

import trio

from .._http import Request, split_target
from .owner import ListenerOwner

__all__ = ["Acceptor", "listen"]

log = logging.getLogger("trio_hibernate.server")

#: accept() errors that mean "out of resources for now", not "the listener is broken".
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: accept() errors that closing a descriptor of ours can cure.
_DESCRIPTOR_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE})
#: accept() errors about one connection that already went away.
_GONE_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


def listen(address: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking TCP socket listening on ``address:port`` (0: any free port)."""
    info = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = info[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(sockaddr)
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


_FULL_BODY: Final = b"the server is at its connection limit; retry"
_FULL_RESPONSE: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 5\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_FULL_BODY), _FULL_BODY)
)
#: The paths answered even past the connection limit (as they always are).
_OPERATIONS_PATHS: Final = frozenset({"/_health", "/_metrics"})
#: Clients past the limit whose request line has not arrived yet, waited for at once.
_MAX_TRIAGED: Final = 16
#: How long each of them may take to send it (seconds).
_TRIAGE_SECONDS: Final = 1.0
#: The most bytes read from a client past the limit (its request line, and some headers).
_TRIAGE_BYTES: Final = 4096
#: accept() failures are logged once, then at most once per this many seconds.
_ACCEPT_ERROR_LOG_SECONDS: Final = 10.0


def _answer_at_limit(owner: ListenerOwner, head: bytes) -> bytes:
    """What a client past the connection limit gets: ``/_health`` and ``/_metrics`` are
    answered as always (a liveness probe that gets 503 would restart a server that is
    merely full, dropping every client); anything else, or a request line that has not
    arrived, gets the 503."""
    method, _, rest = head.partition(b" ")
    target, _, version = rest.partition(b" ")
    if method != b"GET" or not version.startswith(b"HTTP/1."):
        return _FULL_RESPONSE
    url = target.decode("latin-1")
    if split_target(url)[0] not in _OPERATIONS_PATHS:
        return _FULL_RESPONSE
    response = owner.operations(Request(method="GET", url=url))
    reason = HTTPStatus(response.status).phrase.encode()
    lines = [b"HTTP/1.1 %d %s" % (response.status, reason)]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in response.headers]
    lines += [b"connection: close", b"content-length: %d" % len(response.body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + response.body


def _answer_and_close(owner: ListenerOwner, sock: socket.socket, head: bytes) -> None:
    """Send the answer for a client past the limit (best effort, never blocks) and close.

    Whatever else the client sent that is already here is read and dropped before the
    close: closing a socket with unread data sends a reset, which can destroy the answer
    before the client reads it.
    """
    try:
        sock.send(_answer_at_limit(owner, head))
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)
    except OSError:
        pass  # gone, or nothing more to read: closing is all that is left
    finally:
        sock.close()


def _read_head_nowait(sock: socket.socket) -> bytes | None:
    """The request head bytes already received, b"" at EOF, None if none yet."""
    try:
        return sock.recv(_TRIAGE_BYTES)
    except BlockingIOError:
        return None
    except OSError:
        return b""


async def _triage(owner: ListenerOwner, sock: socket.socket) -> None:
    """Wait up to :data:`_TRIAGE_SECONDS` for the request line of a client past the
    limit, then answer it (:func:`_answer_at_limit`) and close."""
    head = b""
    with sock:  # closed on every way out (closing twice is harmless)
        with trio.move_on_after(_TRIAGE_SECONDS):
            while b"\n" not in head and len(head) < _TRIAGE_BYTES:
                await trio.lowlevel.wait_readable(sock)
                chunk = _read_head_nowait(sock)
                if chunk == b"":
                    return  # the client left
                head += chunk or b""
        _answer_and_close(owner, sock, head)


class _SpareDescriptor:
    """One descriptor held back for accept() at EMFILE: closed to accept the waiting
    client, who is answered and closed at once, then reopened. Without it a client at
    EMFILE could be neither accepted nor refused, and would wait in the backlog."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.restore()

    def restore(self) -> None:
        """Hold the spare again (a no-op if held; stays empty if none is free)."""
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = None

    def release(self) -> bool:
        """Give the spare back to the process; False if it was not held."""
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True


class _AcceptErrors:
    """accept() failures: logged at the first one, then at most once per
    :data:`_ACCEPT_ERROR_LOG_SECONDS` with how many there were, and once more when
    accept() works again."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.unreported = 0
        self.answered = 0
        self.next_report = -math.inf

    def failed(self, exc: OSError, *, answered: bool) -> None:
        """accept() failed with ``exc``; ``answered``: the spare let us answer a client."""
        self.unreported += 1
        self.answered += answered
        now = trio.current_time()
        if now < self.next_report:
            return
        log.error(
            "accept() failed %d time(s) since the last report, last with %s (file "
            "descriptor limit %d); %d client(s) answered with the spare descriptor, any "
            "others wait in the backlog; next report in %g s at the earliest",
            self.unreported,
            exc,
            self.limit,
            self.answered,
            _ACCEPT_ERROR_LOG_SECONDS,
        )
        self.unreported = self.answered = 0
        self.next_report = now + _ACCEPT_ERROR_LOG_SECONDS

    def recovered(self) -> None:
        """accept() gave a client again."""
        if self.next_report == -math.inf:
            return
        if self.unreported:
            log.warning(
                "accept() works again; %d more failure(s) since the last report, %d "
                "client(s) answered with the spare descriptor",
                self.unreported,
                self.answered,
            )
        self.unreported = self.answered = 0
        self.next_report = -math.inf


@final
class Acceptor:
    """The accept loop: up to ``max_connections`` clients are served, the rest answered
    and closed at once.

    Past the limit a client is never held beyond its answer: its request line, if already
    here, decides between ``/_health`` / ``/_metrics`` and the 503; otherwise up to
    :data:`_MAX_TRIAGED` such clients wait up to :data:`_TRIAGE_SECONDS` for it (their
    descriptors come out of the reserve), and any more get the 503 at once. At EMFILE or
    ENFILE the spare descriptor lets each waiting client be accepted and answered.
    Accepted clients go to ``serve``, which takes ownership of the socket.
    ``descriptor_limit`` (the process's) is quoted when accept() fails.
    """

    def __init__(
        self,
        owner: ListenerOwner,
        serve: Callable[[socket.socket], None],
        listener: socket.socket,
        max_connections: int,
        descriptor_limit: int,
    ) -> None:
        self.owner = owner
        self.serve = serve
        self.listener = listener
        self.max_connections = max_connections
        self.refused = 0
        self.triaged = 0
        self.errors = _AcceptErrors(descriptor_limit)
        self.spare = _SpareDescriptor()

    async def run(self) -> NoReturn:
        """Accept clients until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    await trio.lowlevel.wait_readable(self.listener)
                    while await self._accept(nursery):
                        pass
        finally:
            self.spare.release()  # for good

    async def _accept(self, nursery: trio.Nursery) -> bool:
        """Take one client from the backlog; False when there is none for now."""
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                return True
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            return await self._out_of_resources(exc)
        self.errors.recovered()
        sock.setblocking(False)
        if self.owner.connection_count < self.max_connections:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.serve(sock)
            return True
        self._note_refusal()
        head = _read_head_nowait(sock)
        if head is None and self.triaged < _MAX_TRIAGED:
            self.triaged += 1
            nursery.start_soon(self._triage, sock)
        elif head == b"":
            sock.close()  # the client already left
        else:
            _answer_and_close(self.owner, sock, head or b"")
        return True

    async def _out_of_resources(self, exc: OSError) -> bool:
        if exc.errno in _DESCRIPTOR_ERRNOS and self.spare.release():
            try:
                waiting, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                # Linux reports EMFILE before looking at the queue: nobody was waiting.
                self.spare.restore()
                return False
            except OSError:
                self.spare.restore()
            else:
                waiting.setblocking(False)
                self._note_refusal()
                _answer_and_close(self.owner, waiting, _read_head_nowait(waiting) or b"")
                self.spare.restore()
                self.errors.failed(exc, answered=True)
                return True
        # Nothing to spare (or memory is short): clients wait in the backlog a while.
        self.errors.failed(exc, answered=False)
        await trio.sleep(0.1)
        self.spare.restore()
        return False

    def _note_refusal(self) -> None:
        self.owner.counters.refused("connection_limit")
        self.refused += 1
        if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
            log.warning(
                "connection limit reached (%d, max_connections) or out of descriptors: "
                "%d refused with 503",
                self.max_connections,
                self.refused,
            )

    async def _triage(self, sock: socket.socket) -> None:
        try:
            await _triage(self.owner, sock)
        finally:
            self.triaged -= 1
