"""Object ids: deterministic from a name, or random."""

from __future__ import annotations

import hashlib
import secrets

import attrs

__all__ = ["ObjectId"]

_HEX_DIGITS = frozenset("0123456789abcdef")


def _check_hex(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX_DIGITS:
        raise ValueError(f"an object id is 64 lowercase hex digits, got {value!r}")


@attrs.frozen
class ObjectId:
    """The address of an object within its namespace.

    Ids made from the same namespace and name are always equal (:meth:`from_name`), so a
    name like a room title always reaches the same object. ``str(id)`` is the hex form.
    """

    hex: str = attrs.field(validator=_check_hex)
    """64 lowercase hex digits."""
    name: str | None = attrs.field(default=None, eq=False)
    """The name the id was derived from, if it was derived from one."""

    @classmethod
    def from_name(cls, namespace: str, name: str) -> ObjectId:
        """The id for ``name`` in ``namespace`` (SHA-256 of both; deterministic)."""
        digest = hashlib.sha256(f"{namespace}\0{name}".encode()).hexdigest()
        return cls(digest, name)

    @classmethod
    def unique(cls) -> ObjectId:
        """A new random id (256 bits from :mod:`secrets`)."""
        return cls(secrets.token_hex(32))

    def __str__(self) -> str:
        return self.hex
