"""Logs and metrics (issue 15): connection lines at DEBUG, objects named in log lines,
the counters and the turn histogram of ``/_metrics``, ``/_health`` on storage failure,
and the JSON log format."""

from __future__ import annotations

import io
import json
import logging
import sqlite3
from collections.abc import Iterator
from typing import Any, Final

import pytest
import trio
from helpers import WAIT_SECONDS, Echo, http_exchange, open_client, serve
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import MockClock

from trio_hibernate import (
    AlarmInfo,
    App,
    DurableObject,
    JsonLogFormatter,
    ObjectContext,
    Request,
    Response,
    WebSocket,
    configure_logging,
)
from trio_hibernate._cli import _parser
from trio_hibernate._host import runtime_of
from trio_hibernate._statistics import TURN_SECONDS_BUCKETS, Counters
from trio_hibernate._storage.sqlite import SqliteDatabase
from trio_hibernate.testing import open_test_host

CONNECTION_LOG: Final = "trio_hibernate.connection"


class Room(Echo):
    """An echo that raises on ``boom`` and closes with 4000 on ``bye``."""

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if message == "boom":
            raise RuntimeError("boom")
        if message == "bye":
            ws.close(4000, "bye")
            return
        await super().websocket_message(ws, message)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a Prometheus text page, by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the library logs at DEBUG and above, as JSON lines (JsonLogFormatter)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("trio_hibernate")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# -- connection lines ------------------------------------------------------------------


async def test_websocket_open_and_close_are_logged_at_debug_with_peer_name_and_code(
    json_lines: io.StringIO,
) -> None:
    app = App({"room": Room})
    async with serve(app) as server:  # its end waits for every connection task
        async with open_client(server, "/room/lobby") as ws:
            await ws.send_message("hi")
            with trio.fail_after(WAIT_SECONDS):
                assert await ws.get_message() == "hi"
        async with open_client(server, "/room/kitchen") as ws:
            await ws.send_message("bye")  # the object closes: 4000
            with trio.fail_after(WAIT_SECONDS), pytest.raises(Exception, match="4000"):
                await ws.get_message()
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    mine = [line for line in lines if line["logger"] == CONNECTION_LOG]
    opened = [line for line in mine if "WebSocket open" in line["message"]]
    closed = [line for line in mine if "WebSocket closed" in line["message"]]
    assert [line["object"] for line in opened] == ["room:lobby", "room:kitchen"]
    assert opened[0]["level"] == "DEBUG"
    peer = opened[0]["peer"]
    assert peer.startswith("127.0.0.1:")
    assert opened[0]["message"] == f"{peer}: WebSocket open: room:lobby (/room/lobby)"
    assert opened[0]["namespace"] == "room"
    assert len(opened[0]["object_id"]) == 64
    by_object = {line["object"]: line for line in closed}
    assert by_object["room:lobby"]["close_code"] == 1000  # trio-websocket's close
    assert by_object["room:lobby"]["closed_by"] == "peer"
    assert by_object["room:lobby"]["message"] == (
        f"{peer}: WebSocket closed: room:lobby, code 1000 by peer"
    )
    assert by_object["room:kitchen"]["close_code"] == 4000
    assert by_object["room:kitchen"]["closed_by"] == "server"
    for line in mine:
        assert set(line) >= {"time", "level", "logger", "message"}


async def test_no_connection_line_and_no_formatting_when_debug_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=CONNECTION_LOG)
    async with serve(App({"room": Room})) as server, open_client(server, "/room/a") as ws:
        await ws.send_message("hi")
        with trio.fail_after(WAIT_SECONDS):
            assert await ws.get_message() == "hi"
    assert not [r for r in caplog.records if "WebSocket open" in r.getMessage()]


# -- /_metrics -------------------------------------------------------------------------


async def test_metrics_count_messages_handler_errors_refusals_and_turns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App({"room": Room})
    async with serve(app) as server:
        async with open_client(server, "/room/a") as ws:
            for message in ("one", "two", "boom", "three"):
                await ws.send_message(message)
            with trio.fail_after(WAIT_SECONDS):
                assert [await ws.get_message() for _ in range(3)] == ["one", "two", "three"]
        cross_site = (
            b"GET /room/a HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://evil.example\r\n\r\n"
        )
        assert (await http_exchange(server.port, cross_site)).status == 403
        reply = await http_exchange(server.port, b"GET /_metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(reply.body.decode())
    assert found["trio_hibernate_messages_received_total", ()] == 4
    assert found["trio_hibernate_messages_sent_total", ()] == 3
    assert found["trio_hibernate_handler_errors_total", (("hook", "websocket_message"),)] == 1
    assert found["trio_hibernate_handler_errors_total", (("hook", "fetch"),)] == 0
    assert found["trio_hibernate_refusals_total", (("cause", "origin"),)] == 1
    assert found["trio_hibernate_refusals_total", (("cause", "connection_limit"),)] == 0
    # The upgrade's fetch, four messages and the close: six turns, each under +Inf.
    turns = found["trio_hibernate_turn_duration_seconds_count", ()]
    assert turns == 6
    assert found["trio_hibernate_turn_duration_seconds_bucket", (("le", "+Inf"),)] == turns
    assert found["trio_hibernate_turn_duration_seconds_sum", ()] > 0
    # The names tests and dashboards already use are still there.
    for name in ("trio_hibernate_wakes_total", "trio_hibernate_connections"):
        assert (name, ()) in found
    assert ("trio_hibernate_objects", (("state", "live"),)) in found
    # The crash is logged naming the object and the hook, not the event class.
    [crash] = [r for r in caplog.records if r.exc_info]
    assert crash.getMessage() == (
        "websocket_message handler of room:a raised; the socket stays open"
    )


async def test_a_refusal_by_app_authorize_is_counted_and_its_crash_is_a_handler_error() -> None:
    async def authorize(request: Request) -> Response | None:
        if request.path.endswith("/crash"):
            raise RuntimeError("authorize crashed")
        return Response(status=429, body="slow down\n")

    async with serve(App({"room": Room}, authorize=authorize)) as server:
        for path in (b"/room/a", b"/room/crash"):
            await http_exchange(server.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        stats = server.host.statistics()
    assert stats.refusals == {"authorize": 1}
    assert stats.handler_errors == {"App.authorize": 1}


class Alarmed(DurableObject):
    """Sets an alarm on fetch; the alarm fails on its first run and succeeds on retry."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)

    async def fetch(self, request: Request) -> Response:
        await self.ctx.storage.set_alarm(self.ctx.now())
        return Response(body="set")

    async def alarm(self, info: AlarmInfo) -> None:
        if not info.is_retry:
            raise RuntimeError("first run")
        self.env["done"].set()


async def test_alarms_fired_and_retried_are_counted(autojump_clock: MockClock) -> None:
    env = {"done": trio.Event()}
    with trio.fail_after(WAIT_SECONDS):
        async with open_test_host(App({"alarmed": Alarmed}, env=env)) as th:
            assert (await th.fetch("alarmed", "a", "/")).status == 200
            await env["done"].wait()
            await th.settle()
            stats = th.host.statistics()
    assert (stats.alarms_fired, stats.alarms_retried, stats.alarms_given_up) == (2, 1, 0)
    assert stats.alarms_pending == 0
    assert stats.handler_errors == {"alarm": 1}


def test_turn_durations_fall_in_inclusive_buckets() -> None:
    counters = Counters()
    counters.turn_took(TURN_SECONDS_BUCKETS[0])  # on the bound: in that bucket
    counters.turn_took(TURN_SECONDS_BUCKETS[0] * 1.5)
    counters.turn_took(3600.0)
    stats = counters.snapshot(
        live_objects=0,
        hibernated_objects=0,
        websockets=0,
        connections=0,
        buffered_bytes=0,
        alarms=_NoAlarms(),
    )
    assert stats.turn_seconds_buckets[0] == (TURN_SECONDS_BUCKETS[0], 1)
    assert stats.turn_seconds_buckets[1] == (TURN_SECONDS_BUCKETS[1], 2)
    assert stats.turn_seconds_buckets[-2] == (TURN_SECONDS_BUCKETS[-1], 2)
    assert stats.turn_seconds_buckets[-1] == (float("inf"), 3)
    assert stats.turns == 3


class _NoAlarms:
    fired = retried = given_up = 0

    def __len__(self) -> int:
        return 0


# -- /_health ----------------------------------------------------------------------------


class Writer(DurableObject):
    async def fetch(self, request: Request) -> Response:
        await self.ctx.storage.put("k", request.path)
        return Response(body="written")


async def test_health_is_503_while_storage_fails_and_200_after_a_commit_succeeds(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failures = 1
    real_commit = SqliteDatabase.commit

    def commit(db: SqliteDatabase) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise sqlite3.OperationalError("disk I/O error (injected)")
        real_commit(db)

    monkeypatch.setattr(SqliteDatabase, "commit", commit)
    health = Request(method="GET", url="/_health")
    with trio.fail_after(WAIT_SECONDS):
        async with open_test_host(App({"w": Writer})) as th:
            runtime = runtime_of(th.host)
            assert runtime.operations(health).status == 200
            assert (await th.fetch("w", "first", "/")).status == 500  # its write was lost
            failing = runtime.operations(health)
            assert th.host.statistics().storage_failure is not None
            assert (await th.fetch("w", "second", "/")).status == 200
            healthy = runtime.operations(health)
    assert failing.status == 503
    assert failing.headers == (("content-type", "application/json"),)
    body = json.loads(failing.body)
    assert body["status"] == "failing"
    assert body["storage"].startswith("the storage commit of w:first failed: disk I/O error")
    assert healthy.status == 200
    assert healthy.body == b"ok\n"
    assert any(
        r.getMessage().startswith("storage commit of w:first failed") for r in caplog.records
    )


# -- the JSON format and the CLI option ---------------------------------------------------


def test_json_formatter_writes_one_object_per_line_with_extra_fields() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("trio_hibernate.test_json")
    handler = configure_logging("debug", log_format="json", stream=stream)
    root = logging.getLogger()
    try:
        logger.debug("a %s line", "debug", extra={"object": "room:a", "peer": "1.2.3.4:5"})
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("it failed")
    finally:
        root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "a debug line"
    assert first["level"] == "DEBUG"
    assert first["logger"] == "trio_hibernate.test_json"
    assert (first["object"], first["peer"]) == ("room:a", "1.2.3.4:5")
    assert first["time"].endswith("+00:00")
    assert "ValueError: bad" in second["exception"]


def test_serve_takes_log_format() -> None:
    args = _parser().parse_args(["serve", "app.py", "--log-format", "json"])
    assert args.log_format == "json"
    assert _parser().parse_args(["serve", "app.py"]).log_format == "text"
    with pytest.raises(ValueError, match="log_format is 'text' or 'json'"):
        configure_logging(log_format="yaml")  # type: ignore[arg-type]
