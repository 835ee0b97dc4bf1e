"""Hypothesis profiles, chosen with the ``HYPOTHESIS_PROFILE`` environment variable.

- ``default`` (local runs): 100 examples per test, random, failures kept in
  ``.hypothesis/`` and replayed first on the next run.
- ``ci`` (``.ci/run`` exports it): the same 100 examples on every run (``derandomize``), no
  example database. A CI run on a clean clone tests exactly what the last one tested, so
  it goes red only when the code changed, and ``tests/test_fuzz.py`` stays within its
  budget (under 60 s on two cores).
- ``nightly``: random, 100 times the examples, for a long exploring run of the fuzzing
  suite: ``HYPOTHESIS_PROFILE=nightly nox -s tests -- tests/test_fuzz.py`` (about a
  quarter of an hour on two cores). What it finds is saved in ``.hypothesis/`` and
  replayed first by the next local run.
- ``stateful``: more runs of the state machines.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from hypothesis import HealthCheck, settings
from trio.testing import MockClock

# Tests send real SIGINTs (to this process and to servers they start). A shell starts a
# background job (`nox &`, nohup) with SIGINT ignored, and an ignored signal stays ignored
# in every child: Python would then never raise KeyboardInterrupt and those tests would
# hang. Restore Python's handler (a handler, unlike SIG_IGN, is reset to the default in
# children, where Python installs its own again).
signal.signal(signal.SIGINT, signal.default_int_handler)

T = TypeVar("T")

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.register_profile(
    "ci", parent=settings.get_profile("default"), print_blob=True, derandomize=True, database=None
)
settings.register_profile("nightly", parent=settings.get_profile("default"), max_examples=10_000)
settings.register_profile("stateful", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def clock(autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch) -> MockClock:
    """The autojump clock, held still while any worker thread (a commit) runs.

    A task waiting for a thread looks idle to the autojump clock, which would then jump
    over timeouts in the middle of a commit of a durable host.
    """
    real_run_sync = trio.to_thread.run_sync
    running = 0

    async def run_sync(fn: Callable[..., T], *args: object, **kwargs: Any) -> T:
        nonlocal running
        running += 1
        autojump_clock.autojump_threshold = math.inf
        try:
            return await real_run_sync(fn, *args, **kwargs)
        finally:
            running -= 1
            if not running:
                autojump_clock.autojump_threshold = 0

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    return autojump_clock


def _browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None if they can."""
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (nox -s browser installs it)"
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        return f"Chromium not found at {chromium} (apt-get install chromium)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``browser`` are skipped, with the reason, where Playwright or
    Chromium is missing, so that a plain ``pytest -m browser`` (or one selecting them)
    passes on a machine without a browser. ``nox -s browser`` sets
    ``TRIO_HIBERNATE_REQUIRE_BROWSER=1``: there a missing browser fails them instead."""
    if item.get_closest_marker("browser") is None:
        return
    missing = _browser_missing()
    if missing is None:
        return
    if os.environ.get("TRIO_HIBERNATE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"TRIO_HIBERNATE_REQUIRE_BROWSER=1 but {missing}", pytrace=False)
    pytest.skip(missing)
