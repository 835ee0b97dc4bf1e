"""Hypothesis strategies shared by the property tests, and the value pools they draw from.

Each pool is chosen around a rule of the runtime or of RFC 6455: strings around the
UTF-8 length boundaries, tags around a byte limit, close codes on both sides of the
ranges an object may send and a peer may send. A test that needs a different shape
builds it from these rather than writing its own pool.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import attrs
from hypothesis import strategies as st

from trio_hibernate._limits import MAX_CLOSE_REASON_BYTES

__all__ = [
    "BAD_CLOSE_CODES",
    "INVALID_UTF8",
    "MAX_CHAR",
    "PEER_CLOSE_CODES",
    "RESERVED_CLOSE_CODES",
    "TAG_BYTES",
    "TAG_POOL",
    "UTF8_BOUNDARY_CHARS",
    "VALID_TAGS",
    "AttachmentArg",
    "UnclonableThing",
    "attachment_args",
    "close_codes",
    "close_reasons",
    "data_values",
    "messages",
    "object_close_code_is_valid",
    "oversized_values",
    "tag_arguments",
    "unclonable_values",
    "utf8_boundary_text",
]

# -- strings ---------------------------------------------------------------------------------

#: The highest code point.
MAX_CHAR: Final = "\U0010ffff"
#: One character from each side of the UTF-8 length boundaries (1/2/3/4 bytes), both
#: sides of the surrogate gap, NUL, and the two highest code points.
UTF8_BOUNDARY_CHARS: Final = (
    *("\x00", "a", "b", "\x7f", "\x80", "é", "\u07ff", "\u0800", "\ud7ff", "\ue000"),
    *("\uffff", "\U00010000", "\U0010fffe", MAX_CHAR),
)
#: Byte strings that are not UTF-8: a stray continuation byte, a cut sequence, an
#: overlong encoding, a surrogate, a code point past U+10FFFF, a byte never used.
INVALID_UTF8: Final = (b"\x80", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff")


def utf8_boundary_text(max_size: int) -> st.SearchStrategy[str]:
    """Strings of :data:`UTF8_BOUNDARY_CHARS`: where byte order and length are awkward."""
    return st.text(st.sampled_from(UTF8_BOUNDARY_CHARS), max_size=max_size)


def messages(max_size: int) -> st.SearchStrategy[str | bytes]:
    """A WebSocket message: text or binary, up to ``max_size`` characters or bytes."""
    return st.text(max_size=max_size) | st.binary(max_size=max_size)


# -- data (what attachments, storage values and call arguments may hold) ----------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.datetimes(timezones=st.just(UTC))
)
#: Values the data codec takes: scalars, lists and string-keyed dicts of them, nested.
data_values: Final = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=10,
)


def oversized_values(min_size: int) -> st.SearchStrategy[str | bytes]:
    """Data that encodes to more than ``min_size`` bytes (and not much more)."""
    return st.text(min_size=min_size, max_size=min_size + 20) | st.binary(
        min_size=min_size, max_size=min_size + 20
    )


class UnclonableThing:
    """An arbitrary class instance: not data."""


_UNCLONABLE_FACTORIES: Final[tuple[Callable[[], object], ...]] = (
    lambda: lambda: 1,
    object,
    UnclonableThing,
    lambda: [1, object()],
    lambda: {"k": print},
    lambda: datetime(2024, 1, 1, 12, 0),  # naive: not an instant
)
#: Values that are not data (a fresh one per draw: some are mutable).
unclonable_values: Final = st.sampled_from(_UNCLONABLE_FACTORIES).map(lambda make: make())


@attrs.frozen
class AttachmentArg:
    """A value to store, and whether it is data (decided by how it was built)."""

    value: object
    clonable: bool


def attachment_args(max_bytes: int) -> st.SearchStrategy[AttachmentArg]:
    """Values for ``serialize_attachment`` with a ``max_bytes`` limit: mostly data, some
    over the limit, some not data at all."""
    return st.one_of(
        data_values.map(lambda v: AttachmentArg(v, clonable=True)),
        data_values.map(lambda v: AttachmentArg(v, clonable=True)),
        oversized_values(max_bytes + 6).map(lambda v: AttachmentArg(v, clonable=True)),
        unclonable_values.map(lambda v: AttachmentArg(v, clonable=False)),
    )


# -- tags ---------------------------------------------------------------------------------------

#: The tag limit :data:`TAG_POOL` is built around (``Limits.max_tag_bytes``).
TAG_BYTES: Final = 8
#: Tags around the limit: 8 bytes is fine, 9 is not; "ééééé" and "🙂🙂🙂" are short in
#: characters but over the limit in UTF-8 bytes.
TAG_POOL: Final = (
    *("a", "b", "c", "d", "", "abcdefgh", "abcdefghi"),
    *("éééé", "ééééé", "🙂🙂", "🙂🙂🙂"),
)
#: Tags within every limit (for tests that want sockets to pile up).
VALID_TAGS: Final = ("a", "b", "c", "")
#: What a test passes as ``accept_websocket``'s ``tags`` with ``max_tag_bytes`` =
#: :data:`TAG_BYTES`.
tag_arguments: Final = st.one_of(
    # Mostly valid tag lists (with repeats), so that sockets pile up to the socket limit.
    st.lists(st.sampled_from(VALID_TAGS), max_size=4),
    st.lists(st.sampled_from(VALID_TAGS), max_size=4),
    st.lists(st.sampled_from(TAG_POOL), max_size=6),
    st.lists(st.sampled_from(TAG_POOL), max_size=4).map(tuple),
    st.sampled_from(TAG_POOL).filter(bool),  # a bare str: a TypeError, not tags "a", "b"...
    st.lists(st.sampled_from(TAG_POOL), max_size=2).map(lambda tags: [*tags, 7]),
)

# -- close codes and reasons ----------------------------------------------------------------------

#: Codes that never travel in a Close frame (RFC 6455 section 7.4.1): an object may not
#: send them either.
RESERVED_CLOSE_CODES: Final = frozenset({1004, 1005, 1006, 1015})
#: Codes a client may send (RFC 6455 section 7.4 and the IANA registry) that the server
#: echoes, 1014 (Bad Gateway, registered in 2016) included.
PEER_CLOSE_CODES: Final = frozenset({*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)})
#: Codes no Close frame may carry: reserved, unassigned, out of range.
BAD_CLOSE_CODES: Final = (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)


def object_close_code_is_valid(code: int) -> bool:
    """Whether ``ws.close(code)`` takes ``code`` (the rule workerd applies)."""
    return 1000 <= code <= 4999 and code not in RESERVED_CLOSE_CODES


#: What an object passes as ``ws.close``'s code: None, valid, reserved, out of range.
close_codes: Final = st.one_of(
    st.none(),
    st.sampled_from([1000, 1001, 1011, 3000, 4999, 1004, 1005, 1006, 1015, 999, 5000]),
    st.integers(min_value=900, max_value=5100),
)
#: What an object passes as ``ws.close``'s reason: None, empty, at the byte limit, over it.
close_reasons: Final = st.one_of(
    st.none(), st.sampled_from(["", "bye", "a" * MAX_CLOSE_REASON_BYTES, "é" * 62])
)
