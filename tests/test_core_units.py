"""Example tests for the Trio-free core: limits, errors, validation and the lifecycle table.

Each test pins one rule of ``spec/hibernation-semantics.md`` (or workerd's observed
behaviour it follows) with the smallest example that shows it, including the exact error
messages object code will see.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

import attrs
import cbor2
import pytest
from fakes import FakeTransport
from strategies import object_close_code_is_valid

from trio_hibernate._autoresponse import WebSocketRequestResponsePair
from trio_hibernate._context import ObjectContext
from trio_hibernate._core.codec import decode_data, encode_data
from trio_hibernate._core.events import CloseEvent, Event, FetchEvent, MessageEvent, Reply
from trio_hibernate._core.gate import OutputGate
from trio_hibernate._core.lifecycle import (
    TRANSITIONS,
    Input,
    InvalidTransition,
    ObjectCore,
    ObjectState,
)
from trio_hibernate._core.sockets import (
    SOCKET_REFUSALS,
    SOCKET_TRANSITIONS,
    ReadyState,
    SocketInput,
    SocketRecord,
    SocketRegistry,
    SocketState,
    normalize_tags,
    should_pause_reading,
    should_resume_reading,
)
from trio_hibernate._errors import (
    DataCloneError,
    HibernateError,
    InvalidCloseCodeError,
    LimitExceededError,
    WebSocketStateError,
)
from trio_hibernate._http import Request
from trio_hibernate._ids import ObjectId
from trio_hibernate._limits import MAX_CLOSE_REASON_BYTES, MAX_EVENT_TIMEOUT_MS, Limits
from trio_hibernate._websocket import WebSocket, check_close_args

DEFAULTS: Final = Limits()


class Unclonable:
    """An arbitrary class instance: not data."""


def fetch() -> FetchEvent:
    """A plain HTTP request for the object (it wakes a hibernated object)."""
    return FetchEvent(Request(method="GET", url="/room/lobby"), Reply(lambda result: None))


def state_of(
    thing: WebSocket | ObjectCore | SocketRecord,
) -> ReadyState | ObjectState | SocketState:
    """Read a state afresh (so that type checkers do not narrow it across calls)."""
    return thing.ready_state if isinstance(thing, WebSocket) else thing.state


def live_object(limits: Limits = DEFAULTS) -> tuple[ObjectCore, ObjectContext]:
    """An object woken by a request, as the supervisor would leave it: LIVE, mailbox empty."""
    core = ObjectCore(limits)
    assert core.enqueue(fetch())
    core.on_started()
    assert isinstance(core.pop_event(), FetchEvent)
    return core, new_context(core)


def new_context(core: ObjectCore) -> ObjectContext:
    """A new activation's context (what a wake makes)."""
    return ObjectContext(
        namespace="room",
        object_id=ObjectId.from_name("room", "lobby"),
        core=core,
        spawn=_no_spawn,
    )


def _no_spawn(async_fn: Callable[[], Awaitable[object]]) -> None:
    raise AssertionError("nothing here starts tasks")


_urls = itertools.count()


def new_socket(
    limits: Limits = DEFAULTS, url: str | None = None
) -> tuple[WebSocket, FakeTransport]:
    """An upgrading socket; each gets its own URL so that tests can find its record."""
    transport = FakeTransport()
    url = f"/room/lobby?socket={next(_urls)}" if url is None else url
    return WebSocket(transport=transport, url=url, limits=limits), transport


def accepted(
    ctx: ObjectContext, tags: Iterable[str] = (), limits: Limits = DEFAULTS
) -> tuple[WebSocket, FakeTransport]:
    ws, transport = new_socket(limits)
    ctx.accept_websocket(ws, tags)
    return ws, transport


def record_of(core: ObjectCore, ws: WebSocket) -> SocketRecord:
    """The registry record behind ``ws`` (found through the registry, not the handle)."""
    matches = [r for r in core.registry.sockets() if r.url == ws.url]
    assert len(matches) == 1
    return matches[0]


def check_limit_error(exc: LimitExceededError, limit_name: str, limit: int, value: int) -> None:
    """Rule 6: a limit error carries the field, the limit and the offered value."""
    assert (exc.limit_name, exc.limit, exc.value) == (limit_name, limit, value)
    assert f"Limits.{limit_name}" in str(exc)
    assert str(limit) in str(exc)
    assert isinstance(exc, HibernateError)
    assert isinstance(exc, ValueError)


# -- tags --------------------------------------------------------------------------------------


def test_too_many_distinct_tags() -> None:
    tags = [f"t{i}" for i in range(11)]
    with pytest.raises(LimitExceededError) as info:
        normalize_tags(tags, DEFAULTS)
    assert str(info.value).startswith("a Hibernatable WebSocket cannot have more than 10 tags")
    check_limit_error(info.value, "max_tags_per_websocket", 10, 11)


def test_ten_distinct_tags_are_fine() -> None:
    tags = [f"t{i}" for i in range(10)]
    assert normalize_tags(tags, DEFAULTS) == tuple(tags)


def test_workerd_quirk_many_repeats_of_one_tag_are_accepted() -> None:
    assert normalize_tags(["a"] * 20, DEFAULTS) == ("a",)


def test_workerd_quirk_a_repeat_after_ten_distinct_tags_is_rejected() -> None:
    # The count is checked per element before de-duplication: once 10 distinct tags are
    # collected, any further element fails, even one already seen.
    tags = [f"t{i}" for i in range(10)] + ["t0"]
    with pytest.raises(LimitExceededError) as info:
        normalize_tags(tags, DEFAULTS)
    check_limit_error(info.value, "max_tags_per_websocket", 10, 11)


def test_duplicates_collapse_in_first_occurrence_order() -> None:
    assert normalize_tags(["b", "a", "b", "c", "a", ""], DEFAULTS) == ("b", "a", "c", "")


@pytest.mark.parametrize(
    ("tag", "size"),
    [
        ("a" * 257, 257),
        ("é" * 129, 258),  # 129 characters, 258 bytes
        ("🙂" * 65, 260),  # 65 characters, 260 bytes
    ],
)
def test_tag_length_is_counted_in_utf8_bytes(tag: str, size: int) -> None:
    assert len(tag) <= 257
    with pytest.raises(LimitExceededError) as info:
        normalize_tags(["ok", tag], DEFAULTS)
    assert str(info.value).startswith(f'"{tag}" is longer than the max tag length (256 ')
    check_limit_error(info.value, "max_tag_bytes", 256, size)


@pytest.mark.parametrize("tag", ["a" * 256, "é" * 128, "🙂" * 64, ""])
def test_tags_up_to_256_bytes_are_fine(tag: str) -> None:
    assert normalize_tags([tag], DEFAULTS) == (tag,)


def test_the_count_is_checked_before_the_length() -> None:
    tags = [f"t{i}" for i in range(10)] + ["x" * 300]
    with pytest.raises(LimitExceededError) as info:
        normalize_tags(tags, DEFAULTS)
    assert info.value.limit_name == "max_tags_per_websocket"


@pytest.mark.parametrize("tags", ["lobby", b"lobby"])
def test_a_single_string_is_not_a_list_of_tags(tags: str) -> None:
    with pytest.raises(TypeError, match="not a single string"):
        normalize_tags(tags, DEFAULTS)


def test_every_tag_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="every tag must be a str, got int"):
        normalize_tags(["a", 1], DEFAULTS)  # type: ignore[list-item]


def test_any_iterable_of_tags_is_accepted() -> None:
    assert normalize_tags((t for t in ["x", "y", "x"]), DEFAULTS) == ("x", "y")


def test_accept_with_bad_tags_changes_nothing() -> None:
    core, ctx = live_object()
    ws, transport = new_socket()
    ws.serialize_attachment({"user": 1})
    with pytest.raises(LimitExceededError):
        ctx.accept_websocket(ws, ["x" * 257])
    with pytest.raises(TypeError):
        ctx.accept_websocket(ws, "lobby")
    assert len(core.registry) == 0
    assert ctx.get_websockets() == []
    assert ws.ready_state is ReadyState.CONNECTING
    assert ws.deserialize_attachment() == {"user": 1}
    # The upgrade is still possible after a failed accept.
    ctx.accept_websocket(ws, ["lobby"])
    assert ctx.get_tags(ws) == ["lobby"]
    assert ws.deserialize_attachment() == {"user": 1}
    assert transport.sent == []


def test_tags_cannot_change_after_accept() -> None:
    core, ctx = live_object()
    tags = ["a", "b"]
    ws, _ = accepted(ctx, tags)
    tags.append("c")
    returned = ctx.get_tags(ws)
    returned.append("d")
    assert ctx.get_tags(ws) == ["a", "b"]
    assert record_of(core, ws).tags == ("a", "b")
    with pytest.raises(AttributeError):
        record_of(core, ws).tags.append("e")  # type: ignore[attr-defined]


# -- sockets per object ------------------------------------------------------------------------


def test_socket_limit_refuses_the_next_accept_and_disturbs_nothing() -> None:
    limits = Limits(max_websockets_per_object=2)
    core, ctx = live_object(limits)
    first, _ = accepted(ctx, ["x"], limits)
    second, _ = accepted(ctx, [], limits)
    third, _ = new_socket(limits)
    with pytest.raises(LimitExceededError) as info:
        ctx.accept_websocket(third, ["x"])
    assert str(info.value).startswith(
        "only 2 websockets can be accepted on a single Durable Object instance"
    )
    check_limit_error(info.value, "max_websockets_per_object", 2, 3)
    assert third.ready_state is ReadyState.CONNECTING
    assert ctx.get_websockets() == [second, first]
    assert ctx.get_websockets("x") == [first]
    core.registry.check_valid()


def test_a_socket_still_closing_counts_until_released() -> None:
    limits = Limits(max_websockets_per_object=1)
    core, ctx = live_object(limits)
    first, transport = accepted(ctx, [], limits)
    first.close(1000, "bye")
    assert transport.closes == [(1000, "bye")]
    second, _ = new_socket(limits)
    with pytest.raises(LimitExceededError):
        ctx.accept_websocket(second)
    assert ctx.get_websockets() == [first]
    assert first.ready_state is ReadyState.CLOSING
    core.release(record_of(core, first))
    ctx.accept_websocket(second)
    assert ctx.get_websockets() == [second]


def test_default_socket_limit_is_32768() -> None:
    core, ctx = live_object()
    for i in range(32768):
        core.registry.add(SocketRecord(transport=FakeTransport(), tags=(), url=f"/{i}"))
    ws, _ = new_socket()
    with pytest.raises(LimitExceededError) as info:
        ctx.accept_websocket(ws)
    assert str(info.value).startswith("only 32768 websockets can be accepted")
    check_limit_error(info.value, "max_websockets_per_object", 32768, 32769)


def test_accepting_twice_is_refused() -> None:
    _, ctx = live_object()
    ws, _ = accepted(ctx)
    with pytest.raises(
        WebSocketStateError,
        match=r"^Cannot call accept_websocket\(\) if the WebSocket was already accepted\.$",
    ):
        ctx.accept_websocket(ws)
    assert ctx.get_websockets() == [ws]


def test_accept_takes_a_websocket() -> None:
    _, ctx = live_object()
    with pytest.raises(TypeError, match="expected a WebSocket, got str"):
        ctx.accept_websocket("ws")  # type: ignore[arg-type]


# -- get_websockets and get_tags ---------------------------------------------------------------


def test_get_websockets_orders_are_workerds() -> None:
    # workerd: all sockets most recently accepted first; a tag's sockets oldest first.
    _, ctx = live_object()
    a, _ = accepted(ctx, ["room:1", "admin"])
    b, _ = accepted(ctx, ["room:2"])
    c, _ = accepted(ctx, ["room:1"])
    assert ctx.get_websockets() == [c, b, a]
    assert ctx.get_websockets("room:1") == [a, c]
    assert ctx.get_websockets("admin") == [a]
    assert ctx.get_websockets("ROOM:1") == []
    assert ctx.get_websockets("unknown") == []
    with pytest.raises(TypeError, match="a tag is a str"):
        ctx.get_websockets(1)  # type: ignore[arg-type]


def test_same_handle_within_an_activation_new_handles_after_a_wake() -> None:
    core, ctx = live_object()
    ws, _ = accepted(ctx, ["t"])
    assert ctx.get_websockets()[0] is ws
    assert ctx.get_websockets("t")[0] is ws
    woken = new_context(core)
    fresh = woken.get_websockets()[0]
    assert fresh is not ws
    assert fresh.url == ws.url
    assert woken.get_websockets("t")[0] is fresh
    assert woken.get_tags(fresh) == ["t"]


def test_get_tags_of_an_unaccepted_socket() -> None:
    _, ctx = live_object()
    ws, _ = new_socket()
    with pytest.raises(WebSocketStateError, match=r"^you must call 'accept_websocket\(\)' before"):
        ctx.get_tags(ws)
    with pytest.raises(TypeError, match="expected a WebSocket"):
        ctx.get_tags(object())  # type: ignore[arg-type]


def test_get_tags_of_a_socket_accepted_by_another_object() -> None:
    _, ctx = live_object()
    _, other = live_object()
    ws, _ = accepted(other, ["elsewhere"])
    with pytest.raises(WebSocketStateError):
        ctx.get_tags(ws)


def test_get_tags_inside_the_close_handler_and_after_release() -> None:
    core, ctx = live_object()
    ws, _ = accepted(ctx, ["a", "b"])
    record = record_of(core, ws)
    record.decide_end()  # what the connection does before queueing the close
    assert ws.ready_state is ReadyState.CLOSED
    assert ctx.get_tags(ws) == ["a", "b"]
    assert ctx.get_websockets() == [ws]
    core.release(record)
    assert ctx.get_websockets() == []
    assert ctx.get_websockets("a") == []
    assert ctx.get_tags(ws) == ["a", "b"]
    core.registry.check_valid()


# -- attachments -------------------------------------------------------------------------------


def test_attachment_is_none_until_set() -> None:
    _, ctx = live_object()
    ws, _ = accepted(ctx)
    assert ws.deserialize_attachment() is None
    unaccepted, _ = new_socket()
    assert unaccepted.deserialize_attachment() is None


def test_attachment_is_a_copy_taken_at_serialize_time() -> None:
    _, ctx = live_object()
    ws, _ = accepted(ctx)
    value: dict[str, object] = {"user": "ann", "rooms": ["a"]}
    ws.serialize_attachment(value)
    value["user"] = "bob"
    rooms = value["rooms"]
    assert isinstance(rooms, list)
    rooms.append("b")
    assert ws.deserialize_attachment() == {"user": "ann", "rooms": ["a"]}


def test_deserialize_returns_a_fresh_copy_every_call() -> None:
    _, ctx = live_object()
    ws, _ = accepted(ctx)
    ws.serialize_attachment({"n": [1, 2]})
    first = ws.deserialize_attachment()
    second = ws.deserialize_attachment()
    assert first == second == {"n": [1, 2]}
    assert first is not second
    assert isinstance(first, dict)
    assert isinstance(second, dict)
    assert first["n"] is not second["n"]
    first["n"].append(3)
    assert ws.deserialize_attachment() == {"n": [1, 2]}


def test_attachment_survives_a_new_activation() -> None:
    core, ctx = live_object()
    ws, _ = accepted(ctx)
    ws.serialize_attachment({"id": 7})
    woken = new_context(core)
    assert woken.get_websockets()[0].deserialize_attachment() == {"id": 7}


def test_cycles_survive() -> None:
    ws, _ = new_socket()
    looped: list[object] = [1]
    looped.append(looped)
    ws.serialize_attachment(looped)
    copy = ws.deserialize_attachment()
    assert isinstance(copy, list)
    assert copy[0] == 1
    assert copy[1] is copy
    assert copy is not looped

    mapping: dict[str, object] = {"name": "x"}
    mapping["self"] = mapping
    ws.serialize_attachment(mapping)
    copied = ws.deserialize_attachment()
    assert isinstance(copied, dict)
    assert copied["self"] is copied


def test_shared_references_survive() -> None:
    ws, _ = new_socket()
    shared = {"k": [1, 2]}
    ws.serialize_attachment({"a": shared, "b": shared, "list": [shared, shared]})
    copy = ws.deserialize_attachment()
    assert isinstance(copy, dict)
    assert copy["a"] is copy["b"]
    assert copy["list"][0] is copy["list"][1] is copy["a"]
    assert copy["a"] == shared
    assert copy["a"] is not shared


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**70),
        1.5,
        "héllo",
        b"\x00\xff",
        [1, "two", [3.0]],
        {"nested": {"deeper": [None]}},
        {1, 2, 3},
        datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
    ],
)
def test_data_round_trips(value: object) -> None:
    ws, _ = new_socket()
    ws.serialize_attachment(value)
    copy = ws.deserialize_attachment()
    assert copy == value
    assert type(copy) is type(value)


def test_tuples_come_back_as_lists() -> None:
    ws, _ = new_socket()
    ws.serialize_attachment((1, (2, 3)))
    assert ws.deserialize_attachment() == [1, [2, 3]]


def test_aware_datetimes_are_instants() -> None:
    ws, _ = new_socket()
    when = datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    ws.serialize_attachment(when)
    copy = ws.deserialize_attachment()
    assert copy == when
    assert isinstance(copy, datetime)
    assert copy.utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: lambda: None,
        object,
        Unclonable,
        lambda: print,
        lambda: [1, {"deep": object()}],
        lambda: datetime(2024, 5, 1, 12, 30),  # naive: not an instant
        lambda: iter([1]),
    ],
    ids=["lambda", "object", "instance", "builtin", "nested", "naive-datetime", "iterator"],
)
def test_non_data_is_refused_and_the_previous_attachment_kept(make: Callable[[], object]) -> None:
    _, ctx = live_object()
    ws, _ = accepted(ctx)
    ws.serialize_attachment({"keep": True})
    with pytest.raises(DataCloneError, match=r"^A WebSocket attachment is not data"):
        ws.serialize_attachment(make())
    assert ws.deserialize_attachment() == {"keep": True}


def test_data_clone_error_is_a_type_error() -> None:
    assert issubclass(DataCloneError, TypeError)
    assert issubclass(DataCloneError, HibernateError)


def test_attachment_limit_is_on_the_encoded_size() -> None:
    limits = Limits(max_attachment_bytes=64)
    ws, _ = new_socket(limits)
    fits = b"x" * 62  # 2-byte CBOR header + 62 bytes
    assert len(cbor2.dumps(fits)) == 64
    ws.serialize_attachment(fits)
    assert ws.deserialize_attachment() == fits
    with pytest.raises(LimitExceededError) as info:
        ws.serialize_attachment(b"y" * 63)
    assert str(info.value) == (
        "A WebSocket attachment cannot be larger than 64 bytes when encoded; "
        "this one is 65 bytes (Limits.max_attachment_bytes)"
    )
    check_limit_error(info.value, "max_attachment_bytes", 64, 65)
    assert ws.deserialize_attachment() == fits


def test_default_attachment_limit_is_2048_bytes() -> None:
    _, ctx = live_object()
    ws, _ = accepted(ctx)
    ws.serialize_attachment("a" * 2045)  # 3-byte header
    with pytest.raises(LimitExceededError) as info:
        ws.serialize_attachment("a" * 2046)
    check_limit_error(info.value, "max_attachment_bytes", 2048, 2049)
    assert ws.deserialize_attachment() == "a" * 2045


def test_attachment_set_before_accept_moves_to_the_socket() -> None:
    core, ctx = live_object()
    ws, _ = new_socket()
    ws.serialize_attachment(["pending"])
    ctx.accept_websocket(ws)
    assert record_of(core, ws).attachment == cbor2.dumps(["pending"], value_sharing=True)
    assert new_context(core).get_websockets()[0].deserialize_attachment() == ["pending"]


def nested_lists(depth: int) -> list[object]:
    value: list[object] = []
    inner = value
    for _ in range(depth - 1):
        nested: list[object] = []
        inner.append(nested)
        inner = nested
    return value


def test_a_deeply_nested_attachment_reads_back_or_is_refused_at_once() -> None:
    # Spec 4: data round-trips. Nesting is capped (MAX_NESTING_DEPTH) so that what is
    # stored can always be read back: at the cap it round-trips, past it serializing
    # fails cleanly and the previous attachment stays.
    from trio_hibernate._core.codec import MAX_NESTING_DEPTH

    _, ctx = live_object()
    ws, _ = accepted(ctx)
    deepest = nested_lists(MAX_NESTING_DEPTH)
    ws.serialize_attachment(deepest)
    assert ws.deserialize_attachment() == deepest
    with pytest.raises(DataCloneError, match=f"more than {MAX_NESTING_DEPTH} containers"):
        ws.serialize_attachment(nested_lists(MAX_NESTING_DEPTH + 1))
    with pytest.raises(DataCloneError):
        ws.serialize_attachment(nested_lists(450))  # 451 bytes: under the size limit
    assert ws.deserialize_attachment() == deepest


def test_an_oversized_deeply_nested_attachment_is_refused_cleanly() -> None:
    # A value far over the limit must be refused with an error, not crash the process.
    # Run in a child process: the failure mode is a segfault.
    script = textwrap.dedent(
        """
        from trio_hibernate._errors import DataCloneError, LimitExceededError
        from trio_hibernate._limits import Limits
        from trio_hibernate._websocket import WebSocket

        class T:
            def send_message(self, data): pass
            def start_close(self, code, reason): pass
            def begin_shutdown(self, code, reason): pass
            def resume_reading(self): pass

        ws = WebSocket(transport=T(), url="/x", limits=Limits())
        value = inner = []
        for _ in range(100_000):
            nested = []
            inner.append(nested)
            inner = nested
        try:
            ws.serialize_attachment(value)
        except (LimitExceededError, DataCloneError) as exc:
            print(type(exc).__name__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"the process died (exit {result.returncode})"
    assert result.stdout.strip() in ("LimitExceededError", "DataCloneError")


def test_codec_directly() -> None:
    encoded = encode_data(
        {"a": [1]}, what="A value", limit_name="max_attachment_bytes", limit_bytes=100
    )
    assert decode_data(encoded) == {"a": [1]}
    with pytest.raises(DataCloneError, match=r"^A value is not data"):
        encode_data(object(), what="A value", limit_name="max_attachment_bytes", limit_bytes=100)


# -- auto-response -----------------------------------------------------------------------------


def test_auto_response_pair_accessors() -> None:
    pair = WebSocketRequestResponsePair("ping", "pong")
    assert (pair.request, pair.response) == ("ping", "pong")
    assert (pair.get_request(), pair.get_response()) == ("ping", "pong")
    assert pair == WebSocketRequestResponsePair("ping", "pong")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        pair.request = "other"  # type: ignore[misc]


@pytest.mark.parametrize(("request_", "response"), [(b"ping", "pong"), ("ping", None)])
def test_auto_response_pair_holds_strings(request_: object, response: object) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        WebSocketRequestResponsePair(request_, response)  # type: ignore[arg-type]


def test_set_replace_and_clear_auto_response() -> None:
    core, ctx = live_object()
    assert ctx.get_websocket_auto_response() is None
    ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
    ctx.set_websocket_auto_response(WebSocketRequestResponsePair("hb", "ok"))
    assert ctx.get_websocket_auto_response() == WebSocketRequestResponsePair("hb", "ok")
    assert new_context(core).get_websocket_auto_response() == WebSocketRequestResponsePair(
        "hb", "ok"
    )
    ctx.set_websocket_auto_response()
    assert ctx.get_websocket_auto_response() is None
    assert not core.is_auto_response("hb")


def test_auto_response_request_over_the_limit() -> None:
    _, ctx = live_object()
    ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
    with pytest.raises(LimitExceededError) as info:
        ctx.set_websocket_auto_response(WebSocketRequestResponsePair("é" * 1025, "x" * 5000))
    assert str(info.value).startswith(
        "Request cannot be larger than 2048 bytes. A request of size 2050 was provided"
    )
    check_limit_error(info.value, "max_auto_response_bytes", 2048, 2050)
    assert ctx.get_websocket_auto_response() == WebSocketRequestResponsePair("ping", "pong")


def test_auto_response_response_over_the_limit() -> None:
    _, ctx = live_object()
    with pytest.raises(LimitExceededError) as info:
        ctx.set_websocket_auto_response(WebSocketRequestResponsePair("a" * 2048, "b" * 2049))
    assert str(info.value).startswith(
        "Response cannot be larger than 2048 bytes. A response of size 2049 was provided"
    )
    check_limit_error(info.value, "max_auto_response_bytes", 2048, 2049)
    assert ctx.get_websocket_auto_response() is None


def test_set_auto_response_takes_a_pair() -> None:
    _, ctx = live_object()
    with pytest.raises(TypeError, match="expected a WebSocketRequestResponsePair"):
        ctx.set_websocket_auto_response(("ping", "pong"))  # type: ignore[arg-type]


def test_auto_response_matching_is_exact() -> None:
    core, ctx = live_object()
    ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
    assert core.is_auto_response("ping")
    for near_miss in ("PING", "ping ", " ping", "pin", "pingg", ""):
        assert not core.is_auto_response(near_miss)


def test_auto_response_timestamp_is_kept_after_clearing_and_across_a_wake() -> None:
    core, ctx = live_object()
    ws, transport = accepted(ctx)
    assert ctx.get_websocket_auto_response_timestamp(ws) is None
    ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
    record = record_of(core, ws)
    assert core.record_auto_response(record, 1_700_000_000.25) == "pong"
    stamp = datetime.fromtimestamp(1_700_000_000.25, UTC)
    assert ctx.get_websocket_auto_response_timestamp(ws) == stamp
    ctx.set_websocket_auto_response()
    assert ctx.get_websocket_auto_response_timestamp(ws) == stamp
    woken = new_context(core)
    assert woken.get_websocket_auto_response_timestamp(woken.get_websockets()[0]) == stamp
    assert transport.sent == []  # sending the reply is the connection's job


def test_auto_response_after_close_sends_nothing_but_stamps() -> None:
    core, ctx = live_object()
    ws, _ = accepted(ctx)
    ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
    ws.close(1000)
    record = record_of(core, ws)
    assert core.record_auto_response(record, 5.0) is None
    assert record.auto_response_at == 5.0


def test_auto_response_timestamp_of_an_unaccepted_socket_is_none() -> None:
    _, ctx = live_object()
    ws, _ = new_socket()
    assert ctx.get_websocket_auto_response_timestamp(ws) is None
    with pytest.raises(TypeError):
        ctx.get_websocket_auto_response_timestamp("ws")  # type: ignore[arg-type]


# -- close codes and reasons -------------------------------------------------------------------


def test_close_code_range_exhaustively() -> None:
    for code in range(-1, 6001):
        if object_close_code_is_valid(code):
            check_close_args(code, None)
        else:
            with pytest.raises(InvalidCloseCodeError) as info:
                check_close_args(code, None)
            assert str(info.value).startswith(f"Invalid WebSocket close code: {code}.")


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 1016, 2999, 3000, 4999])
def test_close_sends_a_valid_code(code: int) -> None:
    _, ctx = live_object()
    ws, transport = accepted(ctx)
    ws.close(code, "bye")
    assert transport.closes == [(code, "bye")]
    assert ws.ready_state is ReadyState.CLOSING


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 5000, 0, 65535])
def test_close_refuses_an_invalid_code(code: int) -> None:
    _, ctx = live_object()
    ws, transport = accepted(ctx)
    with pytest.raises(InvalidCloseCodeError, match=f"^Invalid WebSocket close code: {code}"):
        ws.close(code)
    assert transport.closes == []
    assert ws.ready_state is ReadyState.OPEN
    ws.send("still open")
    assert transport.sent == ["still open"]


@pytest.mark.parametrize("code", [True, 1000.0, "1000"])
def test_close_code_must_be_an_int(code: object) -> None:
    ws, _ = new_socket()
    with pytest.raises(TypeError, match="a close code must be an int"):
        ws.close(code)  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", ["bye", ""])
def test_a_reason_needs_a_code(reason: str) -> None:
    _, ctx = live_object()
    ws, transport = accepted(ctx)
    with pytest.raises(
        InvalidCloseCodeError,
        match=r"^If you specify a WebSocket close reason, you must also specify a code\.$",
    ):
        ws.close(None, reason)
    assert transport.closes == []


def test_close_reason_limit_is_123_utf8_bytes() -> None:
    _, ctx = live_object()
    ws, transport = accepted(ctx)
    too_long = "é" * 62  # 62 characters, 124 bytes
    with pytest.raises(InvalidCloseCodeError) as info:
        ws.close(1000, too_long)
    assert str(info.value) == (
        "WebSocket close reason must not be longer than 123 bytes when UTF-8 encoded; "
        "it is 124 bytes."
    )
    assert transport.closes == []
    longest = "é" * 61 + "a"
    assert len(longest.encode("utf-8")) == MAX_CLOSE_REASON_BYTES == 123
    ws.close(1000, longest)
    assert transport.closes == [(1000, longest)]


def test_close_reason_must_be_a_string() -> None:
    ws, _ = new_socket()
    with pytest.raises(TypeError, match="a close reason must be a str"):
        ws.close(1000, b"bye")  # type: ignore[arg-type]


def test_close_arguments_are_checked_before_the_state() -> None:
    ws, _ = new_socket()
    with pytest.raises(InvalidCloseCodeError):
        ws.close(1005)
    with pytest.raises(WebSocketStateError, match="accept_websocket"):
        ws.close(1000)


def test_close_without_a_code_sends_an_empty_close() -> None:
    _, ctx = live_object()
    ws, transport = accepted(ctx)
    ws.close()
    assert transport.closes == [(None, "")]


def test_closing_twice_or_after_the_peer_does_nothing() -> None:
    core, ctx = live_object()
    ws, transport = accepted(ctx)
    ws.close(4000, "first")
    ws.close(1000, "second")
    assert transport.closes == [(4000, "first")]
    other, other_transport = accepted(ctx)
    record_of(core, other).decide_end()
    other.close(1000)
    assert other_transport.closes == []
    assert other.ready_state is ReadyState.CLOSED


def test_send_after_close_raises() -> None:
    core, ctx = live_object()
    ws, transport = accepted(ctx)
    ws.send("before")
    ws.close(1000)
    with pytest.raises(
        WebSocketStateError, match=r"^Can't call WebSocket send\(\) after close\(\)\.$"
    ):
        ws.send("after")
    assert transport.sent == ["before"]
    # The flag survives hibernation: a new activation's handle refuses too.
    fresh = new_context(core).get_websockets()[0]
    assert fresh.ready_state is ReadyState.CLOSING
    with pytest.raises(WebSocketStateError):
        fresh.send("after a wake")


def test_send_before_accept_raises() -> None:
    ws, transport = new_socket()
    with pytest.raises(WebSocketStateError, match="accept_websocket"):
        ws.send("hi")
    assert transport.sent == []


def test_send_types() -> None:
    _, ctx = live_object()
    ws, transport = accepted(ctx)
    ws.send("text")
    ws.send(b"bin")
    ws.send(bytearray(b"ba"))
    ws.send(memoryview(b"mv"))
    assert transport.sent == ["text", b"bin", b"ba", b"mv"]
    assert all(type(m) in (str, bytes) for m in transport.sent)
    with pytest.raises(TypeError, match="send\\(\\) takes str or bytes, not int"):
        ws.send(1)  # type: ignore[arg-type]


def test_send_after_the_peer_left_is_dropped_silently() -> None:
    core, ctx = live_object()
    ws, transport = accepted(ctx)
    record_of(core, ws).decide_end()
    ws.send("into the void")
    assert transport.sent == []


def test_ready_states() -> None:
    core, ctx = live_object()
    ws, _ = new_socket()
    assert state_of(ws) is ReadyState.CONNECTING
    ctx.accept_websocket(ws)
    assert state_of(ws) is ReadyState.OPEN
    ws.close(1000)
    assert state_of(ws) is ReadyState.CLOSING
    record_of(core, ws).decide_end()
    assert ws.ready_state is ReadyState.CLOSED
    assert [s.value for s in ReadyState] == [0, 1, 2, 3]


# -- event timeout -----------------------------------------------------------------------------


def test_event_timeout_set_get_and_unset() -> None:
    core, ctx = live_object()
    assert ctx.get_hibernatable_websocket_event_timeout() is None
    ctx.set_hibernatable_websocket_event_timeout(1500)
    assert ctx.get_hibernatable_websocket_event_timeout() == 1500
    assert new_context(core).get_hibernatable_websocket_event_timeout() == 1500
    ctx.set_hibernatable_websocket_event_timeout(0)
    assert ctx.get_hibernatable_websocket_event_timeout() is None
    ctx.set_hibernatable_websocket_event_timeout(MAX_EVENT_TIMEOUT_MS)
    assert ctx.get_hibernatable_websocket_event_timeout() == 604_800_000
    ctx.set_hibernatable_websocket_event_timeout()
    assert ctx.get_hibernatable_websocket_event_timeout() is None
    ctx.set_hibernatable_websocket_event_timeout(1)
    ctx.set_hibernatable_websocket_event_timeout(None)
    assert core.event_timeout_ms is None


def test_event_timeout_whole_float_is_accepted_as_int() -> None:
    _, ctx = live_object()
    ctx.set_hibernatable_websocket_event_timeout(250.0)  # type: ignore[arg-type]
    stored = ctx.get_hibernatable_websocket_event_timeout()
    assert stored == 250
    assert type(stored) is int


def test_event_timeout_over_a_week() -> None:
    _, ctx = live_object()
    ctx.set_hibernatable_websocket_event_timeout(10)
    with pytest.raises(ValueError, match=r"^Event timeout should not exceed 604800000 ms"):
        ctx.set_hibernatable_websocket_event_timeout(MAX_EVENT_TIMEOUT_MS + 1)
    assert ctx.get_hibernatable_websocket_event_timeout() == 10


@pytest.mark.parametrize("value", [-1, -1.0, -604_800_001])
def test_event_timeout_negative(value: float) -> None:
    _, ctx = live_object()
    ctx.set_hibernatable_websocket_event_timeout(10)
    with pytest.raises(ValueError, match="cannot be negative"):
        ctx.set_hibernatable_websocket_event_timeout(value)  # type: ignore[arg-type]
    assert ctx.get_hibernatable_websocket_event_timeout() == 10


@pytest.mark.parametrize(("value", "kept"), [(1500.7, 1500), (1.5, 1), (0.5, None)])
def test_event_timeout_truncates_fractions(value: float, kept: int | None) -> None:
    # workerd converts to uint32: 1500.7 -> 1500, and 0.5 -> 0, which unsets.
    _, ctx = live_object()
    ctx.set_hibernatable_websocket_event_timeout(10)
    ctx.set_hibernatable_websocket_event_timeout(value)  # type: ignore[arg-type]
    assert ctx.get_hibernatable_websocket_event_timeout() == kept


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_event_timeout_not_finite(value: float) -> None:
    _, ctx = live_object()
    ctx.set_hibernatable_websocket_event_timeout(10)
    with pytest.raises(TypeError, match="must be finite"):
        ctx.set_hibernatable_websocket_event_timeout(value)  # type: ignore[arg-type]
    assert ctx.get_hibernatable_websocket_event_timeout() == 10


@pytest.mark.parametrize("value", [True, False, "100", [100]])
def test_event_timeout_not_a_number(value: object) -> None:
    # bool is an int subclass, but neither True nor False is a number of milliseconds.
    _, ctx = live_object()
    ctx.set_hibernatable_websocket_event_timeout(10)
    with pytest.raises(TypeError, match="the event timeout is a number of ms"):
        ctx.set_hibernatable_websocket_event_timeout(value)  # type: ignore[arg-type]
    assert ctx.get_hibernatable_websocket_event_timeout() == 10


# -- ids ---------------------------------------------------------------------------------------


def test_object_id_from_name_is_deterministic() -> None:
    one = ObjectId.from_name("chat", "lobby")
    two = ObjectId.from_name("chat", "lobby")
    assert one == two
    assert hash(one) == hash(two)
    assert one.hex == two.hex == str(one)
    assert one.name == "lobby"
    # Pinned: ids key stored state, so the derivation must never change.
    assert one.hex == hashlib.sha256(b"chat\x00lobby").hexdigest()
    assert len(one.hex) == 64
    assert set(one.hex) <= set("0123456789abcdef")


def test_object_ids_differ_by_name_and_namespace() -> None:
    ids = {
        ObjectId.from_name("chat", "lobby"),
        ObjectId.from_name("chat", "Lobby"),
        ObjectId.from_name("game", "lobby"),
        ObjectId.from_name("ab", "c"),
        ObjectId.from_name("a", "bc"),
    }
    assert len(ids) == 5


def test_object_id_equality_ignores_the_name() -> None:
    named = ObjectId.from_name("chat", "lobby")
    assert ObjectId(named.hex) == named
    assert ObjectId(named.hex).name is None


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65])
def test_object_id_validates_its_hex(bad: str) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        ObjectId(bad)


def test_unique_ids_are_random_and_valid() -> None:
    ids = {ObjectId.unique() for _ in range(50)}
    assert len(ids) == 50
    assert all(i.name is None and len(i.hex) == 64 for i in ids)


# -- the lifecycle table -----------------------------------------------------------------------

#: How a fresh core reaches each state, through its real inputs.
_LIFECYCLE_PATHS: Final[dict[ObjectState, tuple[Input, ...]]] = {
    ObjectState.HIBERNATED: (),
    ObjectState.STARTING: (Input.EVENT,),
    ObjectState.LIVE: (Input.EVENT, Input.STARTED),
    ObjectState.STOPPING: (Input.EVENT, Input.STARTED, Input.STOP),
}


def _apply(core: ObjectCore, what: Input) -> None:
    """Feed ``what`` to the core through its public method for that input."""
    if what is Input.EVENT:
        core.enqueue(fetch())
    elif what is Input.STARTED:
        core.on_started()
    elif what is Input.FAILED:
        core.on_failed()
    elif what is Input.STOP:
        core.begin_stop()
    else:
        core.on_stopped()


def core_in(state: ObjectState) -> ObjectCore:
    """A core in ``state`` with an empty mailbox (the waking event was taken)."""
    core = ObjectCore(DEFAULTS)
    for what in _LIFECYCLE_PATHS[state]:
        _apply(core, what)
        if what is Input.STARTED:
            assert isinstance(core.pop_event(), FetchEvent)
    assert core.state is state
    return core


def test_transition_table_only_uses_known_states_and_inputs() -> None:
    for (state, what), target in TRANSITIONS.items():
        assert isinstance(state, ObjectState)
        assert isinstance(target, ObjectState)
        assert isinstance(what, Input)


@pytest.mark.parametrize(("state", "what"), list(itertools.product(ObjectState, Input)), ids=str)
def test_transition_table_is_total(state: ObjectState, what: Input) -> None:
    core = core_in(state)
    generation = core.generation
    target = TRANSITIONS.get((state, what))
    if target is None:
        with pytest.raises(InvalidTransition) as info:
            _apply(core, what)
        assert info.value.state is state
        assert info.value.what is what
        assert str(info.value) == (
            f"Input.{what.name} is not allowed in state ObjectState.{state.name}; please report"
        )
        assert core.state is state
        assert core.generation == generation
    else:
        _apply(core, what)
        assert core.state is target


def test_the_hot_path_agrees_with_the_table() -> None:
    # enqueue() skips the lookup while LIVE; the table must say the same.
    assert TRANSITIONS[ObjectState.LIVE, Input.EVENT] is ObjectState.LIVE
    core = core_in(ObjectState.LIVE)
    assert core.enqueue(fetch()) is False
    assert core.state is ObjectState.LIVE


@pytest.mark.parametrize(
    "state", [ObjectState.HIBERNATED, ObjectState.STARTING, ObjectState.STOPPING]
)
def test_only_a_live_object_gets_events(state: ObjectState) -> None:
    core = core_in(state)
    with pytest.raises(InvalidTransition) as info:
        core.pop_event()
    assert info.value.what == "pop_event"
    assert str(info.value).startswith("'pop_event' is not allowed in state ObjectState.")


def test_settings_are_read_only_and_set_through_methods() -> None:
    core = ObjectCore(DEFAULTS)
    pair = WebSocketRequestResponsePair("ping", "pong")
    core.set_auto_response(pair)
    core.set_event_timeout_ms(250)
    assert (core.auto_response, core.event_timeout_ms) == (pair, 250)
    for name in ("auto_response", "event_timeout_ms", "state"):
        with pytest.raises(AttributeError):
            setattr(core, name, None)


def test_a_wake_is_asked_for_exactly_once() -> None:
    core = ObjectCore(DEFAULTS)
    assert core.enqueue(fetch()) is True
    assert core.state is ObjectState.STARTING
    assert core.enqueue(fetch()) is False
    assert core.on_started() == 1
    assert core.enqueue(fetch()) is False
    core.begin_stop()
    assert core.enqueue(fetch()) is False
    assert core.queued == 4
    # Events that arrived while stopping ask for the next instance.
    assert core.on_stopped() is True
    assert core.state is ObjectState.STARTING
    assert core.on_started() == 2
    assert core.generation == 2


def test_events_come_out_in_arrival_order() -> None:
    core, ctx = live_object()
    _, _ = accepted(ctx)
    record = core.registry.sockets()[0]
    events: list[Event] = [MessageEvent(record, f"m{i}", 2) for i in range(5)]
    events.append(CloseEvent(record, 1000, "", True))
    for event in events:
        core.enqueue(event)
    assert record.queued == 5
    popped = [core.pop_event() for _ in events]
    assert popped == events
    assert core.pop_event() is None
    assert record.queued == 0


def test_stopping_with_an_empty_mailbox_hibernates() -> None:
    core, _ = live_object()
    core.begin_stop()
    assert core.on_stopped() is False
    assert core.state is ObjectState.HIBERNATED
    assert not core.has_work


def test_a_failed_constructor_drops_the_queued_events() -> None:
    core, ctx = live_object()
    accepted(ctx)
    record = core.registry.sockets()[0]
    core.begin_stop()
    assert core.on_stopped() is False
    message = MessageEvent(record, "hi", 2)
    assert core.enqueue(message) is True
    request = fetch()
    core.enqueue(request)
    assert record.queued == 1
    assert core.on_failed() == [message, request]
    assert state_of(core) is ObjectState.STOPPING
    assert core.queued == 0
    assert record.queued == 0
    assert core.on_stopped() is False
    assert state_of(core) is ObjectState.HIBERNATED
    assert core.has_work  # the socket is still registered


def test_has_work() -> None:
    core = ObjectCore(DEFAULTS)
    seen = [core.has_work]
    core.enqueue(fetch())
    seen.append(core.has_work)  # an event waits
    core.on_started()
    core.pop_event()
    seen.append(core.has_work)  # an instance exists
    core.begin_stop()
    core.on_stopped()
    seen.append(core.has_work)
    assert seen == [False, True, True, False]


def test_settings_keep_no_object_without_sockets() -> None:
    core, ctx = live_object()
    ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
    ctx.set_hibernatable_websocket_event_timeout(1000)
    core.begin_stop()
    core.on_stopped()
    assert not core.has_work  # forgotten whole: issue 9, one-visit rooms leaked


def test_release_is_idempotent() -> None:
    core, ctx = live_object()
    ws, _ = accepted(ctx, ["a"])
    record = record_of(core, ws)
    core.release(record)
    core.release(record)
    assert record.released
    assert len(core.registry) == 0
    assert core.registry.sockets("a") == []
    core.registry.check_valid()


def test_start_soon_hands_the_function_to_the_runtime() -> None:
    core = ObjectCore(DEFAULTS)
    spawned: list[Callable[[], Awaitable[object]]] = []
    ctx = ObjectContext(
        namespace="room",
        object_id=ObjectId.from_name("room", "lobby"),
        core=core,
        spawn=spawned.append,
    )

    async def background() -> None:
        pass

    ctx.start_soon(background)
    assert spawned == [background]
    assert ctx.namespace == "room"
    assert ctx.id == ObjectId.from_name("room", "lobby")


# -- output gate -------------------------------------------------------------------------------


def gated_object() -> tuple[ObjectCore, ObjectContext, OutputGate]:
    core, _ = live_object()
    gate = OutputGate()
    ctx = ObjectContext(
        namespace="room",
        object_id=ObjectId.from_name("room", "lobby"),
        core=core,
        spawn=_no_spawn,
        gate=gate,
    )
    return core, ctx, gate


def test_sends_and_closes_wait_for_the_commit_in_order() -> None:
    _, ctx, gate = gated_object()
    first, first_transport = accepted(ctx)
    second, second_transport = accepted(ctx)
    first.send("before the write")
    gate.wrote()  # what a storage write does
    first.send("after the write")
    second.send(b"to the other")
    first.close(1000, "done")
    assert first_transport.sent == ["before the write"]
    assert first_transport.closes == []
    assert second_transport.sent == []
    assert state_of(first) is ReadyState.CLOSING
    with pytest.raises(WebSocketStateError):
        first.send("after close")
    gate.open()
    assert first_transport.sent == ["before the write", "after the write"]
    assert first_transport.closes == [(1000, "done")]
    assert second_transport.sent == [b"to the other"]


def test_handles_made_by_get_websockets_use_the_context_gate() -> None:
    core, ctx, gate = gated_object()
    _, transport = accepted(ctx)
    fresh = ObjectContext(
        namespace="room",
        object_id=ObjectId.from_name("room", "lobby"),
        core=core,
        spawn=_no_spawn,
        gate=gate,
    ).get_websockets()[0]
    gate.wrote()
    fresh.send("held")
    assert transport.sent == []
    gate.open()
    assert transport.sent == ["held"]


def test_a_failed_write_drops_the_held_messages() -> None:
    _, ctx, gate = gated_object()
    ws, transport = accepted(ctx)
    gate.wrote()
    ws.send("lost")
    ws.send(b"lost too")
    assert gate.drop() == 2
    assert transport.sent == []
    assert not gate.closed
    ws.send("after the reset")
    assert transport.sent == ["after the reset"]


def test_a_close_dropped_by_a_failed_write_does_not_wedge_the_socket() -> None:
    # A failed commit drops the held Close frame and resets the instance (spec 10): the
    # close never happened. The socket must not be left believing it sent a Close: with
    # no Close on the wire, no watchdog and close()/send() refused, nothing could ever
    # end it from the object's side.
    core, ctx, gate = gated_object()
    ws, transport = accepted(ctx)
    gate.wrote()
    ws.close(4000, "bye")
    assert gate.drop() == 1
    assert transport.closes == []
    fresh = new_context(core).get_websockets()[0]  # the next activation
    assert state_of(fresh) is ReadyState.OPEN
    fresh.close(4001, "bye again")
    assert transport.closes == [(4001, "bye again")]


# -- registry ----------------------------------------------------------------------------------


def test_registry_indexes_and_cleans_up() -> None:
    registry = SocketRegistry(Limits(max_websockets_per_object=3))
    a = SocketRecord(transport=FakeTransport(), tags=("x", "y"), url="/a")
    b = SocketRecord(transport=FakeTransport(), tags=("y",), url="/b")
    registry.add(a)
    registry.add(b)
    registry.check_valid()
    assert registry.sockets() == [b, a]  # newest first
    assert registry.sockets("y") == [a, b]
    registry.remove(a)
    registry.remove(a)
    registry.check_valid()
    assert registry.sockets("x") == []
    assert registry.sockets("y") == [b]
    assert a not in registry
    assert len(registry) == 1


# -- the socket close-state table --------------------------------------------------------------

#: How a fresh record reaches each state, through its real inputs (the usual paths).
_SOCKET_PATHS: Final[dict[SocketState, tuple[SocketInput, ...]]] = {
    SocketState.OPEN: (),
    SocketState.CLOSING: (SocketInput.CLOSE,),
    SocketState.ENDED: (SocketInput.END_DECIDED,),
    SocketState.ENDED_AFTER_CLOSE: (SocketInput.CLOSE, SocketInput.END_DECIDED),
    SocketState.RELEASED: (SocketInput.END_DECIDED, SocketInput.RELEASE),
    SocketState.RELEASED_AFTER_CLOSE: (
        SocketInput.CLOSE,
        SocketInput.END_DECIDED,
        SocketInput.RELEASE,
    ),
}


def _feed(record: SocketRecord, what: SocketInput) -> None:
    """Feed ``what`` to the record through its public method for that input."""
    if what is SocketInput.CLOSE:
        record.close_by_object()
    elif what is SocketInput.CLOSE_DROPPED:
        record.undo_close()
    elif what is SocketInput.END_DECIDED:
        record.decide_end()
    else:
        record.release()


def record_in(state: SocketState) -> SocketRecord:
    record = SocketRecord(transport=FakeTransport(), tags=(), url="/room/lobby")
    for what in _SOCKET_PATHS[state]:
        _feed(record, what)
    assert record.state is state
    return record


def test_every_socket_state_and_input_is_a_cell_or_a_documented_refusal() -> None:
    pairs = set(itertools.product(SocketState, SocketInput))
    assert set(SOCKET_TRANSITIONS) | set(SOCKET_REFUSALS) == pairs
    assert not set(SOCKET_TRANSITIONS) & set(SOCKET_REFUSALS)
    assert all(isinstance(target, SocketState) for target in SOCKET_TRANSITIONS.values())
    assert all(reason for reason in SOCKET_REFUSALS.values())


@pytest.mark.parametrize(
    ("state", "what"), list(itertools.product(SocketState, SocketInput)), ids=str
)
def test_socket_transition_table_is_total(state: SocketState, what: SocketInput) -> None:
    record = record_in(state)
    target = SOCKET_TRANSITIONS.get((state, what))
    if target is None:
        assert (state, what) in SOCKET_REFUSALS
        with pytest.raises(InvalidTransition) as info:
            _feed(record, what)
        assert (info.value.state, info.value.what) == (state, what)
        assert str(info.value) == (
            f"SocketInput.{what.name} is not allowed in state SocketState.{state.name}; "
            "please report"
        )
        assert record.state is state
    else:
        _feed(record, what)
        assert record.state is target
    record.check_valid(DEFAULTS)


@pytest.mark.parametrize("state", list(SocketState), ids=str)
def test_close_by_object_asks_for_a_close_frame_only_when_open(state: SocketState) -> None:
    assert record_in(state).close_by_object() is (state is SocketState.OPEN)


_DERIVED: Final = {
    # state: (ready_state, server_closed, released)
    SocketState.OPEN: (ReadyState.OPEN, False, False),
    SocketState.CLOSING: (ReadyState.CLOSING, True, False),
    SocketState.ENDED: (ReadyState.CLOSED, False, False),
    SocketState.ENDED_AFTER_CLOSE: (ReadyState.CLOSED, True, False),
    SocketState.RELEASED: (ReadyState.CLOSED, False, True),
    SocketState.RELEASED_AFTER_CLOSE: (ReadyState.CLOSED, True, True),
}


@pytest.mark.parametrize("state", list(SocketState), ids=str)
def test_what_each_socket_state_means_to_object_code(state: SocketState) -> None:
    ready, closed_by_object, released = _DERIVED[state]
    record = record_in(state)
    assert (record.ready_state, record.server_closed, record.released) == _DERIVED[state]
    core, ctx = live_object()
    ws, transport = new_socket()
    ctx.accept_websocket(ws)
    live = record_of(core, ws)
    for what in _SOCKET_PATHS[state]:
        if what is SocketInput.RELEASE:
            core.release(live)
        else:
            _feed(live, what)
    transport.closes.clear()
    assert ws.ready_state is ready
    if closed_by_object:
        with pytest.raises(WebSocketStateError, match=r"send\(\) after close\(\)"):
            ws.send("x")
    else:
        ws.send("x")
    # Only an OPEN socket's messages reach the transport; anywhere else they are dropped.
    assert transport.sent == (["x"] if state is SocketState.OPEN else [])
    ws.close(1000)
    assert transport.closes == ([(1000, "")] if state is SocketState.OPEN else [])
    assert (live in core.registry) is not released
    core.registry.check_valid()


def test_a_dropped_close_after_the_peer_ended_leaves_the_end() -> None:
    core, ctx, gate = gated_object()
    ws, transport = accepted(ctx)
    record = record_of(core, ws)
    gate.wrote()
    ws.close(4000, "held")
    record.decide_end()  # the peer closed while the Close frame was held
    assert state_of(record) is SocketState.ENDED_AFTER_CLOSE
    assert gate.drop() == 1
    assert state_of(record) is SocketState.ENDED
    assert transport.closes == []
    ws.send("dropped, not refused")
    assert transport.sent == []


def test_record_check_valid_catches_broken_counts() -> None:
    record = record_in(SocketState.OPEN)
    record.add_queued(3)
    record.check_valid(DEFAULTS)
    record.remove_queued(3)
    record.remove_queued(0)
    with pytest.raises(AssertionError):
        record.check_valid()


def test_registry_check_valid_catches_a_released_record_still_listed() -> None:
    registry = SocketRegistry(DEFAULTS)
    record = record_in(SocketState.OPEN)
    registry.add(record)
    record.release()  # without ObjectCore.release: still registered
    with pytest.raises(AssertionError, match="registered but RELEASED"):
        registry.check_valid()


def test_shut_down_sockets_closes_every_socket_without_a_handler() -> None:
    core, ctx = live_object()
    (first, first_transport), (second, second_transport) = accepted(ctx), accepted(ctx)
    first.close(4000, "closing")
    core.shut_down_sockets(1011, "internal error")
    assert first_transport.shutdowns == second_transport.shutdowns == [(1011, "internal error")]
    assert len(core.registry) == 0
    assert ctx.get_websockets() == []
    assert [first.ready_state, second.ready_state] == [ReadyState.CLOSED] * 2
    with pytest.raises(WebSocketStateError):
        first.send("after close")
    second.send("dropped")
    assert second_transport.sent == []
    core.registry.check_valid()


# -- backpressure ------------------------------------------------------------------------------


def test_reading_pauses_at_either_queue_limit() -> None:
    limits = Limits(max_queued_messages_per_websocket=3, max_queued_bytes_per_websocket=10)
    by_count, by_bytes = record_in(SocketState.OPEN), record_in(SocketState.OPEN)
    for _ in range(2):
        by_count.add_queued(1)
    assert not should_pause_reading(by_count, limits)
    by_count.add_queued(1)
    assert should_pause_reading(by_count, limits)  # 3 messages
    by_bytes.add_queued(9)
    assert not should_pause_reading(by_bytes, limits)
    by_bytes.add_queued(1)
    assert should_pause_reading(by_bytes, limits)  # 10 bytes in 2 messages


def test_reading_resumes_only_when_paused_and_both_below() -> None:
    limits = Limits(max_queued_messages_per_websocket=2, max_queued_bytes_per_websocket=10)

    def paused_record(*sizes: int, paused: bool = True) -> SocketRecord:
        record = record_in(SocketState.OPEN)
        for size in sizes:
            record.add_queued(size)
        record.set_reading_paused(paused)
        return record

    assert not should_resume_reading(paused_record(0, 0), limits)  # 2 messages
    assert not should_resume_reading(paused_record(10), limits)  # 10 bytes
    assert should_resume_reading(paused_record(9), limits)
    assert should_resume_reading(paused_record(), limits)
    assert not should_resume_reading(paused_record(9, paused=False), limits)


def test_pop_event_resumes_a_paused_socket_once_it_is_below_both_limits() -> None:
    limits = Limits(max_queued_messages_per_websocket=2, max_queued_bytes_per_websocket=100)
    core, ctx = live_object(limits)
    _, transport = accepted(ctx, (), limits)
    record = core.registry.sockets()[0]
    for i in range(3):
        core.enqueue(MessageEvent(record, f"m{i}", 2))
    assert should_pause_reading(record, limits)
    record.set_reading_paused(True)  # what the connection does
    core.pop_event()
    assert (transport.resumes, record.reading_paused) == (0, True)  # 2 still queued
    core.pop_event()
    assert (transport.resumes, record.reading_paused) == (1, False)
    core.pop_event()
    assert transport.resumes == 1  # not paused any more: nothing to resume


# -- limits ------------------------------------------------------------------------------------


def test_default_limits_follow_the_spec() -> None:
    assert DEFAULTS.max_tags_per_websocket == 10
    assert DEFAULTS.max_tag_bytes == 256
    assert DEFAULTS.max_attachment_bytes == 2048
    assert DEFAULTS.max_auto_response_bytes == 2048
    assert DEFAULTS.max_websockets_per_object == 32_768
    assert DEFAULTS.max_message_bytes == 32 * 1024 * 1024


_LIMIT_FIELDS: Final = [field.name for field in attrs.fields(Limits)]


@pytest.mark.parametrize("field", _LIMIT_FIELDS)
@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (True, TypeError),
        (False, TypeError),
        (1.0, TypeError),
        (2.5, TypeError),
        ("3", TypeError),
        (None, TypeError),
    ],
)
def test_limits_must_be_positive_ints(field: str, bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"Limits.{field} must be"):
        Limits(**{field: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", _LIMIT_FIELDS)
def test_limits_accept_one(field: str) -> None:
    assert getattr(Limits(**{field: 1}), field) == 1


def test_limits_are_frozen_and_keyword_only() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        DEFAULTS.max_tag_bytes = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Limits(10)  # type: ignore[call-arg]


# -- error types -------------------------------------------------------------------------------


def test_error_hierarchy() -> None:
    assert issubclass(LimitExceededError, HibernateError)
    assert issubclass(LimitExceededError, ValueError)
    assert issubclass(InvalidCloseCodeError, ValueError)
    assert issubclass(InvalidCloseCodeError, HibernateError)
    assert issubclass(WebSocketStateError, RuntimeError)
    assert issubclass(WebSocketStateError, HibernateError)
    assert issubclass(InvalidTransition, RuntimeError)
    exc = LimitExceededError("m", limit_name="max_tag_bytes", limit=1, value=2)
    assert (str(exc), exc.limit_name, exc.limit, exc.value) == ("m", "max_tag_bytes", 1, 2)
