"""Listening for clients: ``serve_objects`` (Trio ``serve_*`` style) and ``open_server``."""

from __future__ import annotations

import errno
import logging
import resource
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn, final

import trio

from ._app import App
from ._groups import open_owned_nursery
from ._host import Host, open_host

__all__ = ["Server", "open_server", "serve_objects"]

log = logging.getLogger("trio_hibernate.server")

#: accept() errors that mean "out of resources for now", not "the listener is broken".
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: accept() errors about one connection that already went away.
_GONE_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


@final
class Server:
    """A listening server: its :attr:`host` and the address it listens on."""

    def __init__(self, host: Host, listener: socket.socket) -> None:
        self.host = host
        """The :class:`Host` running the app (statistics, test hooks)."""
        address = listener.getsockname()
        self.address: tuple[str, int] = (address[0], address[1])
        """The (host, port) actually bound."""

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        return self.address[1]

    def url(self, path: str = "/", scheme: str = "ws") -> str:
        """``ws://host:port/path`` (or another ``scheme``) for this server."""
        return f"{scheme}://{self.address[0]}:{self.address[1]}{path}"


def _listen(address: str, port: int, backlog: int) -> socket.socket:
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


_FULL_RESPONSE: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 5\r\n"
    b"connection: close\r\ncontent-length: 44\r\n\r\n"
    b"the server is at its connection limit; retry"
)


def _refuse(sock: socket.socket) -> None:
    """Answer 503 without reading the request (best effort, never blocks), then close."""
    try:
        sock.setblocking(False)
        sock.send(_FULL_RESPONSE)
    except OSError:
        pass  # the client is gone or its buffer is full: closing is all that is left
    finally:
        sock.close()


async def _accept_loop(host: Host, listener: socket.socket, max_connections: int) -> NoReturn:
    refused = 0
    while True:
        await trio.lowlevel.wait_readable(listener)
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    continue
                if exc.errno in _RESOURCE_ERRNOS:
                    # Out of file descriptors: new clients wait in the backlog (and may
                    # time out) until connections end; existing ones are not disturbed.
                    log.error("accept() failed (%s); pausing new connections for 0.1 s", exc)
                    await trio.sleep(0.1)
                    break
                raise
            if len(host._connections) >= max_connections:
                # Refuse cleanly while a descriptor is still there to answer with.
                _refuse(sock)
                refused += 1
                if refused in (1, 10, 100) or refused % 1000 == 0:
                    log.warning(
                        "connection limit reached (%d, max_connections): %d refused with 503",
                        max_connections,
                        refused,
                    )
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            host.serve_socket(sock)


#: Descriptors kept free of client connections: listener, storage files, pipes, logs.
FD_RESERVE: Final = 256


def default_max_connections() -> int:
    """The process's file descriptor limit, less :data:`FD_RESERVE`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - FD_RESERVE)


async def serve_objects(
    app: App,
    address: str = "127.0.0.1",
    port: int = 0,
    *,
    backlog: int = 1024,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    **host_options: Any,
) -> NoReturn:
    """Serve ``app`` over HTTP and WebSocket on ``address:port`` until cancelled.

    Use with ``await nursery.start(serve_objects, app)``: the :class:`Server` (with the
    bound port) is passed to ``task_status.started``. ``host_options`` go to
    :func:`open_host`. Requests to ``/<namespace>/<name>[/...]`` reach the object's
    ``fetch``; WebSocket upgrades it accepts stay connected across hibernation.

    ``max_connections`` (default: the file descriptor limit less 256) caps open client
    connections; past it a new client gets an immediate 503 and is closed, and nobody
    already connected is disturbed. The limit is logged at start-up.

    Cancellation:
        Cancelling stops listening and shuts the host down as :func:`open_host` does
        (WebSockets closed with ``shutdown_close_code``).
    """
    if max_connections is None:
        max_connections = default_max_connections()
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, got {max_connections}")
    # The host first: if its storage cannot be used, nothing has listened (a port that
    # accepts connections and never answers them is worse than no port).
    async with open_host(app, **host_options) as host:
        listener = _listen(address, port, backlog)
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.info(
                "at most %d connections (file descriptor limit %d, hard %d)",
                max_connections,
                soft,
                hard,
            )
            task_status.started(Server(host, listener))
            await _accept_loop(host, listener, max_connections)
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()


@asynccontextmanager
async def open_server(
    app: App, address: str = "127.0.0.1", port: int = 0, **options: Any
) -> AsyncIterator[Server]:
    """Serve ``app`` for the duration of the ``async with`` block; yields the Server.

    Takes the same arguments as :func:`serve_objects`. On exit, listening stops and the
    host shuts down (WebSockets closed with ``shutdown_close_code``, default 1001).
    """
    async with open_owned_nursery() as nursery:
        server: Server = await nursery.start(
            lambda task_status: serve_objects(
                app, address, port, task_status=task_status, **options
            )
        )
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
