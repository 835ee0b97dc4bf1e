"""The live dashboard's paths without a browser: what ``/_dashboard/state`` and
``/_dashboard/object`` report, the bounds on what they list, and who may read them.
(tests/test_browser.py opens the page itself in Chromium.)"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import IO_GRACE_SECONDS, accept_upgrade, http_exchange, open_client, send, serve
from trio.testing import MockClock

from trio_hibernate import (
    App,
    DurableObject,
    ObjectId,
    Request,
    Response,
    Server,
    WebSocket,
    WebSocketCompression,
    WebSocketRequestResponsePair,
)
from trio_hibernate._dashboard import (
    ERRORS_KEPT,
    IDLE_SOCKET_BYTES,
    MAX_OBJECTS_LISTED,
    MAX_TAGS_LISTED,
    DashboardAccess,
    ErrorRing,
    deflate_context_bytes,
    is_loopback_address,
)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "correct-horse-battery-staple"


class Room(DurableObject):
    """Accepts sockets with the tags of ``?tags=a,b``; ``boom`` raises, ``alarm`` sets an
    alarm an hour away, ``save`` commits a write; anything else is echoed. ``ping`` is
    answered ``pong`` by the runtime."""

    async def fetch(self, request: Request) -> Response:
        self.ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
        tags = [tag for tag in request.query_params.get("tags", "").split(",") if tag]
        assert request.websocket is not None
        request.websocket.serialize_attachment({"who": request.query_params.get("who", "")})
        return accept_upgrade(self.ctx, request, tags)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if message == "boom":
            raise RuntimeError("the room exploded on purpose")
        if message == "alarm":
            await self.ctx.storage.set_alarm(self.ctx.now() + 3600)
        elif message == "save":
            await self.ctx.storage.put("saved", True)
        ws.send(message)


APP = App({"room": Room, "lobby": Room})


@pytest.fixture(autouse=True)
def _io_grace(autojump_clock: MockClock) -> None:
    """Real sockets on the autojump clock: wait out in-flight I/O (see ``helpers``)."""
    autojump_clock.autojump_threshold = IO_GRACE_SECONDS


async def get(
    server: Server, target: str, *headers: str, method: str = "GET", host: str | None = None
) -> Any:
    """``method target`` with ``headers`` and a ``Host`` (default: the server's loopback
    address); the reply."""
    host = f"127.0.0.1:{server.port}" if host is None else host
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers]
    request = ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode()
    return await http_exchange(server.port, request)


async def state(server: Server, query: str = "") -> Any:
    reply = await get(server, f"/_dashboard/state{query}")
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["cache-control"] == "no-store"
    return json.loads(reply.body)


async def echo(ws: Any, message: str) -> None:
    await send(ws, message)
    with trio.fail_after(30):
        assert await ws.get_message() == message


# -- what the state says -------------------------------------------------------------------


async def test_state_lists_objects_sockets_tags_and_counters(autojump_clock: MockClock) -> None:
    async with serve(APP, idle_timeout=5) as server:
        async with (
            open_client(server, "/room/a?tags=blue,green&who=ada") as ada,
            open_client(server, "/room/a?tags=blue") as bob,
            open_client(server, "/room/b") as carol,
            open_client(server, "/lobby/hall?tags=x") as dan,
        ):
            for ws in (ada, bob, carol, dan):
                await echo(ws, "hello")
            await echo(ada, "save")
            await echo(bob, "alarm")
            await trio.sleep(6)  # virtual: every room is idle, and hibernates
            await send(carol, "ping")  # answered by the runtime: b stays asleep
            with trio.fail_after(30):
                assert await carol.get_message() == "pong"
            await echo(dan, "wake up")  # the lobby is live again
            seen = await state(server)

    stats = seen["statistics"]
    assert stats["websockets"] == 4
    assert stats["wakes"] == 4  # a, b, hall, and hall again
    assert stats["auto_responses"] == 1
    assert stats["storage_commits"] >= 2  # the write and the alarm
    assert seen["states"] == {
        "hibernated": 2,
        "starting": 0,
        "live": 1,
        "stopping": 0,
        "websockets": 4,
    }
    assert seen["alarms_pending"] == 1
    assert seen["namespaces"] == [
        {"namespace": "lobby", "hibernated": 0, "starting": 0, "live": 1, "stopping": 0,
         "websockets": 1},
        {"namespace": "room", "hibernated": 2, "starting": 0, "live": 0, "stopping": 0,
         "websockets": 3},
    ]  # fmt: skip
    assert seen["objects_total"] == 3
    # The awake first, then by sockets.
    first, second, third = seen["objects"]
    assert (first["namespace"], first["name"], first["state"]) == ("lobby", "hall", "live")
    assert first["activations"] == 2
    assert first["id"] == ObjectId.from_name("lobby", "hall").hex
    assert (second["name"], second["state"], second["websockets"]) == ("a", "hibernated", 2)
    assert second["tags"] == [["blue", 2], ["green", 1]]
    assert second["tags_total"] == 2
    assert (third["name"], third["websockets"], third["tags"]) == ("b", 1, [])
    assert seen["errors"] == []
    memory = seen["memory"]
    assert memory["baseline_bytes"] == IDLE_SOCKET_BYTES
    assert memory["sampled_sockets"] == 3  # the hibernated rooms' sockets
    assert memory["data_bytes"] > 0  # attachments and tags
    assert memory["compression_bytes"] == 0
    assert memory["per_hibernated_socket_bytes"] == IDLE_SOCKET_BYTES + memory["data_bytes"]
    assert "estimate" in memory["how"]


async def test_memory_estimate_counts_compression_contexts(autojump_clock: MockClock) -> None:
    compression = WebSocketCompression(context_takeover=True, window_bits=12)
    async with serve(APP, websocket_compression=compression) as server:
        seen = await state(server)
    assert seen["memory"]["compression_bytes"] == deflate_context_bytes(12)
    # What docs/operations.md measured: about 50,500 at 12 bits, 308,000 at 15.
    assert abs(deflate_context_bytes(12) - 50_500) < 2_000
    assert abs(deflate_context_bytes(15) - 308_000) < 2_000


async def test_rates_and_history_come_from_samples_a_second_apart(
    autojump_clock: MockClock,
) -> None:
    async with serve(APP, idle_timeout=0.5) as server:
        first = await state(server)
        assert first["rates"]["wakes_per_second"] is None  # one sample: no rate yet
        async with open_client(server, "/room/a") as ws:
            for _ in range(4):
                await echo(ws, "hi")
                await trio.sleep(1)  # virtual: the room hibernates between messages
            second = await state(server)
    samples = second["history"]["samples"]
    assert second["history"]["fields"] == ["time", "live", "hibernated", "websockets"]
    assert len(samples) == 2
    assert samples[0][1:] == [0, 0, 0]
    assert samples[1][1:] == [0, 1, 1]  # hibernated, its socket connected
    rates = second["rates"]
    assert rates["window_seconds"] == pytest.approx(4, abs=0.5)
    assert rates["wakes_per_second"] == pytest.approx(4 / rates["window_seconds"])
    # Every counter gets a rate, gauges do not: a counter added to HostStatistics
    # appears here without a change to the dashboard.
    assert "hibernations_per_second" in rates
    assert "storage_commits_per_second" in rates
    assert "websockets_per_second" not in rates


async def test_errors_name_the_object_and_the_hook(autojump_clock: MockClock) -> None:
    async with serve(APP) as server:
        async with open_client(server, "/room/a") as ws:
            await send(ws, "boom")
            await echo(ws, "still here")  # the socket stays open
            seen = await state(server)
    assert seen["errors_total"] == 1
    (error,) = seen["errors"]
    assert error["level"] == "ERROR"
    assert error["namespace"] == "room"
    assert error["object"] == ObjectId.from_name("room", "a").hex
    assert error["name"] == "a"
    assert error["hook"] == "websocket_message"
    assert "RuntimeError: the room exploded on purpose" in error["message"]


async def test_the_object_path_reads_one_object_without_waking_it(
    autojump_clock: MockClock,
) -> None:
    async with serve(APP, idle_timeout=1) as server:
        async with open_client(server, "/room/a?tags=t") as ws:
            await echo(ws, "hi")
            live = json.loads((await get(server, "/_dashboard/object?namespace=room&name=a")).body)
            await trio.sleep(2)
            asleep = await get(server, "/_dashboard/object?namespace=room&name=a")
            by_id = await get(
                server, f"/_dashboard/object?namespace=room&id={ObjectId.from_name('room', 'a')}"
            )
            stats = server.host.statistics()
        unknown = await get(server, "/_dashboard/object?namespace=room&name=nobody")
        no_namespace = await get(server, "/_dashboard/object?namespace=nope&name=a")
        bad_id = await get(server, "/_dashboard/object?namespace=room&id=xyz")
        no_name = await get(server, "/_dashboard/object?namespace=room")
    assert live["object"]["state"] == "live"
    assert live["object"]["activations"] == 1
    assert live["object"]["tags"] == [["t", 1]]
    assert json.loads(asleep.body)["object"]["state"] == "hibernated"
    assert json.loads(by_id.body)["object"] == json.loads(asleep.body)["object"]
    assert stats.wakes == 1  # reading it woke nothing
    assert json.loads(unknown.body)["object"] == {
        "namespace": "room",
        "id": ObjectId.from_name("room", "nobody").hex,
        "name": "nobody",
        "known": False,
        "state": "hibernated",
        "websockets": 0,
        "queued_events": 0,
    }
    assert no_namespace.status == 404
    assert "no namespace 'nope'" in json.loads(no_namespace.body)["error"]
    assert bad_id.status == 400
    assert "64 lowercase hex digits" in json.loads(bad_id.body)["error"]
    assert no_name.status == 400


async def test_the_page_runs_only_its_own_inline_script_and_style(
    autojump_clock: MockClock,
) -> None:
    async with serve(APP) as server:
        reply = await get(server, "/_dashboard")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    page = reply.body.decode()
    policy = reply.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    for tag in ("script", "style"):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in policy
    # Nothing is loaded from elsewhere: the machine serving it may have no internet.
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=\"(?!data:)", page)
    assert "/_dashboard/state" in page
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["referrer-policy"] == "no-referrer"


def test_the_page_ships_in_the_wheel() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["trio_hibernate"]
    assert "_dashboard.html" in package_data
    assert (ROOT / "trio_hibernate" / "_dashboard.html").is_file()


# -- bounds -----------------------------------------------------------------------------------


async def test_the_listing_is_bounded_and_counts_the_rest(autojump_clock: MockClock) -> None:
    tags = ",".join(f"tag{i}" for i in range(10))
    async with serve(APP) as server:
        async with (
            open_client(server, f"/room/tagged?tags={tags}") as first,
            open_client(server, "/room/tagged?tags=tag9") as second,
            open_client(server, "/room/plain") as fourth,
            open_client(server, "/lobby/hall") as third,
        ):
            for ws in (first, second, third, fourth):
                await echo(ws, "hi")
            one = await state(server, "?limit=1")
            none = await state(server, "?limit=0")
            lobby = await state(server, "?namespace=lobby")
            too_many = await get(server, f"/_dashboard/state?limit={MAX_OBJECTS_LISTED + 1}")
            not_a_number = await get(server, "/_dashboard/state?limit=many")
    (listed,) = one["objects"]
    assert one["objects_total"] == 3
    assert listed["name"] == "tagged"  # all are live: the most sockets first
    assert len(listed["tags"]) == MAX_TAGS_LISTED
    assert listed["tags"][:2] == [["tag9", 2], ["tag0", 1]]  # the most used first
    assert listed["tags_total"] == 10
    assert none["objects"] == []
    assert none["objects_total"] == 3
    assert [o["name"] for o in lobby["objects"]] == ["hall"]
    assert lobby["objects_total"] == 1
    assert lobby["statistics"]["websockets"] == 4  # the totals stay host-wide
    for reply in (too_many, not_a_number):
        assert reply.status == 400
        assert f"limit must be 0 to {MAX_OBJECTS_LISTED}" in json.loads(reply.body)["error"]


def test_the_error_ring_keeps_the_last_ones() -> None:
    ring = ErrorRing()
    logger = logging.getLogger("trio_hibernate.test_dashboard")
    logger.addHandler(ring)
    try:
        for number in range(ERRORS_KEPT + 10):
            logger.error("error number %d: %s", number, "x" * 1000)
        logger.info("not kept: below WARNING")
    finally:
        logger.removeHandler(ring)
    assert ring.total == ERRORS_KEPT + 10
    assert len(ring.recent) == ERRORS_KEPT
    assert ring.recent[0]["message"].startswith("error number 10:")
    assert len(ring.recent[-1]["message"]) == 500  # cut


# -- who may read it -------------------------------------------------------------------------


async def test_loopback_server_serves_loopback_hosts_only(autojump_clock: MockClock) -> None:
    async with serve(APP) as server:
        plain = await get(server, "/_dashboard/state")
        named = await get(server, "/_dashboard/state", host=f"localhost:{server.port}")
        v6 = await get(server, "/_dashboard/state", host=f"[::1]:{server.port}")
        rebound = await get(server, "/_dashboard/state", host="evil.example:8080")
        proxied = await get(server, "/_dashboard", "X-Forwarded-For: 203.0.113.9")
        posted = await get(server, "/_dashboard/state", method="POST")
    assert plain.status == named.status == v6.status == 200
    # A page of another site whose name was rebound to 127.0.0.1 sends its own name.
    assert rebound.status == 403
    assert b"'evil.example:8080' is not a loopback name" in rebound.body
    assert proxied.status == 403
    assert b"through a proxy (x-forwarded-for)" in proxied.body
    assert posted.status == 405
    assert posted.headers["allow"] == "GET, HEAD"


async def test_token_opens_it_to_whoever_presents_it(autojump_clock: MockClock) -> None:
    async with serve(APP, dashboard_token=TOKEN) as server:
        without = await get(server, "/_dashboard/state")
        wrong = await get(server, "/_dashboard/state", "Authorization: Bearer wrong-token-wrong")
        header = await get(server, "/_dashboard/state", f"Authorization: Bearer {TOKEN}")
        query = await get(server, f"/_dashboard?token={TOKEN}")
        metrics = await get(server, "/_metrics")
    assert without.status == 401
    assert without.headers["www-authenticate"].startswith("Bearer")
    assert wrong.status == 401
    assert header.status == 200
    assert query.status == 200
    assert metrics.status == 200  # the other paths are not affected


async def test_dashboard_off_answers_404(autojump_clock: MockClock) -> None:
    async with serve(APP, dashboard=False) as server:
        page = await get(server, "/_dashboard")
        data = await get(server, "/_dashboard/state")
    assert page.status == data.status == 404


async def test_a_weak_token_is_refused_at_start(autojump_clock: MockClock) -> None:
    with pytest.raises(ValueError, match=r"at least 16 .* \(got 7 characters\)") as info:
        async with serve(APP, dashboard_token="hunter2"):
            pass
    assert "hunter2" not in str(info.value)


def test_without_token_a_public_address_serves_no_dashboard() -> None:
    request = Request(method="GET", url="/_dashboard/state", headers={"host": "127.0.0.1"})
    for address in ("0.0.0.0", "::", "192.0.2.7"):
        refusal = DashboardAccess(address).refusal(request)
        assert refusal is not None
        assert refusal.status == 403
        assert b"not a loopback address, and has no dashboard_token" in refusal.body
    assert DashboardAccess("0.0.0.0", TOKEN).refusal(
        request.with_headers({"authorization": f"Bearer {TOKEN}"})
    ) is None  # fmt: skip
    assert DashboardAccess("127.0.0.1").refusal(request) is None
    assert DashboardAccess("::1").refusal(request) is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.1:8080", True),
        ("127.1.2.3", True),
        ("[::1]:80", True),
        ("::1", True),
        ("localhost:8080", True),
        ("LocalHost", True),
        ("app.localhost", True),
        ("0.0.0.0", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("[::ffff:203.0.113.1]", False),
        ("", False),
    ],
)
def test_loopback_names(host: str, loopback: bool) -> None:
    assert is_loopback_address(host) is loopback
