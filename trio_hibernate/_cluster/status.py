"""What a cluster host shows of itself: ``GET /_cluster`` and its ``/_metrics`` families."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, Protocol

from .._http import Response

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .._directory import ObjectEntry
    from .config import ClusterConfig
    from .lease import Lease


class ClusterNode(Protocol):
    """What is shown of a node (``node.ClusterNode`` meets it)."""

    @property
    def config(self) -> ClusterConfig: ...
    @property
    def lease(self) -> Lease: ...
    @property
    def counters(self) -> dict[str, int]: ...

    def owned(self) -> list[ObjectEntry]:
        """The entries of the objects this host owns."""
        ...


__all__ = [
    "COUNTER_HELP",
    "STATUS_OBJECTS",
    "ClusterNode",
    "metric_families",
    "status",
    "status_response",
]

#: Objects listed by ``/_cluster`` at most.
STATUS_OBJECTS: Final = 500

#: What each counter of a node (and of its lease) counts.
COUNTER_HELP: Final = {
    "claims": "Objects this host claimed (a new epoch each).",
    "claims_lost": "Local copies dropped after a failed or fenced commit (reloaded on use).",
    "relayed": "Requests and calls relayed to the host that owns their object.",
    "unavailable": "Events answered 503 (or ObjectUnavailableError): owner unreachable.",
    "releases": "Objects given up when they had nothing left to do here.",
    "fenced_commits": "Commits refused because another host owns the object now.",
    "sweeps": "Alarm sweeps run.",
    "sweep_claims": "Objects claimed by a sweep to fire a due alarm of a dead owner.",
    "lease_renewals": "Lease renewals.",
    "lease_renewal_failures": "Lease renewals that failed (PostgreSQL unreachable).",
}


def _counts(node: ClusterNode) -> dict[str, int]:
    lease = node.lease
    return {
        **node.counters,
        "lease_renewals": lease.renewals,
        "lease_renewal_failures": lease.renewal_failures,
    }


def status(node: ClusterNode) -> dict[str, Any]:
    """What ``GET /_cluster`` answers (the hosts as of the last lease renewal)."""
    lease = node.lease
    held = lease.held
    owned = [
        {
            "namespace": entry.namespace,
            "id": entry.object_id.hex,
            "name": entry.object_id.name,
            "epoch": entry.placed,
        }
        for entry in node.owned()
    ]
    return {
        "host_id": node.config.host_id,
        "incarnation": None if held is None else held.incarnation,
        "address": node.config.advertise,
        "state": "fenced" if lease.fenced.is_set() else "alive" if held else "joining",
        "lease_ttl": node.config.lease_ttl,
        "hosts": [
            {
                "host_id": h.host_id,
                "incarnation": h.incarnation,
                "address": h.address,
                "state": h.state,
                "expires_in": round(h.expires_in, 3),
            }
            for h in lease.hosts
        ],
        "owned_count": len(owned),
        "owned": owned[:STATUS_OBJECTS],
        "counters": _counts(node),
    }


def status_response(node: ClusterNode) -> Response:
    """``GET /_cluster`` as a response."""
    body = json.dumps(status(node), indent=1)
    return Response(headers={"content-type": "application/json"}, body=body + "\n")


def metric_families(node: ClusterNode) -> Iterator[Metric]:
    """Cluster mode's families in ``/_metrics`` (``trio_hibernate_cluster_*``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    lease = node.lease
    yield GaugeMetricFamily(
        "trio_hibernate_cluster_owned_objects",
        "Objects this host owns.",
        value=len(node.owned()),
    )
    yield GaugeMetricFamily(
        "trio_hibernate_cluster_lease_valid",
        "1 while this host holds its lease (by its own clock), else 0.",
        value=int(lease.valid()),
    )
    hosts = GaugeMetricFamily(
        "trio_hibernate_cluster_hosts",
        "Hosts of the cluster by lease state (as of the last renewal).",
        labels=["state"],
    )
    for state in ("alive", "expired", "left"):
        hosts.add_metric([state], sum(1 for h in lease.hosts if h.state == state))
    yield hosts
    for name, value in _counts(node).items():
        yield CounterMetricFamily(f"trio_hibernate_cluster_{name}", COUNTER_HELP[name], value=value)
