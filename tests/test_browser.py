"""The chat page in a real browser: headless Chromium (Debian's package) driven by
Playwright, against the example app served on 127.0.0.1:0. Run by ``nox -s browser``.

The room runs in strict mode (an instance is dropped after every event), so every
message the other tab sees was handled by a freshly constructed room: the page works
while the room hibernates between messages.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from trio_hibernate import open_server
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
