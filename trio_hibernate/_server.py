"""Listening for clients: ``serve_objects`` (Trio ``serve_*`` style) and ``open_server``."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import NoReturn, Unpack, final

import trio

from ._app import App
from ._dashboard import check_dashboard_token, serve_dashboard
from ._descriptors import default_max_connections, descriptor_limit, fd_reserve
from ._groups import open_owned_nursery
from ._host import Host, HostOptions, open_host, runtime_of
from ._net.listener import Acceptor, listen
from ._storage.backend import StorageBackend

__all__ = ["Server", "open_server", "serve_objects"]

log = logging.getLogger("trio_hibernate.server")


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


async def serve_objects(
    app: App,
    address: str = "127.0.0.1",
    port: int = 0,
    *,
    backlog: int = 1024,
    max_connections: int | None = None,
    dashboard: bool = True,
    dashboard_token: str | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    **host_options: Unpack[HostOptions],
) -> NoReturn:
    """Serve ``app`` over HTTP and WebSocket on ``address:port`` until cancelled.

    Use with ``await nursery.start(serve_objects, app)``: the :class:`Server` (with the
    bound port) is passed to ``task_status.started``. ``host_options`` go to
    :func:`open_host`. Requests to ``/<namespace>/<name>[/...]`` reach the object's
    ``fetch``; WebSocket upgrades it accepts stay connected across hibernation.

    Args:
        max_connections: Open client connections (one file descriptor each). Past it a
            new client gets an immediate 503 and is closed, except that ``GET /_health``
            and ``GET /_metrics`` are answered as usual; nobody already connected is
            disturbed. Default: the file descriptor limit (``ulimit -n``) less a reserve
            of 256 (a quarter of a limit under 1024) less the descriptors object
            databases may hold (``3 * max_open_databases`` with a ``data_dir``). An
            explicit value must fit in that budget too (ValueError otherwise).
        dashboard: Serve the live dashboard at ``/_dashboard`` (objects by state,
            sockets and tags, wakes per second, memory per hibernated socket, recent
            errors; its JSON at ``/_dashboard/state``) to the clients
            ``dashboard_token`` and the address allow. False: those paths answer 404.
        dashboard_token: The secret that opens the dashboard to whoever presents it
            (``Authorization: Bearer <token>``, or ``/_dashboard?token=<token>`` in a
            browser); at least 16 printable characters. Without one the dashboard is
            served only when ``address`` is a loopback address, and there only to
            requests naming a loopback ``Host`` with no proxy forwarding header (a
            reverse proxy in front: give a token or block ``/_`` paths at the proxy).
        host_options: Passed to :func:`open_host` (:class:`HostOptions`), e.g. ``data_dir`` and
            ``max_open_databases`` (default: an eighth of the limit less the reserve,
            in databases of 3 descriptors).

    The budget is logged at start-up; the process never needs more descriptors than its
    limit for connections and databases (see docs/operations.md). Should it run out
    anyway (descriptors the app opens itself), a spare descriptor lets each waiting
    client get its 503 instead of hanging.

    Raises:
        ValueError: ``max_connections`` below 1, or over what the descriptor limit
            leaves once the reserve and the databases are counted; a ``dashboard_token``
            shorter than 16 characters or with spaces or non-ASCII characters.

    Cancellation:
        Cancelling stops listening and shuts the host down as :func:`open_host` does
        (WebSockets closed with ``shutdown_close_code``).
    """
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, got {max_connections}")
    check_dashboard_token(dashboard_token)
    # The host first: if its storage cannot be used, nothing has listened (a port that
    # accepts connections and never answers them is worse than no port).
    async with open_host(app, **host_options) as host:
        max_connections = _connection_budget(runtime_of(host).storage_backend, max_connections)
        listener = listen(address, port, backlog)
        try:
            server = Server(host, listener)
            placement = runtime_of(host).cluster
            if placement is not None:  # cluster mode: join, advertising this address
                await placement.join(f"{server.address[0]}:{server.address[1]}")
            with (
                serve_dashboard(runtime_of(host), server.address[0], dashboard_token)
                if dashboard
                else nullcontext()
            ):
                task_status.started(server)
                await Acceptor(
                    runtime_of(host),
                    host.serve_socket,
                    listener,
                    max_connections,
                    descriptor_limit(),
                ).run()
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()


def _connection_budget(backend: StorageBackend, max_connections: int | None) -> int:
    """``max_connections``, or its default, checked against the descriptor budget."""
    limit = descriptor_limit()
    reserve = fd_reserve(limit)
    storage = backend.max_descriptors
    available = limit - reserve - storage
    if max_connections is None:
        max_connections = default_max_connections(storage, limit)
    if max_connections > available:
        raise ValueError(
            f"max_connections={max_connections} does not fit in the file descriptor "
            f"limit {limit}: {reserve} are reserved and object databases may hold "
            f"{storage}, which leaves {available}; lower max_connections or "
            "max_open_databases, or raise the limit (ulimit -n)"
        )
    log.info(
        "at most %d connections and %d descriptors for object databases (file "
        "descriptor limit %d, %d reserved)",
        max_connections,
        storage,
        limit,
        reserve,
    )
    return max_connections


@asynccontextmanager
async def open_server(
    app: App,
    address: str = "127.0.0.1",
    port: int = 0,
    *,
    backlog: int = 1024,
    max_connections: int | None = None,
    dashboard: bool = True,
    dashboard_token: str | None = None,
    **host_options: Unpack[HostOptions],
) -> AsyncIterator[Server]:
    """Serve ``app`` for the duration of the ``async with`` block; yields the Server.

    Takes the same arguments as :func:`serve_objects`. On exit, listening stops and the
    host shuts down (WebSockets closed with ``shutdown_close_code``, default 1001).
    """
    async with open_owned_nursery() as nursery:
        server: Server = await nursery.start(
            lambda task_status: serve_objects(
                app,
                address,
                port,
                backlog=backlog,
                max_connections=max_connections,
                dashboard=dashboard,
                dashboard_token=dashboard_token,
                task_status=task_status,
                **host_options,
            )
        )
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
