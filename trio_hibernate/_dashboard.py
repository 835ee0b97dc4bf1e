"""The server's live dashboard: a page at ``/_dashboard`` and the JSON it polls.

Paths (added to the runtime's ``extra_operations`` by :func:`serve_dashboard`, which
``serve_objects`` enters; answered like ``/_metrics``, without waking any object):

* ``/_dashboard``: one HTML page (``_dashboard.html`` next to this module: inline script
  and style, no build step, nothing fetched from elsewhere) that polls the state every
  second and updates in place.
* ``/_dashboard/state[?namespace=NS][&limit=N]``: the host as JSON (:meth:`Dashboard.state`).
  Bounded whatever the host holds: at most ``limit`` objects (default
  :data:`DEFAULT_OBJECTS_LISTED`, at most :data:`MAX_OBJECTS_LISTED`) with the total
  count, :data:`MAX_TAGS_LISTED` tags per object, :data:`ERRORS_KEPT` errors,
  :data:`HISTORY_SAMPLES` chart samples, strings cut at :data:`MAX_TEXT_CHARS`.
* ``/_dashboard/object?namespace=NS&name=NAME`` (or ``&id=HEX``): one object's state,
  found without visiting the others (what the chat example's page polls).

Who may read them is :class:`DashboardAccess`: with a token, whoever presents it; without
one, only a server listening on a loopback address, and there only requests whose
``Host`` names a loopback host (a page from another site that rebinds its DNS name to
127.0.0.1 cannot read it) and that carry no proxy forwarding header.

The JSON is built from the runtime's public parts: the object directory (each entry's
``core``: state, sockets, tags, mailbox, activations), ``Runtime.statistics()`` (every
field of :class:`~._statistics.HostStatistics` is passed on, so a counter added there
appears here with its rate, unless it is listed in :data:`GAUGE_FIELDS`), the alarm
scheduler and the compression settings.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from heapq import nsmallest
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from ._core.lifecycle import ObjectState
from ._http import Request, Response
from ._ids import ObjectId

if TYPE_CHECKING:
    from ._directory import ObjectEntry
    from ._runtime import Runtime

__all__ = [
    "DEFAULT_OBJECTS_LISTED",
    "ERRORS_KEPT",
    "GAUGE_FIELDS",
    "HISTORY_SAMPLES",
    "IDLE_SOCKET_BYTES",
    "MAX_OBJECTS_LISTED",
    "MAX_TAGS_LISTED",
    "MAX_TEXT_CHARS",
    "OBJECT_PATH",
    "PAGE_PATH",
    "STATE_PATH",
    "Dashboard",
    "DashboardAccess",
    "ErrorRing",
    "check_dashboard_token",
    "deflate_context_bytes",
    "is_loopback_address",
    "serve_dashboard",
]

log = logging.getLogger("trio_hibernate.server")

PAGE_PATH: Final = "/_dashboard"
STATE_PATH: Final = "/_dashboard/state"
OBJECT_PATH: Final = "/_dashboard/object"

#: Objects listed by ``/_dashboard/state`` unless ``?limit=`` says otherwise.
DEFAULT_OBJECTS_LISTED: Final = 50
#: The most objects ``?limit=`` may ask for (the rest are counted, not listed).
MAX_OBJECTS_LISTED: Final = 500
#: Tags listed per object, the most used first (``tags_total`` counts them all).
MAX_TAGS_LISTED: Final = 8
#: Characters kept of a name, a tag or a namespace in the JSON.
MAX_TEXT_CHARS: Final = 200
#: Characters kept of an error message.
MAX_ERROR_CHARS: Final = 500
#: Recent warnings and errors kept (a ring: the oldest goes).
ERRORS_KEPT: Final = 50
#: Chart samples kept: one per poll at most every :data:`SAMPLE_SECONDS`.
HISTORY_SAMPLES: Final = 300
SAMPLE_SECONDS: Final = 1.0
#: Rates are taken over the samples of the last this many seconds.
RATE_WINDOW_SECONDS: Final = 10.0
#: Sockets of hibernated objects whose data is measured for the memory estimate.
MEMORY_SAMPLED_SOCKETS: Final = 1000
#: What an idle WebSocket of a hibernated object costs the server with no tag, no
#: attachment and no compression, measured (docs/operations.md, "per idle (hibernated)
#: socket": tracemalloc of the server's allocations, ``bench/deflate_cost.py``): its
#: connection object, transport, writer, frame reader, channel, parked task and record.
IDLE_SOCKET_BYTES: Final = 7_050
#: What permessage-deflate without context takeover adds per idle socket (measured there).
DEFLATE_NO_TAKEOVER_BYTES: Final = 130
#: Statistics that are levels, not running totals: they get no rate.
GAUGE_FIELDS: Final = frozenset(
    {
        "live_objects",
        "hibernated_objects",
        "websockets",
        "connections",
        "buffered_bytes",
        "alarms_pending",
    }
)

#: How the state of an object sorts in the list: the awake first.
_STATE_RANK: Final = {
    ObjectState.STARTING: 0,
    ObjectState.LIVE: 1,
    ObjectState.STOPPING: 2,
    ObjectState.HIBERNATED: 3,
}
_RANKED: Final = {rank: state.value for state, rank in _STATE_RANK.items()}
_HIBERNATED: Final = ObjectState.HIBERNATED
_LIVE: Final = ObjectState.LIVE
_JSON_HEADERS: Final = (
    ("content-type", "application/json"),
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
)
_FORWARDING_HEADERS: Final = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
_TOKEN_CHARS: Final = re.compile(r"[!-~]+")  # printable ASCII, no space: fits a header
MIN_TOKEN_CHARS: Final = 16


def deflate_context_bytes(window_bits: int) -> int:
    """Memory of one socket's kept zlib contexts (permessage-deflate with context
    takeover): the compressor's window and hash table (``memLevel = bits - 7``, as
    ``_core/deflate.new_compressor`` makes it: ``2**(bits + 3)``), the decompressor's
    window (``2**bits``) and about 13 KB of zlib's own state. Matches the measurements
    of docs/operations.md: 308,000 at 15 bits, 50,500 at 12."""
    return (1 << (window_bits + 3)) + (1 << window_bits) + 13_000


def is_loopback_address(host: str) -> bool:
    """Whether ``host`` (an IP address, ``localhost``, or either with a port, IPv6 in
    brackets) names this machine through the loopback interface."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_dashboard_token(token: str | None) -> None:
    """Raise ValueError if ``token`` cannot protect the dashboard (the message gives its
    length, never the token)."""
    if token is None:
        return
    if not isinstance(token, str):
        raise TypeError(f"dashboard_token must be a str or None, not {type(token).__name__}")
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN_CHARS.fullmatch(token):
        raise ValueError(
            f"dashboard_token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
            f"without spaces (got {len(token)} characters); secrets.token_urlsafe(16) "
            "makes one"
        )


@attrs.frozen
class DashboardAccess:
    """Who may read the dashboard (see the module docstring).

    Attributes:
        listen_address: The address the server is bound to.
        token: The secret a request must present (``Authorization: Bearer <token>``, or
            ``?token=`` for the page, whose script then sends it as the header), or None.
    """

    listen_address: str
    token: str | None = attrs.field(default=None, repr=False)

    @property
    def loopback_only(self) -> bool:
        """The server listens on a loopback address: nothing else can reach it."""
        return is_loopback_address(self.listen_address)

    def refusal(self, request: Request) -> Response | None:
        """The answer for a request that may not read the dashboard, or None."""
        if self.token is not None:
            given = request.header("authorization") or ""
            scheme, _, value = given.partition(" ")
            presented = value.strip() if scheme.lower() == "bearer" else None
            if presented is None:
                presented = request.query_params.get("token")
            if presented is not None and hmac.compare_digest(
                presented.encode("utf-8", "replace"), self.token.encode("ascii")
            ):
                return None
            return _text(
                401,
                "the dashboard needs its token: Authorization: Bearer <token>, or "
                "/_dashboard?token=<token> (dashboard_token)",
                (("www-authenticate", 'Bearer realm="trio-hibernate dashboard"'),),
            )
        if not self.loopback_only:
            return _text(
                403,
                f"the dashboard is off: the server listens on {self.listen_address}, not a "
                "loopback address, and has no dashboard_token",
            )
        forwarded = [name for name in _FORWARDING_HEADERS if request.header(name) is not None]
        if forwarded:
            return _text(
                403,
                f"the dashboard is served to loopback clients only, and this request came "
                f"through a proxy ({forwarded[0]}); give the server a dashboard_token",
            )
        host = request.header("host")
        if host is not None and not is_loopback_address(host):
            return _text(
                403,
                f"the dashboard is served to loopback clients only; Host {host[:100]!r} "
                "is not a loopback name (give the server a dashboard_token)",
            )
        return None


def _text(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(
        status=status,
        body=f"{message}\n",
        headers=(("content-type", "text/plain; charset=utf-8"), *headers),
    )


def _json(payload: object, status: int = 200) -> Response:
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return Response(status=status, body=body, headers=_JSON_HEADERS)


def _cut(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- recent errors ------------------------------------------------------------------------

#: Hook names found in a log message when its record does not carry ``hook``.
_HOOK_WORDS: Final = (
    (re.compile(r"\bMessageEvent\b|\bwebsocket_message\b"), "websocket_message"),
    (re.compile(r"\bCloseEvent\b|\bwebsocket_close\b"), "websocket_close"),
    (re.compile(r"\bErrorEvent\b|\bwebsocket_error\b"), "websocket_error"),
    (re.compile(r"\bAlarmEvent\b|\balarm\(\)"), "alarm"),
    (re.compile(r"\bCallEvent\b"), "stub call"),
    (re.compile(r"\bApp\.authorize\b"), "App.authorize"),
    (re.compile(r"\bApp\.fetch\b"), "App.fetch"),
    (re.compile(r"\bFetchEvent\b|\bfetch\(\)"), "fetch"),
    (re.compile(r"\bconstructor\b"), "constructor"),
    (re.compile(r"\bctx\.start_soon\b"), "ctx.start_soon"),
    (re.compile(r"\bblock_concurrency_while\b"), "block_concurrency_while"),
    (re.compile(r"\bctx\.abort\(\)"), "ctx.abort"),
    (re.compile(r"\bbroadcast\(\)"), "broadcast"),
    (re.compile(r"\bstorage commit\b"), "storage commit"),
)


@final
class ErrorRing(logging.Handler):
    """The last :data:`ERRORS_KEPT` warnings and errors of the ``trio_hibernate``
    loggers, as the dashboard lists them: time, level, object, hook, message.

    The object is the record's ``namespace`` and ``object_id`` (what the object logger
    puts on every record), else the first :class:`ObjectId` among the message's
    arguments; the hook is the record's ``hook`` attribute if a log call gives one, else
    the first hook name the message mentions. Installed on the ``trio_hibernate``
    logger while a dashboard is served: it sees what that logger lets through (WARNING
    and up unless configured otherwise), from every host of the process.
    """

    def __init__(self, size: int = ERRORS_KEPT) -> None:
        super().__init__(logging.WARNING)
        self.recent: deque[dict[str, Any]] = deque(maxlen=size)
        """The newest last."""
        self.total = 0
        """Records seen since the ring was made."""

    def emit(self, record: logging.LogRecord) -> None:
        """Keep ``record`` (a logging handler's method: it never raises)."""
        try:
            self.recent.append(_describe(record))
            self.total += 1
        except Exception:  # logging's own convention: report to stderr, carry on
            self.handleError(record)


def _describe(record: logging.LogRecord) -> dict[str, Any]:
    message = record.getMessage()
    if record.exc_info is not None and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        message = f"{message}: {type(exc).__name__}: {exc}"
    namespace = getattr(record, "namespace", None)
    hex_id = getattr(record, "object_id", None)
    name = getattr(record, "object_name", None)
    args = record.args if isinstance(record.args, tuple) else ()
    for index, arg in enumerate(args):
        if isinstance(arg, ObjectId) and (hex_id is None or arg.hex == hex_id):
            hex_id, name = arg.hex, name or arg.name
            if namespace is None and index > 0 and isinstance(args[index - 1], str):
                namespace = args[index - 1]
            break
    hook = getattr(record, "hook", None)
    if hook is None:
        hook = next((word for pattern, word in _HOOK_WORDS if pattern.search(message)), None)
    return {
        "time": record.created,
        "level": record.levelname,
        "logger": record.name,
        "namespace": None if namespace is None else _cut(str(namespace)),
        "object": None if hex_id is None else str(hex_id),
        "name": None if name is None else _cut(str(name)),
        "hook": hook,
        "message": _cut(message, MAX_ERROR_CHARS),
    }


# -- the dashboard ------------------------------------------------------------------------


@attrs.frozen(eq=False)
class _Sample:
    at: float  # Trio clock
    wall: float
    live: int
    hibernated: int
    websockets: int
    counters: dict[str, float]


def _page_and_policy() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that lets its inline script and style
    run (by their SHA-256) and nothing else, fetches only from this server included."""
    page = files(__package__ or "trio_hibernate").joinpath("_dashboard.html").read_text("utf-8")
    hashes = []
    for tag in ("script", "style"):
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL):
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            hashes.append(f"{tag}-src 'sha256-{digest}'")
    policy = "; ".join(
        [
            "default-src 'none'",
            *hashes,
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )
    return page.encode(), policy


@final
class Dashboard:
    """Answers the dashboard's paths for one runtime (see the module docstring).

    Reading the state visits every known object once (counts by namespace and state)
    and at most :data:`MEMORY_SAMPLED_SOCKETS` sockets; it is a sample for the chart
    when the previous one is at least :data:`SAMPLE_SECONDS` old: nothing runs while
    nobody looks.
    """

    def __init__(self, runtime: Runtime, access: DashboardAccess, errors: ErrorRing) -> None:
        self._runtime = runtime
        self.access = access
        self.errors = errors
        self._samples: deque[_Sample] = deque(maxlen=HISTORY_SAMPLES)
        self._page, self._policy = _page_and_policy()
        self._started = trio.current_time()

    @property
    def routes(self) -> dict[str, Callable[[Request], Response]]:
        """Path -> answering function, for ``Runtime.extra_operations``."""
        return {
            PAGE_PATH: self._guarded(self.page),
            STATE_PATH: self._guarded(self.state),
            OBJECT_PATH: self._guarded(self.object_state),
        }

    def _guarded(self, answer: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def guarded(request: Request) -> Response:
            if request.method not in ("GET", "HEAD"):
                return _text(405, f"{request.path} answers GET only", (("allow", "GET, HEAD"),))
            refused = self.access.refusal(request)
            return refused if refused is not None else answer(request)

        return guarded

    # -- the paths -----------------------------------------------------------------------

    def page(self, request: Request) -> Response:
        """The HTML page."""
        return Response(
            body=self._page,
            headers=(
                ("content-type", "text/html; charset=utf-8"),
                ("cache-control", "no-store"),
                ("content-security-policy", self._policy),
                ("referrer-policy", "no-referrer"),
                ("x-content-type-options", "nosniff"),
                ("x-frame-options", "DENY"),
            ),
        )

    def state(self, request: Request) -> Response:
        """``/_dashboard/state``: the snapshot as JSON, or 400 for a bad query."""
        query = request.query_params
        namespace = query.get("namespace") or None
        raw_limit = query.get("limit", str(DEFAULT_OBJECTS_LISTED))
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = -1
        if not 0 <= limit <= MAX_OBJECTS_LISTED:
            return _json(
                {"error": f"limit must be 0 to {MAX_OBJECTS_LISTED}, got {raw_limit[:20]!r}"},
                400,
            )
        return _json(self.snapshot(namespace, limit))

    def object_state(self, request: Request) -> Response:
        """``/_dashboard/object``: one object's state, or 400/404 as JSON."""
        query = request.query_params
        namespace, name, hex_id = query.get("namespace"), query.get("name"), query.get("id")
        runtime = self._runtime
        if namespace is None or (name is None) == (hex_id is None):
            return _json({"error": "give namespace and either name or id"}, 400)
        try:
            object_id = runtime.object_id(namespace, ObjectId(hex_id) if hex_id else name or "")
        except KeyError:
            return _json({"error": f"no namespace {_cut(namespace)!r} in the app"}, 404)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        entry = runtime.objects.get(namespace, object_id)
        described: dict[str, Any] = {
            "namespace": namespace,
            "id": object_id.hex,
            "name": None if object_id.name is None else _cut(object_id.name),
            "known": entry is not None,
        }
        if entry is None:  # forgotten, or never seen: no socket, no instance
            described |= {"state": "hibernated", "websockets": 0, "queued_events": 0}
        else:
            described |= self._object(entry)
        return _json({"time": runtime.wall_clock(), "object": described})

    # -- the snapshot --------------------------------------------------------------------

    def snapshot(self, namespace: str | None = None, limit: int = DEFAULT_OBJECTS_LISTED) -> Any:
        """The host as plain data (see ``docs/operations.md`` for the fields): objects of
        ``namespace`` (all if None), at most ``limit`` listed; everything else bounded as
        the module docstring says."""
        runtime = self._runtime
        now = trio.current_time()
        stats = attrs.asdict(runtime.statistics())
        # JSON has no infinity: the last bucket's bound (inf) is written as null.
        stats["turn_seconds_buckets"] = [
            [bound if math.isfinite(bound) else None, count]
            for bound, count in stats["turn_seconds_buckets"]
        ]
        entries = list(runtime.objects)
        # One pass, as cheap as can be per object: a host may hold tens of thousands.
        by_state: Counter[tuple[str, int]] = Counter()  # (namespace, rank of the state)
        by_namespace: Counter[str] = Counter()  # sockets
        keyed: list[tuple[int, int]] = []  # (listing order, index in entries)
        asleep: list[ObjectEntry] = []  # hibernated with sockets: the memory sample
        for index, entry in enumerate(entries):
            core = entry.core
            state = core.state
            held = len(core.registry)
            # (Identity tests: hashing an Enum member runs Python code.)
            rank = 3 if state is _HIBERNATED else 1 if state is _LIVE else _STATE_RANK[state]
            by_state[entry.namespace, rank] += 1
            if held:
                by_namespace[entry.namespace] += held
                if rank == 3 and len(asleep) < MEMORY_SAMPLED_SOCKETS:
                    asleep.append(entry)
            if namespace is None or entry.namespace == namespace:
                # The awake first, then by sockets (at most 32,768 an object: < 2**32).
                keyed.append(((rank << 32) - held, index))
        listed = [entries[index] for _, index in nsmallest(limit, keyed)]
        namespaces = {name: _state_counts() for name in runtime.app.objects}
        for (name, rank), count in by_state.items():
            namespaces.setdefault(name, _state_counts())[_RANKED[rank]] += count
        for name, count in by_namespace.items():
            namespaces[name]["websockets"] = count
        totals = _state_counts()
        for counts in namespaces.values():
            for key, value in counts.items():
                totals[key] += value
        self._sample(now, totals, stats)
        return {
            "time": runtime.wall_clock(),
            "uptime_seconds": now - self._started,
            "statistics": stats,
            "states": totals,
            "rates": self._rates(now, stats),
            "alarms_pending": len(runtime.alarms),
            "memory": self._memory(asleep, stats["websockets"]),
            "namespaces": [
                {"namespace": _cut(name), **counts} for name, counts in sorted(namespaces.items())
            ],
            "objects": [self._object(entry) for entry in listed],
            "objects_total": len(keyed),
            "objects_limit": limit,
            "namespace": namespace,
            "errors": list(reversed(self.errors.recent)),
            "errors_total": self.errors.total,
            "history": {
                "fields": ["time", "live", "hibernated", "websockets"],
                "samples": [[s.wall, s.live, s.hibernated, s.websockets] for s in self._samples],
            },
        }

    @staticmethod
    def _object(entry: ObjectEntry) -> dict[str, Any]:
        core = entry.core
        tags = core.registry.tag_counts()
        top = nsmallest(MAX_TAGS_LISTED, tags.items(), key=lambda item: (-item[1], item[0]))
        name = entry.object_id.name
        return {
            "namespace": _cut(entry.namespace),
            "id": entry.object_id.hex,
            "name": None if name is None else _cut(name),
            "state": core.state.value,
            "websockets": len(core.registry),
            "queued_events": core.queued,
            "activations": core.generation,
            "tags": [[_cut(tag), count] for tag, count in top],
            "tags_total": len(tags),
        }

    def _sample(self, now: float, totals: dict[str, int], stats: dict[str, Any]) -> None:
        samples = self._samples
        if samples and now - samples[-1].at < SAMPLE_SECONDS:
            return
        samples.append(
            _Sample(
                at=now,
                wall=self._runtime.wall_clock(),
                live=totals["live"] + totals["starting"] + totals["stopping"],
                hibernated=totals["hibernated"],
                websockets=totals["websockets"],
                counters=dict(_counters(stats)),
            )
        )

    def _rates(self, now: float, stats: dict[str, Any]) -> dict[str, Any]:
        """Per second, for every counter, over the last :data:`RATE_WINDOW_SECONDS`
        (None until two samples are half a second apart)."""
        base = next((s for s in self._samples if now - s.at <= RATE_WINDOW_SECONDS), None)
        seconds = None if base is None else now - base.at
        if base is None or seconds is None or seconds < SAMPLE_SECONDS / 2:
            return {"window_seconds": None} | {
                f"{name}_per_second": None for name, _ in _counters(stats)
            }
        return {"window_seconds": seconds} | {
            f"{name}_per_second": (value - base.counters.get(name, value)) / seconds
            for name, value in _counters(stats)
        }

    def _memory(self, asleep: list[ObjectEntry], websockets: int) -> dict[str, Any]:
        """The estimate of what a socket of a hibernated object costs (see
        :data:`IDLE_SOCKET_BYTES`), from the sockets of ``asleep`` (hibernated objects),
        and the process's resident memory to compare."""
        sampled = data = 0
        for record in (record for entry in asleep for record in entry.core.registry.sockets()):
            data += sys.getsizeof(record.attachment) if record.attachment is not None else 0
            data += sum(sys.getsizeof(tag) + 8 for tag in record.tags)
            sampled += 1
            if sampled >= MEMORY_SAMPLED_SOCKETS:
                break
        compression = self._runtime.compression
        if compression is None:
            deflate = 0
        elif compression.context_takeover:
            deflate = deflate_context_bytes(compression.window_bits)
        else:
            deflate = DEFLATE_NO_TAKEOVER_BYTES
        average = round(data / sampled) if sampled else 0
        rss = _resident_bytes()
        return {
            "per_hibernated_socket_bytes": IDLE_SOCKET_BYTES + average + deflate,
            "baseline_bytes": IDLE_SOCKET_BYTES,
            "data_bytes": average,
            "compression_bytes": deflate,
            "sampled_sockets": sampled,
            "how": (
                f"estimate: {IDLE_SOCKET_BYTES:,} B measured per idle socket with no tag, "
                "attachment or compression (docs/operations.md), plus the average size of "
                f"the attachment and tags of up to {MEMORY_SAMPLED_SOCKETS:,} sockets of "
                "hibernated objects, plus permessage-deflate's per-socket state if the "
                "host offers it (assuming every client took it)"
            ),
            "process_resident_bytes": rss,
            "process_resident_bytes_per_websocket": (
                round(rss / websockets) if rss is not None and websockets else None
            ),
        }


def _state_counts() -> dict[str, int]:
    return {state.value: 0 for state in ObjectState} | {"websockets": 0}


def _counters(stats: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The running totals among the statistics (numbers, not in :data:`GAUGE_FIELDS`)."""
    for name, value in stats.items():
        if (
            name not in GAUGE_FIELDS
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            yield name, value


def _resident_bytes() -> int | None:
    """The process's resident set size (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def serve_dashboard(
    runtime: Runtime, listen_address: str, token: str | None
) -> Iterator[Dashboard]:
    """Serve the dashboard's paths from ``runtime`` for the ``with`` block, and keep the
    recent errors of the ``trio_hibernate`` loggers meanwhile. Logs where it is (or why
    it is off)."""
    access = DashboardAccess(listen_address, token)
    errors = ErrorRing()
    dashboard = Dashboard(runtime, access, errors)
    logger = logging.getLogger("trio_hibernate")
    logger.addHandler(errors)
    runtime.extra_operations.update(dashboard.routes)
    if token is not None:
        log.info("dashboard at %s (with its token: ?token=...)", PAGE_PATH)
    elif access.loopback_only:
        log.info("dashboard at %s (loopback clients only)", PAGE_PATH)
    else:
        log.info(
            "dashboard off: the server listens on %s, not a loopback address, and has no "
            "dashboard_token",
            listen_address,
        )
    try:
        yield dashboard
    finally:
        for path in dashboard.routes:
            runtime.extra_operations.pop(path, None)
        logger.removeHandler(errors)
