"""The benchmarks' garbage-collector pause statistics (``trio_hibernate._gcstats``)."""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trio_hibernate import _gcstats
from trio_hibernate._gcstats import ENVIRONMENT_VARIABLE, GcPauses, install_from_environment

ROOT = Path(__file__).resolve().parent.parent


def test_collections_are_timed_per_generation_while_installed(tmp_path: Path) -> None:
    pauses = GcPauses()
    pauses.install()
    pauses.install()  # idempotent: one callback, each collection counted once
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        pauses.uninstall()
    gc.collect(2)  # not counted any more
    summary = pauses.summary()
    generations = summary["generations"]
    assert generations["2"]["count"] == 2
    full_collections = [event for event in summary["events"] if event[2] == 2]
    assert len(full_collections) == 2
    assert all(
        0 < start <= time.monotonic_ns() and pause > 0 for start, pause, _ in full_collections
    )
    assert generations["0"]["count"] >= 1
    full = generations["2"]
    assert 0 < full["p50_ms"] <= full["p99_ms"] <= full["max_ms"] <= full["total_ms"]
    pauses.write(tmp_path / "gc.json")
    assert json.loads((tmp_path / "gc.json").read_text())["generations"]["2"]["count"] == 2


def test_percentiles_come_from_the_histogram_within_its_resolution() -> None:
    pauses = GcPauses()
    for ms in range(1, 101):  # 1 ms .. 100 ms, one collection each
        pauses.record(1, ms * 1_000_000, collected=1)
    stats = pauses.summary()["generations"]["1"]
    step = 10 ** (1 / _gcstats.BUCKETS_PER_DECADE)
    assert stats["count"] == 100
    assert stats["collected"] == 100
    assert stats["max_ms"] == 100.0
    assert stats["total_ms"] == pytest.approx(5050.0)
    assert 50.0 <= stats["p50_ms"] <= 50.0 * step
    assert 99.0 <= stats["p99_ms"] <= 99.0 * step
    assert pauses.summary()["generations"]["0"]["p99_ms"] is None  # no collection yet


def test_the_list_of_collections_stops_growing_at_max_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_gcstats, "MAX_EVENTS", 3)
    pauses = GcPauses()
    for started in range(5):
        pauses.record(0, 1_000, started_ns=started)
    summary = pauses.summary()
    assert summary["events"] == [[0, 1_000, 0], [1, 1_000, 0], [2, 1_000, 0]]
    assert summary["events_dropped"] == 2
    assert summary["generations"]["0"]["count"] == 5


def test_install_from_environment_writes_the_file_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    assert install_from_environment() is None
    target = tmp_path / "gc.json"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(target))
    pauses = install_from_environment()
    assert pauses is not None
    try:
        gc.collect(1)
    finally:
        pauses.uninstall()
        atexit.unregister(pauses.write)
    # What the exit hook does (the hook itself runs only when the interpreter exits).
    pauses.write(target)
    assert json.loads(target.read_text())["generations"]["1"]["count"] >= 1


def test_serve_writes_the_statistics_when_interrupted(tmp_path: Path) -> None:
    app_file = tmp_path / "app.py"
    app_file.write_text(
        "from trio_hibernate import App, DurableObject\n"
        "class Nothing(DurableObject):\n    pass\n"
        "app = App({'nothing': Nothing})\n"
    )
    target = tmp_path / "gc.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_hibernate", "serve", f"{app_file}:app", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, ENVIRONMENT_VARIABLE: str(target)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        output = b""
        while b"listening on" not in output:  # printed once the server listens
            line = process.stdout.readline()
            assert line, f"the server exited: {output.decode(errors='replace')}"
            output += line
        # SIGINT: a graceful shutdown once the handlers are up (0), KeyboardInterrupt if
        # it comes before (130); the file is written either way.
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) in (0, 130)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait(timeout=20)
        if process.stdout is not None:
            process.stdout.close()
    stats = json.loads(target.read_text())
    assert stats["pid"] == process.pid
    assert set(stats["generations"]) == {"0", "1", "2"}
