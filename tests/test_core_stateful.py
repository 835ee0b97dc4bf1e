"""A state machine over the Trio-free core: ``ObjectCore``, ``ObjectContext`` and handles.

Shaped like Hypothesis's own ``CacheRules`` test: every rule drives the real objects and a
small model side by side, and the ``@invariant`` methods compare the two after every step.
Pinned cache entries are objects with live sockets; eviction is hibernation.

The machine plays the Trio layer itself, doing what ``_connection.py`` and
``_supervisor.py`` do with the core:

* a connection turns frames into :class:`MessageEvent` (after asking the core whether the
  frame is the auto-response: a match is answered and never queued), and a peer Close,
  a drop or a protocol error into exactly one terminal event, setting ``peer_closed`` first;
  it stops reading a socket with ``max_queued_messages_per_websocket`` messages queued and
  reads again when told ``resume_reading()``;
* when :meth:`ObjectCore.enqueue` asks for a wake the machine starts an activation at once
  (``on_started()`` and a new :class:`ObjectContext`);
* ``deliver`` pops events while ``LIVE`` and "dispatches" them in the live activation,
  releasing the socket after a terminal event as the supervisor does;
* ``hibernate`` is ``begin_stop()`` then ``on_stopped()`` (restarting when events wait), and
  can also be split in two so that events arrive while ``STOPPING``;
* each activation gets its own :class:`OutputGate`: a storage write closes it, so ``send``
  and ``close`` are held until the commit opens it (or dropped when the commit fails, which
  resets the instance), as ``_storage/api.py`` and ``_supervisor.py`` do.

Object code (accept, attachments, auto-response, ``send``/``close``, event timeout) runs
only while ``LIVE``, between turns, which the core cannot tell from inside a handler.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Final, TypeVar

import attrs
import cbor2
import pytest
from fakes import FakeTransport
from hypothesis import event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from strategies import (
    TAG_BYTES,
    TAG_POOL,
    AttachmentArg,
    attachment_args,
    close_codes,
    close_reasons,
    messages,
    object_close_code_is_valid,
    tag_arguments,
)

from trio_hibernate._autoresponse import WebSocketRequestResponsePair
from trio_hibernate._context import ObjectContext
from trio_hibernate._core.events import (
    CloseEvent,
    ErrorEvent,
    Event,
    FetchEvent,
    MessageEvent,
    Reply,
)
from trio_hibernate._core.gate import OutputGate
from trio_hibernate._core.lifecycle import InvalidTransition, ObjectCore, ObjectState
from trio_hibernate._core.sockets import ReadyState, SocketRecord
from trio_hibernate._errors import (
    DataCloneError,
    InvalidCloseCodeError,
    LimitExceededError,
    WebSocketStateError,
)
from trio_hibernate._http import Request, Response
from trio_hibernate._ids import ObjectId
from trio_hibernate._limits import MAX_CLOSE_REASON_BYTES, MAX_EVENT_TIMEOUT_MS, Limits
from trio_hibernate._websocket import WebSocket

# Small limits, so that every limit is hit often.
LIMITS: Final = Limits(
    max_tags_per_websocket=3,
    max_tag_bytes=TAG_BYTES,
    max_attachment_bytes=64,
    max_auto_response_bytes=16,
    max_websockets_per_object=5,
    max_queued_messages_per_websocket=3,
)
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


@attrs.frozen
class Upgrade:
    """What the ``fetch`` handler will do with a queued upgrade request."""

    sid: int
    transport: FakeTransport
    tags: object
    pre_attachment: AttachmentArg | None


@attrs.frozen
class Held:
    """A ``send`` or ``close`` held by the output gate, in the model."""

    sid: int
    kind: str  # "send" or "close"
    payload: str | bytes | tuple[int | None, str]


@attrs.define(eq=False)
class SocketModel:
    """The model of one accepted socket, and what its connection has done."""

    sid: int
    url: str
    transport: FakeTransport
    record: SocketRecord
    tags: tuple[str, ...]
    attachment: object = UNSET
    server_close: tuple[int | None, str] | None = None
    terminal_queued: bool = False
    terminal_delivered: int = 0
    queued: int = 0
    paused: bool = False
    resumes: int = 0
    auto_response_at: float | None = None
    sent: list[str | bytes] = attrs.field(factory=list)

    @property
    def server_closed(self) -> bool:
        return self.server_close is not None

    @property
    def released(self) -> bool:
        return self.terminal_delivered > 0


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


def close_args_valid(code: int | None, reason: str | None) -> bool:
    if code is not None and not object_close_code_is_valid(code):
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
SOCKET: Final = st.integers(min_value=0, max_value=15)
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


@settings(stateful_step_count=50)
class HibernationMachine(RuleBasedStateMachine):
    """One object, its sockets and its activations, against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.core = ObjectCore(LIMITS)
        self.object_id = ObjectId.from_name("room", "lobby")
        # The live activation: its context and the handles object code has seen in it.
        self.ctx: ObjectContext | None = None
        self.ctx_generation = 0
        self.handles: dict[int, WebSocket] = {}
        self.retired_handles: dict[int, list[WebSocket]] = {}
        self.retired_contexts: list[ObjectContext] = []
        self.spawned: list[Callable[[], Awaitable[object]]] = []
        # The model.
        self.sockets: dict[int, SocketModel] = {}  # every socket ever accepted, in order
        self.by_record: dict[SocketRecord, SocketModel] = {}
        self.mailbox: deque[Event] = deque()
        self.pair: WebSocketRequestResponsePair | None = None
        self.event_timeout_ms: int | None = None
        self.activations = 0
        self.deliveries: list[tuple[int, str, int | None]] = []
        self.replies: list[Response] = []
        self.fetches_queued = 0
        self.upgrades: dict[str, Upgrade] = {}  # by URL, until the fetch is dispatched
        self.gate: OutputGate | None = None  # the live activation's output gate
        self.held: list[Held] = []
        self.clock = 1_700_000_000.0
        self.next_sid = 0

    # -- the simulated Trio layer ------------------------------------------------------------

    def _start(self) -> None:
        assert self.core.state is ObjectState.STARTING
        generation = self.core.on_started()
        self.activations += 1
        assert generation == self.activations
        self.gate = OutputGate()
        self.ctx = ObjectContext(
            namespace="room",
            object_id=self.object_id,
            core=self.core,
            spawn=self.spawned.append,
            gate=self.gate,
        )
        self.ctx_generation = generation
        self.handles = {}

    def _retire(self) -> None:
        assert self.ctx is not None
        self.retired_contexts.append(self.ctx)
        for sid, handle in self.handles.items():
            self.retired_handles.setdefault(sid, []).append(handle)
        assert self.gate is not None
        assert not self.gate.closed, "the supervisor commits before an instance goes"
        assert not self.held
        self.ctx = None
        self.gate = None
        self.handles = {}

    def _enqueue(self, event: Event) -> None:
        before = self.core.state
        self.mailbox.append(event)
        wake = self.core.enqueue(event)
        assert wake is (before is ObjectState.HIBERNATED)
        if wake:
            self._start()
        else:
            assert self.core.state is before

    def _new_reply(self) -> Reply[Response]:
        return Reply(lambda result: self.replies.append(result.unwrap()))

    def _gate_closed(self) -> bool:
        return self.gate is not None and self.gate.closed

    def _live(self) -> bool:
        return self.core.state is ObjectState.LIVE

    def _listed(self) -> list[SocketModel]:
        return [sock for sock in self.sockets.values() if not sock.released]

    def _reading(self) -> list[SocketModel]:
        """Sockets whose connection is reading: no terminal event yet, not paused."""
        return [s for s in self._listed() if not s.terminal_queued and not s.paused]

    def _endable(self) -> list[SocketModel]:
        """Sockets that may end now. Not while the gate holds a send or close for one:
        what a held action should do once its peer is gone is left to the Trio layer."""
        held = {h.sid for h in self.held}
        return [s for s in self._reading() if s.sid not in held]

    def _reachable(self) -> list[SocketModel]:
        """Sockets object code can hold a handle to now: listed, or seen this activation."""
        if self.ctx is None:
            return []
        return [s for s in self.sockets.values() if not s.released or s.sid in self.handles]

    def _handle(self, sock: SocketModel) -> WebSocket:
        """The live activation's handle, found the way object code finds it."""
        assert self.ctx is not None
        handle = self.handles.get(sock.sid)
        if handle is None:
            assert not sock.released
            found = [ws for ws in self.ctx.get_websockets() if ws.url == sock.url]
            assert len(found) == 1
            handle = self.handles[sock.sid] = found[0]
            for old in self.retired_handles.get(sock.sid, []):
                assert handle is not old, "a handle survived hibernation"
        return handle

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

    def _new_upgrade(self, tags: object, pre_attachment: AttachmentArg | None) -> Request:
        """What the connection makes for an upgrade request: a socket, not yet accepted."""
        sid = self.next_sid
        self.next_sid += 1
        transport = FakeTransport()
        url = f"/room/lobby?socket={sid}"
        ws = WebSocket(transport=transport, url=url, limits=LIMITS)
        self.upgrades[url] = Upgrade(sid, transport, tags, pre_attachment)
        return Request(method="GET", url=url, websocket=ws)

    def _fetch(self, request: Request) -> Response:
        """The object's ``fetch``: accept an upgrade (maybe with an attachment)."""
        ws = request.websocket
        if ws is None:
            return Response(status=204)
        upgrade = self.upgrades.pop(request.url)
        if self._accept(ws, upgrade):
            return Response(status=101, websocket=ws)
        return Response(status=400, body="refused")

    def _accept(self, ws: WebSocket, upgrade: Upgrade) -> bool:
        """Maybe set an attachment, then accept; check the outcome against the model."""
        ctx = self.ctx
        assert ctx is not None
        tags, pre_attachment, transport = upgrade.tags, upgrade.pre_attachment, upgrade.transport
        sid, url = upgrade.sid, ws.url
        assert ready_state(ws) is ReadyState.CONNECTING
        attachment: object = UNSET
        if pre_attachment is not None:
            attachment = self._write(ws, UNSET, pre_attachment)
        before = self.core.registry.sockets()
        expected = model_tags(tags)
        if not isinstance(expected, Refusal) and len(self._listed()) >= (
            LIMITS.max_websockets_per_object
        ):
            expected = Refusal(
                LimitExceededError, "max_websockets_per_object", len(self._listed()) + 1
            )
        if isinstance(expected, Refusal):
            event(f"accept refused: {expected.limit_name or expected.error.__name__}")
            with pytest.raises(expected.error) as info:
                ctx.accept_websocket(ws, tags)  # type: ignore[arg-type]
            if isinstance(info.value, LimitExceededError):
                check_limit_error(info.value, expected)
            # A failed accept changes nothing: the socket is still unaccepted.
            assert self.core.registry.sockets() == before
            assert ready_state(ws) is ReadyState.CONNECTING
            with pytest.raises(WebSocketStateError):
                ws.send("not accepted")
            with pytest.raises(WebSocketStateError):
                ctx.get_tags(ws)
            self._check_attachment(ws, attachment)
            assert transport.sent == []
            return False
        ctx.accept_websocket(ws, tags)  # type: ignore[arg-type]
        event(f"accepted: {len(self._listed()) + 1} sockets listed")
        record = self.core.registry.sockets()[0]  # newest first
        sock = SocketModel(
            sid=sid,
            url=url,
            transport=transport,
            record=record,
            tags=expected,
            attachment=attachment,
        )
        self.sockets[sid] = sock
        self.by_record[record] = sock
        self.handles[sid] = ws
        assert ws.ready_state is ReadyState.OPEN
        assert ctx.get_websockets()[0] is ws  # newest first
        with pytest.raises(WebSocketStateError, match="already accepted"):
            ctx.accept_websocket(ws, ["a"])
        assert self.core.registry.sockets()[0] is record
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

    def _dispatch(self, event: Event, close_in_handler: bool) -> None:
        ctx = self.ctx
        assert ctx is not None
        assert ctx not in self.retired_contexts
        # No event reaches an evicted instance: only the live generation gets events.
        generation = self.core.generation
        assert generation == self.ctx_generation == self.activations
        if isinstance(event, FetchEvent):
            self.deliveries.append((generation, "fetch", None))
            before = len(self.replies)
            event.reply.send(self._fetch(event.request))
            assert len(self.replies) == before + 1
            return
        assert isinstance(event, MessageEvent | CloseEvent | ErrorEvent)
        sock = self.by_record[event.record]
        assert not sock.released, "an event for a socket after its terminal event"
        ws = self._handle(sock)
        assert ws in ctx.get_websockets(), "a socket must stay listed until its handler ran"
        if isinstance(event, MessageEvent):
            assert not sock.terminal_delivered
            sock.queued -= 1
            assert event.record.queued == sock.queued
            if event.record.queued == LIMITS.max_queued_messages_per_websocket - 1:
                event.record.transport.resume_reading()  # as _supervisor._dispatch does
                sock.paused = False
                sock.resumes += 1
            self.deliveries.append((generation, "message", sock.sid))
            return
        if isinstance(event, CloseEvent):
            # 1006 is exactly the unclean end (a drop); the peer's codes come through as is.
            assert event.was_clean is (event.code != 1006)
        kind = "close" if isinstance(event, CloseEvent) else "error"
        self.deliveries.append((generation, kind, sock.sid))
        assert sock.terminal_queued
        # Inside the close/error handler: the socket is CLOSED and still fully readable.
        assert ws.ready_state is ReadyState.CLOSED
        assert ctx.get_tags(ws) == list(sock.tags)
        self._check_attachment(ws, sock.attachment)
        if close_in_handler:
            ws.close(1000, "bye")  # harmless: the runtime already answered the peer
            assert sock.transport.closes == ([sock.server_close] if sock.server_close else [])
        elif sock.server_closed:
            with pytest.raises(WebSocketStateError, match=r"send\(\) after close\(\)"):
                ws.send("too late")
        else:
            ws.send("too late")  # dropped: the peer is gone
        self.core.release(event.record)
        sock.terminal_delivered += 1
        assert ws not in ctx.get_websockets()
        assert ctx.get_tags(ws) == list(sock.tags)
        assert ws.ready_state is ReadyState.CLOSED

    def _terminal(self, sock: SocketModel, event: CloseEvent | ErrorEvent) -> None:
        """What ``ServerConnection._end`` does: decide the end once, then queue it."""
        assert not sock.terminal_queued
        sock.terminal_queued = True
        sock.record.peer_closed = True
        self._enqueue(event)

    @initialize(wake=st.booleans(), request=st.none() | st.sampled_from(_SHORT_AUTO_STRINGS))
    def begin(self, wake: bool, request: str | None) -> None:
        """Start hibernated (no instance yet), or live, maybe with an auto-response set."""
        if wake:
            self.wake()
            if request is not None:
                self.set_auto_response(request, "pong")

    # -- rules: object code (only while LIVE) -------------------------------------------------

    @precondition(lambda self: self._live())
    @rule(tags=tag_arguments, pre_attachment=st.none() | ATTACHMENTS)
    def accept(self, tags: object, pre_attachment: AttachmentArg | None) -> None:
        """``fetch`` for an upgrade, running now."""
        request = self._new_upgrade(tags, pre_attachment)
        response = self._fetch(request)
        assert response.status in (101, 400)

    @precondition(lambda self: bool(self._reachable()))
    @rule(index=SOCKET, arg=ATTACHMENTS)
    def write_attachment(self, index: int, arg: AttachmentArg) -> None:
        sock = _pick(self._reachable(), index)
        sock.attachment = self._write(self._handle(sock), sock.attachment, arg)

    @precondition(lambda self: bool(self._reachable()))
    @rule(index=SOCKET, message=messages(max_size=4))
    def send(self, index: int, message: str | bytes) -> None:
        sock = _pick(self._reachable(), index)
        ws = self._handle(sock)
        if sock.server_closed:
            with pytest.raises(WebSocketStateError, match=r"send\(\) after close\(\)"):
                ws.send(message)
            return
        ws.send(message)
        if sock.terminal_queued:
            return  # dropped silently: the peer is gone
        if self._gate_closed():
            self.held.append(Held(sock.sid, "send", message))
        else:
            sock.sent.append(message)

    @precondition(lambda self: bool(self._reachable()))
    @rule(index=SOCKET, code=close_codes, reason=close_reasons)
    def object_close(self, index: int, code: int | None, reason: str | None) -> None:
        sock = _pick(self._reachable(), index)
        ws = self._handle(sock)
        if not close_args_valid(code, reason):
            with pytest.raises(InvalidCloseCodeError):
                ws.close(code, reason)
            return
        ws.close(code, reason)
        if not sock.server_closed and not sock.terminal_queued:
            sock.server_close = (code, reason or "")
            if self._gate_closed():
                self.held.append(Held(sock.sid, "close", sock.server_close))

    @precondition(lambda self: self._live())
    @rule(
        request=st.sampled_from(_SHORT_AUTO_STRINGS) | st.sampled_from(AUTO_STRINGS),
        response=st.sampled_from(_SHORT_AUTO_STRINGS) | st.sampled_from(AUTO_STRINGS),
    )
    def set_auto_response(self, request: str, response: str) -> None:
        assert self.ctx is not None
        pair = WebSocketRequestResponsePair(request, response)
        limit = LIMITS.max_auto_response_bytes
        for what, text in (("Request", request), ("Response", response)):
            size = len(text.encode("utf-8"))
            if size > limit:
                with pytest.raises(LimitExceededError, match=f"^{what} cannot be larger") as info:
                    self.ctx.set_websocket_auto_response(pair)
                check_limit_error(
                    info.value, Refusal(LimitExceededError, "max_auto_response_bytes", size)
                )
                return
        self.ctx.set_websocket_auto_response(pair)
        self.pair = pair

    @precondition(lambda self: self._live())
    @rule()
    def clear_auto_response(self) -> None:
        assert self.ctx is not None
        self.ctx.set_websocket_auto_response()
        self.pair = None

    @precondition(lambda self: self._live())
    @rule(value=TIMEOUTS)
    def set_event_timeout(self, value: float | None) -> None:
        assert self.ctx is not None
        expected = model_timeout(value)
        if isinstance(expected, Refusal):
            with pytest.raises(expected.error):
                self.ctx.set_hibernatable_websocket_event_timeout(value)  # type: ignore[arg-type]
            return
        self.ctx.set_hibernatable_websocket_event_timeout(value)  # type: ignore[arg-type]
        self.event_timeout_ms = expected

    # -- rules: the peer and the connection layer ----------------------------------------------

    @precondition(lambda self: bool(self._reading()))
    @rule(index=SOCKET, frames=FRAMES)
    def inbound_frames(self, index: int, frames: list[str | bytes | NearRequest]) -> None:
        """One read's worth of frames, handled as ``_websocket_phase`` does."""
        sock = _pick(self._reading(), index)
        record = sock.record
        for frame in frames:
            data = frame.frame(self.pair) if isinstance(frame, NearRequest) else frame
            if isinstance(data, str) and self.core.is_auto_response(data):
                assert self.pair is not None
                assert data == self.pair.request
                event(f"auto-response matched{' (object closed)' * sock.server_closed}")
                state, queued = self.core.state, self.core.queued
                self.clock += 1.5
                reply = self.core.record_auto_response(record, self.clock)
                sock.auto_response_at = self.clock
                if sock.server_closed:
                    assert reply is None
                else:
                    assert reply == self.pair.response
                    record.transport.send_message(reply)
                    sock.sent.append(reply)
                # A match is never queued and never wakes the object.
                assert (self.core.state, self.core.queued) == (state, queued)
                continue
            # Only an exact text match is an auto-response.
            assert self.pair is None or not isinstance(data, str) or data != self.pair.request
            sock.queued += 1
            self._enqueue(MessageEvent(record, data, len(data)))
        if record.queued >= LIMITS.max_queued_messages_per_websocket:
            event("connection paused (backpressure)")
            sock.paused = True  # the connection waits for resume_reading()

    @precondition(lambda self: bool(self._endable()))
    @rule(
        index=SOCKET,
        code=st.none() | st.sampled_from([1000, 1001, 1011, 3000, 4999]),
        reason=st.sampled_from(["", "bye", "going away"]),
    )
    def peer_close(self, index: int, code: int | None, reason: str) -> None:
        sock = _pick(self._endable(), index)
        if code is None:  # an empty Close frame
            code, reason = 1005, ""
        self._terminal(sock, CloseEvent(sock.record, code, reason, True))

    @precondition(lambda self: any(s.server_closed for s in self._endable()))
    @rule(index=SOCKET)
    def peer_answers_close(self, index: int) -> None:
        sock = _pick([s for s in self._endable() if s.server_closed], index)
        assert sock.server_close is not None
        code, reason = sock.server_close
        if code is None:
            code, reason = 1005, ""
        self._terminal(sock, CloseEvent(sock.record, code, reason, True))

    @precondition(lambda self: bool(self._endable()))
    @rule(index=SOCKET)
    def drop(self, index: int) -> None:
        sock = _pick(self._endable(), index)
        self._terminal(sock, CloseEvent(sock.record, 1006, DROP_REASON, False))

    @precondition(lambda self: bool(self._endable()))
    @rule(index=SOCKET)
    def protocol_error(self, index: int) -> None:
        sock = _pick(self._endable(), index)
        self._terminal(sock, ErrorEvent(sock.record, PeerProtocolError("1002: bad frame")))

    @rule(tags=tag_arguments, pre_attachment=st.none() | ATTACHMENTS)
    def upgrade_request(self, tags: object, pre_attachment: AttachmentArg | None) -> None:
        """An HTTP upgrade: a ``fetch`` event that accepts the socket when dispatched."""
        self.fetches_queued += 1
        self._enqueue(FetchEvent(self._new_upgrade(tags, pre_attachment), self._new_reply()))

    # -- rules: the supervisor --------------------------------------------------------------------

    @precondition(lambda self: self._live())
    @rule(count=st.integers(min_value=1, max_value=4), close_in_handler=st.booleans())
    def deliver(self, count: int, close_in_handler: bool) -> None:
        for _ in range(count):
            event = self.core.pop_event()
            if event is None:
                assert not self.mailbox
                return
            assert event is self.mailbox.popleft(), "events must be delivered in arrival order"
            self._dispatch(event, close_in_handler)

    @precondition(lambda self: self._live() and not self._gate_closed())
    @rule()
    def hibernate(self) -> None:
        self.core.begin_stop()
        self._retire()
        self._finish_stop()

    @precondition(lambda self: self._live() and not self._gate_closed())
    @rule()
    def begin_hibernate(self) -> None:
        self.core.begin_stop()
        assert self.core.state is ObjectState.STOPPING
        self._retire()

    @precondition(lambda self: self.core.state is ObjectState.STOPPING)
    @rule()
    def finish_hibernate(self) -> None:
        self._finish_stop()

    @precondition(lambda self: self._live())
    @rule()
    def storage_write(self) -> None:
        """The object wrote to storage: its output gate closes until the commit."""
        assert self.gate is not None
        self.gate.closed = True

    @precondition(lambda self: self._gate_closed())
    @rule()
    def commit(self) -> None:
        """The write is durable: held sends and closes go out, in order."""
        assert self.gate is not None
        self.gate.open()
        for held in self.held:
            sock = self.sockets[held.sid]
            if held.kind == "send":
                assert isinstance(held.payload, str | bytes)
                sock.sent.append(held.payload)
        self.held = []

    # A failed commit while a close() is held is left out: see
    # test_core_units.py::test_a_close_dropped_by_a_failed_write_does_not_wedge_the_socket.
    @precondition(lambda self: self._gate_closed() and all(h.kind == "send" for h in self.held))
    @rule()
    def commit_fails(self) -> None:
        """The write failed: held messages are dropped and the instance is reset."""
        assert self.gate is not None
        assert self.gate.drop() == len(self.held)
        self.held = []
        self.core.begin_stop()
        self._retire()
        self._finish_stop()

    def _finish_stop(self) -> None:
        restart = self.core.on_stopped()
        assert restart is bool(self.mailbox)
        if restart:
            event("events arrived while stopping: restarted")
            self._start()
        else:
            assert self.core.state is ObjectState.HIBERNATED

    @precondition(lambda self: self.core.state is ObjectState.HIBERNATED)
    @rule()
    def wake(self) -> None:
        """A plain HTTP request wakes a hibernated object."""
        self.fetches_queued += 1
        self._enqueue(FetchEvent(Request(method="GET", url="/room/lobby"), self._new_reply()))
        assert self._live()

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def registry_agrees(self) -> None:
        self.core.registry.check_valid()
        listed = self._listed()
        assert len(listed) <= LIMITS.max_websockets_per_object
        # workerd's orders: all sockets newest first, a tag's sockets oldest first.
        assert self.core.registry.sockets() == [s.record for s in reversed(listed)]
        assert len(self.core.registry) == len(listed)
        for tag in TAG_POOL:
            expected = [s for s in listed if tag in s.tags]
            assert self.core.registry.sockets(tag) == [s.record for s in expected]
            if self.ctx is not None:
                urls = [ws.url for ws in self.ctx.get_websockets(tag)]
                assert urls == [s.url for s in expected], f"get_websockets({tag!r})"
        if self.ctx is not None:
            # The same handle for the same socket, everywhere in one activation.
            by_url = {s.url: s for s in listed}
            for ws in self.ctx.get_websockets():
                sid = by_url[ws.url].sid
                if sid in self.handles:
                    assert self.handles[sid] is ws
            assert self.ctx.get_websockets("never used") == []

    @invariant()
    def sockets_agree(self) -> None:
        max_queued = LIMITS.max_queued_messages_per_websocket
        for sock in self.sockets.values():
            record = sock.record
            # Tags: immutable, within limits, as accepted.
            assert isinstance(record.tags, tuple)
            assert record.tags == sock.tags
            assert len(record.tags) <= LIMITS.max_tags_per_websocket
            assert len(set(record.tags)) == len(record.tags)
            assert all(len(t.encode("utf-8")) <= LIMITS.max_tag_bytes for t in record.tags)
            # Attachment: the last successful write, and within the limit when encoded.
            if sock.attachment is UNSET:
                assert record.attachment is None
            else:
                assert record.attachment is not None
                assert len(record.attachment) <= LIMITS.max_attachment_bytes
                assert same_data(cbor2.loads(record.attachment), sock.attachment)
            # Closing: exactly one terminal event, then out of the registry.
            assert sock.terminal_delivered <= 1
            assert record.server_closed is sock.server_closed
            assert record.peer_closed is sock.terminal_queued
            assert record.released is sock.released
            assert (record in self.core.registry) is not sock.released
            if sock.released:
                assert sock.terminal_queued
            if sock.terminal_queued or sock.released:
                assert record.ready_state is ReadyState.CLOSED
            elif sock.server_closed:
                assert record.ready_state is ReadyState.CLOSING
            else:
                assert record.ready_state is ReadyState.OPEN
            # What went to the peer.
            assert record.auto_response_at == sock.auto_response_at
            assert record.queued == sock.queued
            assert sock.transport.sent == sock.sent
            close_held = any(h.sid == sock.sid and h.kind == "close" for h in self.held)
            sent_close = sock.server_close is not None and not close_held
            assert sock.transport.closes == ([sock.server_close] if sent_close else [])
            assert sock.transport.shutdowns == []
            assert sock.transport.resumes == sock.resumes
            if not sock.terminal_queued:
                assert sock.paused is (sock.queued >= max_queued)
            self._check_handle(sock)

    def _check_handle(self, sock: SocketModel) -> None:
        ws = self.handles.get(sock.sid)
        if ws is None or self.ctx is None:
            return
        self._check_attachment(ws, sock.attachment)
        assert ws.ready_state is sock.record.ready_state
        assert ws.url == sock.url
        tags = self.ctx.get_tags(ws)
        assert tags == list(sock.tags)
        tags.append("mutated")  # a copy: the socket's tags cannot change
        assert self.ctx.get_tags(ws) == list(sock.tags)
        stamp = self.ctx.get_websocket_auto_response_timestamp(ws)
        if sock.auto_response_at is None:
            assert stamp is None
        else:
            assert stamp == datetime.fromtimestamp(sock.auto_response_at, UTC)
        if sock.server_closed:
            with pytest.raises(WebSocketStateError, match=r"send\(\) after close\(\)"):
                ws.send("after close")

    @invariant()
    def lifecycle_agrees(self) -> None:
        core = self.core
        assert core.generation == self.activations
        assert core.queued == len(self.mailbox)
        for sock in self.sockets.values():
            pending = sum(
                1 for e in self.mailbox if isinstance(e, MessageEvent) and e.record is sock.record
            )
            assert pending == sock.queued
        assert (self.ctx is not None) is (core.state is ObjectState.LIVE)
        assert core.state is not ObjectState.STARTING  # the machine starts at once
        assert core.has_work is (
            bool(self._listed()) or bool(self.mailbox) or core.state is not ObjectState.HIBERNATED
        )  # settings (auto-response, event timeout) keep no object without sockets
        if core.state is ObjectState.HIBERNATED:
            assert not self.mailbox, "a queued event must wake the object"
        if core.state is not ObjectState.LIVE:
            with pytest.raises(InvalidTransition):
                core.pop_event()
            assert core.queued == len(self.mailbox)
        # Per-object state that survives hibernation.
        assert core.auto_response == self.pair
        assert core.event_timeout_ms == self.event_timeout_ms
        if self.ctx is not None:
            assert self.ctx.get_websocket_auto_response() == self.pair
            assert self.ctx.get_hibernatable_websocket_event_timeout() == self.event_timeout_ms
            assert self.ctx.id == self.object_id
        assert self.spawned == []
        if not self._gate_closed():
            assert not self.held

    @invariant()
    def deliveries_agree(self) -> None:
        generations = [g for g, _, _ in self.deliveries]
        assert generations == sorted(generations)
        assert all(1 <= g <= self.activations for g in generations)
        terminal_seen: set[int] = set()
        for _, kind, sid in self.deliveries:
            if kind == "fetch":
                continue
            assert sid is not None
            assert sid not in terminal_seen, "an event after the socket's terminal event"
            if kind in ("close", "error"):
                terminal_seen.add(sid)
        assert terminal_seen == {s.sid for s in self.sockets.values() if s.released}
        fetches_done = sum(1 for _, kind, _ in self.deliveries if kind == "fetch")
        assert fetches_done == len(self.replies)
        pending_fetches = sum(1 for e in self.mailbox if isinstance(e, FetchEvent))
        assert fetches_done + pending_fetches == self.fetches_queued


TestHibernationMachine = HibernationMachine.TestCase
