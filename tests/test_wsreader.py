"""The frame reader's rules, one by one (sans-IO: no Trio); the differential test against
wsproto is ``test_wsreader_differential.py``. Also the closing handshake's table and the
control frames the server encodes."""

from __future__ import annotations

import struct
import zlib

import pytest

from trio_hibernate import Limits, WebSocketCompression
from trio_hibernate._core.budget import MemoryBudget
from trio_hibernate._core.deflate import Compression, Inflater
from trio_hibernate._core.frames import encode_close, encode_pong
from trio_hibernate._core.wsevents import (
    CloseState,
    ClosingHandshake,
    PeerClose,
    Ping,
    Pong,
    Violation,
    is_valid_close_code,
)
from trio_hibernate._core.wsreader import FrameReader
from trio_hibernate._errors import InvalidTransition

MASK = b"\x01\x02\x03\x04"


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    size = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if masked else 0
    if size > 65535:
        head = bytes((first, bit | 127)) + struct.pack("!Q", size)
    elif size > 125:
        head = bytes((first, bit | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, bit | size))
    if not masked:
        return head + payload
    key = (MASK * (size // 4 + 1))[:size]
    return head + MASK + bytes(a ^ b for a, b in zip(payload, key, strict=True))


def reader(limit: int = 1000, budget: int = 10**9, inflater: Inflater | None = None) -> FrameReader:
    return FrameReader(MemoryBudget(budget), limit, inflater)


def violation(stream: bytes, limit: int = 1000) -> int:
    events = reader(limit).feed(stream)
    assert isinstance(events[-1], Violation), events
    return events[-1].code


# -- what is read -----------------------------------------------------------------------------


def test_several_frames_in_one_feed_and_one_frame_in_many() -> None:
    stream = (
        frame(1, "hé".encode())
        + frame(2, b"\x00\x01")
        + frame(1, b"fragm", fin=False)
        + frame(9, b"ping")
        + frame(0, "ént".encode())
        + frame(10, b"pong")
        + frame(2, b"x" * 70_000)
        + frame(8, struct.pack("!H", 1000) + b"bye")
    )
    expected = ["hé", b"\x00\x01", Ping(b"ping"), "fragmént", Pong(b"pong"), b"x" * 70_000]
    expected.append(PeerClose(1000, "bye"))
    assert reader(limit=100_000).feed(stream) == expected
    for step in (1, 3, 1000):
        r = reader(limit=100_000)
        events = [e for i in range(0, len(stream), step) for e in r.feed(stream[i : i + step])]
        assert events == expected
        assert r.feed(frame(1, b"after the Close")) == []


def test_an_empty_close_reads_as_1005() -> None:
    assert reader().feed(frame(8, b"")) == [PeerClose(1005, "")]


def test_bytes_after_the_close_are_noted_not_read() -> None:
    """What follows the peer's Close is not read; that there was some is noted (the
    server then lingers instead of resetting the connection on unread bytes)."""
    done = reader()
    assert done.feed(frame(8, b"")) == [PeerClose(1005, "")]
    assert not done.more_after_close
    broken = reader()
    assert broken.feed(frame(8, b"") + frame(1, b"more")) == [PeerClose(1005, "")]
    assert broken.more_after_close
    assert broken.feed(frame(1, b"and more")) == []


# -- refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "code"),
    [
        (frame(1, b"hi", masked=False), 1002),
        (frame(1, b"hi", rsv=0x40), 1002),  # RSV1 without permessage-deflate
        (frame(1, b"hi", rsv=0x20), 1002),
        (frame(1, b"hi", rsv=0x10), 1002),
        (frame(3, b""), 1002),
        (frame(0xB, b""), 1002),
        (frame(9, b"", fin=False), 1002),
        (frame(9, b"x" * 126), 1002),
        (frame(0, b"x"), 1002),  # a continuation outside a message
        (frame(1, b"x", fin=False) + frame(2, b"y"), 1002),  # a new message inside one
        (b"\x81\xfe\x00\x05" + MASK + b"12345", 1002),  # a 16-bit length of 5
        (b"\x81\xff" + struct.pack("!Q", 5) + MASK, 1002),  # a 64-bit length of 5
        (b"\x81\xff" + struct.pack("!Q", 1 << 63 | 70_000), 1002),  # the top bit set
        (frame(1, b"\xc3"), 1007),
        (frame(1, b"ok\xc3", fin=False) + frame(0, b"\xa9") + frame(1, b"\xff"), 1007),
        (frame(1, b"a", fin=False) + frame(0, b"\xed\xa0\x80"), 1007),  # a surrogate
        (frame(8, b"\x03"), 1002),
        (frame(8, struct.pack("!H", 1000) + b"\xff"), 1007),
    ],
)
def test_protocol_violations(stream: bytes, code: int) -> None:
    assert violation(stream) == code


def test_bad_utf8_fails_as_soon_as_it_arrives() -> None:
    """Before the rest of the frame, or of the message, is here."""
    r = reader()
    assert r.feed(frame(1, b"ok", fin=False)) == []
    head = frame(0, b"\xff" + b"x" * 50)[:7]  # the header, the mask, one bad byte
    events = r.feed(head)
    assert [e.code for e in events if isinstance(e, Violation)] == [1007]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_close_codes_no_close_may_carry(code: int) -> None:
    assert not is_valid_close_code(code)
    assert violation(frame(8, struct.pack("!H", code))) == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1013, 1014, 3000, 4999])
def test_close_codes_a_peer_may_send(code: int) -> None:
    """1014 included (wsproto refuses it)."""
    assert is_valid_close_code(code)
    assert reader().feed(frame(8, struct.pack("!H", code) + b"r")) == [PeerClose(code, "r")]


# -- limits ----------------------------------------------------------------------------------


def test_an_oversize_message_is_refused_from_its_header() -> None:
    """No payload needed: the header says it."""
    r = reader(limit=100)
    assert [e.code for e in r.feed(b"\x82\xfe\x00\xc8") if isinstance(e, Violation)] == [1009]
    fragments = frame(2, b"x" * 60, fin=False) + frame(0, b"y" * 41)[:4]
    assert violation(fragments, limit=100) == 1009
    assert reader(limit=100).feed(frame(2, b"x" * 100)) == [b"x" * 100]


def test_the_budget_counts_the_message_in_progress() -> None:
    budget = MemoryBudget(100)
    r = FrameReader(budget, 1000)
    assert r.feed(frame(2, b"x" * 60, fin=False)) == []
    assert (budget.used, r.held) == (60, 60)
    events = r.feed(frame(0, b"y" * 50))
    assert events == [Violation(1013, "a 110-byte message")]
    assert (budget.used, r.held) == (0, 0)  # given back


def test_a_whole_message_stays_counted_for_its_event() -> None:
    budget = MemoryBudget(100)
    r = FrameReader(budget, 1000)
    assert r.feed(frame(1, b"a" * 40) + frame(2, b"b" * 40)) == ["a" * 40, b"b" * 40]
    assert (budget.used, r.held) == (80, 0)
    assert r.feed(frame(2, b"c" * 40)) == [Violation(1013, "a 40-byte message")]
    assert budget.used == 80


def test_discard_gives_back_a_message_cut_short() -> None:
    budget = MemoryBudget(1000)
    r = FrameReader(budget, 1000)
    r.feed(frame(2, b"x" * 100)[:50])
    assert r.partial
    assert budget.used == r.held == 44  # the payload so far
    r.discard()
    assert (budget.used, r.held) == (0, 0)
    assert r.feed(frame(1, b"late")) == []


# -- permessage-deflate ----------------------------------------------------------------------


def deflate_reader(limit: int = 1000, budget: int = 10**9) -> FrameReader:
    memory = MemoryBudget(budget)
    compression = Compression(WebSocketCompression(), Limits(max_message_bytes=limit), memory)
    params = compression.negotiate(["permessage-deflate"])
    assert params is not None
    return FrameReader(memory, limit, Inflater(compression, params))


def compress(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_compressed_messages_are_inflated() -> None:
    data = compress("héllo ".encode() * 50)
    stream = frame(1, data[:5], fin=False, rsv=0x40) + frame(9, b"") + frame(0, data[5:])
    assert deflate_reader().feed(stream) == [Ping(b""), "héllo " * 50]


@pytest.mark.parametrize(
    ("stream", "code"),
    [
        (frame(9, b"", rsv=0x40), 1002),  # RFC 7692 6.1: not on a control frame
        (frame(1, b"x", fin=False) + frame(0, b"y", rsv=0x40), 1002),  # nor a continuation
        (frame(1, b"x", rsv=0x20), 1002),
        (frame(2, b"\xff\xff\xff", rsv=0x40), 1007),  # not deflate
        (frame(2, compress(b"\x00" * 5000), rsv=0x40), 1009),  # a bomb, past the limit
    ],
)
def test_compressed_violations(stream: bytes, code: int) -> None:
    events = deflate_reader().feed(stream)
    assert isinstance(events[-1], Violation)
    assert events[-1].code == code


def test_inflating_stops_at_the_budget() -> None:
    r = deflate_reader(limit=10_000, budget=1000)
    assert r.feed(frame(2, compress(b"\x00" * 5000), rsv=0x40)) == [
        Violation(1013, "inflating a compressed message")
    ]


# -- closing handshake and control frames sent --------------------------------------------------


def test_the_closing_handshake() -> None:
    ours_first = ClosingHandshake()
    ours_first.check_valid()
    assert ours_first.send_close(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert ours_first.state is CloseState.LOCAL_CLOSING
    with pytest.raises(InvalidTransition):
        ours_first.send_close(1000)
    assert ours_first.received_close() is CloseState.CLOSED
    theirs_first = ClosingHandshake()
    assert theirs_first.received_close() is CloseState.REMOTE_CLOSING
    with pytest.raises(InvalidTransition):
        theirs_first.received_close()
    theirs_first.send_close(None)
    assert theirs_first.state is CloseState.CLOSED
    theirs_first.check_valid()


def test_encoded_control_frames() -> None:
    assert encode_close(None, "ignored") == encode_close(1005) == b"\x88\x00"
    assert encode_close(1006) == encode_close(1015) == b"\x88\x02\x03\xe8"
    long = encode_close(4000, "é" * 100)  # cut at a character boundary
    assert len(long) == 2 + 2 + 122
    assert long[4:].decode() == "é" * 61
    assert encode_pong(b"p") == b"\x8a\x01p"
