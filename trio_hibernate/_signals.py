"""Shutting a server down on SIGTERM, SIGINT or SIGUSR1, as ``trio-hibernate serve`` does."""

from __future__ import annotations

import logging
import signal
from typing import Final

import trio

from ._groups import open_owned_nursery
from ._host import Host, runtime_of
from ._server import Server

__all__ = ["wait_for_shutdown_signal"]

log = logging.getLogger("trio_hibernate.signals")

#: The signals that shut the host down. SIGUSR1 means "restart": clients get 1012.
_SHUTDOWN_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


async def wait_for_shutdown_signal(server: Server | Host) -> signal.Signals:
    """Wait for SIGTERM, SIGINT or SIGUSR1, then shut the host down gracefully.

    For an embedded server, in place of ``trio.sleep_forever()``::

        async with open_server(app, "0.0.0.0", 8080) as server:
            await wait_for_shutdown_signal(server)

    On the first signal, every WebSocket is sent a Close with the host's
    ``shutdown_close_code`` (1001 going away; for SIGUSR1, 1012 service restart, which
    tells clients to reconnect at once) and new clients are refused. Then it waits until
    every client has answered its Close, or ``close_timeout`` has passed, logging how
    many connections are still closing once a second, and returns the signal; leaving
    the ``async with`` block then has nothing left to wait for. Without this, SIGTERM
    kills the process and every client sees 1006 (no Close).

    Args:
        server: The :class:`Server` (or its :class:`Host`) to shut down.

    Returns:
        The signal received.

    Raises:
        KeyboardInterrupt: a second signal (any of the three) came while waiting for the
            clients: the wait stops at once, and the connections still open are dropped
            as the exception leaves the ``async with`` block.
        RuntimeError: not called from the main thread (signals are only delivered there).

    The handlers are installed for the duration of the call, and the previous ones are
    restored on return: while it runs, Ctrl-C does not raise ``KeyboardInterrupt`` but
    shuts down gracefully like SIGTERM.

    Cancellation:
        Cancelled while it waits for the clients, it stops waiting; leaving the
        ``async with`` block waits for what remains of ``close_timeout``.
    """
    host = server.host if isinstance(server, Server) else server
    runtime = runtime_of(host)
    with trio.open_signal_receiver(*_SHUTDOWN_SIGNALS) as received:
        signum = signal.Signals(await anext(received))
        if signum is signal.SIGUSR1:
            host.shutdown_close_code = 1012
        log.info(
            "%s: shutting down (closing %d connection(s) with %d)",
            signum.name,
            len(runtime.connections),
            host.shutdown_close_code,
        )
        forced: list[signal.Signals] = []

        async def stop_at_a_second_signal() -> None:
            forced.append(signal.Signals(await anext(received)))
            dropped = runtime.connections.stop_waiting()
            log.warning("%s again: exiting now, dropping %d connection(s)", forced[0].name, dropped)

        async with open_owned_nursery() as nursery:
            nursery.start_soon(stop_at_a_second_signal)
            await runtime.shutdown(host.close_timeout)
            nursery.cancel_scope.cancel()
    if forced:
        raise KeyboardInterrupt
    return signum
