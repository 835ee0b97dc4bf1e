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


async def _accept_loop(host: Host, listener: socket.socket) -> NoReturn:
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
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            host.serve_socket(sock)


def _log_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info("file descriptor limit: %d (hard %d): at most that many connections", soft, hard)


async def serve_objects(
    app: App,
    address: str = "127.0.0.1",
    port: int = 0,
    *,
    backlog: int = 1024,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    **host_options: Any,
) -> NoReturn:
    """Serve ``app`` over HTTP and WebSocket on ``address:port`` until cancelled.

    Use with ``await nursery.start(serve_objects, app)``: the :class:`Server` (with the
    bound port) is passed to ``task_status.started``. ``host_options`` go to
    :func:`open_host`. Requests to ``/<namespace>/<name>[/...]`` reach the object's
    ``fetch``; WebSocket upgrades it accepts stay connected across hibernation.

    Cancellation:
        Cancelling stops listening and shuts the host down as :func:`open_host` does
        (WebSockets closed with ``shutdown_close_code``).
    """
    listener = _listen(address, port, backlog)
    try:
        _log_fd_limit()
        async with open_host(app, **host_options) as host:
            task_status.started(Server(host, listener))
            await _accept_loop(host, listener)
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
