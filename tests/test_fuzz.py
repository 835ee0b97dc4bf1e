"""Fuzzing the server: whatever one client sends, the server and every other client carry on.

Hypothesis writes the bytes of whole connections: HTTP requests (request lines, odd
targets, headers, bodies), WebSocket upgrade requests, and frame streams sent after a
valid upgrade (built by the small encoder below, which will happily break every rule of
RFC 6455). Each example starts one server on 127.0.0.1:0 serving an echo object and
connects a *witness* WebSocket to it; then each generated connection is made on a fresh
TCP connection, and what comes back is read until EOF (or :data:`READ_SECONDS`). After
each one the server must still be alive: the witness gets its echo and ``/_health``
answers 200. And whatever the server answered must make sense: an HTTP/1.1 status line
(101, 2xx, 4xx, 5xx) and a whole response, or a close without a word; well-formed server
frames, and a Close code from :data:`SERVER_CLOSE_CODES` (or the echo of the client's).
No property names the status a given odd request must get: that is for the tests at the
end and for the server's own tests.

How it runs. pytest-trio tests cannot be wrapped in ``@given``, so each property is a sync
``@given`` test that calls ``trio.run`` once per example, on Trio's autojump clock (with
the I/O grace explained in ``helpers``). A fresh server per example costs about 3 ms
(measured), and it makes every example independent, so a failure shrinks to a minimal
input and replays; one server shared by a whole test would carry one example's damage
into the next. A server crash propagates out of ``open_server`` and fails the example
with its traceback; Hypothesis prints the generated connections (long runs of bytes as
:class:`Repeat`) and, as notes, what the server answered to each.

Budgets (profiles in ``conftest.py``, chosen by ``HYPOTHESIS_PROFILE``): ``ci`` runs the
same 100 examples per property every time, about 10 s for this file on two cores.
For a long random run (about a quarter of an hour)::

    HYPOTHESIS_PROFILE=nightly nox -s tests -- tests/test_fuzz.py

The parametrized tests at the end pin the crashers of issue 9 (a 400 or 431 status line
each) and those this suite found (the server stays up and answers sensibly).
"""

from __future__ import annotations

import re
import struct
from base64 import b64encode
from collections.abc import Awaitable, Callable, Sequence
from hashlib import sha1
from typing import Final

import attrs
import pytest
import trio
from helpers import (
    IO_GRACE_SECONDS,
    WAIT_SECONDS,
    Echo,
    RawWebSocket,
    http_exchange,
    open_raw_websocket,
    settle,
)
from hypothesis import (
    Phase,
    currently_in_test_context,
    event,
    example,
    given,
    note,
    settings,
    strategies as st,
)
from strategies import BAD_CLOSE_CODES, INVALID_UTF8, PEER_CLOSE_CODES
from trio.testing import MockClock
from wsproto.events import TextMessage

from trio_hibernate import App, Server, open_server

pytestmark = pytest.mark.integration

# -- the server under test ----------------------------------------------------------------


#: The one origin a browser upgrade may come from (the others get 403).
GOOD_ORIGIN: Final = "https://good.example"
#: Seconds a client has to send its request (virtual: the autojump clock runs the tests).
HANDSHAKE_SECONDS: Final = 5.0
APP: Final = App({"echo": Echo})
#: The witness's object. Fuzzed connections go to it or to another one.
WITNESS_ROOM: Final = "witness"
ROOMS: Final = (WITNESS_ROOM, "fuzz")
#: How long to read a fuzzed connection's answer (virtual seconds). Past the handshake
#: timeout, so a server that keeps a connection it should have closed is caught.
READ_SECONDS: Final = HANDSHAKE_SECONDS + 15.0
#: Bound on one whole example (virtual seconds).
EXAMPLE_SECONDS: Final = 600.0
#: Close codes the server may send on its own (issue 9): normal, protocol error, invalid
#: payload, policy, too big, internal error, try again later.
SERVER_CLOSE_CODES: Final = frozenset({1000, 1002, 1007, 1008, 1009, 1011, 1013})
#: What a client sends to ask the server for the WebSocket upgrade, and the key in it.
UPGRADE_KEY: Final = b"dGhlIHNhbXBsZSBub25jZQ=="
HEALTH_REQUEST: Final = b"GET /_health HTTP/1.1\r\nHost: fuzz\r\n\r\n"
RECV_BYTES: Final = 65536


def upgrade_request(room: str) -> bytes:
    """A valid upgrade to ``/echo/<room>``."""
    return (
        (
            f"GET /echo/{room} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
        + b"Sec-WebSocket-Key: "
        + UPGRADE_KEY
        + b"\r\n\r\n"
    )


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value that answers ``key`` (RFC 6455 section 4.2.2)."""
    return b64encode(sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


# -- what a fuzzed connection sends ---------------------------------------------------------


@attrs.frozen
class Repeat:
    """``chunk`` repeated ``times`` times: a long run of bytes with a short repr."""

    chunk: bytes
    times: int

    def __bytes__(self) -> bytes:
        return self.chunk * self.times


Part = bytes | Repeat


def join(parts: Sequence[Part]) -> bytes:
    """The bytes ``parts`` stand for."""
    return b"".join(bytes(part) for part in parts)


@attrs.frozen
class Connection:
    """The bytes of one fuzzed connection (in ``parts``); with ``half_close`` the client
    then shuts down its sending side, otherwise it keeps it open while reading."""

    parts: tuple[Part, ...]
    half_close: bool = True

    @property
    def data(self) -> bytes:
        """All the bytes sent."""
        return join(self.parts)


@attrs.frozen
class Frame:
    """A client-to-server WebSocket frame, valid or not (RFC 6455 section 5.2).

    ``length`` is the payload length written in the header when it lies (None: the real
    one); ``width`` widens the length encoding to 16 or 64 bits (a non-minimal encoding),
    which is otherwise the shortest that fits.
    """

    opcode: int
    payload: Part = b""
    fin: bool = True
    rsv: int = 0
    mask: bytes | None = b"\x37\xfa\x21\x3d"
    length: int | None = None
    width: int | None = None

    def encode(self) -> bytes:
        """The frame's bytes."""
        payload = bytes(self.payload)
        declared = len(payload) if self.length is None else self.length
        shortest = 7 if declared < 126 else 16 if declared < 65536 else 64
        width = max(self.width or 7, shortest)
        first = (0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode
        mask_bit = 0x80 if self.mask is not None else 0
        if width == 7:
            head = bytes((first, mask_bit | declared))
        elif width == 16:
            head = struct.pack("!BBH", first, mask_bit | 126, declared)
        else:
            head = struct.pack("!BBQ", first, mask_bit | 127, declared)
        if self.mask is None or not payload:
            return head + bytes(self.mask or b"") + payload
        size = len(payload)
        key = (self.mask * (size // 4 + 1))[:size]
        masked = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
        return head + self.mask + masked.to_bytes(size, "big")

    def is_close(self) -> bool:
        """A Close frame the server can parse as one (whatever its payload)."""
        return self.opcode == 8 and self.fin and not self.rsv and self.mask is not None


@attrs.frozen
class FrameSession:
    """A valid upgrade to ``/echo/<room>``, then ``frames``; ``half_close`` as in
    :class:`Connection`."""

    room: str
    frames: tuple[Frame, ...]
    half_close: bool = True


# -- strategies: HTTP requests ------------------------------------------------------------
#
# A request is built from components (method, target, headers...), each either ordinary
# or odd. Which ones are odd is drawn first, as a small set: most requests break one or
# two things and the server gets past the others, and a failure shrinks to the fewest odd
# components that still matter.

HTTP_ODDITIES: Final = (
    *("garbage", "method", "spacing", "target", "version", "eol", "names", "values"),
    *("folded", "flood", "huge", "host", "framing"),
)
METHODS: Final = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")
ODD_METHODS: Final = (b"CONNECT", b"TRACE", b"PRI", b"get", b"G\xe9T", b"GET\x00", b"", b"G(T")
#: Targets the server should route (to an object, an operations path, or a 404).
TARGETS: Final = (
    *(b"/echo/fuzz", b"/echo/witness", b"/echo/fuzz/sub/path?x=1&y=2", b"/", b"/_health"),
    *(b"/_metrics", b"/_nope", b"/nope/a", b"/echo/%E2%98%83", b"/echo/a%2Fb", b"/echo"),
)
ODD_TARGETS: Final = (
    *(b"*", b"//[", b"http://[::1/x", b"//x]/", b"/[", b"/]", b"/echo/[::1]", b"//", b"/_"),
    *(b"http://127.0.0.1/echo/a", b"https://x/echo/a", b"http://[::1]:80/echo/a", b"/echo/"),
    *(b"/echo//", b"/echo/%", b"/echo/%zz", b"/echo/%00", b"/echo/%ff%fe", b"/echo/\xe9"),
    *(b"/echo/\x00", b"/echo/a b", b"/echo/a\tb", b"/echo/" + b"n" * 300, b"/echo/a?q=["),
    *(b"/echo/a#x", b"?x", b"", b"echo/a", b"/echo/a?" + b"q" * 5000, b"/echo/%0a"),
)
SEGMENTS: Final = (
    *(b"echo", b"witness", b"a", b"", b".", b"..", b"[", b"]", b"[::1]", b"%", b"%2F"),
    *(b"%e9", b"%ff", b"%00", b"%0a", b"\xe9", b"\xff", b"\x00", b"\x7f", b" ", b"?", b"#"),
    *(b"@", b":", b"_health"),
)
ODD_VERSIONS: Final = (
    *(b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b"HTTP/0.9", b"http/1.1", b"HTTP/1.10"),
    *(b"HTTP/\xe9", b""),
)
HEADER_NAMES: Final = (b"X-Test", b"Accept", b"User-Agent", b"Cookie", b"X-Forwarded-For")
ODD_HEADER_NAMES: Final = (
    *(b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"Expect"),
    *(b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"Origin", b"X-\xe9", b"Bad Name"),
    *(b"", b":", b"Host "),
)
HEADER_VALUES: Final = (b"1", b"text/plain", b"a=b; c=d", b"fuzz/1.0", b"127.0.0.1")
ODD_HEADER_VALUES: Final = (
    *(b"", b"\xe9", b"caf\xc3\xa9", b"a\x00b", b"a\rb", b" padded ", b"chunked", b"-1"),
    *(b"gzip, chunked", b"100-continue", b"99999999999999999999", b"0", b"websocket"),
    *(b"Upgrade", b"keep-alive, Upgrade", b"13", b"null", b"https://evil.example"),
)
#: Request lines a conforming client never sends.
GARBAGE_LINES: Final = (b"\x16\x03\x01\x02\x00\x01\x00", b"PRI * HTTP/2.0", b"\xff" * 40, b" ")


def choose(
    draw: st.DrawFn, odd: bool, usual: Sequence[bytes], odd_ones: st.SearchStrategy[bytes]
) -> bytes:
    """One of ``usual``, or of ``odd_ones`` when this component is odd."""
    return draw(odd_ones if odd else st.sampled_from(usual))


@st.composite
def targets(draw: st.DrawFn, odd: bool = True) -> bytes:
    """A request target: a routable one, or (``odd``) a known-odd one or a path of odd
    segments and an odd query."""
    if not odd:
        return draw(st.sampled_from(TARGETS))
    if draw(st.booleans()):
        return draw(st.sampled_from(ODD_TARGETS))
    segments = draw(st.lists(st.sampled_from(SEGMENTS) | st.binary(max_size=6), max_size=4))
    query = draw(st.sampled_from((b"", b"?", b"?a=1", b"?[", b"?\xe9", b"?%")))
    return b"/" + b"/".join(segments) + query


@st.composite
def bodies(draw: st.DrawFn, odd: bool, eol: bytes) -> tuple[list[bytes], list[bytes]]:
    """(framing headers, body): none, a Content-Length, chunked; or (``odd``) a
    Content-Length that lies, malformed or unfinished chunks, bytes with no framing."""
    content = draw(st.binary(max_size=64))
    kinds = ("lie", "bad-chunked", "raw") if odd else ("none", "length", "chunked")
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return [], []
    if kind == "length":
        return [b"Content-Length: %d" % len(content) + eol], [content]
    if kind == "lie":
        declared = draw(st.sampled_from((0, 1, 100, 2**20 + 1, 2**31, 10**30)))
        return [b"Content-Length: %d" % declared + eol], [content]
    if kind == "raw":
        return [], [content]
    chunked = [b"Transfer-Encoding: chunked" + eol]
    if kind == "chunked":
        chunks = [b"%x" % len(content) + eol + content + eol] if content else []
        return chunked, [*chunks, b"0" + eol + eol]
    bad = draw(st.sampled_from((b"zz", b"-1", b"ffffffffffffffffffff", b"5", b"3;x=\xe9")))
    ending = draw(st.sampled_from((b"", b"0" + eol, b"0" + eol + eol)))
    return chunked, [bad + eol, content, ending]


@st.composite
def http_connections(draw: st.DrawFn) -> Connection:
    """A whole HTTP request with a few odd components (see above)."""
    odd = draw(st.sets(st.sampled_from(HTTP_ODDITIES), max_size=3))
    eol = b"\n" if "eol" in odd else b"\r\n"
    if "garbage" in odd:
        line = draw(st.sampled_from(GARBAGE_LINES) | st.binary(max_size=64))
    else:
        space = draw(st.sampled_from((b"  ", b"\t"))) if "spacing" in odd else b" "
        method = choose(draw, "method" in odd, METHODS, st.sampled_from(ODD_METHODS))
        version = choose(draw, "version" in odd, [b"HTTP/1.1"], st.sampled_from(ODD_VERSIONS))
        line = method + space + draw(targets("target" in odd)) + space + version
    names = st.sampled_from(ODD_HEADER_NAMES) | st.binary(max_size=12)
    values = st.sampled_from(ODD_HEADER_VALUES) | st.binary(max_size=32)
    headers: list[Part] = []
    for _ in range(draw(st.integers(0, 4))):
        name = choose(draw, "names" in odd, HEADER_NAMES, names)
        headers += [name + b": " + choose(draw, "values" in odd, HEADER_VALUES, values) + eol]
        if "folded" in odd and draw(st.booleans()):
            headers.append(b" folded continuation" + eol)
    if "huge" in odd:
        chunk = draw(st.sampled_from((b"a", b"\xe9", b"; x")))
        headers += [b"X-Huge: ", Repeat(chunk, draw(st.integers(16_000, 120_000))), eol]
    if "flood" in odd:
        headers.append(Repeat(b"X-Fill: 1" + eol, draw(st.integers(100, 12_000))))
    host = b"Host: 127.0.0.1" + eol
    where = draw(st.sampled_from(("last", "twice", "none"))) if "host" in odd else "first"
    if where in ("first", "twice"):
        headers.insert(0, host)
    if where in ("last", "twice"):
        headers.append(b"Host: other.example" + eol)
    framing, body = draw(bodies("framing" in odd, eol))
    position = draw(st.integers(0, len(headers)))
    headers[position:position] = framing
    return Connection((line + eol, *headers, eol, *body), half_close=draw(st.booleans()))


# -- strategies: WebSocket upgrades -------------------------------------------------------

#: Each header of an upgrade request: the valid value first, then odd ones (None: absent).
UPGRADE_HEADERS: Final[dict[bytes, tuple[bytes | None, ...]]] = {
    b"Host": (b"127.0.0.1", None, b"\xe9", b""),
    b"Upgrade": (b"websocket", b"WebSocket", None, b"h2c", b"websocket, h2c", b"\xe9"),
    b"Connection": (b"Upgrade", b"keep-alive, Upgrade", b"upgrade", None, b"close", b","),
    b"Sec-WebSocket-Key": (
        *(UPGRADE_KEY, b"\xe9", b"caf\xc3\xa9caf\xc3\xa9caf\xc3\xa9==", None, b"", b"a"),
        *(b"dGhlIHNhbXBsZSBub25jZQ", b"not base64 at all!!!!!==", b"A" * 200, b"\x00"),
    ),
    b"Sec-WebSocket-Version": (b"13", None, b"8", b"13, 8", b"14", b"\xe9", b"", b"-13"),
    b"Origin": (
        *(None, GOOD_ORIGIN.encode(), b"https://evil.example", b"null", b"\xe9"),
        *(b"", b"https://good.example.evil", b"HTTPS://GOOD.EXAMPLE"),
    ),
    b"Sec-WebSocket-Protocol": (None, b"chat", b"\xe9"),
    b"Sec-WebSocket-Extensions": (None, b"permessage-deflate", b"x; y=\xe9"),
}
UPGRADE_ODDITIES: Final = (
    *(name.decode() for name in UPGRADE_HEADERS),
    *("duplicates", "order", "method", "version", "target", "early"),
)
#: What may follow the upgrade request's headers before the server answers.
EARLY_BYTES: Final = (
    b"Content-Length: 5\r\n\r\nhello",
    b"\r\n" + Frame(1, b"early").encode(),
    b"\r\n" + Frame(8, b"\x03\xe8").encode(),
    b"\r\n\xff\xff\xff",
)


@st.composite
def upgrade_connections(draw: st.DrawFn) -> Connection:
    """An upgrade request with a few odd components: a header odd, missing or doubled,
    the headers shuffled, another method, version or target, a body or frames sent
    before the answer."""
    odd = draw(st.sets(st.sampled_from(UPGRADE_ODDITIES), max_size=3))
    lines: list[bytes] = []
    for name, choices in UPGRADE_HEADERS.items():
        value = draw(st.sampled_from(choices[1:])) if name.decode() in odd else choices[0]
        if value is not None:
            lines.append(name + b": " + value + b"\r\n")
        if "duplicates" in odd and draw(st.booleans()):
            lines.append(name + b": " + (draw(st.sampled_from(choices)) or b"") + b"\r\n")
    if "order" in odd:
        lines = draw(st.permutations(lines))
    method = draw(st.sampled_from((b"POST", b"HEAD", b"PUT"))) if "method" in odd else b"GET"
    version = b"HTTP/1.0" if "version" in odd else b"HTTP/1.1"
    target = (
        draw(targets(odd=True))
        if "target" in odd
        else b"/echo/" + draw(st.sampled_from(ROOMS)).encode()
    )
    early = draw(st.sampled_from(EARLY_BYTES)) if "early" in odd else b"\r\n"
    head = method + b" " + target + b" " + version + b"\r\n" + b"".join(lines)
    return Connection((head, early), half_close=draw(st.booleans()))


# -- strategies: frame streams ------------------------------------------------------------

LENGTH_LIES: Final = (0, 1, 125, 126, 127, 65535, 65536, 2**31, 2**63 - 1, 2**63, 2**64 - 1)
masks = st.sampled_from((b"\x37\xfa\x21\x3d", b"\x00\x00\x00\x00")) | st.binary(
    min_size=4, max_size=4
)
big_payloads = st.builds(Repeat, st.just(b"x"), st.sampled_from((126, 65535, 65536, 70_000)))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """A Close frame's payload: the code, then the reason."""
    return struct.pack("!H", code) + reason


close_payloads = st.one_of(
    st.just(b""),
    st.builds(
        close_payload,
        st.sampled_from(sorted(code for code in PEER_CLOSE_CODES if code < 3000))
        | st.integers(3000, 4999),
        st.text(max_size=40).map(str.encode),
    ),
    st.builds(close_payload, st.sampled_from(BAD_CLOSE_CODES)),
    st.builds(close_payload, st.just(1000), st.sampled_from(INVALID_UTF8)),
    st.sampled_from((b"\x03", b"\xe8")),  # a payload of length 1
    st.just(close_payload(1000, b"r" * 124)),  # 126 bytes: too long for a control frame
)


@st.composite
def messages(draw: st.DrawFn) -> list[Frame]:
    """One valid message, maybe fragmented, maybe with pings and pongs in between; or a
    Close frame."""
    kind = draw(st.sampled_from(("text", "binary", "big", "control", "close")))
    if kind == "close":
        return [Frame(8, draw(close_payloads))]
    if kind == "control":
        return [Frame(draw(st.sampled_from((9, 10))), draw(st.binary(max_size=125)))]
    if kind == "big":
        return [Frame(2, draw(big_payloads))]
    opcode = 1 if kind == "text" else 2
    payload = draw(st.text(max_size=40)).encode() if opcode == 1 else draw(st.binary(max_size=40))
    # Cut anywhere, inside a UTF-8 sequence too (valid: UTF-8 is checked per message).
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    frames: list[Frame] = []
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        frames.append(Frame(opcode if index == 0 else 0, piece, fin=last))
        if not last and draw(st.integers(0, 3)) == 0:
            frames.append(Frame(draw(st.sampled_from((9, 10))), b"between fragments"))
    return frames


Mutation = Callable[[Frame], Frame]


def _lie(delta: int) -> Mutation:
    return lambda frame: attrs.evolve(frame, length=max(0, len(bytes(frame.payload)) + delta))


def _payload(payload: bytes) -> Mutation:
    return lambda frame: attrs.evolve(frame, payload=payload, length=None, width=None)


def _wider(width: int) -> Mutation:
    return lambda frame: attrs.evolve(frame, width=width)


mutations: st.SearchStrategy[Mutation] = st.one_of(
    st.integers(1, 7).map(lambda rsv: lambda frame: attrs.evolve(frame, rsv=rsv)),
    st.integers(0, 15).map(lambda opcode: lambda frame: attrs.evolve(frame, opcode=opcode)),
    st.just(lambda frame: attrs.evolve(frame, fin=not frame.fin)),
    st.just(lambda frame: attrs.evolve(frame, mask=None)),
    st.sampled_from(LENGTH_LIES).map(
        lambda lie: lambda frame: attrs.evolve(frame, length=lie, width=None)
    ),
    st.sampled_from((-1, 1, 10)).map(_lie),
    st.sampled_from((16, 64)).map(_wider),
    st.sampled_from(INVALID_UTF8).map(
        lambda bad: lambda frame: attrs.evolve(frame, payload=bytes(frame.payload) + bad)
    ),
    close_payloads.map(_payload),
    st.integers(126, 200).map(lambda size: _payload(b"p" * size)),  # over-long if control
)
#: Any frame at all, to insert anywhere (a continuation with nothing to continue, a
#: reserved opcode, a fragmented ping...).
raw_frames = st.builds(
    Frame,
    opcode=st.integers(0, 15),
    payload=st.binary(max_size=130),
    fin=st.booleans(),
    rsv=st.sampled_from((0, 0, 0, 1, 2, 4, 7)),
    mask=st.none() | masks,
)


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[Frame, ...]:
    """Valid messages, then a few mutations and inserted odd frames."""
    mask = draw(masks)
    frames = [
        attrs.evolve(frame, mask=mask)
        for message in draw(st.lists(messages(), max_size=4))
        for frame in message
    ]
    # A quarter of the streams stay valid, so that the server gets deep into some.
    breakage = draw(st.sampled_from(("none", "mutate", "insert", "both")))
    if breakage in ("mutate", "both"):
        changes = draw(st.lists(st.tuples(st.integers(0, 99), mutations), min_size=1, max_size=3))
        for index, mutate in changes:
            if frames:
                frames[index % len(frames)] = mutate(frames[index % len(frames)])
    if breakage in ("insert", "both"):
        inserts = draw(st.lists(st.tuples(st.integers(0, 99), raw_frames), min_size=1, max_size=2))
        for index, frame in inserts:
            frames.insert(index % (len(frames) + 1), frame)
    return tuple(frames)


frame_sessions = st.builds(
    FrameSession, room=st.sampled_from(ROOMS), frames=frame_streams(), half_close=st.booleans()
)


# -- talking to the server ----------------------------------------------------------------


@attrs.frozen
class Answer:
    """What the server sent on a fuzzed connection, and how the connection ended."""

    data: bytes
    closed: bool  # EOF (or a reset) before we stopped reading
    reset: bool


async def read_answer(
    stream: trio.SocketStream, received: bytes = b"", done: Callable[[bytes], bool] | None = None
) -> Answer:
    """Read until EOF, a reset, ``done(data)``, or :data:`READ_SECONDS`."""
    data = bytearray(received)
    with trio.move_on_after(READ_SECONDS):
        while done is None or not done(bytes(data)):
            try:
                chunk = await stream.receive_some(RECV_BYTES)
            except trio.BrokenResourceError:
                return Answer(bytes(data), closed=True, reset=True)
            if not chunk:
                return Answer(bytes(data), closed=True, reset=False)
            data += chunk
    return Answer(bytes(data), closed=False, reset=False)


async def send(stream: trio.SocketStream, data: bytes, half_close: bool) -> None:
    """Send ``data`` (and EOF with ``half_close``) unless the server hangs up first."""
    with trio.move_on_after(WAIT_SECONDS) as waited:
        try:
            await stream.send_all(data)
            if half_close:
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the server closed (or reset) first: what it answered is still readable
    assert not waited.cancelled_caught, (
        f"the server neither read our {len(data)} bytes nor closed within {WAIT_SECONDS} s"
    )


def complete_101(data: bytes) -> bool:
    """The head of a 101 has arrived (the connection then stays open)."""
    return data.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in data


async def exchange(port: int, connection: Connection) -> Answer:
    """Send ``connection`` on a fresh TCP connection and read the answer."""
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await send(stream, connection.data, connection.half_close)
        return await read_answer(stream, done=None if connection.half_close else complete_101)


async def frame_exchange(port: int, session: FrameSession) -> Answer:
    """Upgrade a fresh connection, send the frames, read what follows the 101 head."""
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await send(stream, upgrade_request(session.room), half_close=False)
        upgrade = await read_answer(stream, done=complete_101)
        assert complete_101(upgrade.data), f"the valid upgrade was refused: {upgrade}"
        _, _, after_head = upgrade.data.partition(b"\r\n\r\n")
        stream_bytes = b"".join(frame.encode() for frame in session.frames)
        await send(stream, stream_bytes, session.half_close)
        return await read_answer(stream, received=after_head)


async def check_alive(server: Server, witness: RawWebSocket, after: int) -> None:
    """The witness still gets its echo, and a new client gets ``/_health``."""
    text = f"still here after connection {after}"
    await witness.send(TextMessage(text))
    reply = await witness.next_event()
    assert reply is not None, (
        f"the server closed the witness's connection instead of echoing {text!r}"
    )
    assert isinstance(reply, TextMessage), f"the witness got {reply!r} instead of its echo"
    assert reply.data == text, f"the witness got {reply.data!r} instead of {text!r}"
    health = await http_exchange(server.port, HEALTH_REQUEST)
    assert health.status == 200, f"/_health answered {health}"
    errors = server.host.statistics().internal_errors
    assert errors == 0, f"{errors} connection(s) ended by an internal error (see the log)"


def run_with_server(body: Callable[[Server, RawWebSocket], Awaitable[None]]) -> None:
    """Start a server and its witness, run ``body`` on Trio's autojump clock."""

    async def main() -> None:
        with trio.fail_after(EXAMPLE_SECONDS):
            async with open_server(
                APP,
                "127.0.0.1",
                0,
                handshake_timeout=HANDSHAKE_SECONDS,
                allowed_origins=[GOOD_ORIGIN],
            ) as server:
                async with open_raw_websocket(server.port, f"/echo/{WITNESS_ROOM}") as witness:
                    try:
                        await check_alive(server, witness, after=0)
                        await body(server, witness)
                    except Exception:
                        # A crashing server drops the witness before its error cancels
                        # this task: wait for it, so that the crash is reported, not the
                        # symptom (the wait is cancelled then; otherwise this re-raises).
                        await settle()
                        raise

    trio.run(main, clock=MockClock(autojump_threshold=IO_GRACE_SECONDS))


# -- what makes an answer sensible --------------------------------------------------------


def outcome(label: str) -> None:
    """Count ``label`` in Hypothesis's statistics (``--hypothesis-show-statistics``)."""
    if currently_in_test_context():
        event(label)


STATUS_LINE: Final = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")
KEY_HEADER: Final = re.compile(rb"(?im)^sec-websocket-key:[ \t]*([^\r\n]*?)[ \t]*\r?$")
ACCEPT_HEADER: Final = re.compile(rb"(?im)^sec-websocket-accept:[ \t]*([^\r\n]*?)[ \t]*\r?$")
LENGTH_HEADER: Final = re.compile(rb"(?im)^content-length:[ \t]*(\d+)[ \t]*\r?$")


def check_http_answer(connection: Connection, answer: Answer) -> None:
    """An HTTP/1.1 status line with a whole response, or a close with nothing said; the
    connection closed in time unless it became a WebSocket."""
    data = answer.data
    if not data:
        outcome("closed without an answer" if answer.closed else "no answer, still open")
        assert answer.closed, f"no answer and no close within {READ_SECONDS} s"
        return
    match = STATUS_LINE.match(data)
    assert match, f"not an HTTP/1.1 status line: {data[:200]!r}"
    status = int(match[1])
    outcome(f"status {status}")
    assert status == 101 or 200 <= status < 300 or 400 <= status < 600, f"status {status}"
    head, separator, body = data.partition(b"\r\n\r\n")
    assert separator or answer.reset, f"an incomplete response head: {data[:500]!r}"
    if status == 101:
        keys = KEY_HEADER.findall(connection.data.partition(b"\r\n\r\n")[0])
        accepts = ACCEPT_HEADER.findall(head)
        if len(keys) == 1:
            assert accepts == [accept_token(keys[0])], f"101 answering key {keys[0]!r}: {head!r}"
        return
    assert answer.closed, f"status {status}, then the connection stayed open {READ_SECONDS} s"
    lengths = LENGTH_HEADER.findall(head)
    assert len(lengths) <= 1, f"several Content-Length headers: {head!r}"
    if lengths and not answer.reset and not connection.data.startswith(b"HEAD "):
        assert len(body) == int(lengths[0]), f"the body does not match the head: {data[:500]!r}"


@attrs.frozen
class ServerFrame:
    """A frame sent by the server."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes


def parse_server_frames(data: bytes) -> tuple[list[ServerFrame], bytes]:
    """The whole frames in ``data``, and the bytes of an unfinished one after them."""
    frames = []
    while len(data) >= 2:
        first, second = data[0], data[1]
        size, offset = second & 0x7F, 2
        if size == 126:
            if len(data) < 4:
                break
            (size,) = struct.unpack_from("!H", data, 2)
            offset = 4
        elif size == 127:
            if len(data) < 10:
                break
            (size,) = struct.unpack_from("!Q", data, 2)
            offset = 10
        masked = bool(second & 0x80)
        offset += 4 if masked else 0
        if len(data) < offset + size:
            break
        payload = data[offset : offset + size]
        frames.append(
            ServerFrame(bool(first & 0x80), (first >> 4) & 7, first & 0xF, masked, payload)
        )
        data = data[offset + size :]
    return frames, data


def is_utf8(data: bytes) -> bool:
    """``data`` is valid UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_frames_answer(session: FrameSession, answer: Answer) -> None:
    """Well-formed server frames; a Close, if any, last, with a code the server may send
    (or the client's own, echoed); the connection closed in time after a Close or EOF."""
    frames, unfinished = parse_server_frames(answer.data)
    assert not unfinished or not answer.closed, f"a cut frame before EOF: {unfinished[:100]!r}"
    client_closes = [bytes(frame.payload) for frame in session.frames if frame.is_close()]
    lied = any(frame.length is not None for frame in session.frames)
    for index, frame in enumerate(frames):
        assert not frame.masked, f"a masked server frame: {frame}"
        assert not frame.rsv, f"a server frame with RSV bits: {frame}"
        assert frame.opcode in (0, 1, 2, 8, 9, 10), f"a server frame with a bad opcode: {frame}"
        if frame.opcode >= 8:
            assert frame.fin, f"a fragmented control frame: {frame}"
            assert len(frame.payload) <= 125, f"an over-long control frame: {frame}"
        if frame.opcode == 1 and frame.fin:
            assert is_utf8(frame.payload), f"a text frame that is not UTF-8: {frame}"
        if frame.opcode != 8:
            continue
        assert index == len(frames) - 1, f"frames after the Close: {frames[index:]}"
        payload = frame.payload
        if not payload:
            # Only the answer to an empty Close (or to bytes we cannot account for).
            assert b"" in client_closes or lied, "an empty Close the client did not ask for"
            continue
        assert len(payload) >= 2, f"a Close with a 1-byte payload: {payload!r}"
        (code,) = struct.unpack_from("!H", payload)
        outcome(f"Close {code}")
        echoes = {struct.unpack_from("!H", close)[0] for close in client_closes if len(close) >= 2}
        if lied:
            echoes |= PEER_CLOSE_CODES
        assert code in SERVER_CLOSE_CODES | (echoes & PEER_CLOSE_CODES), f"Close code {code}"
        assert is_utf8(payload[2:]), f"a Close reason that is not UTF-8: {payload!r}"
    sent_close = any(frame.opcode == 8 for frame in frames)
    outcome(f"{len(frames) - sent_close} data/control frames back")
    if session.half_close or sent_close:
        assert answer.closed, f"the connection stayed open {READ_SECONDS} s after EOF or Close"


# -- the properties -----------------------------------------------------------------------

#: The profile's settings without the explain phase, whose line tracing of the server
#: (under ``sys.settrace``) takes minutes per failure here.
fuzz_settings = settings(phases=[phase for phase in Phase if phase is not Phase.explain])


def send_each_and_check(connections: list[Connection]) -> None:
    """Send each connection in turn; after each, its answer is sensible and the server
    is alive."""

    async def body(server: Server, witness: RawWebSocket) -> None:
        for number, connection in enumerate(connections, 1):
            answer = await exchange(server.port, connection)
            note(f"connection {number} got {answer}")
            check_http_answer(connection, answer)
            await check_alive(server, witness, after=number)

    run_with_server(body)


@fuzz_settings
@given(connections=st.lists(http_connections(), min_size=1, max_size=4))
def test_http_requests_do_not_take_the_server_down(connections: list[Connection]) -> None:
    send_each_and_check(connections)


@fuzz_settings
@given(connections=st.lists(upgrade_connections(), min_size=1, max_size=4))
def test_upgrade_requests_do_not_take_the_server_down(connections: list[Connection]) -> None:
    send_each_and_check(connections)


@fuzz_settings
@given(sessions=st.lists(frame_sessions, min_size=1, max_size=3))
# Found by a nightly run: a protocol error (a new message inside a fragmented one) while
# the client still sent and a 64 KiB echo waited for it to read; the server closed at
# once and the kernel's reset cut the echo. It fails only when the echo goes out before
# the error (a race): test_robustness pins the defect deterministically.
@example(
    sessions=[
        FrameSession(
            "fuzz",
            (
                Frame(2, Repeat(b"x", 65535)),
                Frame(2, Repeat(b"x", 65535), fin=False),
                Frame(2, Repeat(b"x", 65535)),
            ),
            half_close=False,
        )
    ]
)
def test_frame_streams_do_not_take_the_server_down(sessions: list[FrameSession]) -> None:
    async def body(server: Server, witness: RawWebSocket) -> None:
        for number, session in enumerate(sessions, 1):
            answer = await frame_exchange(server.port, session)
            note(f"connection {number} got {answer}")
            check_frames_answer(session, answer)
            await check_alive(server, witness, after=number)

    run_with_server(body)


# -- the crashers of issue 9, and those this suite found ------------------------------------

HOST_LINE: Final = b"Host: 127.0.0.1\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        # Origin-form targets: a path //[ (no namespace "", so 404), not a host to parse.
        pytest.param(b"GET //[ HTTP/1.1\r\n" + HOST_LINE + b"\r\n", id="target-//["),
        pytest.param(b"GET http://[::1/x HTTP/1.1\r\n" + HOST_LINE + b"\r\n", id="target-[::1"),
        pytest.param(b"GET //x]/ HTTP/1.1\r\n" + HOST_LINE + b"\r\n", id="target-//x]/"),
        pytest.param(
            upgrade_request("fuzz").replace(UPGRADE_KEY, b"\xe9"), id="non-ascii-websocket-key"
        ),
        pytest.param(b"\x16\x03\x01 garbage\r\n" + HOST_LINE + b"\r\n", id="garbage-line"),
        pytest.param(
            b"GET /echo/a HTTP/1.1\r\n" + HOST_LINE + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            id="100KB-header",
        ),
        pytest.param(
            b"GET /echo/a HTTP/1.1\r\n" + HOST_LINE + b"X-Fill: 1\r\n" * 10_000 + b"\r\n",
            id="10000-headers",
        ),
        pytest.param(b"GET /echo/a HTTP/1.1\r\n\r\n", id="no-host"),
    ],
)
def test_issue_9_requests_get_4xx(request_bytes: bytes) -> None:
    """Issue 9's table: each of these crashed the server or got no answer at all."""

    async def body(server: Server, witness: RawWebSocket) -> None:
        answer = await exchange(server.port, Connection((request_bytes,)))
        await check_alive(server, witness, after=1)
        match = STATUS_LINE.match(answer.data)
        assert match, f"no status line: {answer}"
        expected = (404,) if request_bytes.startswith(b"GET //") else (400, 431)
        assert int(match[1]) in expected, f"expected {expected}: {answer.data[:300]!r}"

    run_with_server(body)


@pytest.mark.parametrize(
    "request_bytes",
    [
        # Any response with a body to a HEAD request (h11: "Too much data for declared
        # Content-Length"): a 404 here, the object's 200 or the 426 of a refused upgrade.
        pytest.param(b"HEAD / HTTP/1.1\r\n" + HOST_LINE + b"\r\n", id="HEAD-404"),
        pytest.param(b"HEAD /echo/fuzz HTTP/1.1\r\n" + HOST_LINE + b"\r\n", id="HEAD-object"),
        # A 2xx answer to CONNECT switches h11 to another protocol; the body cannot follow.
        pytest.param(b"CONNECT /echo/fuzz HTTP/1.1\r\n" + HOST_LINE + b"\r\n", id="CONNECT"),
    ],
)
def test_fuzzer_finds_leave_the_server_alive(request_bytes: bytes) -> None:
    """What the fuzzing above found beyond issue 9's table: answered sensibly, or closed."""

    async def body(server: Server, witness: RawWebSocket) -> None:
        connection = Connection((request_bytes,))
        answer = await exchange(server.port, connection)
        check_http_answer(connection, answer)
        await check_alive(server, witness, after=1)
        match = STATUS_LINE.match(answer.data)
        assert match, f"no status line: {answer}"
        if request_bytes.startswith(b"HEAD"):
            assert answer.data.endswith(b"\r\n\r\n"), "a HEAD response has no body"
        else:
            assert int(match[1]) == 405, answer.data[:300]

    run_with_server(body)


def test_frames_after_the_peers_close_do_not_cut_our_last_frame() -> None:
    """Found by this suite: a 64 KiB message, an empty Close, and another 64 KiB message
    sent after it. Closing the socket with the last message unread reset the connection,
    and the reset destroyed the end of our echo before the client had read it. Now the
    server lingers (reading and dropping) when the peer sent more after its Close."""
    big = Frame(opcode=2, payload=b"x" * 65535)
    session = FrameSession("after-close", (big, Frame(opcode=8), big), half_close=False)

    async def body(server: Server, witness: RawWebSocket) -> None:
        answer = await frame_exchange(server.port, session)
        check_frames_answer(session, answer)
        frames, _ = parse_server_frames(answer.data)
        assert [frame.opcode for frame in frames] == [2, 8]
        await check_alive(server, witness, after=1)

    run_with_server(body)
