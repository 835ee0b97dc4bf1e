"""``trio-hibernate connect URL``: a reconnecting client on the terminal, for debugging.

Lines read from stdin are sent as text messages, messages received are printed on
stdout (text as it is, binary as a Python bytes literal), and the client's state changes
on stderr, each prefixed with ``* ``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable

import trio

from .._errors import ClientClosedError
from .._groups import open_owned_nursery
from ._connection import DEFAULT_BACKOFF, ClientEvent, ClientState, open_client
from ._policy import Backoff

__all__ = ["connect", "describe_event"]


def describe_event(event: ClientEvent) -> str:
    """One line for a state change, as ``connect`` prints it on stderr."""
    cause = ""
    if event.close_code is not None:
        cause = f" (closed with {event.close_code})"
    elif event.status is not None:
        cause = f" (refused with HTTP {event.status})"
    elif event.error:
        cause = f" ({event.error})"
    if event.state is ClientState.RECONNECTING:
        return f"* reconnecting in {event.delay_seconds:.2f} s, attempt {event.attempt}{cause}"
    if event.state is ClientState.CLOSED:
        return f"* closed for good{cause}"
    return f"* {event.state.value}"


async def _lines(fd: int) -> AsyncIterator[str]:
    # os.read in a thread, abandoned if the client closes for good while nobody types:
    # a worker thread is a daemon and os.read holds no lock (sys.stdin's buffer would
    # hold one, which the interpreter's exit then cannot take). Not an FdStream: that
    # would leave a terminal shared with the shell non-blocking.
    pending = b""
    while chunk := await trio.to_thread.run_sync(os.read, fd, 65536, abandon_on_cancel=True):
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            yield line.decode("utf-8", errors="replace").removesuffix("\r")
    if pending:
        yield pending.decode("utf-8", errors="replace")


async def connect(
    url: str,
    *,
    reliable: bool = False,
    backoff: Backoff = DEFAULT_BACKOFF,
    client_id: str | None = None,
    stdin_fd: int = 0,
    show: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> int:
    """Talk to ``url`` until stdin ends (0, once connected and every line is sent:
    acknowledged when ``reliable``) or the client closes for good (1, the reason on
    stderr)."""
    show = show or (lambda text: print(text, flush=True))
    note = note or (lambda text: print(text, file=sys.stderr, flush=True))
    report = note

    def on_event(event: ClientEvent) -> None:
        report(describe_event(event))

    try:
        async with open_client(
            url, reliable=reliable, backoff=backoff, client_id=client_id, on_event=on_event
        ) as client:
            note(f"* client id {client.client_id}")

            async def print_messages() -> None:
                while True:  # ends with ClientClosedError, which stops the reading too
                    message = await client.receive()
                    show(message if isinstance(message, str) else repr(message))

            async with open_owned_nursery() as nursery:
                nursery.start_soon(print_messages)
                async for line in _lines(stdin_fd):
                    await client.send(line)
                await client.wait_connected()  # also with nothing to send: an answer
                await client.flush()
                nursery.cancel_scope.cancel()
            report = lambda text: None  # noqa: E731 (the block's own close is no news)
    except ClientClosedError as exc:
        note(f"* {exc}")
        return 1
    return 0
