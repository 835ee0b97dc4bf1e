"""The frame reader (``_core/wsreader.py``) against wsproto, the reference it replaced.

Random frame streams, valid and not (unmasked frames, reserved bits, unknown opcodes,
fragmentation errors, bad UTF-8 cut anywhere, Close payloads of every kind, lengths in
too many bytes, compressed messages and garbage marked compressed), cut at random byte
boundaries, go to both the reader and wsproto's server-side ``FrameProtocol`` (with
wsproto's own ``PerMessageDeflate`` when compression is on). Both must yield the same
messages, pings, pongs and Close, and the same close code for a violation, and the
reader must never be later than wsproto: after every chunk, wsproto's events so far are
a prefix of the reader's.

Where the reader differs on purpose, the test says so and holds it to its own rule:

* Close code 1014 (Bad Gateway, registered in 2016) is valid; wsproto refuses it with
  1002. The oracle is wsproto with that one check changed (:class:`Oracle`).
* A control frame between the fragments of a compressed message: wsproto's
  ``PerMessageDeflate`` then forgets the message is compressed and passes its next
  fragments through as they are; the reader inflates them (RFC 7692 6.1: the message is
  compressed, its control frames are not). The oracle's extension is fixed for that
  (:class:`OracleDeflate`).
* With context takeover, after a message whose deflate stream ended (a final block),
  the next message starts a new stream, as the host always did (``_core/deflate.py``);
  wsproto inflates it with the ended one, and fails (1007). ``OracleDeflate`` too.
* A data frame that breaks the fragmentation rules (a continuation outside a message,
  a new message inside one) is refused with 1002 as its header is read, before any of
  it is inflated; wsproto's extension first inflates it as the end of the compressed
  message it interrupts, and may fail at that (1007). ``OracleDeflate`` refuses it at
  its header.
* ``max_message_bytes``: wsproto has no size limit. The reader refuses a message that
  would be larger with 1009, from the frame header on (before the payload), or once its
  inflated bytes pass the limit; up to there both agree, and wsproto's next event is not
  a message within the limit.
* The memory budget (1013) is not exercised here (see ``test_wsreader.py``).
"""

from __future__ import annotations

import itertools
import struct
import zlib
from typing import Final, TypeAlias

from hypothesis import event, given, strategies as st
from strategies import INVALID_UTF8, UTF8_BOUNDARY_CHARS
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import (
    CloseReason,
    Frame,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    RsvBits,
)

from trio_hibernate import Limits, WebSocketCompression
from trio_hibernate._core.budget import MemoryBudget
from trio_hibernate._core.deflate import Compression, Inflater
from trio_hibernate._core.wsevents import PeerClose, Ping, Pong, Violation
from trio_hibernate._core.wsreader import FrameReader

#: A normalized event: a whole message, or ("ping"|"pong", payload), ("close", code,
#: reason), ("violation", code).
Normal: TypeAlias = str | bytes | tuple[object, ...]

UNLIMITED: Final = 1 << 40
MASK: Final = st.binary(min_size=4, max_size=4)
CLOSE_CODES: Final = (
    *(1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014),
    *(3000, 4999, 0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535),
)


class Oracle(FrameProtocol):
    """wsproto's server-side frame protocol, but for the one rule the reader changes on
    purpose: a Close with code 1014 is valid (wsproto: 1002, "unknown reserved code")."""

    def _process_close(self, frame: Frame) -> Frame:
        data = frame.payload
        assert isinstance(data, bytes | bytearray)
        if bytes(data[:2]) == b"\x03\xf6":
            try:
                reason = bytes(data[2:]).decode()
            except UnicodeDecodeError as exc:
                raise ParseFailed(str(exc), 1007) from None  # type: ignore[arg-type]
            return Frame(frame.opcode, (1014, reason), frame.frame_finished, True)
        return super()._process_close(frame)


class OracleDeflate(PerMessageDeflate):
    """wsproto's permessage-deflate, but a control frame leaves the state of the message
    it interrupts alone (wsproto's resets it: the next fragments go uninflated), and a
    deflate stream that ended is not inflated into (see the module)."""

    _control = False
    _in_message = False
    _in_message_after = False

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        self._control = opcode.iscontrol()
        if self._control:
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else RsvBits(True, False, False)
        assert isinstance(proto, FrameDecoder)
        fin = bool(proto.buffer.buffer[0] & 0x80)  # the header being read starts it
        if (opcode is Opcode.CONTINUATION) is not self._in_message:
            return CloseReason.PROTOCOL_ERROR
        # Taken at the frame's end: wsproto reads a header again when its mask is cut.
        self._in_message_after = not fin
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if self._control:
            return data
        return super().frame_inbound_payload_data(proto, data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if self._control:
            return None
        self._in_message = self._in_message_after
        result = super().frame_inbound_complete(proto, fin)
        if fin and self._decompressor is not None and self._decompressor.eof:
            self._decompressor = None  # a final block ended the stream: a new one follows
        return result


class OracleReader:
    """The oracle's events, normalized (messages reassembled)."""

    def __init__(self, deflate: bool, takeover: bool) -> None:
        extensions = []
        if deflate:
            extension = OracleDeflate()
            offer = "permessage-deflate; client_max_window_bits"
            if not takeover:
                offer += "; client_no_context_takeover"
            extension.accept(offer)
            extensions.append(extension)
        self.proto = Oracle(False, extensions)  # type: ignore[arg-type]
        self.events: list[Normal] = []
        self.parts: list[str | bytes] = []

    def feed(self, data: bytes) -> None:
        last = self.events[-1] if self.events else None
        if isinstance(last, tuple) and last[0] in ("close", "violation"):
            return
        self.proto.receive_bytes(data)
        try:
            for frame in self.proto.received_frames():
                self._frame(frame)
        except ParseFailed as exc:
            self.events.append(("violation", int(exc.code)))

    def _frame(self, frame: Frame) -> None:
        payload = frame.payload
        if frame.opcode is Opcode.PING:
            self.events.append(("ping", bytes(payload)))  # type: ignore[arg-type]
        elif frame.opcode is Opcode.PONG:
            self.events.append(("pong", bytes(payload)))  # type: ignore[arg-type]
        elif frame.opcode is Opcode.CLOSE:
            assert isinstance(payload, tuple)
            self.events.append(("close", int(payload[0]), payload[1]))
        else:
            assert isinstance(payload, str | bytes)
            self.parts.append(payload)
            if frame.message_finished:
                parts, self.parts = self.parts, []
                if frame.opcode is Opcode.TEXT:
                    self.events.append("".join(p for p in parts if isinstance(p, str)))
                else:
                    self.events.append(b"".join(p for p in parts if isinstance(p, bytes)))


def normal(event: object) -> Normal:
    if isinstance(event, str | bytes):
        return event
    if isinstance(event, Ping):
        return ("ping", event.payload)
    if isinstance(event, Pong):
        return ("pong", event.payload)
    if isinstance(event, PeerClose):
        return ("close", event.code, event.reason)
    assert isinstance(event, Violation)
    return ("violation", event.code)


# -- frames -------------------------------------------------------------------------------


def frame(
    opcode: int,
    payload: bytes,
    mask: bytes | None,
    *,
    fin: bool = True,
    rsv: int = 0,
    length: str = "minimal",
) -> bytes:
    """A client frame: ``mask`` None sends it unmasked; ``length`` "16"/"64" encodes the
    length in more bytes than needed, "top" sets the 64-bit length's top bit."""
    size = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    masked = 0x80 if mask is not None else 0
    if length == "top":
        head = bytes((first, masked | 127)) + struct.pack("!Q", size | 1 << 63)
    elif length == "64" or size > 65535:
        head = bytes((first, masked | 127)) + struct.pack("!Q", size)
    elif length == "16" or size > 125:
        head = bytes((first, masked | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, masked | size))
    if mask is None:
        return head + payload
    key = (mask * (size // 4 + 1))[:size]
    return head + mask + bytes(a ^ b for a, b in zip(payload, key, strict=True))


texts = st.text(st.sampled_from(UTF8_BOUNDARY_CHARS), max_size=40) | st.text(max_size=200)


@st.composite
def utf8_payloads(draw: st.DrawFn) -> bytes:
    """Text as UTF-8, sometimes with a byte sequence that is not UTF-8 put in."""
    data = draw(texts).encode()
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(INVALID_UTF8)) + data[at:]
    return data


@st.composite
def close_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return b""
    if kind == 1:
        return draw(st.binary(min_size=1, max_size=1))
    code = struct.pack("!H", draw(st.sampled_from(CLOSE_CODES)))
    if kind == 2:
        return code + draw(st.sampled_from(INVALID_UTF8))
    return code + draw(st.text(max_size=40)).encode()[:123]


@st.composite
def cuts(draw: st.DrawFn, data: bytes, pieces: int) -> list[bytes]:
    """``data`` cut in up to ``pieces`` (some may be empty)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=pieces - 1)))
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


@st.composite
def messages(draw: st.DrawFn, deflate: bool) -> list[bytes]:
    """A data message as frames: fragmented at random, maybe compressed, with control
    frames between its fragments."""
    text = draw(st.booleans())
    payload = draw(utf8_payloads()) if text else draw(st.binary(max_size=300))
    compressed = deflate and draw(st.booleans())
    if compressed and draw(st.integers(0, 5)):  # else garbage marked compressed
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        payload = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        payload = payload[:-4] if payload.endswith(b"\x00\x00\xff\xff") else payload
    pieces = draw(cuts(payload, draw(st.integers(1, 4))))
    frames = []
    for index, piece in enumerate(pieces):
        first = index == 0
        opcode = (1 if text else 2) if first else 0
        rsv = 0x40 if compressed and first else 0
        frames.append(frame(opcode, piece, draw(MASK), fin=index == len(pieces) - 1, rsv=rsv))
        if index < len(pieces) - 1 and draw(st.integers(0, 3)) == 0:
            frames.append(draw(controls()))
    return frames


@st.composite
def controls(draw: st.DrawFn) -> bytes:
    opcode = draw(st.sampled_from((9, 10, 8)))
    payload = draw(close_payloads()) if opcode == 8 else draw(st.binary(max_size=20))
    if draw(st.integers(0, 15)) == 0:
        payload = draw(st.binary(min_size=126, max_size=130))  # too long for control
    return frame(opcode, payload, draw(MASK), fin=draw(st.integers(0, 15)) != 0)


@st.composite
def odd_frames(draw: st.DrawFn) -> bytes:
    """A frame with anything in its header."""
    payload = draw(st.binary(max_size=140))
    return frame(
        draw(st.integers(0, 15)),
        payload,
        draw(MASK) if draw(st.integers(0, 7)) else None,
        fin=draw(st.booleans()),
        rsv=draw(st.sampled_from((0, 0, 0, 0x40, 0x20, 0x10))),
        length=draw(st.sampled_from(("minimal", "minimal", "minimal", "16", "64", "top"))),
    )


@st.composite
def streams(draw: st.DrawFn, deflate: bool) -> bytes:
    items = draw(
        st.lists(
            st.one_of(
                messages(deflate), controls().map(lambda f: [f]), odd_frames().map(lambda f: [f])
            ),
            max_size=6,
        )
    )
    return b"".join(f for item in items for f in item)


# -- the test -------------------------------------------------------------------------------


def run_both(
    stream: bytes, chunks: list[bytes], limit: int, deflate: bool, takeover: bool
) -> tuple[list[Normal], list[Normal]]:
    """Feed both; check the reader is never later than the oracle. Their final events."""
    budget = MemoryBudget(UNLIMITED)
    inflater = None
    if deflate:
        compression = Compression(
            WebSocketCompression(context_takeover=takeover),
            Limits(max_message_bytes=limit),
            budget,
        )
        offer = "permessage-deflate; client_max_window_bits"
        if not takeover:
            offer += "; client_no_context_takeover"
        params = compression.negotiate([offer])
        assert params is not None
        inflater = Inflater(compression, params)
    reader = FrameReader(budget, limit, inflater)
    oracle = OracleReader(deflate, takeover)
    ours: list[Normal] = []
    for chunk in chunks:
        ours.extend(normal(e) for e in reader.feed(chunk))
        oracle.feed(chunk)
        if ("violation", 1009) in ours:
            continue  # the reader stopped early on purpose (see the module)
        assert oracle.events == ours[: len(oracle.events)], "the reader is later than wsproto"
    assert b"".join(chunks) == stream
    # The budget counts the messages returned (their events hold them) and the one in
    # progress; nothing once the reader is done.
    kept = sum(size_of(m) for m in ours if isinstance(m, str | bytes))
    assert budget.used == kept + reader.held
    if ours and isinstance(ours[-1], tuple) and ours[-1][0] in ("close", "violation"):
        assert reader.held == 0
    return ours, oracle.events


def size_of(message: Normal) -> int:
    if isinstance(message, str):
        return len(message.encode())
    assert isinstance(message, bytes)
    return len(message)


@given(st.data())
def test_the_reader_agrees_with_wsproto(data: st.DataObject) -> None:
    deflate = data.draw(st.booleans(), label="deflate")
    takeover = deflate and data.draw(st.booleans(), label="context takeover")
    stream = data.draw(streams(deflate), label="stream")
    chunks = data.draw(cuts(stream, data.draw(st.integers(1, 12))), label="chunks")
    limit = data.draw(st.sampled_from((UNLIMITED, UNLIMITED, 1, 50, 200)), label="limit")
    ours, theirs = run_both(stream, chunks, limit, deflate, takeover)
    last = ours[-1] if ours else None
    event(f"ends with {last[0] if isinstance(last, tuple) else type(last).__name__}")
    if ("violation", 1009) not in ours:
        assert ours == theirs
        assert all(size_of(m) <= limit for m in theirs if isinstance(m, str | bytes))
        return
    # The deliberate difference: wsproto has no limit.
    stop = ours.index(("violation", 1009))
    assert stop == len(ours) - 1
    assert ours[:stop] == theirs[:stop]
    following = theirs[stop] if stop < len(theirs) else None
    assert not (isinstance(following, str | bytes) and size_of(following) <= limit), following
    assert sum(len(c) for c in chunks) > limit
