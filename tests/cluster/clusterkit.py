"""What the cluster proofs share: the launcher (examples/cluster/cluster.py), when to skip,
reading a host's ``/_cluster`` and ``/_metrics``, a ledger client that reconnects and
records what was acknowledged, and the audit of PostgreSQL (``th_kv``, ``th_objects``,
``th_commit_log``) through psycopg.

psycopg is imported only when a proof runs, so that collecting these files needs nothing
but the test dependencies (the default session collects them and deselects them).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "cluster"))

from app import op_key  # examples/cluster/ is on the path now
from cluster import (
    Cluster,
    HostProcess,
    missing_binaries,
    open_cluster,
    open_postgres,
)

__all__ = [
    "CLUSTER",
    "CLUSTER_SKIP_REASON",
    "LEASE_TTL",
    "NAMESPACE",
    "AuditRow",
    "Cluster",
    "HostProcess",
    "LedgerClient",
    "Progress",
    "audit_epochs",
    "cluster_state",
    "commit_log",
    "http_get",
    "metric",
    "missing_acked",
    "op_key",
    "open_cluster",
    "open_postgres",
    "owners",
    "poll",
    "stored_keys",
    "vm_rss_kib",
]

NAMESPACE: Final = "ledger"
#: The proofs' lease TTL: short, so that takeovers are quick.
LEASE_TTL: Final = 2.0
#: Bound on one HTTP exchange with a host.
HTTP_SECONDS: Final = 10.0
#: How long a client waits for an ack before it gives the connection up.
ACK_SECONDS: Final = 3 * LEASE_TTL + 5.0
#: Between a failed connection attempt and the next.
RETRY_SECONDS: Final = 0.1


def _skip_reason() -> str | None:
    missing = missing_binaries()
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing.append("psycopg (pip install 'psycopg[binary]' psycopg-pool)")
    if not missing:
        return None
    return "the cluster proofs need PostgreSQL, nginx and psycopg; missing: " + ", ".join(missing)


_REASON = _skip_reason()
#: Why the cluster tests cannot run here (None: they can), unless they are required.
CLUSTER_SKIP_REASON: Final = None if os.environ.get("TRIO_HIBERNATE_REQUIRE_CLUSTER") else _REASON
#: ``pytestmark`` of every proof: marked ``cluster``; skipped when PostgreSQL, nginx or
#: psycopg are missing, unless ``$TRIO_HIBERNATE_REQUIRE_CLUSTER`` is set (``nox -s
#: cluster`` sets it, so that CI fails instead).
CLUSTER: Final = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        _REASON is not None and not os.environ.get("TRIO_HIBERNATE_REQUIRE_CLUSTER"),
        reason=_REASON or "",
    ),
]


# -- a host's own view ------------------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """``GET path`` from 127.0.0.1:``port`` (one request, ``Connection: close``): the
    status and the body."""
    with trio.fail_after(HTTP_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            await stream.send_all(request.encode())
            response = b""
            while chunk := await stream.receive_some(65536):
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return status, body


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return out


async def cluster_state(host: HostProcess) -> dict[str, Any]:
    """The host's ``GET /_cluster``."""
    status, body = await http_get(host.port, "/_cluster")
    assert status == 200, (host.host_id, status, body)
    state: dict[str, Any] = json.loads(body)
    return state


async def owners(hosts: Iterable[HostProcess], prefix: str = "") -> dict[str, list[str]]:
    """Object name -> the hosts that list it as owned (a list, to see a double owner),
    for the objects of :data:`NAMESPACE` whose name starts with ``prefix``."""
    owned: dict[str, list[str]] = defaultdict(list)
    for host in hosts:
        state = await cluster_state(host)
        assert state["owned_count"] <= 500, "more objects than /_cluster lists"
        for entry in state["owned"]:
            if entry["namespace"] == NAMESPACE and str(entry["name"]).startswith(prefix):
                owned[entry["name"]].append(host.host_id)
    return dict(owned)


async def metric(host: HostProcess, name: str) -> float:
    """The value of one sample of the host's ``/_metrics`` (``name`` with its labels, as
    printed: ``trio_hibernate_objects{state="live"}``)."""
    status, body = await http_get(host.port, "/_metrics")
    assert status == 200, (host.host_id, status)
    for line in body.decode().splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name:
            return float(value)
    raise AssertionError(f"{host.host_id}: no {name} in /_metrics")


def vm_rss_kib(pid: int) -> int:
    """The process's resident set (``VmRSS`` of /proc/PID/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


# -- waiting -----------------------------------------------------------------------------------


async def poll(predicate: Callable[[], Awaitable[bool]], interval: float = 0.1) -> None:
    """Wait until ``predicate()`` holds, asking every ``interval`` seconds: for state
    outside this process that announces nothing (PostgreSQL's tables, a host's metrics).
    The caller bounds the wait."""
    while not await predicate():  # noqa: ASYNC110  (nothing to wait on but time)
        await trio.sleep(interval)


@attrs.define(eq=False)
class Progress:
    """What the clients of a proof report each ack and each failure to, so that the test
    waits for them on an event, not by polling."""

    _changed: trio.Event = attrs.field(factory=trio.Event)

    def changed(self) -> None:
        """A client acked or failed: wake the waiters."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds after some client's report (the caller bounds
        the wait)."""
        while not predicate():
            await self._changed.wait()


# -- a client ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class LedgerClient:
    """Sends ops ``base``, ``base + 1``... to one ledger object, one at a time, each after
    the previous one's ack, through ``urls`` (taken in turn after each failure); reconnects
    after any failure and sends the unacknowledged op again.

    It records the acknowledged ops, each connection's close code, and each outage: from
    the moment a connection failed to the first ack after it.
    """

    name: str
    urls: Sequence[str]
    base: int = 0
    pause: float = 0.1
    progress: Progress = attrs.field(factory=Progress, kw_only=True)
    """Told of every ack and every failure (share one between clients)."""
    acked: set[int] = attrs.field(factory=set)
    close_codes: list[int | None] = attrs.field(factory=list)
    outages: list[tuple[float, float]] = attrs.field(factory=list)
    """(failed at, first ack after) in ``trio.current_time()``."""
    last_ack_at: float = 0.0
    last_error: str | None = None
    """How the last connection or attempt failed (for a failing proof's message)."""
    connected_to: str | None = None
    _down_since: float | None = None
    _next: int = 0
    _url_index: int = 0

    @property
    def down_since(self) -> float | None:
        """When the current outage began, or None while served."""
        return self._down_since

    async def run(self) -> None:
        """Send ops until cancelled."""
        self._next = self.base
        while True:
            url = self.urls[self._url_index % len(self.urls)]
            try:
                await self._session(url)
            except (ConnectionClosed, HandshakeError, OSError, trio.TooSlowError) as exc:
                reason = exc.reason if isinstance(exc, ConnectionClosed) else None
                code = None if reason is None else reason.code
                self.close_codes.append(code)
                self.last_error = repr(exc)[:300]
                if self._down_since is None:
                    self._down_since = trio.current_time()
                self.connected_to = None
                self._url_index += 1
                self.progress.changed()
                await trio.sleep(RETRY_SECONDS)

    async def _session(self, url: str) -> None:
        async with open_websocket_url(
            f"{url}/{NAMESPACE}/{self.name}", connect_timeout=ACK_SECONDS, disconnect_timeout=1
        ) as ws:
            self.connected_to = url
            while True:
                n = self._next
                await ws.send_message(json.dumps({"op": n}))
                with trio.fail_after(ACK_SECONDS):
                    reply = json.loads(await ws.get_message())
                assert reply == {"ack": n}, (self.name, n, reply)
                self.acked.add(n)
                self.last_ack_at = trio.current_time()
                if self._down_since is not None:
                    self.outages.append((self._down_since, self.last_ack_at))
                    self._down_since = None
                self._next += 1
                self.progress.changed()
                await trio.sleep(self.pause)


# -- the audit ---------------------------------------------------------------------------------


def _connect(dsn: str) -> Any:
    import psycopg  # see the module docstring

    return psycopg.connect(dsn, autocommit=True)


async def stored_keys(dsn: str, prefix: str = "") -> dict[str, set[str]]:
    """Object name -> its keys in ``th_kv``, for the ledger objects whose name starts with
    ``prefix``."""

    def read() -> dict[str, set[str]]:
        with _connect(dsn) as connection:
            rows = connection.execute(
                "SELECT o.name, k.key FROM th_kv k JOIN th_objects o"
                " ON o.namespace = k.namespace AND o.object_id = k.object_id"
                " WHERE k.namespace = %s AND o.name LIKE %s",
                (NAMESPACE, prefix.replace("%", r"\%").replace("_", r"\_") + "%"),
            ).fetchall()
        keys: dict[str, set[str]] = defaultdict(set)
        for name, key in rows:
            keys[name].add(key)
        return dict(keys)

    return await trio.to_thread.run_sync(read)


@attrs.frozen
class AuditRow:
    """A row of ``th_commit_log`` (with its object's name)."""

    seq: int
    name: str | None
    object_id: str
    epoch: int
    host_id: str
    incarnation: int
    keys: tuple[str, ...]


async def commit_log(dsn: str) -> list[AuditRow]:
    """Every row of ``th_commit_log`` of :data:`NAMESPACE`, in ``seq`` order."""

    def read() -> list[AuditRow]:
        with _connect(dsn) as connection:
            rows = connection.execute(
                "SELECT l.seq, o.name, l.object_id, l.epoch, l.host_id, l.incarnation,"
                " coalesce(l.keys, '{}') FROM th_commit_log l LEFT JOIN th_objects o"
                " ON o.namespace = l.namespace AND o.object_id = l.object_id"
                " WHERE l.namespace = %s ORDER BY l.seq",
                (NAMESPACE,),
            ).fetchall()
        return [
            AuditRow(
                seq=seq,
                name=name,
                object_id=object_id,
                epoch=epoch,
                host_id=host_id,
                incarnation=incarnation,
                keys=tuple(keys),
            )
            for seq, name, object_id, epoch, host_id, incarnation, keys in rows
        ]

    return await trio.to_thread.run_sync(read)


def audit_epochs(rows: Iterable[AuditRow]) -> list[str]:
    """What the commit log shows wrong (empty: nothing): per object, in ``seq`` order, an
    epoch lower than an earlier commit's (a write under an old epoch committed after a
    takeover), or an epoch committed by two (host_id, incarnation) pairs (two owners)."""
    problems: list[str] = []
    highest: dict[str, AuditRow] = {}
    writer: dict[tuple[str, int], tuple[str, int]] = {}
    for row in rows:
        previous = highest.get(row.object_id)
        if previous is not None and row.epoch < previous.epoch:
            problems.append(f"{row.name}: {row} committed after {previous}")
        if previous is None or row.epoch > previous.epoch:
            highest[row.object_id] = row
        who = (row.host_id, row.incarnation)
        first = writer.setdefault((row.object_id, row.epoch), who)
        if first != who:
            problems.append(f"{row.name}: epoch {row.epoch} written by {first} and by {who}")
    return problems


def missing_acked(clients: Iterable[LedgerClient], stored: dict[str, set[str]]) -> list[str]:
    """Acknowledged ops not in ``th_kv``, as ``name: op`` (empty: none lost)."""
    return [
        f"{client.name}: {n}"
        for client in clients
        for n in sorted(client.acked)
        if op_key(n) not in stored.get(client.name, set())
    ]
