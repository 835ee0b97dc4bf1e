"""The data-only codec used for attachments (and, later, storage values).

Values are encoded with CBOR (RFC 8949) through ``cbor2``, with value sharing on so that
shared references and cycles survive a round trip, as with the structured-clone algorithm.
Decoding never runs code. A value that is not data raises :class:`DataCloneError`.

Round-trip notes: tuples come back as lists (structured clone has no tuples); naive
datetimes are refused (a ``Date`` is an instant, so give it a timezone).
"""

from __future__ import annotations

from typing import Final

import cbor2

from .._errors import DataCloneError, LimitExceededError

__all__ = ["decode_data", "encode_data"]


#: Containers nested deeper than this are refused: the decoder stops at 400 levels
#: (value sharing adds a tag per container) and the C encoder has no guard at all.
MAX_NESTING_DEPTH: Final = 100


def _check_depth(value: object, what: str) -> None:
    # Depth of the encoding: each container is written once (value sharing turns later
    # references and cycles into back-references), so walk each container once.
    seen: set[int] = set()
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple | set | frozenset):
            children = list(item)
        else:
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if depth > MAX_NESTING_DEPTH:
            raise DataCloneError(
                f"{what} is nested more than {MAX_NESTING_DEPTH} containers deep "
                "and cannot be stored"
            )
        stack.extend((child, depth + 1) for child in children)


def encode_data(value: object, *, what: str, limit_name: str, limit_bytes: int) -> bytes:
    """Encode ``value`` and check the encoded size.

    Raises:
        DataCloneError: ``value`` (or something inside it) is not data, or it nests
            containers more than ``MAX_NESTING_DEPTH`` deep.
        LimitExceededError: the encoding is longer than ``limit_bytes``.
    """
    _check_depth(value, what)
    try:
        encoded: bytes = cbor2.dumps(value, value_sharing=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise DataCloneError(f"{what} is not data and cannot be stored: {exc}") from None
    if len(encoded) > limit_bytes:
        raise LimitExceededError(
            f"{what} cannot be larger than {limit_bytes} bytes when encoded; "
            f"this one is {len(encoded)} bytes (Limits.{limit_name})",
            limit_name=limit_name,
            limit=limit_bytes,
            value=len(encoded),
        )
    return encoded


def decode_data(encoded: bytes) -> object:
    """Decode bytes made by :func:`encode_data` into a fresh copy of the value."""
    return cbor2.loads(encoded)
