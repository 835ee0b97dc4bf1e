"""An application: the object classes by namespace, and the app's hooks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._hooks import hook_takes_context
from ._object import DurableObject

if TYPE_CHECKING:
    from ._hooks import Authorize, Fetch

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


def _check_hook(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        try:
            hook_takes_context(value)
        except TypeError as exc:
            raise TypeError(f"App.{attribute.name}: {exc}") from None


@attrs.frozen
class App:
    """What a host serves: ``objects`` maps namespace names to :class:`DurableObject`
    classes; ``env`` is handed to every constructor.

    A request passes ``authorize`` first (if given). Then, with ``route_by_path`` (the
    default), one to ``/<namespace>/<name>[/...]`` reaches the object of that class whose
    id is derived from ``name``; every other request goes to ``fetch``, which may answer
    it or forward it, WebSocket upgrades included, to any object through a stub (by
    name, or by an id from ``new_unique_id()``), as a Cloudflare Worker does::

        async def fetch(request: Request, ctx: AppContext) -> Response:
            match_id = request.path.removeprefix("/api/match/").removesuffix("/ws")
            rooms = ctx.get_namespace("match")
            return await rooms.get(rooms.id_from_string(match_id)).fetch(request)

    Both hooks may take ``(request)`` or ``(request, ctx)``; ``ctx`` is the
    :class:`AppContext` (the namespaces and ``env``).
    """

    objects: Mapping[str, type[DurableObject]] = attrs.field(
        converter=_to_objects, validator=_check_objects
    )
    """Namespace name -> object class."""
    env: Any = None
    """Bindings for the objects (configuration, clients...)."""
    authorize: Authorize | None = attrs.field(default=None, kw_only=True, validator=_check_hook)
    """Checks every request (upgrades included) before any object wakes and before
    ``fetch``: return a :class:`Response` (say 401 or 403) to refuse it, None to let it
    through, or a copy of the request (``request.with_context(user)``,
    ``request.with_headers(...)``) to let that copy through instead. A copy must carry
    the same ``websocket`` (the copy methods keep it)."""
    fetch: Fetch | None = attrs.field(default=None, kw_only=True, validator=_check_hook)
    """Answers every request the built-in routing does not take (``/``, static pages,
    custom routes); it may forward a request to an object with ``stub.fetch``, and
    return the 101 of an upgrade the object accepted. Without it they get 404."""
    route_by_path: bool = attrs.field(default=True, kw_only=True)
    """Route ``/<namespace>/<name>[/...]`` to that object (the default). Turn it off
    for an app whose ``fetch`` routes every request itself: ``/<namespace>/<name>`` then
    goes to ``fetch`` like any other path."""
