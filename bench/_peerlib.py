"""Shared pieces of the benchmark's peer servers (``bench/peer_*.py``).

Every peer is started as ``python bench/peer_NAME.py --port 0`` and prints ``PORT <n>`` on
its first line of standard output once it accepts connections. The two lowest-level peers
(trio + wsproto, plain trio TCP) drive non-blocking stdlib sockets with
``trio.lowlevel.wait_readable``: one task per connection, writes go straight to the kernel
and only a full kernel buffer costs a flusher task.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

__all__ = ["Writer", "accept_loop", "listen", "parse_port", "recv_some", "report_port"]

RECV_BYTES = 65536


def parse_port(description: str) -> int:
    """The ``--port`` argument of a peer's command line (0 picks a free one)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0)
    return int(parser.parse_args().port)


def report_port(port: int) -> None:
    """Tell ``bench/run.py`` where we listen (the first line of standard output)."""
    print(f"PORT {port}", flush=True)


def listen(port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening socket on 127.0.0.1."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(backlog)
    listener.setblocking(False)
    return listener


async def accept_loop(
    listener: socket.socket,
    nursery: trio.Nursery,
    serve: Callable[[socket.socket], Awaitable[None]],
) -> NoReturn:
    """Accept forever; each connection runs ``serve(sock)`` as one task in ``nursery``."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                await trio.sleep(0.05)  # out of descriptors: leave the rest in the backlog
                break
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(serve, sock)


async def recv_some(sock: socket.socket) -> bytes:
    """The next bytes from the peer; ``b""`` on EOF or error."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return b""


class Writer:
    """Synchronous, non-blocking writes to one socket; a backlog is flushed by a task."""

    __slots__ = ("_backlog", "_nursery", "dead", "sock")

    def __init__(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        self.sock = sock
        self._nursery = nursery
        self._backlog: bytearray | None = None
        self.dead = False

    def write(self, data: bytes) -> None:
        """Send ``data`` now if the kernel takes it; keep the rest for the flusher."""
        if self.dead:
            return
        if self._backlog is not None:
            self._backlog += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.dead = True
            return
        if sent < len(data):
            self._backlog = bytearray(data[sent:])
            self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        backlog = self._backlog
        assert backlog is not None
        try:
            while backlog and not self.dead:
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    sent = self.sock.send(backlog)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    self.dead = True
                    break
                del backlog[:sent]
        except trio.ClosedResourceError:
            self.dead = True
        finally:
            self._backlog = None

    def close(self) -> None:
        """Close the socket (waking a flusher that waits on it)."""
        self.dead = True
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
