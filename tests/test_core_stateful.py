"""A state machine over the Trio-free core: ``ObjectCore``, ``ObjectContext`` and handles.

Shaped like Hypothesis's own ``CacheRules`` test: every rule drives the real objects and a
small model side by side, and the ``@invariant`` methods compare the two after every step.
Pinned cache entries are objects with live sockets; eviction is hibernation.

The core decides, the Trio layer acts: the machine stands in for the Trio layer only where
it acts (it has no connections and no supervisor tasks), and calls the core's own
decision functions wherever the runtime does, never a copy of them:

* a connection asks :meth:`ObjectCore.is_auto_response` / ``record_auto_response`` about
  each text frame, queues the rest as :class:`MessageEvent` (with their UTF-8 size), stops
  reading when :func:`should_pause_reading` says so, and decides a socket's end once with
  :meth:`SocketRecord.decide_end` before queueing its terminal event; the resumption of
  reading is :meth:`ObjectCore.pop_event`'s own (the backpressure rule of ``sockets.py``);
* a wake leaves the object ``STARTING`` until a rule runs the constructor: it returns
  (``on_started()`` and a new :class:`ObjectContext`) or raises (``on_failed()`` hands the
  mailbox back, :meth:`ObjectCore.shut_down_sockets` closes every socket with 1011);
* ``deliver`` pops events while ``LIVE`` and "dispatches" them: fetches, stub calls
  (answered through the output gate) and alarms, in arrival order with socket events;
  the socket is released after its terminal event as the supervisor does;
* an event timeout cuts a socket handler short: the instance is dropped, sockets stay;
* a storage write closes the activation's real :class:`OutputGate`: ``send``, ``close``
  and call answers are held until the commit opens it, or dropped when it fails (a held
  ``close()`` is then undone) and the instance is reset;
* host shutdown closes every socket with 1001 or 1012 and no handler, answers what is
  queued without running it, and starts a new host (every object forgotten);
* ``ctx.broadcast`` reaches exactly the ``OPEN`` sockets (of a tag, not excluded), in
  whatever state the others are, and is held by the gate as one action;
* connection ids: an upgrade may ask for one (``?_pk=``, from a small pool, so that
  duplicates and malformed ones are frequent); ``ws.id`` makes a random one on first
  use; the model knows every id and where ``get_websocket`` must find it.

The model predicts from the spec alone (its own flags, counts and orders); the
invariants compare it with the real records (``SocketRecord.state`` included), and run
``check_valid()`` on every record and registry after every step. Several objects share
the machine: each has its own core, sockets and activations.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, TypeVar

import attrs
import cbor2
import outcome
import pytest
from fakes import FakeTransport
from hypothesis import event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from strategies import (
    RESERVED_CLOSE_CODES,
    TAG_POOL,
    VALID_TAGS,
    AttachmentArg,
    attachment_args,
    close_codes,
    close_reasons,
    tag_arguments,
)

from trio_hibernate._autoresponse import WebSocketRequestResponsePair
from trio_hibernate._context import ObjectContext
from trio_hibernate._core.events import (
    AlarmEvent,
    CallEvent,
    CloseEvent,
    ErrorEvent,
    Event,
    FetchEvent,
    MessageEvent,
    Reply,
)
from trio_hibernate._core.gate import OutputGate
from trio_hibernate._core.lifecycle import InvalidTransition, ObjectCore, ObjectState
from trio_hibernate._core.sockets import (
    ReadyState,
    SocketRecord,
    SocketState,
    should_pause_reading,
)
from trio_hibernate._errors import (
    ConnectionIdError,
    DataCloneError,
    InvalidCloseCodeError,
    LimitExceededError,
    StorageCommitError,
    WebSocketStateError,
)
from trio_hibernate._http import Request, Response
from trio_hibernate._ids import ObjectId
from trio_hibernate._limits import MAX_CLOSE_REASON_BYTES, MAX_EVENT_TIMEOUT_MS, Limits
from trio_hibernate._websocket import WebSocket

# Small limits, so that every limit is hit often.
LIMITS: Final = Limits(
    max_tags_per_websocket=3,
    max_tag_bytes=8,
    max_attachment_bytes=64,
    max_auto_response_bytes=16,
    max_websockets_per_object=5,
    max_queued_messages_per_websocket=3,
    max_queued_bytes_per_websocket=8,
)
OBJECT_NAMES: Final = ("lobby", "hall")
DROP_REASON: Final = "WebSocket disconnected without sending Close frame."

# Auto-response strings around the 16-byte limit ("é" * 9 is 9 characters, 18 bytes).
AUTO_STRINGS: Final = ("ping", "pong", "", "PING", "x" * 16, "x" * 17, "é" * 8, "é" * 9)
_SHORT_AUTO_STRINGS: Final = ("ping", "pong", "é" * 8)
TEXT_FRAMES: Final = ("ping", "PING", "ping ", "pong", "hello", "", "é" * 8)
BINARY_FRAMES: Final = (b"ping", b"", b"\x00\xff", b"hello")


class PeerProtocolError(Exception):
    """What the connection layer would report for a broken peer (no trio import here)."""


class _Unset:
    """The model's "no attachment was ever stored"."""


UNSET: Final = _Unset()


@attrs.frozen
class NearRequest:
    """An inbound frame made from the current auto-response request ("ping" if none):
    the request itself, or a near miss that must not match."""

    variant: str  # "exact", "upper", "padded" or "binary"

    def frame(self, pair: WebSocketRequestResponsePair | None) -> str | bytes:
        request = pair.request if pair is not None else "ping"
        if self.variant == "upper":
            return request.upper() if request.upper() != request else request + "!"
        if self.variant == "padded":
            return f" {request}"
        if self.variant == "binary":
            return request.encode("utf-8")
        return request


@attrs.frozen
class Refusal:
    """The model's prediction of an error."""

    error: type[Exception]
    limit_name: str | None = None
    value: int | None = None
    status: int | None = None  # a ConnectionIdError's


@attrs.frozen
class Upgrade:
    """What the ``fetch`` handler will do with a queued upgrade request."""

    sid: int
    transport: FakeTransport
    tags: object
    pre_attachment: AttachmentArg | None
    pk: str | None  # the _pk query value asked for (PK_TWICE: two of them)


@attrs.define(eq=False)
class Held:
    """A ``send``, ``close`` or call answer held by the output gate, in the model."""

    kind: str  # "send", "close", "answer" or "broadcast"
    key: int  # the socket id, or the request id of an answer (-1 for a broadcast)
    payload: object = None


@attrs.define(eq=False)
class SocketModel:
    """The model of one accepted socket, and what its connection has done."""

    sid: int
    url: str
    transport: FakeTransport
    record: SocketRecord
    owner: ObjectSim
    tags: tuple[str, ...]
    cid: str | None = None  # its connection id, once given (_pk) or asked for (ws.id)
    attachment: object = UNSET
    server_close: tuple[int | None, str] | None = None
    terminal_queued: bool = False
    terminal_delivered: int = 0
    let_go: bool = False  # released without a handler (a failed constructor, shutdown)
    queued: int = 0
    queued_bytes: int = 0
    paused: bool = False
    resumes: int = 0
    auto_response_at: float | None = None
    sent: list[str | bytes] = attrs.field(factory=list)
    closes: list[tuple[int | None, str]] = attrs.field(factory=list)
    shutdowns: list[tuple[int, str]] = attrs.field(factory=list)

    @property
    def server_closed(self) -> bool:
        return self.server_close is not None

    @property
    def released(self) -> bool:
        return self.terminal_delivered > 0 or self.let_go

    @property
    def reading(self) -> bool:
        """Its connection reads: no end decided, not let go, not paused."""
        return not (self.terminal_queued or self.let_go or self.paused)

    def expected_state(self) -> SocketState:
        """The close state the spec gives these facts (see ``sockets.py``'s rules)."""
        closed = self.server_closed
        if self.released:
            return SocketState.RELEASED_AFTER_CLOSE if closed else SocketState.RELEASED
        if self.terminal_queued:
            return SocketState.ENDED_AFTER_CLOSE if closed else SocketState.ENDED
        return SocketState.CLOSING if closed else SocketState.OPEN


@attrs.define(eq=False)
class Queued:
    """One event in the model's mailbox: its kind and whom it is about."""

    kind: str  # "fetch", "call", "alarm", "message", "close" or "error"
    key: int  # the request id, or the socket id of a socket event
    event: Event


def utf8_size(data: str | bytes) -> int:
    return len(data.encode("utf-8")) if isinstance(data, str) else len(data)


# -- the model's rules, written from the spec ------------------------------------------------


def model_tags(tags: object) -> tuple[str, ...] | Refusal:
    """workerd's tag checks: per element, the count first (even for a repeat), then bytes."""
    if isinstance(tags, str) or not isinstance(tags, list | tuple):
        return Refusal(TypeError)
    distinct: list[str] = []
    for tag in tags:
        if not isinstance(tag, str):
            return Refusal(TypeError)
        if len(distinct) >= LIMITS.max_tags_per_websocket:
            return Refusal(LimitExceededError, "max_tags_per_websocket", len(distinct) + 1)
        size = len(tag.encode("utf-8"))
        if size > LIMITS.max_tag_bytes:
            return Refusal(LimitExceededError, "max_tag_bytes", size)
        if tag not in distinct:
            distinct.append(tag)
    return tuple(distinct)


PK_TWICE: Final = "\x00twice"  # draws the query "_pk=p1&_pk=p2"
PKS: Final = (None, None, "p1", "p2", "", "a.B_c-9~", "a%20b", "x" * 129, PK_TWICE)


def pk_query(pk: str | None) -> str:
    if pk is None:
        return ""
    return "&_pk=p1&_pk=p2" if pk == PK_TWICE else f"&_pk={pk}"


def model_pk(pk: str | None) -> str | Refusal | None:
    """Rule 5 of sockets.py: the id asked for, None (none or empty), or a 400."""
    if pk is None or pk == "":
        return None
    if pk in (PK_TWICE, "a%20b", "x" * 129):
        return Refusal(ConnectionIdError, status=400)
    return pk


def close_args_valid(code: int | None, reason: str | None) -> bool:
    if code is not None and (not 1000 <= code <= 4999 or code in RESERVED_CLOSE_CODES):
        return False
    if reason is not None and code is None:
        return False
    return reason is None or len(reason.encode("utf-8")) <= MAX_CLOSE_REASON_BYTES


def model_timeout(value: object) -> int | Refusal | None:
    """Spec 9: None or 0 unsets; ms up to a week, fractions truncated as workerd does;
    bools and non-finite numbers are refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return Refusal(TypeError)
    if isinstance(value, float):
        if not math.isfinite(value):
            return Refusal(TypeError)
        value = int(value)
    if value == 0:
        return None
    if value < 0 or value > MAX_EVENT_TIMEOUT_MS:
        return Refusal(ValueError)
    return value


def same_data(a: object, b: object) -> bool:
    """Structural equality that also compares types (``True`` is not ``1`` here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_data(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same_data(a[k], b[k]) for k in a)
    return a == b


def ready_state(ws: WebSocket) -> ReadyState:
    """Read afresh (so that type checkers do not narrow it across calls)."""
    return ws.ready_state


def check_limit_error(exc: LimitExceededError, refusal: Refusal) -> None:
    assert exc.limit_name == refusal.limit_name
    assert refusal.limit_name is not None
    assert exc.limit == getattr(LIMITS, refusal.limit_name)
    assert exc.value == refusal.value
    assert f"Limits.{refusal.limit_name}" in str(exc)
    assert str(exc.limit) in str(exc)


# -- strategies --------------------------------------------------------------------------------

ATTACHMENTS: Final = attachment_args(LIMITS.max_attachment_bytes)
TAGS: Final = tag_arguments
SOCKET: Final = st.integers(min_value=0, max_value=15)
CLOSE_CODES: Final = close_codes
CLOSE_REASONS: Final = close_reasons
_EXACT: Final = NearRequest("exact")
FRAMES: Final = st.lists(
    st.one_of(
        st.just(_EXACT),
        st.sampled_from([NearRequest(v) for v in ("exact", "upper", "padded", "binary")]),
        st.sampled_from(TEXT_FRAMES),
        st.sampled_from(BINARY_FRAMES),
    ),
    min_size=1,
    max_size=5,
)
# No bools here: set_hibernatable_websocket_event_timeout(False) is mistaken for 0, which
# test_core_units.py::test_event_timeout_not_a_number exposes on its own.
TIMEOUTS: Final = st.one_of(
    st.none(),
    st.integers(min_value=-3, max_value=5),
    st.sampled_from([MAX_EVENT_TIMEOUT_MS, MAX_EVENT_TIMEOUT_MS + 1, 1.5, 250.0, -2.0, 0.0]),
)


T = TypeVar("T")


def _pick(candidates: Sequence[T], index: int) -> T:
    return candidates[index % len(candidates)]


SOCKET_KINDS: Final = frozenset({"message", "close", "error"})
OBJECT: Final = st.integers(min_value=0, max_value=7)
LOST: Final = StorageCommitError("the commit failed")
MAX_WAITING: Final = 3
# One draw in eight: not 0 nor 7, which Hypothesis draws more often than the others.
ROLL: Final = st.integers(min_value=0, max_value=7)
RARELY: Final = 3


class ObjectSim:
    """One object: the real core and its live activation, next to its own model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.object_id = ObjectId.from_name("room", name)
        self.core = ObjectCore(LIMITS)
        # The live activation: its context, gate, and the handles object code has seen.
        self.ctx: ObjectContext | None = None
        self.ctx_generation = 0
        self.gate: OutputGate | None = None
        self.handles: dict[int, WebSocket] = {}
        self.retired_handles: dict[int, list[WebSocket]] = {}
        self.retired_contexts: list[ObjectContext] = []
        self.spawned: list[Callable[[], Awaitable[object]]] = []
        # The model.
        self.mailbox: deque[Queued] = deque()
        self.held: list[Held] = []
        self.pair: WebSocketRequestResponsePair | None = None
        self.event_timeout_ms: int | None = None
        self.activations = 0
        self.deliveries: list[tuple[int, str, int]] = []  # (generation, kind, key)
        self.upgrades: dict[str, Upgrade] = {}  # by URL, until the fetch is dispatched

    def __repr__(self) -> str:
        return f"<object {self.name} {self.core.state.name}>"

    def is_in(self, state: ObjectState) -> bool:
        return self.core.state is state

    def gate_closed(self) -> bool:
        return self.gate is not None and self.gate.closed

    def times_out_soon(self) -> bool:
        """A socket event waits: its handler may overrun an event timeout."""
        return (
            self.is_in(ObjectState.LIVE)
            and any(queued.kind in SOCKET_KINDS for queued in self.mailbox)
            and not self.gate_closed()
        )


@settings(stateful_step_count=80)
class HibernationMachine(RuleBasedStateMachine):
    """Objects, their sockets and activations, and host restarts, against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.objects = [ObjectSim(name) for name in OBJECT_NAMES]
        self.old_objects: list[ObjectSim] = []  # those of hosts shut down
        self.sockets: dict[int, SocketModel] = {}  # every socket ever accepted, in order
        self.by_record: dict[SocketRecord, SocketModel] = {}
        self.requests: dict[int, str] = {}  # request id -> "fetch", "call" or "alarm"
        self.answers: dict[int, list[object]] = {}  # what each request was answered
        self.clock = 1_700_000_000.0
        self.next_sid = 0
        self.next_rid = 0

    # -- finding things -------------------------------------------------------------------------

    def _objects_in(self, state: ObjectState) -> list[ObjectSim]:
        return [obj for obj in self.objects if obj.is_in(state)]

    def _not_busy(self, limit: int = MAX_WAITING) -> list[ObjectSim]:
        """Objects with few events waiting (so that queueing does not crowd out the rest)."""
        return [obj for obj in self.objects if len(obj.mailbox) < limit]

    def _live(self) -> list[ObjectSim]:
        return self._objects_in(ObjectState.LIVE)

    def _gated(self) -> list[ObjectSim]:
        return [obj for obj in self._live() if obj.gate_closed()]

    def _listed(self, obj: ObjectSim) -> list[SocketModel]:
        return [s for s in self.sockets.values() if s.owner is obj and not s.released]

    def _reading(self) -> list[SocketModel]:
        """Sockets whose connection is reading: no end decided, not let go, not paused."""
        return [s for s in self.sockets.values() if s.owner in self.objects and s.reading]

    def _reachable(self) -> list[SocketModel]:
        """Sockets object code can hold a handle to now: listed by a live object, or seen
        in its activation."""
        live = self._live()
        return [
            s
            for s in self.sockets.values()
            if s.owner in live and (not s.released or s.sid in s.owner.handles)
        ]

    def _handle(self, sock: SocketModel) -> WebSocket:
        """The live activation's handle, found the way object code finds it."""
        obj = sock.owner
        assert obj.ctx is not None
        handle = obj.handles.get(sock.sid)
        if handle is None:
            assert not sock.released
            found = [ws for ws in obj.ctx.get_websockets() if ws.url == sock.url]
            assert len(found) == 1
            handle = obj.handles[sock.sid] = found[0]
            for old in obj.retired_handles.get(sock.sid, []):
                assert handle is not old, "a handle survived hibernation"
        return handle

    def _close_held(self, sock: SocketModel) -> bool:
        return any(h.kind == "close" and h.key == sock.sid for h in sock.owner.held)

    # -- the stand-in for the Trio layer ----------------------------------------------------------

    def _start(self, obj: ObjectSim) -> None:
        """The constructor returned."""
        assert obj.is_in(ObjectState.STARTING)
        generation = obj.core.on_started()
        obj.activations += 1
        assert generation == obj.activations
        obj.gate = OutputGate()
        obj.ctx = ObjectContext(
            namespace="room",
            object_id=obj.object_id,
            core=obj.core,
            spawn=obj.spawned.append,
            gate=obj.gate,
        )
        obj.ctx_generation = generation
        obj.handles = {}

    def _retire(self, obj: ObjectSim) -> None:
        assert obj.ctx is not None
        obj.retired_contexts.append(obj.ctx)
        for sid, handle in obj.handles.items():
            obj.retired_handles.setdefault(sid, []).append(handle)
        assert obj.gate is not None
        assert not obj.gate.closed, "the supervisor commits before an instance goes"
        assert not obj.held
        obj.ctx = None
        obj.gate = None
        obj.handles = {}

    def _finish_stop(self, obj: ObjectSim) -> None:
        restart = obj.core.on_stopped()
        assert restart is bool(obj.mailbox)
        if restart:
            event("events arrived while stopping: a new instance is asked for")
            assert obj.is_in(ObjectState.STARTING)
        else:
            assert obj.is_in(ObjectState.HIBERNATED)

    def _stop(self, obj: ObjectSim) -> None:
        obj.core.begin_stop()
        self._retire(obj)
        self._finish_stop(obj)

    def _enqueue(self, obj: ObjectSim, queued: Queued) -> None:
        before = obj.core.state
        obj.mailbox.append(queued)
        wake = obj.core.enqueue(queued.event)
        assert wake is (before is ObjectState.HIBERNATED)
        if wake:
            assert obj.is_in(ObjectState.STARTING)
        else:
            assert obj.core.state is before

    def _request(self, kind: str) -> int:
        rid = self.next_rid
        self.next_rid += 1
        self.requests[rid] = kind
        self.answers[rid] = []
        return rid

    def _answer(self, rid: int, outcome: object) -> None:
        self.answers[rid].append(outcome)

    def _reply(self, rid: int, *, call: bool = False) -> Reply[Any]:
        """A reply that records its answer as the model expects it: a fetch's response,
        a call's ``(True, value)`` or ``(False, error)``."""

        def settle(result: outcome.Outcome[Any]) -> None:
            if isinstance(result, outcome.Value):
                self._answer(rid, (True, result.value) if call else result.value)
            else:
                assert isinstance(result, outcome.Error)
                self._answer(rid, (False, result.error))

        return Reply(settle)

    def _pop(self, obj: ObjectSim) -> Queued | None:
        """``pop_event``, with the model's account of the message it takes."""
        taken = obj.core.pop_event()
        if taken is None:
            assert not obj.mailbox
            return None
        queued = obj.mailbox.popleft()
        assert taken is queued.event, "events must be delivered in arrival order"
        if isinstance(taken, MessageEvent):
            sock = self.sockets[queued.key]
            sock.queued -= 1
            sock.queued_bytes -= taken.size
            # The spec: a paused socket is read again once it is below both limits.
            if (
                sock.paused
                and sock.queued < LIMITS.max_queued_messages_per_websocket
                and sock.queued_bytes < LIMITS.max_queued_bytes_per_websocket
            ):
                event("reading resumed")
                sock.paused = False
                sock.resumes += 1
        return queued

    def _refuse(self, queued: Queued, why: str) -> None:
        """Answer an event that will not run (what the host does with a refused mailbox)."""
        taken = queued.event
        if isinstance(taken, FetchEvent):
            taken.reply.send(Response(status=503, body=why))
        elif isinstance(taken, CallEvent):
            taken.reply.fail(RuntimeError(why))
        elif isinstance(taken, AlarmEvent):
            assert taken.on_done is not None
            taken.on_done()

    def _let_go(self, obj: ObjectSim, code: int, reason: str) -> None:
        """``shut_down_sockets``: every socket closed with ``code``, no handler."""
        listed = self._listed(obj)
        obj.core.shut_down_sockets(code, reason)
        for sock in listed:
            sock.shutdowns.append((code, reason))
            sock.let_go = True
        assert len(obj.core.registry) == 0

    def _drop_held(self, obj: ObjectSim) -> None:
        """The commit failed: the gate drops what it held (a held close is undone)."""
        assert obj.gate is not None
        assert obj.gate.drop() == len(obj.held)
        for held in obj.held:
            if held.kind == "close":
                self.sockets[held.key].server_close = None
            elif held.kind == "answer":
                assert self.answers[held.key] == [(False, LOST)]
        obj.held = []

    def _write(self, ws: WebSocket, previous: object, arg: AttachmentArg) -> object:
        """``ws.serialize_attachment``; returns the model's attachment afterwards."""
        if not arg.clonable:
            event("attachment refused: not data")
            with pytest.raises(DataCloneError, match="not data"):
                ws.serialize_attachment(arg.value)
            return previous
        size = len(cbor2.dumps(arg.value, value_sharing=True))
        if size > LIMITS.max_attachment_bytes:
            event("attachment refused: too large")
            with pytest.raises(LimitExceededError) as info:
                ws.serialize_attachment(arg.value)
            check_limit_error(info.value, Refusal(LimitExceededError, "max_attachment_bytes", size))
            return previous
        ws.serialize_attachment(arg.value)
        kept = copy.deepcopy(arg.value)
        # Only a copy is stored: changing the value now must not change the attachment.
        if isinstance(arg.value, list):
            arg.value.append("changed later")
        elif isinstance(arg.value, dict):
            arg.value["changed later"] = True
        return kept

    def _new_upgrade(
        self, obj: ObjectSim, tags: object, pre_attachment: AttachmentArg | None, pk: str | None
    ) -> Request:
        """What the connection makes for an upgrade request: a socket, not yet accepted."""
        sid = self.next_sid
        self.next_sid += 1
        transport = FakeTransport()
        url = f"/room/{obj.name}?socket={sid}{pk_query(pk)}"
        ws = WebSocket(transport=transport, url=url, limits=LIMITS)
        obj.upgrades[url] = Upgrade(sid, transport, tags, pre_attachment, pk)
        return Request(method="GET", url=url, websocket=ws)

    def _fetch(self, obj: ObjectSim, request: Request) -> Response:
        """The object's ``fetch``: accept an upgrade (maybe with an attachment)."""
        ws = request.websocket
        if ws is None:
            return Response(status=204)
        upgrade = obj.upgrades.pop(request.url)
        if self._accept(obj, ws, upgrade):
            return Response(status=101, websocket=ws)
        return Response(status=400, body="refused")

    def _accept(self, obj: ObjectSim, ws: WebSocket, upgrade: Upgrade) -> bool:
        """Maybe set an attachment, then accept; check the outcome against the model."""
        ctx = obj.ctx
        assert ctx is not None
        tags, pre_attachment, transport = upgrade.tags, upgrade.pre_attachment, upgrade.transport
        sid, url = upgrade.sid, ws.url
        assert ready_state(ws) is ReadyState.CONNECTING
        attachment: object = UNSET
        if pre_attachment is not None:
            attachment = self._write(ws, UNSET, pre_attachment)
        before = obj.core.registry.sockets()
        listed = len(self._listed(obj))
        # workerd's checks first (tags, then ours: the _pk's form, the capacity, the _pk's use).
        expected = model_tags(tags)
        cid = model_pk(upgrade.pk)
        if not isinstance(expected, Refusal) and isinstance(cid, Refusal):
            expected = cid
        if not isinstance(expected, Refusal) and listed >= LIMITS.max_websockets_per_object:
            expected = Refusal(LimitExceededError, "max_websockets_per_object", listed + 1)
        in_use = {s.cid for s in self._listed(obj)}
        if not isinstance(expected, Refusal) and cid is not None and cid in in_use:
            expected = Refusal(ConnectionIdError, status=409)
        if isinstance(expected, Refusal):
            what = expected.limit_name or expected.error.__name__
            event(f"accept refused: {what}{f' {expected.status}' if expected.status else ''}")
            with pytest.raises(expected.error) as info:
                ctx.accept_websocket(ws, tags)  # type: ignore[arg-type]
            if isinstance(info.value, LimitExceededError):
                check_limit_error(info.value, expected)
            if isinstance(info.value, ConnectionIdError):
                assert info.value.status == expected.status
            # A failed accept changes nothing: the socket is still unaccepted.
            assert obj.core.registry.sockets() == before
            assert ready_state(ws) is ReadyState.CONNECTING
            with pytest.raises(WebSocketStateError):
                ws.send("not accepted")
            with pytest.raises(WebSocketStateError):
                ctx.get_tags(ws)
            self._check_attachment(ws, attachment)
            assert transport.sent == []
            return False
        ctx.accept_websocket(ws, tags)  # type: ignore[arg-type]
        event(f"accepted: {listed + 1} sockets listed")
        record = obj.core.registry.sockets()[0]  # newest first
        sock = SocketModel(
            sid=sid,
            url=url,
            transport=transport,
            record=record,
            owner=obj,
            tags=expected,
            cid=None if isinstance(cid, Refusal) else cid,
            attachment=attachment,
        )
        self.sockets[sid] = sock
        self.by_record[record] = sock
        obj.handles[sid] = ws
        assert ws.ready_state is ReadyState.OPEN
        assert record.state is SocketState.OPEN
        assert ctx.get_websockets()[0] is ws  # newest first
        with pytest.raises(WebSocketStateError, match="already accepted"):
            ctx.accept_websocket(ws, ["a"])
        assert obj.core.registry.sockets()[0] is record
        return True

    def _check_attachment(self, ws: WebSocket, expected: object) -> None:
        first = ws.deserialize_attachment()
        second = ws.deserialize_attachment()
        if expected is UNSET:
            assert first is None
            assert second is None
            return
        assert same_data(first, expected)
        assert same_data(second, expected)
        if isinstance(first, list | dict):
            assert first is not second, "deserialize_attachment() must return a fresh copy"

    def _dispatch(self, obj: ObjectSim, queued: Queued, close_in_handler: bool) -> None:
        ctx = obj.ctx
        gate = obj.gate
        assert ctx is not None
        assert gate is not None
        assert ctx not in obj.retired_contexts
        # No event reaches an evicted instance: only the live generation gets events.
        generation = obj.core.generation
        assert generation == obj.ctx_generation == obj.activations
        taken = queued.event
        obj.deliveries.append((generation, queued.kind, queued.key))
        if isinstance(taken, FetchEvent):
            taken.reply.send(self._fetch(obj, taken.request))
            assert len(self.answers[queued.key]) == 1
            return
        if isinstance(taken, CallEvent):
            # The supervisor answers a call through the gate: lost if the commit fails.
            value = taken.args[0]
            gate.hold(partial(taken.reply.send, value), partial(taken.reply.fail, LOST))
            if obj.gate_closed():
                obj.held.append(Held("answer", queued.key, value))
            else:
                assert self.answers[queued.key] == [(True, value)]
            return
        if isinstance(taken, AlarmEvent):
            assert taken.scheduled <= self.clock
            assert taken.on_done is not None
            taken.on_done()
            return
        sock = self.by_record[taken.record]
        assert sock.owner is obj
        assert not sock.released, "an event for a socket after its terminal event"
        ws = self._handle(sock)
        assert ws in ctx.get_websockets(), "a socket must stay listed until its handler ran"
        if isinstance(taken, MessageEvent):
            assert not sock.terminal_delivered
            return
        if isinstance(taken, CloseEvent):
            # 1006 is exactly the unclean end (a drop); the peer's codes come through as is.
            assert taken.was_clean is (taken.code != 1006)
        assert sock.terminal_queued
        # Inside the close/error handler: the socket is CLOSED and still fully readable.
        assert ws.ready_state is ReadyState.CLOSED
        assert ctx.get_tags(ws) == list(sock.tags)
        self._check_attachment(ws, sock.attachment)
        if close_in_handler:
            ws.close(1000, "bye")  # harmless: the runtime already answered the peer
        elif sock.server_closed:
            with pytest.raises(WebSocketStateError, match=r"send\(\) after close\(\)"):
                ws.send("too late")
        else:
            ws.send("too late")  # dropped: the peer is gone
        obj.core.release(taken.record)
        sock.terminal_delivered += 1
        assert ws not in ctx.get_websockets()
        assert ctx.get_tags(ws) == list(sock.tags)
        assert ws.ready_state is ReadyState.CLOSED

    def _terminal(self, sock: SocketModel, kind: str, terminal: CloseEvent | ErrorEvent) -> None:
        """What ``ServerConnection._end`` does: decide the end once, then queue it."""
        assert sock.reading
        if self._close_held(sock):
            event("the peer ended a socket whose close() is held by the gate")
        sock.terminal_queued = True
        sock.record.decide_end()
        with pytest.raises(InvalidTransition):
            sock.record.decide_end()  # once only
        self._enqueue(sock.owner, Queued(kind, sock.sid, terminal))

    @initialize(
        awake=st.integers(min_value=0, max_value=len(OBJECT_NAMES)),
        request=st.none() | st.sampled_from(_SHORT_AUTO_STRINGS),
        timeout_ms=st.none() | st.just(250),
        sockets=st.lists(st.lists(st.sampled_from(VALID_TAGS), max_size=2), max_size=3),
    )
    def begin(
        self, awake: int, request: str | None, timeout_ms: int | None, sockets: list[list[str]]
    ) -> None:
        """Start with ``awake`` objects live, the first with a few sockets, maybe with an
        auto-response and an event timeout set; the others hibernated."""
        for obj in self.objects[:awake]:
            self.wake(0)
            self._start(obj)
        if awake:
            if request is not None:
                self.set_auto_response(0, request, "pong")
            self.set_event_timeout(0, timeout_ms)
            for tags in sockets:
                self.accept(0, tags, None, None)

    # -- rules: object code (only while LIVE) -------------------------------------------------

    @precondition(lambda self: bool(self._live()))
    @rule(o=OBJECT, tags=TAGS, pre_attachment=st.none() | ATTACHMENTS, pk=st.sampled_from(PKS))
    def accept(
        self, o: int, tags: object, pre_attachment: AttachmentArg | None, pk: str | None
    ) -> None:
        """``fetch`` for an upgrade, running now."""
        obj = _pick(self._live(), o)
        response = self._fetch(obj, self._new_upgrade(obj, tags, pre_attachment, pk))
        assert response.status in (101, 400)

    @precondition(lambda self: bool(self._reachable()))
    @rule(index=SOCKET, arg=ATTACHMENTS)
    def write_attachment(self, index: int, arg: AttachmentArg) -> None:
        sock = _pick(self._reachable(), index)
        sock.attachment = self._write(self._handle(sock), sock.attachment, arg)

    @precondition(lambda self: bool(self._reachable()))
    @rule(index=SOCKET, message=st.text(max_size=4) | st.binary(max_size=4))
    def send(self, index: int, message: str | bytes) -> None:
        sock = _pick(self._reachable(), index)
        ws = self._handle(sock)
        if sock.server_closed:
            with pytest.raises(WebSocketStateError, match=r"send\(\) after close\(\)"):
                ws.send(message)
            return
        ws.send(message)
        if sock.terminal_queued or sock.released:
            return  # dropped silently: the peer is gone
        if sock.owner.gate_closed():
            sock.owner.held.append(Held("send", sock.sid, message))
        else:
            sock.sent.append(message)

    @precondition(lambda self: bool(self._live()))
    @rule(
        o=OBJECT,
        message=st.text(max_size=4) | st.binary(max_size=4),
        tag=st.none() | st.sampled_from(VALID_TAGS),
        exclude=st.lists(SOCKET, max_size=2),
        by_id=st.booleans(),
    )
    def broadcast(
        self, o: int, message: str | bytes, tag: str | None, exclude: list[int], by_id: bool
    ) -> None:
        """``ctx.broadcast``: exactly the OPEN sockets (of ``tag``, not excluded by handle
        or by id), whatever state the others are in; held by the gate as one action."""
        obj = _pick(self._live(), o)
        assert obj.ctx is not None
        mine = [s for s in self._reachable() if s.owner is obj]
        excluded = [_pick(mine, i) for i in exclude] if mine else []
        skip = [self._learn_id(s) if by_id else self._handle(s) for s in excluded]
        count = obj.ctx.broadcast(message, tag=tag, exclude=skip)
        listed = [s for s in self._listed(obj) if tag is None or tag in s.tags]
        targets = [
            s for s in listed if not (s.server_closed or s.terminal_queued) and s not in excluded
        ]
        assert count == len(targets)
        for state in {s.expected_state() for s in listed if s not in targets}:
            event(f"broadcast skipped a socket {state.name}")
        if not targets:
            return
        if obj.gate_closed():
            event("broadcast held by the gate")
            obj.held.append(Held("broadcast", -1, (message, [s.sid for s in targets])))
        else:
            for sock in targets:
                sock.sent.append(message)

    def _learn_id(self, sock: SocketModel) -> str:
        """``ws.id``: the id the socket was given, or a new random one (kept for good)."""
        cid = self._handle(sock).id
        if sock.cid is None:
            event("a random connection id was made")
            assert len(cid) == 22
            assert all(cid != s.cid for s in self.sockets.values())
            sock.cid = cid
        assert cid == sock.cid, "a connection id changed"
        return cid

    @precondition(lambda self: bool(self._reachable()))
    @rule(index=SOCKET)
    def ask_id(self, index: int) -> None:
        """``ws.id`` then ``ctx.get_websocket(id)``: the socket while it is listed, then
        whichever listed socket was given that id since."""
        sock = _pick(self._reachable(), index)
        cid = self._learn_id(sock)
        ctx = sock.owner.ctx
        assert ctx is not None
        found = ctx.get_websocket(cid)
        if not sock.released:
            assert found is self._handle(sock)
        else:  # its id is free again: a later socket may have been given it
            holders = [s for s in self._listed(sock.owner) if s.cid == cid]
            assert (None if found is None else found.url) == (holders[0].url if holders else None)
            if holders:
                event("a released socket's id was given to a later one")

    @precondition(lambda self: bool(self._reachable()))
    @rule(index=SOCKET, code=CLOSE_CODES, reason=CLOSE_REASONS)
    def object_close(self, index: int, code: int | None, reason: str | None) -> None:
        sock = _pick(self._reachable(), index)
        self._close(sock, code, reason)

    @precondition(lambda self: bool(self._reachable()))
    @rule(index=SOCKET, code=st.sampled_from([None, 1000, 4000]))
    def write_then_close(self, index: int, code: int | None) -> None:
        """Object code writes to storage, then calls ``close()`` in the same turn: the
        Close frame waits for the commit (which may fail)."""
        sock = _pick(self._reachable(), index)
        assert sock.owner.gate is not None
        sock.owner.gate.wrote()
        self._close(sock, code, None)

    def _close(self, sock: SocketModel, code: int | None, reason: str | None) -> None:
        ws = self._handle(sock)
        if not close_args_valid(code, reason):
            with pytest.raises(InvalidCloseCodeError):
                ws.close(code, reason)
            return
        ws.close(code, reason)
        if sock.server_closed or sock.terminal_queued or sock.released:
            return  # does nothing
        sock.server_close = (code, reason or "")
        if sock.owner.gate_closed():
            event("close() held by the gate")
            sock.owner.held.append(Held("close", sock.sid, sock.server_close))
        else:
            sock.closes.append(sock.server_close)

    @precondition(lambda self: len(self._live()) > 1 and bool(self._reachable()))
    @rule(index=SOCKET, o=OBJECT)
    def ask_another_object(self, index: int, o: int) -> None:
        """Objects are isolated: a socket of one is unknown to another."""
        sock = _pick(self._reachable(), index)
        other = _pick([obj for obj in self._live() if obj is not sock.owner], o)
        assert other.ctx is not None
        assert sock.url not in [ws.url for ws in other.ctx.get_websockets()]
        if not sock.released:
            with pytest.raises(WebSocketStateError, match="not accepted by this object"):
                other.ctx.get_tags(self._handle(sock))

    @precondition(lambda self: bool(self._live()))
    @rule(
        o=OBJECT,
        request=st.sampled_from(_SHORT_AUTO_STRINGS) | st.sampled_from(AUTO_STRINGS),
        response=st.sampled_from(_SHORT_AUTO_STRINGS) | st.sampled_from(AUTO_STRINGS),
    )
    def set_auto_response(self, o: int, request: str, response: str) -> None:
        obj = _pick(self._live(), o)
        assert obj.ctx is not None
        pair = WebSocketRequestResponsePair(request, response)
        limit = LIMITS.max_auto_response_bytes
        for what, text in (("Request", request), ("Response", response)):
            size = len(text.encode("utf-8"))
            if size > limit:
                with pytest.raises(LimitExceededError, match=f"^{what} cannot be larger") as info:
                    obj.ctx.set_websocket_auto_response(pair)
                check_limit_error(
                    info.value, Refusal(LimitExceededError, "max_auto_response_bytes", size)
                )
                return
        obj.ctx.set_websocket_auto_response(pair)
        obj.pair = pair

    @precondition(lambda self: bool(self._live()))
    @rule(o=OBJECT)
    def clear_auto_response(self, o: int) -> None:
        obj = _pick(self._live(), o)
        assert obj.ctx is not None
        obj.ctx.set_websocket_auto_response()
        obj.pair = None

    @precondition(lambda self: bool(self._live()))
    @rule(o=OBJECT, value=TIMEOUTS)
    def set_event_timeout(self, o: int, value: float | None) -> None:
        obj = _pick(self._live(), o)
        assert obj.ctx is not None
        expected = model_timeout(value)
        if isinstance(expected, Refusal):
            with pytest.raises(expected.error):
                obj.ctx.set_hibernatable_websocket_event_timeout(value)  # type: ignore[arg-type]
            return
        obj.ctx.set_hibernatable_websocket_event_timeout(value)  # type: ignore[arg-type]
        obj.event_timeout_ms = expected

    # -- rules: the peer and the connection layer ----------------------------------------------

    @precondition(lambda self: bool(self._reading()))
    @rule(index=SOCKET, frames=FRAMES)
    def inbound_frames(self, index: int, frames: list[str | bytes | NearRequest]) -> None:
        """One read's worth of frames, handled as ``_websocket_phase`` does."""
        sock = _pick(self._reading(), index)
        obj, record = sock.owner, sock.record
        for frame in frames:
            data = frame.frame(obj.pair) if isinstance(frame, NearRequest) else frame
            if isinstance(data, str) and obj.core.is_auto_response(data):
                assert obj.pair is not None
                assert data == obj.pair.request
                event(f"auto-response matched{' (object closed)' * sock.server_closed}")
                state, queued = obj.core.state, obj.core.queued
                self.clock += 1.5
                reply = obj.core.record_auto_response(record, self.clock)
                sock.auto_response_at = self.clock
                if sock.server_closed:
                    assert reply is None
                else:
                    assert reply == obj.pair.response
                    record.transport.send_message(reply)
                    sock.sent.append(reply)
                # A match is never queued and never wakes the object.
                assert (obj.core.state, obj.core.queued) == (state, queued)
                continue
            # Only an exact text match is an auto-response.
            assert obj.pair is None or not isinstance(data, str) or data != obj.pair.request
            size = utf8_size(data)
            sock.queued += 1
            sock.queued_bytes += size
            self._enqueue(obj, Queued("message", sock.sid, MessageEvent(record, data, size)))
        # The connection asks the core whether to stop reading (the real rule) ...
        if should_pause_reading(record, LIMITS):
            record.set_reading_paused(True)
        # ... and the spec says: at either limit.
        if (
            sock.queued >= LIMITS.max_queued_messages_per_websocket
            or sock.queued_bytes >= LIMITS.max_queued_bytes_per_websocket
        ):
            event("connection paused (backpressure)")
            sock.paused = True

    @precondition(lambda self: bool(self._reading()))
    @rule(
        index=SOCKET,
        code=st.none() | st.sampled_from([1000, 1001, 1011, 3000, 4999]),
        reason=st.sampled_from(["", "bye", "going away"]),
    )
    def peer_close(self, index: int, code: int | None, reason: str) -> None:
        sock = _pick(self._reading(), index)
        if code is None:  # an empty Close frame
            code, reason = 1005, ""
        self._terminal(sock, "close", CloseEvent(sock.record, code, reason, True))

    def _answerable(self) -> list[SocketModel]:
        """Sockets whose peer got the object's Close frame (not held) and may answer."""
        return [s for s in self._reading() if s.server_closed and not self._close_held(s)]

    @precondition(lambda self: bool(self._answerable()))
    @rule(index=SOCKET)
    def peer_answers_close(self, index: int) -> None:
        sock = _pick(self._answerable(), index)
        assert sock.server_close is not None
        code, reason = sock.server_close
        if code is None:
            code, reason = 1005, ""
        self._terminal(sock, "close", CloseEvent(sock.record, code, reason, True))

    def _held_closed(self) -> list[SocketModel]:
        return [s for s in self._reading() if self._close_held(s)]

    @precondition(lambda self: bool(self._held_closed()))
    @rule(index=SOCKET, how=st.sampled_from(["close", "drop", "error"]))
    def peer_ends_before_a_held_close(self, index: int, how: str) -> None:
        """The peer ends a socket whose ``close()`` the gate holds (its Close frame has
        not gone out): the rare case of the ones above, as a rule of its own."""
        sock = _pick(self._held_closed(), index)
        if how == "close":
            self._terminal(sock, "close", CloseEvent(sock.record, 1000, "bye", True))
        elif how == "drop":
            self._terminal(sock, "close", CloseEvent(sock.record, 1006, DROP_REASON, False))
        else:
            self._terminal(sock, "error", ErrorEvent(sock.record, PeerProtocolError("1002")))

    @precondition(lambda self: bool(self._reading()))
    @rule(index=SOCKET)
    def drop(self, index: int) -> None:
        sock = _pick(self._reading(), index)
        self._terminal(sock, "close", CloseEvent(sock.record, 1006, DROP_REASON, False))

    @precondition(lambda self: bool(self._reading()))
    @rule(index=SOCKET)
    def protocol_error(self, index: int) -> None:
        sock = _pick(self._reading(), index)
        self._terminal(sock, "error", ErrorEvent(sock.record, PeerProtocolError("1002: bad frame")))

    @precondition(lambda self: bool(self._not_busy(2 * MAX_WAITING)))
    @rule(o=OBJECT, tags=TAGS, pre_attachment=st.none() | ATTACHMENTS, pk=st.sampled_from(PKS))
    def queue_upgrade(
        self, o: int, tags: object, pre_attachment: AttachmentArg | None, pk: str | None
    ) -> None:
        """An HTTP upgrade: a ``fetch`` event that accepts the socket when dispatched."""
        obj = _pick(self._not_busy(2 * MAX_WAITING), o)
        rid = self._request("fetch")
        request = self._new_upgrade(obj, tags, pre_attachment, pk)
        self._enqueue(obj, Queued("fetch", rid, FetchEvent(request, self._reply(rid))))

    @precondition(lambda self: bool(self._not_busy()))
    @rule(o=OBJECT, value=st.integers(min_value=0, max_value=9))
    def queue_call(self, o: int, value: int) -> None:
        """Another object (or App.fetch) calls this one through a stub."""
        obj = _pick(self._not_busy(), o)
        rid = self._request("call")
        call = CallEvent("echo", (value,), {}, self._reply(rid, call=True))
        self._enqueue(obj, Queued("call", rid, call))

    @precondition(lambda self: bool(self._not_busy()))
    @rule(o=OBJECT)
    def queue_alarm(self, o: int) -> None:
        """The object's alarm came due."""
        obj = _pick(self._not_busy(), o)
        rid = self._request("alarm")
        alarm = AlarmEvent(self.clock, 0, on_done=partial(self._answer, rid, "done"))
        self._enqueue(obj, Queued("alarm", rid, alarm))

    # -- rules: the supervisor --------------------------------------------------------------------

    @rule(seconds=st.integers(min_value=1, max_value=3600))
    def time_passes(self, seconds: int) -> None:
        """Wall-clock time passes (alarm times and auto-response stamps move on)."""
        self.clock += seconds

    @precondition(lambda self: bool(self._objects_in(ObjectState.HIBERNATED)))
    @rule(o=OBJECT)
    def wake(self, o: int) -> None:
        """A plain HTTP request wakes a hibernated object: it is STARTING until the
        constructor returns or raises."""
        obj = _pick(self._objects_in(ObjectState.HIBERNATED), o)
        rid = self._request("fetch")
        plain = FetchEvent(Request(method="GET", url=f"/room/{obj.name}"), self._reply(rid))
        self._enqueue(obj, Queued("fetch", rid, plain))
        assert obj.is_in(ObjectState.STARTING)

    @precondition(lambda self: bool(self._objects_in(ObjectState.STARTING)))
    @rule(o=OBJECT, roll=ROLL)
    def construct(self, o: int, roll: int) -> None:
        """The supervisor runs the constructor; it raises one time in eight."""
        obj = _pick(self._objects_in(ObjectState.STARTING), o)
        if roll == RARELY:
            self._constructor_fails(obj)
        else:
            self._start(obj)

    def _constructor_fails(self, obj: ObjectSim) -> None:
        """The constructor raised: the mailbox comes back, the sockets close with 1011 and
        are released without a handler, and the object hibernates."""
        handed_back = self._hand_back(obj, "the constructor raised")
        event(f"constructor failed with {handed_back} event(s) queued")
        self._let_go(obj, 1011, "internal error")
        self._finish_stop(obj)

    def _hand_back(self, obj: ObjectSim, why: str) -> int:
        """``on_failed()``: the whole mailbox, in order, answered without running."""
        dropped = obj.core.on_failed()
        assert obj.is_in(ObjectState.STOPPING)
        assert len(dropped) == len(obj.mailbox)
        assert all(a is b.event for a, b in zip(dropped, obj.mailbox, strict=True))
        for queued in obj.mailbox:
            if isinstance(queued.event, MessageEvent):
                sock = self.sockets[queued.key]
                sock.queued -= 1
                sock.queued_bytes -= queued.event.size
            self._refuse(queued, why)
        obj.mailbox.clear()
        return len(dropped)

    @precondition(lambda self: bool(self._live()))
    @rule(o=OBJECT, count=st.integers(min_value=1, max_value=4), close_in_handler=st.booleans())
    def deliver(self, o: int, count: int, close_in_handler: bool) -> None:
        obj = _pick(self._live(), o)
        for _ in range(count):
            queued = self._pop(obj)
            if queued is None:
                return
            self._dispatch(obj, queued, close_in_handler)

    @precondition(lambda self: any(obj.times_out_soon() for obj in self.objects))
    @rule(o=OBJECT)
    def handler_times_out(self, o: int) -> None:
        """Events run until a socket handler, which overruns the event timeout: it is
        cancelled and the instance dropped; every socket stays connected (a terminal one
        is still released)."""
        obj = _pick([obj for obj in self.objects if obj.times_out_soon()], o)
        if obj.event_timeout_ms is None:
            self.set_event_timeout(self._live().index(obj), 250)  # object code sets one
        while obj.mailbox[0].kind not in SOCKET_KINDS:
            queued = self._pop(obj)
            assert queued is not None
            self._dispatch(obj, queued, close_in_handler=False)
        before = obj.core.registry.sockets()
        sent = {
            sid: (s.transport.closes[:], s.transport.shutdowns[:])
            for sid, s in self.sockets.items()
        }
        queued = self._pop(obj)
        assert queued is not None
        event(f"{queued.kind} handler timed out")
        obj.deliveries.append((obj.core.generation, queued.kind, queued.key))
        ended = None
        if queued.kind != "message":
            sock = self.sockets[queued.key]
            obj.core.release(sock.record)  # the supervisor's finally
            sock.terminal_delivered += 1
            ended = sock.record
        self._stop(obj)
        assert obj.core.registry.sockets() == [r for r in before if r is not ended]
        assert {
            sid: (s.transport.closes, s.transport.shutdowns) for sid, s in self.sockets.items()
        } == sent
        assert obj.core.event_timeout_ms == obj.event_timeout_ms

    @precondition(lambda self: any(not obj.gate_closed() for obj in self._live()))
    @rule(o=OBJECT)
    def hibernate(self, o: int) -> None:
        self._stop(_pick([obj for obj in self._live() if not obj.gate_closed()], o))

    @precondition(lambda self: any(not obj.gate_closed() for obj in self._live()))
    @rule(o=OBJECT)
    def begin_hibernate(self, o: int) -> None:
        obj = _pick([obj for obj in self._live() if not obj.gate_closed()], o)
        obj.core.begin_stop()
        assert obj.is_in(ObjectState.STOPPING)
        self._retire(obj)

    @precondition(lambda self: bool(self._objects_in(ObjectState.STOPPING)))
    @rule(o=OBJECT)
    def finish_hibernate(self, o: int) -> None:
        self._finish_stop(_pick(self._objects_in(ObjectState.STOPPING), o))

    @precondition(lambda self: any(not obj.gate_closed() for obj in self._live()))
    @rule(o=OBJECT)
    def storage_write(self, o: int) -> None:
        """The object wrote to storage: its output gate closes until the commit."""
        obj = _pick([obj for obj in self._live() if not obj.gate_closed()], o)
        assert obj.gate is not None
        obj.gate.wrote()

    @precondition(lambda self: bool(self._gated()))
    @rule(o=OBJECT, ok=st.booleans())
    def commit(self, o: int, ok: bool) -> None:
        """The write is durable: held sends, closes and answers go out, in order. Or it
        failed: what the gate held is dropped (a held close is undone, a held answer says
        the write was lost) and the instance is reset."""
        self._commit(_pick(self._gated(), o), ok)

    def _holding_a_close(self) -> list[ObjectSim]:
        return [obj for obj in self._gated() if any(h.kind == "close" for h in obj.held)]

    @precondition(lambda self: bool(self._holding_a_close()))
    @rule(o=OBJECT)
    def commit_fails_holding_a_close(self, o: int) -> None:
        """The rare case of ``commit``, as a rule of its own: the write fails while the
        gate holds a ``close()`` (the socket is as if it was never closed)."""
        self._commit(_pick(self._holding_a_close(), o), ok=False)

    def _commit(self, obj: ObjectSim, ok: bool) -> None:
        assert obj.gate is not None
        if not ok:
            if any(h.kind == "close" for h in obj.held):
                event("a failed commit dropped a held close()")
            self._drop_held(obj)
            self._stop(obj)
            return
        obj.gate.open()
        for held in obj.held:
            if held.kind == "send":
                assert isinstance(held.payload, str | bytes)
                self.sockets[held.key].sent.append(held.payload)
            elif held.kind == "close":
                assert isinstance(held.payload, tuple)
                self.sockets[held.key].closes.append(held.payload)
            elif held.kind == "broadcast":
                assert isinstance(held.payload, tuple)
                message, sids = held.payload
                for sid in sids:
                    self.sockets[sid].sent.append(message)
            else:
                assert self.answers[held.key] == [(True, held.payload)]
        obj.held = []

    @precondition(lambda self: any(self._listed(obj) for obj in self.objects))
    @rule(code=st.sampled_from([1001, 1012]), roll=ROLL)
    def host_shutdown(self, code: int, roll: int) -> None:
        """The host shuts down: every socket closes with ``code`` and no handler, queued
        events are answered without running, uncommitted writes are dropped. Then a new
        host starts, knowing no object. (One time in eight: it ends everything.)"""
        if roll != RARELY:
            return
        event(f"host shutdown with {code}")
        reason = "going away" if code == 1001 else "service restart"
        why = "the host is shutting down"
        for obj in self.objects:
            self._let_go(obj, code, reason)
            if obj.is_in(ObjectState.LIVE):
                # The activation is cancelled: what it has not run is refused.
                while (queued := self._pop(obj)) is not None:
                    self._refuse(queued, why)
                obj.core.begin_stop()
                if obj.gate_closed():
                    self._drop_held(obj)  # the turn's writes were never committed
                self._retire(obj)
            if obj.is_in(ObjectState.STOPPING):
                obj.core.on_stopped()  # STARTING again if events arrived meanwhile
            if obj.is_in(ObjectState.STARTING):
                # No instance is constructed once the host is closing.
                self._hand_back(obj, why)
                assert obj.core.on_stopped() is False
            assert obj.is_in(ObjectState.HIBERNATED)
            assert not obj.core.has_work
        self.old_objects.extend(self.objects)
        self.objects = [ObjectSim(name) for name in OBJECT_NAMES]

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def registries_agree(self) -> None:
        for obj in self.objects + self.old_objects:
            obj.core.registry.check_valid()
            listed = self._listed(obj)
            assert len(listed) <= LIMITS.max_websockets_per_object
            # workerd's orders: all sockets newest first, a tag's sockets oldest first.
            assert obj.core.registry.sockets() == [s.record for s in reversed(listed)]
            assert len(obj.core.registry) == len(listed)
            for tag in TAG_POOL:
                expected = [s for s in listed if tag in s.tags]
                assert obj.core.registry.sockets(tag) == [s.record for s in expected]
                if obj.ctx is not None:
                    urls = [ws.url for ws in obj.ctx.get_websockets(tag)]
                    assert urls == [s.url for s in expected], f"get_websockets({tag!r})"
            # Connection ids: unique among the listed sockets, found by get_websocket.
            holders = {s.cid: s for s in listed if s.cid is not None}
            assert len(holders) == len([s for s in listed if s.cid is not None])
            known = {s.cid for s in self.sockets.values() if s.owner is obj and s.cid is not None}
            for cid in known:
                holder = holders.get(cid)  # None: its socket was released
                assert obj.core.registry.by_id(cid) is (None if holder is None else holder.record)
                if obj.ctx is not None:
                    found = obj.ctx.get_websocket(cid)
                    assert (None if found is None else found.url) == (holder and holder.url)
            if obj.ctx is not None:
                # The same handle for the same socket, everywhere in one activation.
                by_url = {s.url: s for s in listed}
                for ws in obj.ctx.get_websockets():
                    sid = by_url[ws.url].sid
                    if sid in obj.handles:
                        assert obj.handles[sid] is ws
                assert obj.ctx.get_websockets("never used") == []

    @invariant()
    def sockets_agree(self) -> None:
        for sock in self.sockets.values():
            record = sock.record
            record.check_valid(LIMITS)
            # Tags: immutable, as accepted. The id: as given, or as first asked for.
            assert record.tags == sock.tags
            assert record.id == sock.cid
            # Attachment: the last successful write.
            if sock.attachment is UNSET:
                assert record.attachment is None
            else:
                assert record.attachment is not None
                assert same_data(cbor2.loads(record.attachment), sock.attachment)
            # Closing: the state the spec gives, exactly one terminal event, then out of
            # the registry (or let go without one).
            assert sock.terminal_delivered <= 1
            assert not (sock.terminal_delivered and sock.let_go)
            assert record.state is sock.expected_state()
            assert record.server_closed is sock.server_closed
            assert record.released is sock.released
            assert (record in sock.owner.core.registry) is not sock.released
            if sock.terminal_delivered:
                assert sock.terminal_queued
            if sock.terminal_queued or sock.released:
                assert record.ready_state is ReadyState.CLOSED
            elif sock.server_closed:
                assert record.ready_state is ReadyState.CLOSING
            else:
                assert record.ready_state is ReadyState.OPEN
            # Backpressure: counts, and paused exactly at either limit while reading.
            assert record.queued == sock.queued
            assert record.queued_bytes == sock.queued_bytes
            assert record.reading_paused is sock.paused
            if not (sock.terminal_queued or sock.let_go):
                assert sock.paused is (
                    sock.queued >= LIMITS.max_queued_messages_per_websocket
                    or sock.queued_bytes >= LIMITS.max_queued_bytes_per_websocket
                )
            # What went to the peer.
            assert record.auto_response_at == sock.auto_response_at
            assert sock.transport.sent == sock.sent
            assert sock.transport.closes == sock.closes
            assert sock.transport.shutdowns == sock.shutdowns
            assert sock.transport.resumes == sock.resumes
            self._check_handle(sock)

    def _check_handle(self, sock: SocketModel) -> None:
        obj = sock.owner
        ws = obj.handles.get(sock.sid)
        if ws is None or obj.ctx is None:
            return
        self._check_attachment(ws, sock.attachment)
        assert ws.ready_state is sock.record.ready_state
        assert ws.url == sock.url
        tags = obj.ctx.get_tags(ws)
        assert tags == list(sock.tags)
        tags.append("mutated")  # a copy: the socket's tags cannot change
        assert obj.ctx.get_tags(ws) == list(sock.tags)
        stamp = obj.ctx.get_websocket_auto_response_timestamp(ws)
        if sock.auto_response_at is None:
            assert stamp is None
        else:
            assert stamp == datetime.fromtimestamp(sock.auto_response_at, UTC)
        if sock.server_closed:
            with pytest.raises(WebSocketStateError, match=r"send\(\) after close\(\)"):
                ws.send("after close")

    @invariant()
    def lifecycles_agree(self) -> None:
        for obj in self.objects:
            core = obj.core
            assert core.generation == obj.activations
            assert core.queued == len(obj.mailbox)
            for sock in self.sockets.values():
                if sock.owner is obj:
                    pending = [q for q in obj.mailbox if q.kind == "message" and q.key == sock.sid]
                    assert len(pending) == sock.queued
            assert (obj.ctx is not None) is (core.state is ObjectState.LIVE)
            assert core.has_work is (
                bool(self._listed(obj))
                or bool(obj.mailbox)
                or core.state is not ObjectState.HIBERNATED
            )  # settings (auto-response, event timeout) keep no object without sockets
            if core.state is ObjectState.HIBERNATED:
                assert not obj.mailbox, "a queued event must wake the object"
            if core.state is not ObjectState.LIVE:
                with pytest.raises(InvalidTransition):
                    core.pop_event()
                assert core.queued == len(obj.mailbox)
            # Per-object state that survives hibernation.
            assert core.auto_response == obj.pair
            assert core.event_timeout_ms == obj.event_timeout_ms
            if obj.ctx is not None:
                assert obj.ctx.get_websocket_auto_response() == obj.pair
                assert obj.ctx.get_hibernatable_websocket_event_timeout() == obj.event_timeout_ms
                assert obj.ctx.id == obj.object_id
            assert obj.spawned == []
            if not obj.gate_closed():
                assert not obj.held

    @invariant()
    def deliveries_agree(self) -> None:
        for obj in self.objects + self.old_objects:
            generations = [g for g, _, _ in obj.deliveries]
            assert generations == sorted(generations)
            assert all(1 <= g <= obj.activations for g in generations)
            terminal_seen: set[int] = set()
            for _, kind, key in obj.deliveries:
                if kind not in SOCKET_KINDS:
                    continue
                assert self.sockets[key].owner is obj
                assert key not in terminal_seen, "an event after the socket's terminal event"
                if kind != "message":
                    terminal_seen.add(key)
            owned = [s for s in self.sockets.values() if s.owner is obj]
            assert terminal_seen == {s.sid for s in owned if s.terminal_delivered}

    @invariant()
    def every_request_is_answered_once(self) -> None:
        """A fetch, a call and an alarm are answered exactly once: when they ran, were
        refused, or (a call) when the gate let the answer out."""
        waiting = {q.key for obj in self.objects for q in obj.mailbox if q.kind not in SOCKET_KINDS}
        held = {h.key for obj in self.objects for h in obj.held if h.kind == "answer"}
        for rid, kind in self.requests.items():
            answers = self.answers[rid]
            assert len(answers) == (0 if rid in waiting or rid in held else 1), (kind, answers)
            if kind == "alarm" and answers:
                assert answers == ["done"]


TestHibernationMachine = HibernationMachine.TestCase
