"""A Hypothesis state machine: several real clients against one object, checked against a model.

The model is what the spec (shared/spec/hibernation-semantics.md) says an object's sockets
look like: who is connected with which tags and attachment, the auto-response pair and which
sockets matched it, what the object holds in memory, how many times it was constructed, and
which close events it must have recorded. Every reply is compared with it.

Only behaviour on which workerd and trio-hibernate agree by design is generated here. Places
where they differ on purpose (the spec's Rules) are pinned by the example cases in suite.py.
In particular get_websockets() results are compared as sets: their order is checked by its
own case.
"""

from __future__ import annotations

import json
import time
from typing import Any, Final

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conformance.client import Client, Endpoint

__all__ = ["HibernationMachine", "canonical"]

MAX_CLIENTS: Final = 4
#: Tags drawn for sockets; the last one is exactly 256 UTF-8 bytes, the limit.
TAG_POOL: Final = ("red", "green", "", "ünï €", "é" * 128)
AUTO_REQUESTS: Final = ("ping", "PING", "ping ", "hb")
OTHER_TEXTS: Final = ("hello", "{}", "[1, 2]", "null", '{"id": 1}')
CLOSE_CODES: Final = (None, 1000, 1001, 3000, 4000, 4999)
#: ``ws.close()`` without a code is pinned by test_object_close_without_code instead.
OBJECT_CLOSE_CODES: Final = CLOSE_CODES[1:]
INVALID_CLOSE_CODES: Final = (999, 1004, 1005, 1006, 1015, 5000)
DROP_REASON: Final = "WebSocket disconnected without sending Close frame."
#: Slack allowed between the client's clock and an auto-response timestamp.
CLOCK_SLACK_MS: Final = 1000

# JSON values that both runtimes store exactly: integers JavaScript represents exactly,
# finite floats, text without lone surrogates, small enough for every attachment limit.
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text("abcxyz_01", max_size=6), children, max_size=4)
    ),
    max_leaves=8,
)
REASONS = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


@attrs.define(eq=False, repr=False)
class Peer:
    """One open client and what the object should know about its socket."""

    client: Client
    key: str
    """A tag only this socket carries (its name in the model)."""
    tags: list[str]
    attachment: Any = None
    """None: never set (or set to null); the object answers null either way."""
    timestamp_ms: int | None = None
    """The latest auto-response timestamp the object reported for this socket."""
    matched: tuple[float, float] | None = None
    """Client-clock bounds (ms) of this socket's latest auto-response match."""

    def __repr__(self) -> str:
        return f"<peer {self.key} tags={self.tags}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # Hypothesis prints this in failing examples


def _normalized(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


def canonical(value: object) -> str:
    """``value`` as canonical JSON: sorted keys, integral floats as integers (JavaScript
    has one number type, so 2.0 comes back as 2)."""

    def walk(item: object) -> object:
        if isinstance(item, int | float) and not isinstance(item, bool):
            number = float(item)  # what JavaScript holds; exact for the ints generated
            return int(number) if number.is_integer() and abs(number) < 2**53 else number
        if isinstance(item, list | tuple):
            return [walk(x) for x in item]
        if isinstance(item, dict):
            return {key: walk(x) for key, x in item.items()}
        return item

    return json.dumps(walk(value), sort_keys=True)


def _same_json(left: object, right: object) -> bool:
    return canonical(left) == canonical(right)


class HibernationMachine(RuleBasedStateMachine):
    """Drives up to MAX_CLIENTS sockets of one fresh object on ``endpoint``."""

    def __init__(self, endpoint: Endpoint, name: str) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.name = name
        self.peers: list[Peer] = []
        self.next_key = 0
        # The object, as the model sees it.
        self.live = False
        self.constructor_runs = 0
        self.memo: Any = None
        self.pair: tuple[str, str] | None = None
        self.events: list[dict[str, Any]] = []

    # -- model helpers ---------------------------------------------------------------

    def event(self) -> None:
        """An event reaches the object: it is constructed first if it hibernated."""
        if not self.live:
            self.live = True
            self.constructor_runs += 1
            self.memo = None

    def pick(self, data: st.DataObject, label: str = "client") -> Peer:
        return data.draw(st.sampled_from(self.peers), label=label)

    def expect_event(self, record: dict[str, Any]) -> None:
        """The object records ``record`` (a close or error event) soon; check all events."""
        self.events.append(record)
        recorded = self.endpoint.wait_for_events(self.name, len(self.events))
        self.event()  # the poll itself is an HTTP request to the object
        assert len(recorded) == len(self.events), f"events: {recorded} != {self.events}"
        for got, want in zip(recorded, self.events, strict=True):
            subset = {key: got.get(key) for key in want}
            assert _same_json(subset, want), f"event {got} does not match {want}"

    def forget(self, peer: Peer) -> None:
        self.peers.remove(peer)
        peer.client.shutdown()

    # -- connecting ------------------------------------------------------------------

    @initialize()
    def first_client(self) -> None:
        self.connect_peer([], ...)

    @precondition(lambda self: len(self.peers) < MAX_CLIENTS)
    @rule(
        extra=st.lists(st.sampled_from(TAG_POOL), max_size=4),
        attachment=st.just(...) | JSON_VALUES,
    )
    def connect(self, extra: list[str], attachment: object) -> None:
        self.connect_peer(extra, attachment)

    def connect_peer(self, extra: list[str], attachment: object) -> None:
        key = f"c{self.next_key}"
        self.next_key += 1
        tags = [key, *extra]
        client = Client.connect(self.endpoint, self.name, tags=tags, attachment=attachment)
        self.event()
        self.peers.append(
            Peer(client, key, _normalized(tags), None if attachment is ... else attachment)
        )

    # -- per-socket state ------------------------------------------------------------

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), value=JSON_VALUES)
    def set_attachment(self, data: st.DataObject, value: object) -> None:
        peer = self.pick(data)
        assert peer.client.request("set_attachment", value=value) == {"ok": True}
        self.event()
        peer.attachment = value

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def get_attachment(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        reply = peer.client.request("get_attachment")
        self.event()
        assert reply["ok"]
        assert _same_json(reply["value"], peer.attachment), (reply, peer.attachment)

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def get_tags(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        reply = peer.client.request("tags")
        self.event()
        assert reply == {"ok": True, "tags": peer.tags}

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def list_sockets(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        choices: list[str | None] = [None, *TAG_POOL, "absent", *(p.key for p in self.peers)]
        tag = data.draw(st.sampled_from(choices), label="tag")
        reply = peer.client.request("list", **({} if tag is None else {"tag": tag}))
        self.event()
        assert reply["ok"]
        expected = [
            {"tags": p.tags, "ready_state": 1, "attachment": p.attachment, "self": p is peer}
            for p in self.peers
            if tag is None or tag in p.tags
        ]
        assert _sorted(reply["sockets"]) == _sorted(expected)

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), payload=_TEXT)
    def broadcast(self, data: st.DataObject, payload: str) -> None:
        sender = self.pick(data, "sender")
        tag = data.draw(st.sampled_from([None, *TAG_POOL, *(p.key for p in self.peers)]))
        reply = sender.client.request(
            "broadcast", data=payload, **({} if tag is None else {"tag": tag})
        )
        self.event()
        targets = [p for p in self.peers if tag is None or tag in p.tags]
        assert reply == {"ok": True, "count": len(targets)}
        for target in targets:
            assert target.client.next_json() == {"push": "broadcast", "data": payload}

    # -- messages and auto-response --------------------------------------------------

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), text=st.sampled_from(AUTO_REQUESTS + OTHER_TEXTS) | _TEXT)
    def send_text(self, data: st.DataObject, text: str) -> None:
        peer = self.pick(data)
        before = time.time() * 1000
        peer.client.send(text)
        message = peer.client.next_message()
        after = time.time() * 1000
        if self.pair is not None and text == self.pair[0]:
            assert message == self.pair[1], "the auto-response"
            peer.matched = (before, after)  # no event: the object is not woken
        else:
            assert isinstance(message, str), message
            assert json.loads(message) == {"echo": text}
            self.event()

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), blob=st.binary(max_size=16) | st.just(b"ping"))
    def send_binary(self, data: st.DataObject, blob: bytes) -> None:
        peer = self.pick(data)
        peer.client.send(blob)
        assert peer.client.next_message() == blob  # binary never matches the auto-response
        self.event()

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), request=st.sampled_from(AUTO_REQUESTS), response=_TEXT)
    def set_auto_response(self, data: st.DataObject, request: str, response: str) -> None:
        peer = self.pick(data)
        reply = peer.client.request("set_auto_response", request=request, response=response)
        self.event()
        assert reply == {"ok": True}
        self.pair = (request, response)

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def clear_auto_response(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        assert peer.client.request("set_auto_response") == {"ok": True}
        self.event()
        self.pair = None

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def get_auto_response(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        reply = peer.client.request("get_auto_response")
        self.event()
        assert reply == {"ok": True, "pair": None if self.pair is None else list(self.pair)}

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def auto_response_timestamp(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        reply = peer.client.request("auto_response_timestamp")
        self.event()
        stamp = reply["timestamp_ms"]
        if peer.matched is None:
            assert stamp is None, f"no match yet, but timestamp {stamp}"
            return
        assert isinstance(stamp, int | float), reply
        low, high = peer.matched
        assert low - CLOCK_SLACK_MS <= stamp <= high + CLOCK_SLACK_MS, (stamp, peer.matched)
        assert peer.timestamp_ms is None or stamp >= peer.timestamp_ms
        peer.timestamp_ms = int(stamp)

    # -- the object's memory and lifecycle -------------------------------------------

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), value=JSON_VALUES)
    def remember(self, data: st.DataObject, value: object) -> None:
        peer = self.pick(data)
        assert peer.client.request("remember", value=value) == {"ok": True}
        self.event()
        self.memo = value

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def recall(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        reply = peer.client.request("recall")
        self.event()
        assert reply["ok"]
        assert _same_json(reply["value"], self.memo), (reply, self.memo)

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def stats(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        reply = peer.client.request("stats")
        self.event()
        assert reply["constructor_runs"] == self.constructor_runs, (reply, self.constructor_runs)

    @precondition(lambda self: self.endpoint.has("evict"))
    @rule()
    def evict(self) -> None:
        assert self.endpoint.evict(self.name) == self.live
        self.live = False
        self.memo = None

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def raise_in_handler(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        peer.client.send_op("raise")
        self.event()
        reply = peer.client.request("recall")  # no reply to "raise"; the socket stays open
        assert reply["ok"]
        assert _same_json(reply["value"], self.memo), (reply, self.memo)

    # -- closing ---------------------------------------------------------------------

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), code=st.sampled_from(CLOSE_CODES), reason=REASONS)
    def client_closes(self, data: st.DataObject, code: int | None, reason: str) -> None:
        peer = self.pick(data)
        reason = reason if code is not None else ""
        answer = peer.client.close(code, reason)
        assert answer is not None, "no Close frame came back"
        assert (answer.code, answer.reason) == (code or 1005, reason)
        self.forget(peer)
        self.expect_close(peer, code or 1005, reason, was_clean=True)

    @precondition(lambda self: self.peers)
    @rule(data=st.data())
    def client_drops(self, data: st.DataObject) -> None:
        peer = self.pick(data)
        peer.client.abort()
        self.forget(peer)
        self.expect_close(peer, 1006, DROP_REASON, was_clean=False)

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), code=st.sampled_from(OBJECT_CLOSE_CODES), reason=REASONS)
    def object_closes(self, data: st.DataObject, code: int | None, reason: str) -> None:
        sender = self.pick(data, "sender")
        target = self.pick(data, "target")
        reason = reason if code is not None else ""
        args: dict[str, object] = {} if code is None else {"code": code, "reason": reason}
        if sender is target:
            sender.client.send_op("close", **args)  # no reply: the Close frame answers
        else:
            reply = sender.client.request("close", tag=target.key, **args)
            assert reply == {"ok": True, "count": 1, "send_errors": [], "close_again_errors": []}
        self.event()
        frame = target.client.wait_for_close_frame()
        assert frame is not None, "the object's Close frame did not arrive"
        assert (frame.code, frame.reason) == (code or 1005, reason)
        self.forget(target)
        # The client library echoes the Close frame, so the handler sees the same code.
        self.expect_close(target, code or 1005, reason, was_clean=True)

    @precondition(lambda self: self.peers)
    @rule(data=st.data(), code=st.sampled_from(INVALID_CLOSE_CODES))
    def invalid_close(self, data: st.DataObject, code: int) -> None:
        peer = self.pick(data)
        reply = peer.client.request("close", code=code)
        self.event()
        assert reply["ok"] is False, reply
        assert reply["error"] == "invalid_close_code", reply

    def expect_close(self, peer: Peer, code: int, reason: str, *, was_clean: bool) -> None:
        self.expect_event(
            {
                "kind": "close",
                "tags": peer.tags,
                "code": code,
                "reason": reason,
                "was_clean": was_clean,
                "attachment": peer.attachment,
                "listed": True,
            }
        )

    # -- after every step ------------------------------------------------------------

    @invariant()
    def nothing_unexpected_arrived(self) -> None:
        for peer in self.peers:
            assert not peer.client.inbox, f"{peer.key} got unexpected {list(peer.client.inbox)}"

    def teardown(self) -> None:
        for peer in self.peers:
            peer.client.shutdown()


def _sorted(sockets: list[dict[str, Any]]) -> list[str]:
    return sorted(canonical(s) for s in sockets)
