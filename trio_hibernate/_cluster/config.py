"""Cluster mode's settings (:class:`ClusterConfig`)."""

from __future__ import annotations

import re
from typing import Final

import attrs

__all__ = ["ClusterConfig"]

_HOST_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_host_id(instance: object, attribute: object, value: str) -> None:
    if not _HOST_ID.fullmatch(value):
        raise ValueError(
            f"host_id {value!r} must be 1-64 letters, digits, '_', '.' or '-', starting "
            "with a letter or digit"
        )


def _check_advertise(instance: object, attribute: object, value: str | None) -> None:
    if value is None:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"advertise {value!r} must be HOST:PORT (a port from 1 to 65535)")


def _check_ttl(instance: object, attribute: object, value: float) -> None:
    if not 0.5 <= value <= 3600:
        raise ValueError(f"lease_ttl must be from 0.5 to 3600 seconds, got {value}")


def _check_key(instance: object, attribute: object, value: str | None) -> None:
    if value is not None and (len(value) < 16 or not value.isascii() or not value.isprintable()):
        raise ValueError(
            "the cluster key must be at least 16 printable ASCII characters "
            f"(got {len(value)} characters)"
        )


@attrs.frozen
class ClusterConfig:
    """Run a host as one of several (processes or machines) sharing one PostgreSQL
    database: each object has at most one live instance, on whichever host claimed it;
    its storage and alarm live in PostgreSQL and survive the loss of any host.

    Pass it to :func:`~trio_hibernate.open_server` (or :func:`~trio_hibernate.open_host`)
    as ``cluster=``; the CLI's ``serve --cluster DSN --host-id NAME`` builds one. See
    ``docs/cluster.md`` for the design, the guarantees and what is not supported.
    """

    dsn: str = attrs.field(repr=False)
    """The PostgreSQL connection string (``postgresql://user@host:port/db``)."""
    host_id: str = attrs.field(validator=_check_host_id)
    """This host's name in the cluster (unique among the running hosts)."""
    advertise: str | None = attrs.field(default=None, validator=_check_advertise)
    """``HOST:PORT`` where the other hosts reach this one (relayed requests and
    sockets). None: the address the server is bound to (fine on one machine)."""
    lease_ttl: float = attrs.field(default=10.0, validator=_check_ttl)
    """Seconds a host's membership lease lasts. A host renews it every quarter of it;
    one that cannot stops serving before it expires, and once it has expired (by the
    database's clock) the other hosts take its objects over. The failover time."""
    key: str | None = attrs.field(default=None, repr=False, validator=_check_key)
    """The secret the hosts present to each other on the internal hop (at least 16
    characters). Without one this host neither relays nor accepts relayed requests:
    a request for an object another host owns is answered 503."""
    audit: bool = False
    """Log every fenced commit (object, epoch, host, incarnation, keys) in the table
    ``th_commit_log``, to check after the fact that no two hosts ever committed for the
    same object at once. For tests and investigations: it grows without bound."""
    pool_size: int = attrs.field(default=8, validator=attrs.validators.in_(range(2, 257)))
    """PostgreSQL connections this host keeps open (commits, claims, renewals)."""

    def with_advertise(self, address: str) -> ClusterConfig:
        """A copy with ``advertise`` set (when it was None)."""
        return self if self.advertise is not None else attrs.evolve(self, advertise=address)
