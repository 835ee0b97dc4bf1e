"""Putting a host in a cluster: connect at start-up, attach to the runtime."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .._errors import StorageError
from .._http import Request, Response
from .._net.operations import PROMETHEUS_TYPE, render_metrics
from .._runtime import fence_runtime
from .node import ClusterNode
from .status import metric_families, status_response

if TYPE_CHECKING:
    from .._runtime import Runtime
    from .config import ClusterConfig

__all__ = ["attach_cluster", "connect_cluster"]


async def connect_cluster(config: ClusterConfig, wall_clock: Callable[[], float]) -> ClusterNode:
    """A node connected to PostgreSQL, the tables created.

    Raises:
        StorageError: psycopg is not installed, or PostgreSQL cannot be reached or used.
    """
    try:
        node = ClusterNode(config, wall_clock)
    except ImportError as exc:
        raise StorageError(
            f"cluster mode needs psycopg and psycopg_pool (pip install "
            f"'trio-hibernate[cluster]'): {exc}",
            path=Path("postgresql"),
        ) from None
    try:
        await node.connect()
    except Exception as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(node.close)
        raise StorageError(
            f"cannot use the cluster's PostgreSQL database: {exc}", path=Path("postgresql")
        ) from exc
    return node


def attach_cluster(node: ClusterNode, runtime: Runtime) -> None:
    """Route ``runtime``'s events through ``node`` and serve ``/_cluster``."""
    runtime.cluster = node
    runtime.relay_key = node.config.key  # None: relays are neither made nor served
    node.attach(runtime, partial(fence_runtime, runtime))
    runtime.extra_operations["/_cluster"] = lambda request: status_response(node)

    def metrics(request: Request) -> Response:
        del request
        body = render_metrics(runtime.statistics(), partial(metric_families, node))
        return Response(body=body, headers=(("content-type", PROMETHEUS_TYPE),))

    runtime.extra_operations["/_metrics"] = metrics
