"""The data-only codec used for attachments (and, later, storage values).

Values are encoded with CBOR (RFC 8949) through ``cbor2``, with value sharing on so that
shared references and cycles survive a round trip, as with the structured-clone algorithm.
Decoding never runs code. A value that is not data raises :class:`DataCloneError`.

Round-trip notes: tuples come back as lists (structured clone has no tuples); naive
datetimes are refused (a ``Date`` is an instant, so give it a timezone).
"""

from __future__ import annotations

import cbor2

from ._errors import DataCloneError, LimitExceededError

__all__ = ["decode_data", "encode_data"]


def encode_data(value: object, *, what: str, limit_name: str, limit_bytes: int) -> bytes:
    """Encode ``value`` and check the encoded size.

    Raises:
        DataCloneError: ``value`` (or something inside it) is not data.
        LimitExceededError: the encoding is longer than ``limit_bytes``.
    """
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
