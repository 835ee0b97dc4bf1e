"""The server's own endpoints: ``/_health`` and ``/_metrics`` (Prometheus text).

The host counts with plain ints as things happen (``_statistics.Counters``: a message
costs one ``+= 1``); ``/_metrics`` turns a snapshot of them into metric families at
scrape time, through a ``prometheus_client`` custom collector, the library's pattern for
values kept elsewhere. ``prometheus_client`` writes the exposition format (escaping,
histogram series); its own ``Counter.inc()`` takes a lock on every call, some 15 times
the cost of an int increment, which the per-message path does not pay.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from .._http import Response

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .._http import Request
    from .._statistics import HostStatistics

__all__ = [
    "HANDLER_HOOKS",
    "PROMETHEUS_TYPE",
    "REFUSAL_CAUSES",
    "operations_response",
    "render_metrics",
]

#: The content type of ``/_metrics``.
PROMETHEUS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Hooks whose errors are counted (listed at 0 before the first, so that ``rate()`` works).
HANDLER_HOOKS: Final = (
    "constructor",
    "fetch",
    "websocket_message",
    "websocket_close",
    "websocket_error",
    "alarm",
    "start_soon",
    "App.authorize",
    "App.fetch",
)
#: Causes of refusals (likewise listed at 0).
REFUSAL_CAUSES: Final = ("connection_limit", "websocket_limit", "origin", "handshake", "authorize")


def _by_label(counts: Mapping[str, int], known: Iterable[str]) -> list[tuple[str, int]]:
    """Every known label (0 if not counted yet), then the others counted."""
    seen = dict.fromkeys(known, 0)
    seen.update(counts)
    return list(seen.items())


class HostCollector:
    """A ``prometheus_client`` collector of one :class:`HostStatistics` snapshot."""

    def __init__(self, stats: HostStatistics) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """The metric families, in the order ``/_metrics`` lists them."""
        from prometheus_client.core import (  # on the first scrape (see render_metrics)
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        stats = self._stats
        objects = GaugeMetricFamily(
            "trio_hibernate_objects", "Objects known to the host, by state.", labels=["state"]
        )
        objects.add_metric(["live"], stats.live_objects)
        objects.add_metric(["hibernated"], stats.hibernated_objects)
        yield objects
        gauges = (
            ("websockets", "Accepted WebSockets.", stats.websockets),
            ("connections", "Open connections.", stats.connections),
            (
                "buffered_bytes",
                "Bytes held for clients (Limits.max_buffered_bytes).",
                stats.buffered_bytes,
            ),
            ("alarms_pending", "Alarms scheduled, not yet fired.", stats.alarms_pending),
            (
                "storage_failing",
                "1 while the last storage commit (or database open) failed, else 0.",
                int(stats.storage_failure is not None),
            ),
        )
        for name, text, level in gauges:
            yield GaugeMetricFamily(f"trio_hibernate_{name}", text, value=level)
        counters: tuple[tuple[str, str, float], ...] = (
            ("wakes", "Objects constructed.", stats.wakes),
            ("hibernations", "Instances dropped from memory.", stats.hibernations),
            (
                "auto_responses",
                "Auto-responses served without waking an object.",
                stats.auto_responses,
            ),
            (
                "seconds_in_memory",
                "Seconds instances spent in memory (finished activations).",
                stats.seconds_in_memory,
            ),
            ("storage_commits", "Storage commits that succeeded.", stats.storage_commits),
            (
                "bad_requests",
                "Requests refused as malformed (400, 413, 431).",
                stats.bad_requests,
            ),
            (
                "internal_errors",
                "Connections ended by an internal error (logged with a traceback).",
                stats.internal_errors,
            ),
            (
                "messages_received",
                "WebSocket data messages handed to websocket_message handlers.",
                stats.messages_in,
            ),
            (
                "messages_sent",
                "WebSocket data messages queued for clients (sends, broadcasts, auto-responses).",
                stats.messages_out,
            ),
            (
                "alarms_fired",
                "Alarms delivered to their object (retries included).",
                stats.alarms_fired,
            ),
            ("alarms_retried", "Retries scheduled after a failed alarm().", stats.alarms_retried),
            ("alarms_given_up", "Alarms whose last retry failed.", stats.alarms_given_up),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(f"trio_hibernate_{name}", text, value=value)
        errors = CounterMetricFamily(
            "trio_hibernate_handler_errors",
            "Application code that raised (logged with a traceback), by hook.",
            labels=["hook"],
        )
        for hook, count in _by_label(stats.handler_errors, HANDLER_HOOKS):
            errors.add_metric([hook], count)
        yield errors
        refusals = CounterMetricFamily(
            "trio_hibernate_refusals",
            "Clients refused before reaching an object, by cause.",
            labels=["cause"],
        )
        for cause, count in _by_label(stats.refusals, REFUSAL_CAUSES):
            refusals.add_metric([cause], count)
        yield refusals
        yield HistogramMetricFamily(
            "trio_hibernate_turn_duration_seconds",
            "Turns (one event run against an object, with its storage commit) by duration.",
            buckets=[
                ("+Inf" if bound == float("inf") else repr(bound), count)
                for bound, count in stats.turn_seconds_buckets
            ],
            sum_value=stats.turn_seconds,
        )


class _Families:
    """A collector of metric families made elsewhere (cluster mode's)."""

    def __init__(self, families: Callable[[], Iterator[Metric]]) -> None:
        self.collect = families


def render_metrics(
    stats: HostStatistics, more: Callable[[], Iterator[Metric]] | None = None
) -> str:
    """The statistics in the Prometheus text exposition format (version 0.0.4), then
    the families ``more()`` yields, if given."""
    # Imported on the first scrape: prometheus_client brings http.server and wsgiref,
    # some 45 ms that `import trio_hibernate` need not pay.
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(stats))
    if more is not None:
        registry.register(_Families(more))
    return generate_latest(registry).decode()


def health_response(stats: HostStatistics, closing: bool) -> Response:
    """``/_health``: 200 ``ok``, or 503 saying why (shutting down, storage failing).

    A storage failure is reported until a commit succeeds again, as JSON:
    ``{"status": "failing", "storage": "<what failed>"}``.
    """
    if closing:
        return Response(status=503, body="shutting down\n")
    if stats.storage_failure is not None:
        body = json.dumps({"status": "failing", "storage": stats.storage_failure})
        return Response(
            status=503, body=body + "\n", headers=(("content-type", "application/json"),)
        )
    return Response(status=200, body="ok\n", headers=(("content-type", "text/plain"),))


def operations_response(request: Request, stats: HostStatistics, closing: bool) -> Response:
    """Answer a request to a path starting with ``/_``."""
    if request.path == "/_health":
        return health_response(stats, closing)
    if request.path == "/_metrics":
        return Response(
            status=200, body=render_metrics(stats), headers=(("content-type", PROMETHEUS_TYPE),)
        )
    return Response(status=404, body=f"Not Found: {request.path}\n")
