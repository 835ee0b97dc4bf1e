"""Reading a client's WebSocket frames (RFC 6455 section 5), sans-IO.

A :class:`FrameReader` takes the bytes a server receives after the 101, in chunks of any
size (:meth:`FrameReader.feed`: one receive may carry many frames, a frame may come in
many receives), and returns what they complete, in order (``wsevents.py``): whole data
messages (``str`` for text, ``bytes`` for binary: fragments reassembled, inflated if
compressed), a ``Ping``, a ``Pong``, the peer's ``PeerClose``, or a ``Violation``: the
peer broke the protocol or a limit and the connection is to be closed with its code.
After a Close or a Violation the reader reads nothing more.

The rules, refused with 1002 unless said otherwise:

* client frames are masked (RFC 6455 5.1);
* RSV bits are clear, but RSV1 on the first frame of a message when permessage-deflate
  was negotiated (RFC 7692 6.1);
* opcodes are 0-2 and 8-10; control frames (8-10) are not fragmented and carry at most
  125 bytes (5.5);
* a length takes as few bytes as it can, and a 64-bit one has its top bit clear (5.2);
* a continuation frame continues a message, a new message waits for the last to end (5.4);
* text is UTF-8, checked as its bytes arrive, across fragments (8.1): 1007;
* a Close frame is empty or carries a code (``wsevents.is_valid_close_code``) and a UTF-8
  reason (5.5.1, 7.4): a 1-byte payload and other codes 1002, a bad reason 1007;
* a message holds at most ``max_message_bytes``: 1009 as soon as a frame's header says
  so, before its payload is read (a compressed one: once its inflated bytes pass it);
* the bytes of the message being received are counted in the host's memory budget as
  they arrive: 1013 once it is spent. A whole message stays counted when returned: its
  event carries the bytes, and whoever drops it gives them back.

These are wsproto's rules and its timing (a violation shows in the feed that completes it,
or earlier), but for code 1014 (registered in 2016), which wsproto refuses, and the two
limits, which it lacks: ``tests/test_wsreader_differential.py`` holds the reader to it.

Cost: a small whole message in one frame is unmasked (an int XOR) and decoded in one
pass; other payloads are unmasked and decoded chunk by chunk as they arrive (never
buffered twice) and joined at the message's end.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Any, Final

from .._errors import WebSocketProtocolError
from .wsevents import PeerClose, Violation, control_event

if TYPE_CHECKING:
    from .budget import MemoryBudget
    from .deflate import Inflater
    from .wsevents import ReaderEvent

__all__ = ["FrameReader"]


_new_utf8_decoder: Final = codecs.getincrementaldecoder("utf-8")


def _unmask(data: bytes, mask: bytes) -> bytes:
    size = len(data)
    return (
        int.from_bytes(data, "big") ^ int.from_bytes((mask * ((size >> 2) + 1))[:size], "big")
    ).to_bytes(size, "big")


def _refuse(reason: str, code: int = 1002) -> WebSocketProtocolError:
    return WebSocketProtocolError(code, reason)


class FrameReader:
    """The inbound half of one server-side WebSocket (see the module).

    Args:
        budget: The host's memory budget, which counts the message being received.
        max_message_bytes: The largest message accepted (``Limits.max_message_bytes``).
        inflater: The socket's permessage-deflate, if negotiated.
    """

    __slots__ = (
        "_budget",
        "_buffer",
        "_compressed",
        "_decoder",
        "_done",
        "_fin",
        "_inflater",
        "_mask",
        "_max_bytes",
        "_opcode",
        "_parts",
        "_remaining",
        "held",
        "more_after_close",
    )

    def __init__(
        self, budget: MemoryBudget, max_message_bytes: int, inflater: Inflater | None = None
    ) -> None:
        self._budget = budget
        self._max_bytes = max_message_bytes
        self._inflater = inflater
        self._buffer = b""  # the start of a frame whose header or control payload is cut
        self._done = False  # a Close or a violation: nothing more is read
        # The data frame whose payload is cut: bytes to come, its mask (turned to where
        # the next byte is), its FIN bit.
        self._remaining = 0
        self._mask = b""
        self._fin = False
        # The message in progress (opcode 0: none): its parts, decoded if text.
        self._opcode = 0
        self._compressed = False
        self._parts: list[Any] | None = None  # str parts for text, bytes for binary
        self._decoder: codecs.IncrementalDecoder | None = None
        self.held = 0
        """Bytes of the message in progress (inflated), counted in the memory budget."""
        self.more_after_close = False
        """The peer sent bytes after its Close frame (a broken client, still sending)."""

    @property
    def partial(self) -> bool:
        """Part of a frame or of a message is here: the rest must follow."""
        return bool(self._opcode or self._buffer)

    def feed(self, data: bytes) -> list[ReaderEvent]:
        """The events ``data`` completes, in order; the last is a ``PeerClose`` or a
        ``Violation`` if the reader is done. The bytes of each message returned
        stay counted in the budget (see the module)."""
        out: list[ReaderEvent] = []
        if self._done:
            return out
        try:
            buf = self._buffer + data if self._buffer else data
            self._buffer = b""
            end = len(buf)
            pos = 0
            if self._remaining:
                pos = self._payload(buf, 0, end, out)
            max_bytes = self._max_bytes
            budget = self._budget
            while end - pos >= 2:
                first = buf[pos]
                second = buf[pos + 1]
                if (first == 0x81 or first == 0x82) and 0x80 <= second <= 0xFD:
                    # The fast path: a whole message in a masked frame of <= 125 bytes
                    # (larger ones take the general path below, in one piece or more).
                    start = pos + 6
                    stop = start + second - 0x80
                    if stop <= end and not self._opcode and stop - start <= max_bytes:
                        payload = _unmask(buf[start:stop], buf[pos + 2 : start])
                        pos = stop
                        if first == 0x81:
                            try:
                                out.append(payload.decode())
                            except UnicodeDecodeError as exc:
                                raise _refuse(
                                    f"invalid UTF-8 in a text message: {exc}", 1007
                                ) from None
                        else:
                            out.append(payload)
                        if not budget.take(stop - start):
                            del out[-1]
                            raise _refuse(f"a {stop - start}-byte message", 1013)
                        continue
                # wsproto's order: opcode, control rules, length, RSV, mask.
                opcode = first & 0x0F
                size = second & 0x7F
                if opcode > 2:
                    if opcode < 8 or opcode > 10:
                        raise _refuse(f"invalid opcode {opcode:#x}")
                    if not first & 0x80:
                        raise _refuse("a fragmented control frame")
                    if size > 125:
                        raise _refuse("a control frame with a payload over 125 bytes")
                head = pos + 2
                if size == 126:
                    head += 2
                    if head > end:
                        break
                    size = (buf[pos + 2] << 8) | buf[pos + 3]
                    if size < 126:
                        raise _refuse("a 16-bit payload length where 7 bits do")
                elif size == 127:
                    head += 8
                    if head > end:
                        break
                    size = int.from_bytes(buf[pos + 2 : head], "big")
                    if size >> 63:
                        raise _refuse("a 64-bit payload length with its top bit set")
                    if size < 65536:
                        raise _refuse("a 64-bit payload length where 16 bits do")
                if first & 0x70:
                    self._check_reserved_bits(first, opcode)
                if opcode <= 2 and (not opcode) is not bool(self._opcode):
                    raise _refuse(
                        "a new message before the last one ended"
                        if opcode
                        else "a continuation frame outside a message"
                    )
                if not second & 0x80:
                    raise _refuse("an unmasked client frame")
                if opcode <= 2 and not (first & 0x40 if opcode else self._compressed):
                    total = size if opcode else self.held + size  # (compressed: inflated)
                    if total > max_bytes:
                        raise _refuse(f"Message is too large: {total} > {max_bytes}", 1009)
                start = head + 4
                if start > end:
                    break
                if opcode > 2:  # a control frame: read whole
                    stop = start + size
                    if stop > end:
                        break
                    pos = stop
                    event = control_event(opcode, _unmask(buf[start:stop], buf[head:start]))
                    out.append(event)
                    if type(event) is PeerClose:
                        self.more_after_close = stop < end
                        self.discard()  # nothing more is read
                        return out
                    continue
                if opcode:  # the first frame of a message
                    self._opcode = opcode
                    self._compressed = bool(first & 0x40)
                    self._parts = []
                    if opcode == 1:
                        self._decoder = _new_utf8_decoder()
                self._fin = bool(first & 0x80)
                self._mask = buf[head:start]
                self._remaining = size
                pos = start
                if size:
                    pos = self._payload(buf, pos, end, out)
                else:
                    self._frame_end(out)
            if pos < end:
                self._buffer = buf[pos:]
        except WebSocketProtocolError as exc:
            self.discard()
            out.append(Violation(exc.code, exc.reason))
        return out

    def discard(self) -> None:
        """Stop reading: the message in progress is dropped, its bytes given back."""
        self._done = True
        self._buffer = b""
        self._parts = self._decoder = None
        self._opcode = self._remaining = 0
        if self._inflater is not None:
            self._inflater.reset()
        self._budget.give(self.held)
        self.held = 0

    def _check_reserved_bits(self, first: int, opcode: int) -> None:
        if first & 0x40 and self._inflater is not None and (opcode == 0 or opcode > 2):
            raise _refuse("RSV1 on a control or continuation frame (RFC 7692 6.1)")
        if first & 0x30 or self._inflater is None:
            raise _refuse("a reserved bit set (no extension negotiated uses it)")

    def _payload(self, buf: bytes, pos: int, end: int, out: list[ReaderEvent]) -> int:
        """Read what ``buf[pos:end]`` has of the data frame in progress; where it ends."""
        take = min(self._remaining, end - pos)
        stop = pos + take
        mask = self._mask
        chunk = _unmask(buf[pos:stop], mask)
        turn = take & 3
        if turn:
            self._mask = mask[turn:] + mask[:turn]
        self._remaining -= take
        self._add(chunk)
        if not self._remaining:
            self._frame_end(out)
        return stop

    def _add(self, chunk: bytes) -> None:
        """Inflate if compressed, count, decode and keep the next payload bytes."""
        if self._compressed:
            assert self._inflater is not None
            chunk = self._inflater.inflate(chunk)
        self._keep(chunk)

    def _keep(self, chunk: bytes) -> None:
        """Count, decode and keep the next bytes of the message in progress."""
        size = len(chunk)
        if not size:
            return
        if not self._budget.take(size):
            raise _refuse(f"a {self.held + size}-byte message", 1013)
        self.held += size
        parts = self._parts
        assert parts is not None
        decoder = self._decoder
        if decoder is None:
            parts.append(chunk)
            return
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise _refuse(f"invalid UTF-8 in a text message: {exc}", 1007) from None
        if text:
            parts.append(text)

    def _frame_end(self, out: list[ReaderEvent]) -> None:
        """The data frame in progress is whole; if it was the last, so is the message."""
        self._mask = b""
        if not self._fin:
            return
        if self._compressed:
            assert self._inflater is not None
            self._keep(self._inflater.end_message())
        parts = self._parts
        assert parts is not None
        decoder = self._decoder
        message: str | bytes
        if decoder is not None:
            try:
                decoder.decode(b"", True)
            except UnicodeDecodeError as exc:
                raise _refuse(f"invalid UTF-8 in a text message: {exc}", 1007) from None
            message = "".join(parts)
        else:
            message = b"".join(parts)
        self._parts = self._decoder = None
        self._opcode = 0
        self.held = 0  # from here the message holds its bytes (see the module)
        out.append(message)
