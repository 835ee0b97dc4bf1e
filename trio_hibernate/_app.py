"""An application: the object classes by namespace, and the bindings they receive."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._object import DurableObject

if TYPE_CHECKING:
    from ._http import Request, Response

#: ``authorize(request)``: return a Response to refuse, or None to let the request through.
Authorize = Callable[["Request"], Awaitable["Response | None"]]
#: ``fetch(request)``: answers requests whose path names no namespace (like a Worker).
Fetch = Callable[["Request"], Awaitable["Response"]]

__all__ = ["App"]

# Paths starting with "/_" are the server's own (/_health, /_metrics).
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _to_objects(value: Mapping[str, type[DurableObject]]) -> dict[str, type[DurableObject]]:
    return dict(value)


def _check_objects(instance: object, attribute: object, value: Mapping[object, object]) -> None:
    if not value:
        raise ValueError("an App needs at least one object class")
    for name, cls in value.items():
        if not isinstance(name, str) or not _NAMESPACE.fullmatch(name):
            raise ValueError(
                f"namespace {name!r} must be 1-64 characters of letters, digits, '_' or '-', "
                "starting with a letter or digit"
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
    authorize: Authorize | None = attrs.field(default=None, kw_only=True)
    """Checks every request (upgrades included) before any object wakes: return a
    :class:`Response` (say 401 or 403) to refuse it, None to let it through."""
    fetch: Fetch | None = attrs.field(default=None, kw_only=True)
    """Answers requests whose first path segment names no namespace (``/``, static
    pages). Without it they get 404."""
