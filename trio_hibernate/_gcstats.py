"""Garbage-collector pause times, for the benchmarks (``TRIO_HIBERNATE_GC_STATS=path``).

When ``trio-hibernate serve`` starts with the environment variable
:data:`ENVIRONMENT_VARIABLE` set to a file path, every collection of Python's cyclic
garbage collector is timed through :data:`gc.callbacks` (from its ``"start"`` to its
``"stop"`` callback), and when the process exits normally (a shutdown by SIGTERM or
SIGINT, not SIGKILL) the file gets one JSON object with, per generation, the number of
collections, their total, p50, p99 and longest pause in milliseconds, and the objects
they collected, and the first :data:`MAX_EVENTS` collections one by one (start time on
the :func:`time.monotonic_ns` clock, which every process of the machine shares, pause
and generation), so that a benchmark can take the pauses of its own time window.
``bench/run.py`` reads it for the many-rooms run.

A collection stops the whole process (every task waits), so the longest pause bounds
the latency tail. Memory is bounded: the pauses go into a histogram of
:data:`BUCKETS_PER_DECADE` logarithmic buckets per decade (a percentile is the upper
edge of its bucket, at most about 5% above the true value; the count, total and maximum
are exact), and the list of collections stops growing at :data:`MAX_EVENTS` (24 bytes
each). The cost is two callbacks and two clock reads per collection.
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import os
import time
from array import array
from pathlib import Path
from typing import Any, Final

import trio

__all__ = [
    "BUCKETS_PER_DECADE",
    "ENVIRONMENT_VARIABLE",
    "MAX_EVENTS",
    "GcPauses",
    "install_from_environment",
]

#: The environment variable naming the file the pause statistics are written to at exit.
ENVIRONMENT_VARIABLE: Final = "TRIO_HIBERNATE_GC_STATS"
#: Histogram resolution: bucket edges grow by 10 ** (1 / BUCKETS_PER_DECADE) (~4.7%).
BUCKETS_PER_DECADE: Final = 50
#: Collections kept one by one (start, pause, generation); later ones are only counted.
MAX_EVENTS: Final = 100_000
#: The smallest bucket's upper edge; shorter pauses are counted in it.
_FLOOR_NS: Final = 1_000
#: Buckets from 1 us to 1,000 s; longer pauses are counted in the last one.
_BUCKETS: Final = 9 * BUCKETS_PER_DECADE
_GENERATIONS: Final = 3


class _Generation:
    """The pauses of one generation's collections."""

    __slots__ = ("collected", "count", "histogram", "max_ns", "total_ns")

    def __init__(self) -> None:
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0
        self.collected = 0
        self.histogram = [0] * _BUCKETS

    def add(self, pause_ns: int, collected: int) -> None:
        self.count += 1
        self.total_ns += pause_ns
        self.max_ns = max(self.max_ns, pause_ns)
        self.collected += collected
        self.histogram[_bucket(pause_ns)] += 1

    def percentile_ms(self, fraction: float) -> float | None:
        """The upper edge of the bucket holding the ``fraction`` quantile, capped at the
        longest pause seen; None before any collection."""
        if not self.count:
            return None
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index, number in enumerate(self.histogram):
            seen += number
            if seen >= rank:
                return min(_upper_edge_ns(index), self.max_ns) / 1e6
        return self.max_ns / 1e6

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total_ms": self.total_ns / 1e6,
            "max_ms": self.max_ns / 1e6,
            "p50_ms": self.percentile_ms(0.50),
            "p99_ms": self.percentile_ms(0.99),
            "collected": self.collected,
        }


def _bucket(pause_ns: int) -> int:
    if pause_ns <= _FLOOR_NS:
        return 0
    index = math.ceil(math.log10(pause_ns / _FLOOR_NS) * BUCKETS_PER_DECADE)
    return min(index, _BUCKETS - 1)


def _upper_edge_ns(index: int) -> float:
    return _FLOOR_NS * 10 ** (index / BUCKETS_PER_DECADE)


class GcPauses:
    """Times every garbage collection of this process, per generation, while installed.

    Not thread-safe by design: the collector runs its callbacks in the thread that
    triggered the collection, and only one collection runs at a time.
    """

    def __init__(self) -> None:
        self._generations = [_Generation() for _ in range(_GENERATIONS)]
        #: start (monotonic ns), pause (ns), generation; three items per collection.
        self._events = array("q")
        self._events_dropped = 0
        self._started_ns = 0
        self._installed_ns = 0

    def install(self) -> None:
        """Start timing collections (appends to :data:`gc.callbacks`; idempotent)."""
        if self._callback not in gc.callbacks:
            self._installed_ns = time.monotonic_ns()
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        """Stop timing collections; what was recorded stays readable."""
        while self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    # Protected: a Ctrl-C that lands in a collection's callback would be raised here and
    # swallowed by the collector ("Exception ignored in gc callback"), and lost. Trio
    # delivers it at the next checkpoint instead.
    @trio.lowlevel.enable_ki_protection
    def _callback(self, phase: str, info: dict[str, int]) -> None:
        now = time.monotonic_ns()
        if phase == "start":
            self._started_ns = now
        elif self._started_ns:  # a "stop" whose "start" was seen
            started, self._started_ns = self._started_ns, 0
            self.record(info["generation"], now - started, info["collected"], started)

    def record(
        self, generation: int, pause_ns: int, collected: int = 0, started_ns: int = 0
    ) -> None:
        """Count one collection of ``generation`` (0-2) that started at ``started_ns``
        (:func:`time.monotonic_ns`), took ``pause_ns`` and freed ``collected`` objects
        (the collector's callbacks call this)."""
        self._generations[generation].add(pause_ns, collected)
        if len(self._events) < 3 * MAX_EVENTS:
            self._events.extend((started_ns, pause_ns, generation))
        else:
            self._events_dropped += 1

    def summary(self) -> dict[str, Any]:
        """The statistics so far: ``{"generations": {"0": {...}, "1": ..., "2": ...}, ...}``
        with ``count``, ``total_ms``, ``max_ms``, ``p50_ms``, ``p99_ms`` (None before the
        first collection) and ``collected`` per generation; ``events``, the first
        :data:`MAX_EVENTS` collections as ``[start_monotonic_ns, pause_ns, generation]``,
        and ``events_dropped``, the collections after those; the seconds since
        :meth:`install`, the thresholds and the objects frozen by :func:`gc.freeze`."""
        seconds = (time.monotonic_ns() - self._installed_ns) / 1e9 if self._installed_ns else 0
        events = self._events
        return {
            "pid": os.getpid(),
            "seconds": seconds,
            "thresholds": list(gc.get_threshold()),
            "frozen": gc.get_freeze_count(),
            "generations": {
                str(number): generation.summary()
                for number, generation in enumerate(self._generations)
            },
            "events": [events[i : i + 3].tolist() for i in range(0, len(events), 3)],
            "events_dropped": self._events_dropped,
        }

    def write(self, path: Path) -> None:
        """Write :meth:`summary` to ``path`` as JSON (replacing the file)."""
        path.write_text(json.dumps(self.summary()) + "\n")


def install_from_environment() -> GcPauses | None:
    """Time collections if :data:`ENVIRONMENT_VARIABLE` names a file, and write the
    statistics there when the interpreter exits; None (nothing installed) otherwise."""
    target = os.environ.get(ENVIRONMENT_VARIABLE)
    if not target:
        return None
    pauses = GcPauses()
    pauses.install()
    atexit.register(pauses.write, Path(target))
    return pauses
