"""Crash test: every write the client saw acknowledged survives ``SIGKILL``.

A child process (``crash_child.py``) serves an object that answers ``ack N`` after
``await ctx.storage.put(f"k{N}", N)``. The parent streams numbered writes to it as fast
as it can, records every acknowledgement, and kills the child with ``SIGKILL`` at a
random moment once acknowledgements flow. Then it opens the object's database the way
the next host would and checks that:

* every acknowledged key is there with its value (the output gate held each ``ack``
  until its commit was durable);
* the durable keys are exactly ``k0 .. kM`` for some M: turns commit one by one, in the
  order the messages arrived, so a crash can only cut off a tail;
* SQLite's ``integrity_check`` is ``ok``.

Real clock (a real child process); every wait is bounded.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest
import trio
from crash_child import NAME, NAMESPACE
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from trio_hibernate import ObjectId
from trio_hibernate._core.codec import decode_data
from trio_hibernate._storage.sqlite import SqliteBackend

pytestmark = pytest.mark.integration

CHILD: Final = Path(__file__).resolve().parent / "crash_child.py"
RUNS: Final = 5
#: Bound on starting the child, connecting, and every other single wait (real seconds).
WAIT: Final = 15.0
#: The kill comes this long (uniformly random, seeded by the run) after the first ack.
KILL_AFTER: Final = (0.02, 0.4)


async def read_port(stdout: trio.abc.ReceiveStream) -> int:
    received = b""
    with trio.fail_after(WAIT):
        while b"\n" not in received:
            chunk = await stdout.receive_some(64)
            if not chunk:
                raise AssertionError(f"the child exited before printing its port: {received!r}")
            received += chunk
    return int(received.split(b"\n", 1)[0])


async def write_until_killed(
    ws: WebSocketConnection, process: trio.Process, kill_after: float
) -> list[int]:
    """Stream writes, collect acks, SIGKILL the child; returns the acknowledged numbers."""
    acked: list[int] = []
    first_ack = trio.Event()

    async def send_forever() -> None:
        number = 0
        try:
            while True:
                await ws.send_message(str(number))
                number += 1
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def collect() -> None:
        try:
            while True:
                message = await ws.get_message()
                assert isinstance(message, str)
                verb, number = message.split()
                assert verb == "ack"
                assert int(number) == len(acked), "acks arrive in order"
                acked.append(int(number))
                first_ack.set()
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_forever)
        nursery.start_soon(collect)
        with trio.fail_after(WAIT):
            await first_ack.wait()
        await trio.sleep(kill_after)
        process.kill()  # SIGKILL: no cleanup, no last commit
        with trio.fail_after(WAIT):
            await process.wait()
        # Acks already on their way were sent before the kill: let the client read them.
        with trio.move_on_after(WAIT):
            await trio.testing.wait_all_tasks_blocked(0.2)
        nursery.cancel_scope.cancel()
    return acked


@pytest.mark.parametrize("run", range(RUNS))
async def test_acknowledged_writes_survive_sigkill(run: int, tmp_path: Path) -> None:
    kill_after = random.Random(run).uniform(*KILL_AFTER)
    data_dir = tmp_path / "data"
    with (tmp_path / "child-stderr.txt").open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(CHILD), str(data_dir)], stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        assert process.stdout is not None
        port = await read_port(process.stdout)
        async with open_websocket_url(
            f"ws://127.0.0.1:{port}/{NAMESPACE}/{NAME}",
            connect_timeout=WAIT,
            disconnect_timeout=1,
        ) as ws:
            acked = await write_until_killed(ws, process, kill_after)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(WAIT):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
    assert process.returncode == -signal.SIGKILL

    db = SqliteBackend(data_dir).open(NAMESPACE, ObjectId.from_name(NAMESPACE, NAME))
    try:
        assert db.execute_user("PRAGMA integrity_check", ()).fetchall() == [("ok",)]
        rows = db.list(prefix=None, start=None, end=None, reverse=False, limit=None)
    finally:
        db.close()
    durable = {key: decode_data(value) for key, value in rows}

    assert acked, "the child acknowledged nothing before the kill"
    lost = [number for number in acked if durable.get(f"k{number}") != number]
    assert lost == [], f"acknowledged but not durable: {lost[:10]} (of {len(acked)} acked)"
    assert durable == {f"k{number}": number for number in range(len(durable))}
    assert len(durable) >= len(acked)
