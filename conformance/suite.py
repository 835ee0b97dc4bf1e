"""The conformance cases: run them against any endpoint serving the reference object.

    pytest conformance --endpoint http://127.0.0.1:8787

Each case talks to a fresh object through real WebSockets and checks what the spec
(shared/spec/hibernation-semantics.md) says. Where the spec is silent, the expectation is
what workerd does. Cases needing a test hook the endpoint did not announce are skipped
with the reason. Cases marked ``Rule`` pin a place where trio-hibernate differs from workerd
on purpose: they are expected to fail on workerd (conformance/differences.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis.stateful import run_state_machine_as_test
from websockets.exceptions import ConnectionClosed

from conformance.client import (
    REPLY_TIMEOUT_S,
    Client,
    Endpoint,
    UpgradeRefused,
    masked_frame,
    oversize_binary_frame,
)
from conformance.model import DROP_REASON, HibernationMachine, canonical

OpenClient = Callable[..., Client]

#: workerd's inbound message limit (and trio-hibernate's default), in bytes.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


def require(endpoint: Endpoint, capability: str) -> None:
    """Skip, visibly, when the endpoint did not announce ``capability``."""
    if not endpoint.has(capability):
        pytest.skip(f"capability {capability!r} not announced by {endpoint.implementation}")


def refused(open_client: OpenClient, **options: Any) -> dict[str, Any]:
    """The JSON body of the refused upgrade (fails if the upgrade succeeds)."""
    with pytest.raises(UpgradeRefused) as info:
        open_client(**options)
    assert info.value.status == 400
    return dict(info.value.body)


def error_of(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, f"expected an error, got {reply}"
    return str(reply["error"])


def tags_of(client: Client) -> list[str]:
    reply = client.request("tags")
    assert reply["ok"]
    return list(reply["tags"])


def listed(client: Client, tag: str | None = None) -> list[dict[str, Any]]:
    reply = client.request("list", **({} if tag is None else {"tag": tag}))
    assert reply["ok"]
    return list(reply["sockets"])


def constructor_runs(client: Client) -> int:
    return int(client.request("stats")["constructor_runs"])


def timestamp_ms(client: Client) -> float | None:
    value = client.request("auto_response_timestamp")["timestamp_ms"]
    assert value is None or isinstance(value, int | float)
    return value


def close_frame(client: Client) -> tuple[int, str] | None:
    frame = client.wait_for_close_frame()
    return None if frame is None else (frame.code, frame.reason)


def messages_until_closed(client: Client) -> list[str | bytes]:
    """Data messages that arrived before the server's Close frame."""
    assert client.wait_for_close_frame() is not None, "no Close frame"
    return drain(client)


def drain(client: Client) -> list[str | bytes]:
    """Every data message received and not yet read."""
    received: list[str | bytes] = list(client.inbox)
    client.inbox.clear()
    while True:
        try:
            received.append(client.ws.recv(timeout=0))
        except (ConnectionClosed, TimeoutError):
            return received


# -- accepting and tags -----------------------------------------------------------------


def test_connect_and_stats(open_client: OpenClient) -> None:
    client = open_client()
    assert client.request("stats")["constructor_runs"] == 1
    assert tags_of(client) == []
    assert client.request("get_attachment") == {"ok": True, "value": None}
    assert client.request("ready_state") == {"ok": True, "ready_state": 1}
    assert client.request("no_such_op")["error"] == "unknown_op"


def test_tags_deduplicated_in_order(open_client: OpenClient) -> None:
    client = open_client(tags=["b", "a", "b", "", "ünï €", "a"])
    assert tags_of(client) == ["b", "a", "", "ünï €"]
    other = open_client(tags=["a"])
    assert len(listed(client, "a")) == 2
    assert [s["tags"] for s in listed(other, "b")] == [["b", "a", "", "ünï €"]]
    assert len(listed(client, "")) == 1
    assert listed(client, "A") == []  # exact, case-sensitive
    assert listed(client, "nope") == []


def test_tags_at_most_ten(open_client: OpenClient) -> None:
    ten = [f"t{i}" for i in range(10)]
    assert tags_of(open_client(tags=ten)) == ten
    assert refused(open_client, tags=[*ten, "t10"])["error"] == "too_many_tags"
    assert tags_of(open_client(tags=["a"] * 20)) == ["a"]
    # workerd checks the count per element, before de-duplication: once ten distinct tags
    # are collected, even a duplicate is one too many.
    assert refused(open_client, tags=[*ten, "t0"])["error"] == "too_many_tags"
    survivor = open_client()
    assert len(listed(survivor)) == 3  # the refused upgrades left nothing behind


def test_tag_length_counts_utf8_bytes(open_client: OpenClient) -> None:
    for tag in ["x" * 256, "é" * 128, ""]:
        assert tags_of(open_client(tags=[tag])) == [tag]
    for tag in ["x" * 257, "é" * 129, "€" * 86]:
        assert refused(open_client, tags=["ok", tag])["error"] == "tag_too_long"


def test_accept_twice_is_refused(open_client: OpenClient) -> None:
    client = open_client(tags=["once"], twice=True)
    assert client.response_header("x-second-accept") == '"already_accepted"'
    assert tags_of(client) == ["once"]


# -- get_websockets ---------------------------------------------------------------------


def test_get_websockets_identity(open_client: OpenClient) -> None:
    clients = [open_client(tags=[f"k{i}"]) for i in range(3)]
    for i, client in enumerate(clients):
        sockets = listed(client)
        assert len(sockets) == 3
        assert [s["tags"] for s in sockets if s["self"]] == [[f"k{i}"]]
        assert all(s["ready_state"] == 1 for s in sockets)


def test_get_websockets_order(open_client: OpenClient) -> None:
    # workerd: without a tag, most recently accepted first; with a tag, oldest first.
    clients = [open_client(tags=[f"k{i}", "all"]) for i in range(3)]
    assert [s["tags"][0] for s in listed(clients[0])] == ["k2", "k1", "k0"]
    assert [s["tags"][0] for s in listed(clients[0], "all")] == ["k0", "k1", "k2"]


def test_broadcast_by_tag(open_client: OpenClient) -> None:
    a = open_client(tags=["a", "red"])
    b = open_client(tags=["b", "red", "blue"])
    c = open_client(tags=["c", "blue"])
    assert a.request("broadcast", tag="red", data="hi") == {"ok": True, "count": 2}
    assert a.next_json() == {"push": "broadcast", "data": "hi"}
    assert b.next_json() == {"push": "broadcast", "data": "hi"}
    c.assert_quiet()
    assert c.request("broadcast", data="all") == {"ok": True, "count": 3}
    for client in (a, b, c):
        assert client.next_json() == {"push": "broadcast", "data": "all"}


# -- attachments ------------------------------------------------------------------------


def test_attachment_roundtrip(open_client: OpenClient) -> None:
    client = open_client()
    assert client.request("get_attachment")["value"] is None
    for value in [
        {"a": [1, 2, {"b": None}], "s": "ü€", "f": 1.5, "t": True},
        [],
        0,
        "",
        None,
        "x" * 1000,
    ]:
        assert client.request("set_attachment", value=value) == {"ok": True}
        assert canonical(client.request("get_attachment")["value"]) == canonical(value)


def test_attachment_set_before_accept(open_client: OpenClient) -> None:
    client = open_client(tags=["pre"], attachment={"pre": 1})
    assert client.request("get_attachment")["value"] == {"pre": 1}
    assert listed(client)[0]["attachment"] == {"pre": 1}


def test_attachment_is_a_copy(open_client: OpenClient) -> None:
    client = open_client(attachment="previous")
    assert client.request("attachment_copy_semantics") == {
        "ok": True,
        "kept_mutation_after_set": False,
        "kept_mutation_of_copy": False,
        "fresh_copy_each_get": True,
    }
    assert client.request("get_attachment")["value"] == "previous"


def test_attachment_must_be_data(open_client: OpenClient) -> None:
    client = open_client(attachment={"k": 1})
    assert error_of(client.request("set_attachment_unclonable")) == "data_clone"
    assert client.request("get_attachment")["value"] == {"k": 1}


def test_attachment_far_over_any_limit(open_client: OpenClient) -> None:
    client = open_client(attachment={"k": 1})
    reply = client.request("set_attachment", value="x" * 20_000)
    assert error_of(reply) == "attachment_too_large"
    assert client.request("get_attachment")["value"] == {"k": 1}  # the previous one is kept


def test_attachment_limit_is_2048_bytes(open_client: OpenClient) -> None:
    """Rule (spec 4): the seed's 2,048 bytes, where workerd now allows 16,384."""
    client = open_client()
    assert error_of(client.request("set_attachment", value="x" * 4000)) == "attachment_too_large"


# -- messages and auto-response ---------------------------------------------------------


def test_text_binary_and_fragments(open_client: OpenClient) -> None:
    client = open_client()
    for text in ["hello", "ünï €", '{"x": 1}', ""]:
        client.send(text)
        assert client.next_json() == {"echo": text}
    client.send(b"\x00\x01\xff")
    assert client.next_message() == b"\x00\x01\xff"
    client.send_fragments(["hel", "lo ", "wörld"])
    assert client.next_json() == {"echo": "hello wörld"}
    client.send_fragments([b"ab", b"cd"])
    assert client.next_message() == b"abcd"


def test_auto_response_matches_exact_text_only(open_client: OpenClient) -> None:
    client = open_client()
    other = open_client()
    assert client.request("set_auto_response", request="ping", response="pong") == {"ok": True}
    before = client.request("stats")["messages"]
    client.send("ping")
    assert client.next_message() == "pong"
    other.send("ping")  # one pair for the whole object
    assert other.next_message() == "pong"
    for text in ["PING", "ping ", " ping"]:
        client.send(text)
        assert client.next_json() == {"echo": text}
    client.send(b"ping")  # binary frames never match
    assert client.next_message() == b"ping"
    # The two matches were not delivered: only the 3 texts, the binary frame and this.
    assert client.request("stats")["messages"] == before + 5
    assert client.request("get_auto_response") == {"ok": True, "pair": ["ping", "pong"]}
    assert client.request("set_auto_response", request="a", response="b") == {"ok": True}
    client.send("ping")
    assert client.next_json() == {"echo": "ping"}
    assert client.request("set_auto_response") == {"ok": True}
    assert client.request("get_auto_response") == {"ok": True, "pair": None}
    client.send("a")
    assert client.next_json() == {"echo": "a"}


def test_auto_response_limits(open_client: OpenClient) -> None:
    client = open_client()
    assert client.request("set_auto_response", request="x" * 2048, response="é" * 1024)["ok"]
    for request, response in [("x" * 2049, "y"), ("y", "x" * 2049), ("é" * 1025, "y")]:
        reply = client.request("set_auto_response", request=request, response=response)
        assert error_of(reply) == "auto_response_too_large"
    assert client.request("get_auto_response")["pair"] == ["x" * 2048, "é" * 1024]


def test_auto_response_timestamp(open_client: OpenClient) -> None:
    client = open_client()
    other = open_client()
    assert timestamp_ms(client) is None
    client.request("set_auto_response", request="ping", response="pong")
    before = time.time() * 1000
    client.send("ping")
    assert client.next_message() == "pong"
    after = time.time() * 1000
    first = timestamp_ms(client)
    assert first is not None
    assert before - 1000 <= first <= after + 1000
    time.sleep(0.05)
    client.send("ping")
    assert client.next_message() == "pong"
    second = timestamp_ms(client)
    assert second is not None
    assert second >= first
    assert timestamp_ms(other) is None  # per socket
    client.request("set_auto_response")
    assert timestamp_ms(client) == second  # clearing the pair keeps the timestamps


# -- hibernation ------------------------------------------------------------------------


def test_auto_response_does_not_wake(
    endpoint: Endpoint, name: str, open_client: OpenClient
) -> None:
    require(endpoint, "evict")
    client = open_client()
    client.request("set_auto_response", request="ping", response="pong")
    assert endpoint.evict(name) is True
    client.send("ping")
    assert client.next_message() == "pong"
    assert endpoint.evict(name) is False  # still hibernated: nothing woke it
    assert constructor_runs(client) == 2


def test_protocol_ping_does_not_wake(
    endpoint: Endpoint, name: str, open_client: OpenClient
) -> None:
    require(endpoint, "evict")
    client = open_client()
    assert endpoint.evict(name) is True
    assert client.ws.ping(b"are you there").wait(5)
    assert endpoint.evict(name) is False
    assert constructor_runs(client) == 2


def test_hibernation_keeps_socket_state(
    endpoint: Endpoint, name: str, open_client: OpenClient
) -> None:
    require(endpoint, "evict")
    first = open_client(tags=["k1", "shared"], attachment={"n": 1})
    second = open_client(tags=["k2", "shared"])
    first.request("set_auto_response", request="ping", response="pong")
    first.send("ping")
    assert first.next_message() == "pong"
    stamp = timestamp_ms(first)
    assert first.request("set_event_timeout", ms=5000) == {"ok": True}
    first.request("remember", value=42)
    messages = first.request("stats")["messages"]
    assert endpoint.evict(name) is True
    assert first.request("recall") == {"ok": True, "value": None}  # memory is gone
    stats = first.request("stats")
    assert stats["constructor_runs"] == 2
    assert stats["messages"] == messages + 2  # storage is not
    assert tags_of(first) == ["k1", "shared"]
    assert tags_of(second) == ["k2", "shared"]
    assert first.request("get_attachment")["value"] == {"n": 1}
    assert first.request("get_auto_response")["pair"] == ["ping", "pong"]
    assert timestamp_ms(first) == stamp
    assert first.request("get_event_timeout") == {"ok": True, "ms": 5000}
    assert sorted(s["tags"][0] for s in listed(second, "shared")) == ["k1", "k2"]
    first.send("ping")
    assert first.next_message() == "pong"


def test_object_settings_survive_hibernation_without_sockets(
    endpoint: Endpoint, name: str, open_client: OpenClient
) -> None:
    """Spec 1: the auto-response pair and the event timeout are the object's, not a socket's."""
    require(endpoint, "evict")
    client = open_client()
    client.request("set_auto_response", request="ping", response="pong")
    client.request("set_event_timeout", ms=5000)
    client.close(1000)
    assert endpoint.wait_for_events(name, 1)[0]["code"] == 1000
    assert endpoint.evict(name) is True
    newcomer = open_client()
    assert newcomer.request("get_auto_response") == {"ok": True, "pair": ["ping", "pong"]}
    assert newcomer.request("get_event_timeout") == {"ok": True, "ms": 5000}
    newcomer.send("ping")
    assert newcomer.next_message() == "pong"


def test_idle_object_hibernates(endpoint: Endpoint, open_client: OpenClient) -> None:
    idle = endpoint.capabilities.get("idle_timeout_s")
    if not isinstance(idle, int | float):
        pytest.skip(f"capability 'idle_timeout_s' not announced by {endpoint.implementation}")
    client = open_client()
    client.request("remember", value=7)
    assert constructor_runs(client) == 1
    time.sleep(idle + 3)
    assert client.request("recall") == {"ok": True, "value": None}
    assert constructor_runs(client) == 2


# -- closing ----------------------------------------------------------------------------


def test_client_close_with_code(endpoint: Endpoint, name: str, open_client: OpenClient) -> None:
    watcher = open_client(tags=["watcher"])
    client = open_client(tags=["k", "t"], attachment={"a": 1})
    answer = client.close(4000, "bye")
    assert answer is not None
    assert (answer.code, answer.reason) == (4000, "bye")
    events = endpoint.wait_for_events(name, 1)
    assert [
        {k: e.get(k) for k in ("kind", "tags", "code", "reason", "was_clean")} for e in events
    ] == [{"kind": "close", "tags": ["k", "t"], "code": 4000, "reason": "bye", "was_clean": True}]
    assert events[0]["attachment"] == {"a": 1}  # readable in the close handler
    assert events[0]["listed"] is True  # still listed while its close handler runs
    assert [s["tags"] for s in listed(watcher)] == [["watcher"]]  # and not after


def test_client_close_without_code(endpoint: Endpoint, name: str, open_client: OpenClient) -> None:
    client = open_client(tags=["k"])
    answer = client.close()
    assert answer is not None
    assert answer.code == 1005
    (event,) = endpoint.wait_for_events(name, 1)
    assert (event["code"], event["reason"], event["was_clean"]) == (1005, "", True)


def test_client_drop_is_1006(endpoint: Endpoint, name: str, open_client: OpenClient) -> None:
    client = open_client(tags=["k"])
    client.abort()
    (event,) = endpoint.wait_for_events(name, 1)
    assert {k: event.get(k) for k in ("kind", "tags", "code", "reason", "was_clean")} == {
        "kind": "close",
        "tags": ["k"],
        "code": 1006,
        "reason": DROP_REASON,
        "was_clean": False,
    }


def test_object_close_with_code(endpoint: Endpoint, name: str, open_client: OpenClient) -> None:
    sender = open_client(tags=["sender"])
    target = open_client(tags=["target"])
    reply = sender.request("close", tag="target", code=4001, reason="done")
    assert reply == {"ok": True, "count": 1, "send_errors": [], "close_again_errors": []}
    assert close_frame(target) == (4001, "done")
    (event,) = endpoint.wait_for_events(name, 1)
    assert (event["tags"], event["code"], event["reason"]) == (["target"], 4001, "done")
    sender.send_op("close", code=4002, reason="self")  # closing oneself: no reply
    assert close_frame(sender) == (4002, "self")


def test_object_close_without_code(endpoint: Endpoint, name: str, open_client: OpenClient) -> None:
    sender = open_client(tags=["sender"])
    target = open_client(tags=["target"])
    assert sender.request("close", tag="target")["count"] == 1
    assert close_frame(target) == (1005, "")
    (event,) = endpoint.wait_for_events(name, 1)
    assert (event["code"], event["reason"]) == (1005, "")


def test_close_code_and_reason_validation(open_client: OpenClient) -> None:
    sender = open_client(tags=["sender"])
    target = open_client(tags=["target"])
    for code in [999, 1004, 1005, 1006, 1015, 5000]:
        assert error_of(sender.request("close", tag="target", code=code)) == "invalid_close_code"
    assert error_of(sender.request("close", tag="target", reason="r")) == "reason_without_code"
    for reason in ["x" * 124, "é" * 62]:
        reply = sender.request("close", tag="target", code=1000, reason=reason)
        assert error_of(reply) == "reason_too_long"
    assert error_of(sender.request("close", code=1006)) == "invalid_close_code"
    assert target.request("ready_state") == {"ok": True, "ready_state": 1}  # untouched
    for code in [1000, 3000, 4999]:
        victim = open_client(tags=[f"v{code}"])
        reply = sender.request("close", tag=f"v{code}", code=code, reason="é" * 61 + "x")
        assert reply["ok"], reply
        assert close_frame(victim) == (code, "é" * 61 + "x")


def test_send_after_close_and_double_close(open_client: OpenClient) -> None:
    sender = open_client(tags=["sender"])
    target = open_client(tags=["target"])
    reply = sender.request("close", tag="target", code=4000, then_send="late", then_close=True)
    assert reply == {
        "ok": True,
        "count": 1,
        "send_errors": ["send_after_close"],
        "close_again_errors": [None],
    }
    assert close_frame(target) == (4000, "")
    assert messages_until_closed(target) == []


def test_runtime_echoes_close(endpoint: Endpoint, name: str, open_client: OpenClient) -> None:
    """Rule (spec 7): the runtime answers the peer's Close, even if the handler does not."""
    open_client().request("set_close_reply", reply=False)
    client = open_client(tags=["k"])
    answer = client.close(4000, "bye")
    assert answer is not None, "no Close frame came back: the client sees 1006"
    assert (answer.code, answer.reason) == (4000, "bye")
    (event,) = endpoint.wait_for_events(name, 1)
    assert (event["code"], event["was_clean"]) == (4000, True)


def test_close_handler_sees_closed_socket(
    endpoint: Endpoint, name: str, open_client: OpenClient
) -> None:
    """Rule (spec 7): the Close is answered before the handler runs, so it sees CLOSED."""
    client = open_client(tags=["k"])
    client.close(4000, "bye")
    (event,) = endpoint.wait_for_events(name, 1)
    assert event["ready_state"] == 3


def test_oversize_message_is_1009(endpoint: Endpoint, name: str, open_client: OpenClient) -> None:
    small = open_client(tags=["small"])
    small.send(b"x" * (1024 * 1024))
    assert small.next_message(timeout=10) == b"x" * (1024 * 1024)
    client = open_client(tags=["big"])
    writer = client.send_raw_in_background(oversize_binary_frame(MAX_MESSAGE_BYTES + 1))
    frame = close_frame(client)
    client.hang_up()  # our writer may be stuck on a peer that stopped reading: cut it off
    writer.join(timeout=5)
    assert frame is not None, "no Close frame"
    assert frame[0] == 1009, f"expected Close 1009, got {frame}"
    (event,) = endpoint.wait_for_events(name, 1)
    assert (event["kind"], event["tags"]) == ("error", ["big"])


def test_protocol_violation_is_1002(endpoint: Endpoint, name: str, open_client: OpenClient) -> None:
    client = open_client(tags=["bad"])
    client.send_raw(masked_frame(0xA1, b"rsv2"))  # FIN | RSV2 | text: no extension allows it
    frame = close_frame(client)
    assert frame is not None, "no Close frame"
    assert frame[0] == 1002, f"expected Close 1002, got {frame}"
    (event,) = endpoint.wait_for_events(name, 1)
    assert (event["kind"], event["tags"]) == ("error", ["bad"])


# -- handlers, turns and the event timeout ----------------------------------------------


def test_handler_that_raises_keeps_socket(
    endpoint: Endpoint, name: str, open_client: OpenClient
) -> None:
    client = open_client()
    client.request("remember", value=5)
    client.send_op("raise")
    client.assert_quiet()  # no reply, no close
    assert client.request("recall") == {"ok": True, "value": 5}  # the instance was kept
    assert client.request("ready_state")["ready_state"] == 1
    assert endpoint.events(name) == []  # and no error event


def test_constructor_failure_ends_sockets(
    endpoint: Endpoint, name: str, open_client: OpenClient
) -> None:
    """A constructor that raises on wake ends the object's sockets; no handler runs."""
    require(endpoint, "evict")
    client = open_client(tags=["k"])
    assert client.request("fail_next_construction") == {"ok": True}
    assert endpoint.evict(name) is True
    client.send("wake up")  # the constructor raises
    client.wait_for_close_frame()
    assert client.ws.wait_closed(REPLY_TIMEOUT_S), "the connection was not ended"
    assert drain(client) == []  # no echo: the message was never handled
    assert endpoint.events(name) == []  # no close handler ran
    newcomer = open_client()  # the next construction works again
    assert newcomer.request("stats")["constructor_runs"] >= 3


def test_turns_do_not_interleave(open_client: OpenClient) -> None:
    """Rule (spec 6): one event at a time per object, even across an await."""
    sleeper = open_client()
    other = open_client()
    sleep_id = sleeper.send_op("sleep", ms=400)
    time.sleep(0.05)
    started = time.monotonic()
    other.request("stats")
    waited = time.monotonic() - started
    assert sleeper.reply_to(sleep_id)["ok"]
    assert waited >= 0.25, f"the second event ran during the first one's await ({waited:.3f} s)"


def test_event_timeout_validation(open_client: OpenClient) -> None:
    client = open_client()
    assert client.request("get_event_timeout") == {"ok": True, "ms": None}
    assert error_of(client.request("set_event_timeout", ms=-1)) == "event_timeout_negative"
    reply = client.request("set_event_timeout", ms=604_800_001)
    assert error_of(reply) == "event_timeout_too_large"
    assert client.request("set_event_timeout", ms=604_800_000) == {"ok": True}
    assert client.request("get_event_timeout") == {"ok": True, "ms": 604_800_000}
    assert client.request("set_event_timeout", ms=0) == {"ok": True}
    assert client.request("get_event_timeout") == {"ok": True, "ms": None}
    client.request("set_event_timeout", ms=5000)
    assert client.request("set_event_timeout") == {"ok": True}
    assert client.request("get_event_timeout") == {"ok": True, "ms": None}


def test_event_timeout_truncates_fractions(open_client: OpenClient) -> None:
    # workerd converts the timeout to uint32 as WebIDL does: 1500.7 ms becomes 1500.
    client = open_client()
    assert client.request("set_event_timeout", ms=1500.7) == {"ok": True}
    assert client.request("get_event_timeout") == {"ok": True, "ms": 1500}


def test_event_timeout_cancels_handler(open_client: OpenClient) -> None:
    """Spec 9: an overrunning handler is cancelled; the sockets stay usable."""
    client = open_client()
    other = open_client()
    assert client.request("set_event_timeout", ms=200) == {"ok": True}
    sleep_id = client.send_op("sleep", ms=2000)
    with pytest.raises(AssertionError, match="no reply"):
        client.reply_to(sleep_id, timeout=2.5)
    assert other.request("ready_state") == {"ok": True, "ready_state": 1}
    assert client.request("ready_state") == {"ok": True, "ready_state": 1}
    client.request("set_event_timeout", ms=0)


# -- critical sections (blockConcurrencyWhile) -------------------------------------------


def test_block_concurrency_while_in_the_constructor(
    endpoint: Endpoint, name: str, open_client: OpenClient
) -> None:
    """A constructor's ``blockConcurrencyWhile`` (a slow setup that sleeps, then writes to
    storage) runs before any event: the messages that woke the object wait for it."""
    require(endpoint, "evict")
    first = open_client()
    second = open_client()
    assert first.request("slow_next_construction", ms=500) == {"ok": True}
    assert endpoint.evict(name) is True
    started = time.monotonic()
    first_id = first.send_op("setup_state")  # wakes the object: the constructor runs
    second_id = second.send_op("setup_state")
    ready = {"ok": True, "setup_done": True, "setups": 1}
    assert first.reply_to(first_id) == ready
    assert second.reply_to(second_id) == ready
    waited = time.monotonic() - started
    assert waited >= 0.4, f"an event ran during the constructor's setup ({waited:.3f} s)"
    assert constructor_runs(first) == 2  # one construction, one setup, for both events


def test_block_concurrency_while_holds_other_events(open_client: OpenClient) -> None:
    """In a handler, ``blockConcurrencyWhile`` holds every other event until it returns
    (workerd too, where a plain ``await`` would let them in: turns_do_not_interleave)."""
    blocker = open_client()
    other = open_client()
    block_id = blocker.send_op("block", ms=400)
    time.sleep(0.05)
    started = time.monotonic()
    assert other.request("stats")["ok"]
    waited = time.monotonic() - started
    assert blocker.reply_to(block_id) == {"ok": True}
    assert waited >= 0.25, f"an event ran inside blockConcurrencyWhile ({waited:.3f} s)"


# -- SQL cursor counts ------------------------------------------------------------------


def sql(client: Client, query: str, *bindings: object, read: int | None = None) -> dict[str, Any]:
    """The ``sql`` command's reply: ``columns``, the ``rows`` read (``read`` of them, or
    all), ``rows_read_at_exec`` (right after ``exec``), ``rows_read``, ``rows_written``."""
    fields: dict[str, Any] = {"query": query, "bindings": list(bindings)}
    if read is not None:
        fields["read"] = read
    reply = client.request("sql", **fields)
    assert reply["ok"], reply
    return reply


def counts(reply: dict[str, Any]) -> tuple[int, int, int]:
    return reply["rows_read_at_exec"], reply["rows_read"], reply["rows_written"]


def test_sql_cursor_counts(endpoint: Endpoint, open_client: OpenClient) -> None:
    """``rowsRead``/``rowsWritten`` where the runtimes agree: rows a plain ``SELECT``
    returns (read lazily: one row ahead), rows an ``INSERT``, ``UPDATE`` or ``DELETE``
    changes without an index, and several statements reporting the last one's.
    docs/sql.md lists where they differ (rows visited, index rows, schema changes)."""
    require(endpoint, "sql")
    client = open_client()
    sql(client, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    assert sql(client, "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')")["rows_written"] == 3
    assert sql(client, "INSERT INTO t VALUES (?, ?)", 4, "d")["rows_written"] == 1
    everything = sql(client, "SELECT id, v FROM t ORDER BY id")
    assert everything["columns"] == ["id", "v"]
    assert everything["rows"] == [[1, "a"], [2, "b"], [3, "c"], [4, "d"]]
    assert counts(everything) == (1, 4, 0)  # one row ahead at exec; four at the end
    assert counts(sql(client, "SELECT id, v FROM t ORDER BY id", read=0)) == (1, 1, 0)
    two = sql(client, "SELECT id, v FROM t ORDER BY id", read=2)
    assert (two["rows"], counts(two)) == ([[1, "a"], [2, "b"]], (1, 3, 0))  # 2 read, 1 ahead
    by_key = sql(client, "SELECT v FROM t WHERE id = ?", 2)
    assert (by_key["rows"], counts(by_key)) == ([["b"]], (1, 1, 0))
    assert sql(client, "UPDATE t SET v = 'B' WHERE id = 2")["rows_written"] == 1
    assert sql(client, "UPDATE t SET v = v || '!'")["rows_written"] == 4
    assert sql(client, "DELETE FROM t WHERE id = 4")["rows_written"] == 1
    several = sql(client, "INSERT INTO t VALUES (5, 'e'); SELECT id FROM t ORDER BY id")
    assert several["rows"] == [[1], [2], [3], [5]]
    assert counts(several) == (1, 4, 0)  # the last statement's counts only
    assert sql(client, "DELETE FROM t")["rows_written"] == 4


# -- routing through stubs -----------------------------------------------------------------


def test_upgrade_through_a_stub_to_a_unique_id_object(endpoint: Endpoint) -> None:
    """The Worker (``App.fetch``) forwards the upgrade with ``stub.fetch`` to an object made
    by ``newUniqueId()``: that object owns the socket, with its tags, attachment,
    auto-response, hibernation and close events."""
    require(endpoint, "forward")
    object_id = endpoint.new_unique_id()
    url = endpoint.ws_url_of_id(object_id)
    first = Client.connect(endpoint, object_id, url=url, tags=["a", "shared"], attachment={"n": 1})
    second = Client.connect(endpoint, object_id, url=url, tags=["shared"])
    try:
        assert tags_of(first) == ["a", "shared"]
        assert first.request("get_attachment") == {"ok": True, "value": {"n": 1}}
        assert constructor_runs(first) == 1
        assert first.request("broadcast", tag="shared", data="hi") == {"ok": True, "count": 2}
        assert first.next_json() == second.next_json() == {"push": "broadcast", "data": "hi"}
        first.request("set_auto_response", request="ping", response="pong")
        second.send("ping")
        assert second.next_message() == "pong"
        if endpoint.has("evict"):
            first.request("remember", value=1)
            assert endpoint.evict_id(object_id) is True
            assert first.request("recall") == {"ok": True, "value": None}
            assert constructor_runs(second) == 2  # the same object, woken again
            assert tags_of(first) == ["a", "shared"]
            assert first.request("get_attachment")["value"] == {"n": 1}
        answer = first.close(4000, "done")
        assert answer is not None
        assert answer.code == 4000
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while not (events := second.request("events")["events"]):
            assert time.monotonic() < deadline, "no close event recorded"
            time.sleep(0.02)
        assert [(e["kind"], e["tags"], e["code"], e["reason"]) for e in events] == [
            ("close", ["a", "shared"], 4000, "done")
        ]
        assert events[0]["attachment"] == {"n": 1}
        assert [s["tags"] for s in listed(second)] == [["shared"]]
    finally:
        first.shutdown()
        second.shutdown()


# -- the property-based model -----------------------------------------------------------


def test_state_machine(endpoint: Endpoint, name: str) -> None:
    """Random sequences of every operation above, by up to four clients, against a model."""
    counter = iter(range(1_000_000))

    class Machine(HibernationMachine):
        def __init__(self) -> None:
            super().__init__(endpoint, f"{name}-{next(counter)}")  # a fresh object each run

    run_state_machine_as_test(Machine)
