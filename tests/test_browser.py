"""The chat page and the live dashboard in a real browser: headless Chromium (Debian's
package) driven by Playwright, against servers on 127.0.0.1:0. Run by ``nox -s browser``.

In the first chat test the room runs in strict mode (an instance is dropped after every
event), so every message the other tab sees was handled by a freshly constructed room:
the page works while the room hibernates between messages. The second watches the
page's hibernation indicator go to sleep and wake with a message. The dashboard test
opens ``/_dashboard`` while a load of clients talks to objects that hibernate and wake,
and checks that the numbers move.

Each test saves a screenshot of its page under its pytest ``tmp_path``, records the path
as the ``screenshot`` property of the test (JUnit XML) and prints it (``nox -s browser``
shows it in the summary).
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from trio_hibernate import (
    App,
    DurableObject,
    Request,
    Response,
    Server,
    WebSocket,
    WebSocketRequestResponsePair,
    open_server,
)
from trio_hibernate._cli import load_app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "chat.py"

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FOUND = Path(CHROMIUM).exists()
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _two_tabs_chat(base_url: str) -> dict[str, list[str]]:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            context = browser.new_context()
            context.set_default_timeout(15_000)
            ada, bob = context.new_page(), context.new_page()
            for page, nick in ((ada, "ada"), (bob, "bob")):
                page.goto(base_url + "/")
                page.fill("input[name=room]", "lobby")
                page.fill("input[name=nick]", nick)
                page.click("#join button")
                expect(page.locator("#status")).to_have_text(f"in lobby as {nick}")
            expect(ada.locator("#people li")).to_have_text(["ada", "bob"])
            ada.fill("input[name=text]", "hello from ada")
            ada.press("input[name=text]", "Enter")
            expect(bob.locator("#log li", has_text="ada: hello from ada")).to_have_count(1)
            bob.fill("input[name=text]", "hi ada")
            bob.press("input[name=text]", "Enter")
            expect(ada.locator("#log li", has_text="bob: hi ada")).to_have_count(1)
            bob.close()
            expect(ada.locator("#log li", has_text="* bob left")).to_have_count(1)
            expect(ada.locator("#people li")).to_have_text(["ada"])
            return {
                "ada": ada.locator("#log li").all_inner_texts(),
                "people": ada.locator("#people li").all_inner_texts(),
            }
        finally:
            browser.close()


def save_screenshot(page: Any, path: Path) -> None:
    """A full-page screenshot of ``page`` at ``path``."""
    page.screenshot(path=str(path), full_page=True)


def report_screenshot(path: Path, record_property: Any) -> None:
    """Attach the screenshot at ``path`` to the test's report."""
    assert path.stat().st_size > 0, f"empty screenshot {path}"
    record_property("screenshot", str(path))
    print(f"screenshot: {path}")


async def test_two_tabs_chat_while_the_room_hibernates() -> None:
    assert CHROMIUM_FOUND, f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    app, _ = load_app(f"{EXAMPLE}:app")
    with trio.fail_after(120):
        async with open_server(app, "127.0.0.1", 0, hibernate_after_every_event=True) as server:
            base = f"http://127.0.0.1:{server.port}"
            seen = await trio.to_thread.run_sync(_two_tabs_chat, base)
            stats = server.host.statistics()
    assert "ada: hello from ada" in seen["ada"]
    assert "bob: hi ada" in seen["ada"]
    assert seen["people"] == ["ada"]
    # Strict mode: every join, message, /who and close built a new instance.
    assert stats.wakes >= 8
    assert stats.hibernations >= stats.wakes - 1


# -- the chat page's hibernation indicator ----------------------------------------------------


def _watch_the_room(server: Server, screenshot: Path) -> dict[str, Any]:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(15_000)
            page.goto(server.url("/", "http"))
            page.fill("input[name=room]", "lobby")
            page.fill("input[name=nick]", "ada")
            page.click("#join button")
            expect(page.locator("#status")).to_have_text("in lobby as ada")
            state = page.locator("#room-state")
            # Nobody talks: the room leaves memory, the socket stays connected.
            expect(state).to_have_attribute("data-state", "hibernated")
            expect(state).to_contain_text("hibernated")
            expect(page.locator("#room-wakes")).to_have_text("woken 1 time; 1 socket connected")
            page.fill("input[name=text]", "wake up")
            page.press("input[name=text]", "Enter")
            expect(page.locator("#log li", has_text="ada: wake up")).to_have_count(1)
            woke = page.locator("#room-events li.woke", has_text="woke up: wake #2")
            expect(woke).to_have_count(1)
            expect(page.locator("#room-wakes")).to_have_text("woken 2 times; 1 socket connected")
            expect(state).to_have_attribute("data-state", "hibernated")  # asleep again
            save_screenshot(page, screenshot)
            return {
                "events": page.locator("#room-events li").all_inner_texts(),
                "state": state.inner_text(),
                # Read while the page is still connected (its close wakes the room).
                "stats": trio.from_thread.run_sync(server.host.statistics),
            }
        finally:
            browser.close()


async def test_chat_page_shows_the_room_hibernate_and_wake(
    tmp_path: Path, record_property: Any
) -> None:
    assert CHROMIUM_FOUND, f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    app, _ = load_app(f"{EXAMPLE}:app")
    screenshot = tmp_path / "chat-room-indicator.png"
    with trio.fail_after(120):
        async with open_server(app, "127.0.0.1", 0, idle_timeout=1.0) as server:
            seen = await trio.to_thread.run_sync(_watch_the_room, server, screenshot)
    report_screenshot(screenshot, record_property)
    stats = seen["stats"]
    assert "hibernated" in seen["state"]
    assert any("woke up: wake #2" in event for event in seen["events"]), seen["events"]
    # The indicator read the truth: the room was built twice and is asleep.
    assert stats.wakes == 2
    assert (stats.live_objects, stats.hibernated_objects) == (0, 1)


# -- the dashboard under load ------------------------------------------------------------------


class LoadRoom(DurableObject):
    """Echoes; ``save`` writes to storage, ``alarm`` sets an alarm an hour away, ``boom``
    raises (a recent error); ``ping`` is answered ``pong`` without a wake."""

    async def fetch(self, request: Request) -> Response:
        self.ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
        ws = request.websocket
        assert ws is not None
        tags = request.query_params.get("tags", "").split(",")
        self.ctx.accept_websocket(ws, [tag for tag in tags if tag])
        return Response(status=101, websocket=ws)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        if message == "boom":
            raise RuntimeError("a handler failed on purpose (the load test)")
        if message == "save":
            await self.ctx.storage.put("last", message)
        elif message == "alarm":
            await self.ctx.storage.set_alarm(self.ctx.now() + 3600)
        ws.send(message)


LOAD_APP = App({"room": LoadRoom, "game": LoadRoom})


CLIENTS = 12


def _object_of(client: int) -> tuple[str, str]:
    return ("room" if client % 3 else "game"), f"r{client % 5}"


OBJECTS = len({_object_of(client) for client in range(CLIENTS)})


async def _client(server: Server, number: int, done: trio.Event) -> None:
    """One client: a few messages a second with pauses long enough for its object to
    hibernate (the idle timeout is short), until ``done``."""
    rng = random.Random(number)
    namespace, name = _object_of(number)
    target = f"/{namespace}/{name}?tags=user{number},team{number % 2}"
    script = ["alarm", "boom"] if number == 0 else []
    async with open_websocket_url(server.url(target)) as ws:
        while not done.is_set():
            message = script.pop(0) if script else rng.choice(["hi", "save", "ping", "hi"])
            await ws.send_message(message)
            if message != "boom":
                with trio.fail_after(30):
                    reply = await ws.get_message()
                assert reply == ("pong" if message == "ping" else message), reply
            with trio.move_on_after(rng.uniform(0.1, 0.9)):
                await done.wait()  # pacing the load, not waiting for anything


def _watch_the_dashboard(base_url: str, screenshot: Path) -> dict[str, Any]:
    from playwright.sync_api import expect, sync_playwright

    def number(text: str) -> int:
        return int(text.replace(",", ""))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on(
                "response",
                lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
            )
            page.goto(base_url + "/_dashboard")
            expect(page.locator("#updated")).to_have_text(re.compile(r"^updated "))
            first = number(page.locator("#v-wakes").inner_text())
            # The numbers move: wakes go up, the hibernated count changes, the chart grows.
            page.wait_for_function(
                "first => Number(document.getElementById('v-wakes').textContent"
                ".replace(/,/g, '')) > first",
                arg=first,
                polling=100,
            )
            page.wait_for_function(
                """() => {
                  const seen = (window.hibernatedSeen ??= new Set());
                  seen.add(document.getElementById('v-hibernated').textContent);
                  return seen.size >= 2;
                }""",
                polling=50,
            )
            expect(page.locator("#chart")).to_have_attribute(
                "data-samples", re.compile(r"^([4-9]|\d\d+)$")
            )
            expect(page.locator("#v-wakes-rate")).not_to_have_text("\u2013")  # a rate
            expect(page.locator("#v-alarms")).to_have_text("1")
            expect(page.locator("#errors tbody tr", has_text="websocket_message")).to_have_count(1)
            expect(page.locator("#objects tbody tr")).to_have_count(OBJECTS)
            expect(page.locator("#objects .tag", has_text="team1").first).to_be_visible()
            expect(page.locator("#namespaces tbody tr")).to_have_count(2)
            last = number(page.locator("#v-wakes").inner_text())
            points = page.locator("#line-hibernated").get_attribute("points") or ""
            save_screenshot(page, screenshot)
            return {
                "first": first,
                "last": last,
                "points": points,
                "memory": page.locator("#v-memory").inner_text(),
                "errors": errors,
            }
        finally:
            browser.close()


async def test_dashboard_numbers_move_under_load(tmp_path: Path, record_property: Any) -> None:
    assert CHROMIUM_FOUND, f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    screenshot = tmp_path / "dashboard.png"
    done = trio.Event()
    with trio.fail_after(120):
        async with open_server(LOAD_APP, "127.0.0.1", 0, idle_timeout=0.3) as server:
            try:
                async with trio.open_nursery() as nursery:
                    for number in range(CLIENTS):
                        nursery.start_soon(_client, server, number, done)
                    seen = await trio.to_thread.run_sync(
                        _watch_the_dashboard, f"http://127.0.0.1:{server.port}", screenshot
                    )
                    done.set()
            except* ConnectionClosed as group:  # the server going first would be a bug
                raise AssertionError("a load client was disconnected") from group
            stats = server.host.statistics()
    report_screenshot(screenshot, record_property)
    assert seen["errors"] == [], seen["errors"]  # the page's script ran clean
    assert seen["last"] > seen["first"]
    assert len(seen["points"].split()) >= 4
    assert re.fullmatch(r"\d+(\.\d)? KiB", seen["memory"]), seen["memory"]
    assert stats.wakes >= seen["last"]
    assert stats.auto_responses > 0
    assert stats.storage_commits > 0
