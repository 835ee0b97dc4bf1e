"""The cluster demo's ledger object on one in-process host (``trio_hibernate.testing``):
what tests/cluster/ relies on, checked without PostgreSQL. Every test runs normally and
in strict mode (the object dropped from memory after every event)."""

from __future__ import annotations

import json

import pytest
import trio
from app import app as ledger_app, op_key

from trio_hibernate import App
from trio_hibernate.testing import TestHost


@pytest.fixture
def hibernate_app() -> App:
    return ledger_app


@pytest.fixture(params=[False, True], ids=["normal", "strict"])
def hibernate_strict(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_ops_are_acked_stored_and_listed(
    hibernate_host: TestHost, autojump_clock: trio.abc.Clock
) -> None:
    ws = await hibernate_host.connect("ledger", "a")
    for n in (3, 1, 2):
        await ws.send(json.dumps({"op": n}))
        assert json.loads(await ws.receive()) == {"ack": n}
    response = await hibernate_host.fetch("ledger", "a")
    assert json.loads(response.body) == {"ops": [1, 2, 3], "alarms": 0}
    assert op_key(42) == "op:000000000042"


async def test_broadcast_reaches_every_socket_and_ping_wakes_nothing(
    hibernate_host: TestHost, autojump_clock: trio.abc.Clock
) -> None:
    x = await hibernate_host.connect("ledger", "b")
    y = await hibernate_host.connect("ledger", "b")
    await x.send(json.dumps({"broadcast": "hi"}))
    assert json.loads(await x.receive()) == {"broadcast": "hi"}
    assert json.loads(await y.receive()) == {"broadcast": "hi"}
    await hibernate_host.settle()
    await hibernate_host.hibernate("ledger", "b")
    with hibernate_host.assert_not_woken():
        await y.send("ping")
        assert await y.receive() == "pong"


async def test_an_alarm_is_counted_and_broadcast(
    hibernate_host: TestHost, autojump_clock: trio.abc.Clock
) -> None:
    ws = await hibernate_host.connect("ledger", "c")
    await ws.send(json.dumps({"alarm_in": 5}))
    assert set(json.loads(await ws.receive())) == {"alarm_set"}
    assert json.loads(await ws.receive()) == {"alarm": 1}  # 5 s later (Trio's clock)
    response = await hibernate_host.fetch("ledger", "c")
    assert json.loads(response.body) == {"ops": [], "alarms": 1}


async def test_a_bad_command_gets_an_error(
    hibernate_host: TestHost, autojump_clock: trio.abc.Clock
) -> None:
    ws = await hibernate_host.connect("ledger", "d")
    for bad in ("nonsense", json.dumps({"op": -1}), json.dumps({"op": 1, "extra": 2})):
        await ws.send(bad)
        assert "error" in json.loads(await ws.receive())
