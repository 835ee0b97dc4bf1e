"""The server's own endpoints: ``/_health`` and ``/_metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._http import Request, Response

if TYPE_CHECKING:
    from .._statistics import HostStatistics

__all__ = ["operations_response"]

_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def render_metrics(stats: HostStatistics) -> str:
    """The statistics in the Prometheus text exposition format."""
    metrics: list[tuple[str, str, str, list[tuple[str, float]]]] = [
        (
            "trio_hibernate_objects",
            "gauge",
            "Objects known to the host, by state.",
            [
                ('{state="live"}', stats.live_objects),
                ('{state="hibernated"}', stats.hibernated_objects),
            ],
        ),
        ("trio_hibernate_websockets", "gauge", "Accepted WebSockets.", [("", stats.websockets)]),
        ("trio_hibernate_connections", "gauge", "Open connections.", [("", stats.connections)]),
        ("trio_hibernate_wakes_total", "counter", "Objects constructed.", [("", stats.wakes)]),
        (
            "trio_hibernate_hibernations_total",
            "counter",
            "Instances dropped from memory.",
            [("", stats.hibernations)],
        ),
        (
            "trio_hibernate_auto_responses_total",
            "counter",
            "Auto-responses served without waking an object.",
            [("", stats.auto_responses)],
        ),
        (
            "trio_hibernate_seconds_in_memory_total",
            "counter",
            "Seconds instances spent in memory (finished activations).",
            [("", stats.seconds_in_memory)],
        ),
        (
            "trio_hibernate_storage_commits_total",
            "counter",
            "Storage commits that succeeded.",
            [("", stats.storage_commits)],
        ),
        (
            "trio_hibernate_buffered_bytes",
            "gauge",
            "Bytes held for clients (Limits.max_buffered_bytes).",
            [("", stats.buffered_bytes)],
        ),
        (
            "trio_hibernate_bad_requests_total",
            "counter",
            "Requests refused as malformed (400, 413, 431).",
            [("", stats.bad_requests)],
        ),
        (
            "trio_hibernate_internal_errors_total",
            "counter",
            "Connections ended by an internal error (logged with a traceback).",
            [("", stats.internal_errors)],
        ),
    ]
    lines = []
    for name, kind, help_text, samples in metrics:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)
    return "\n".join(lines) + "\n"


def operations_response(request: Request, stats: HostStatistics, closing: bool) -> Response:
    """Answer a request to a path starting with ``/_``."""
    if request.path == "/_health":
        if closing:
            return Response(status=503, body="shutting down\n")
        return Response(status=200, body="ok\n", headers=(("content-type", "text/plain"),))
    if request.path == "/_metrics":
        return Response(
            status=200, body=render_metrics(stats), headers=(("content-type", _PROMETHEUS),)
        )
    return Response(status=404, body=f"Not Found: {request.path}\n")
