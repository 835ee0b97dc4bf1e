"""An application: the object classes by namespace, and the bindings they receive."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from ._object import DurableObject

__all__ = ["App"]

_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _to_objects(value: Mapping[str, type[DurableObject]]) -> dict[str, type[DurableObject]]:
    return dict(value)


def _check_objects(instance: object, attribute: object, value: Mapping[object, object]) -> None:
    if not value:
        raise ValueError("an App needs at least one object class")
    for name, cls in value.items():
        if not isinstance(name, str) or not _NAMESPACE.fullmatch(name):
            raise ValueError(
                f"namespace {name!r} must be 1-64 characters of letters, digits, '_' or '-'"
            )
        if not (isinstance(cls, type) and issubclass(cls, DurableObject)):
            raise TypeError(f"namespace {name!r} must map to a DurableObject subclass, not {cls!r}")


@attrs.frozen
class App:
    """What a host serves: ``objects`` maps namespace names to :class:`DurableObject`
    classes; ``env`` is handed to every constructor.

    A WebSocket or HTTP request to ``/<namespace>/<name>[/...]`` reaches the object of that
    class whose id is derived from ``name``.
    """

    objects: Mapping[str, type[DurableObject]] = attrs.field(
        converter=_to_objects, validator=_check_objects
    )
    """Namespace name -> object class."""
    env: Any = None
    """Bindings for the objects (configuration, clients...)."""
