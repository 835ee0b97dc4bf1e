"""An application: the object classes by namespace, the app's hooks, and what the hooks
receive besides the request (:class:`AppContext`)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, final

import attrs

from ._object import DurableObject

if TYPE_CHECKING:
    from ._http import Request, Response
    from ._stubs import Namespace

#: ``authorize(request)`` or ``authorize(request, ctx)``: return a Response to refuse, None
#: to let the request through, or a Request (a copy made with ``with_context`` or
#: ``with_headers``) to let it through annotated.
Authorize: TypeAlias = (
    "Callable[[Request], Awaitable[Response | Request | None]]"
    " | Callable[[Request, AppContext], Awaitable[Response | Request | None]]"
)
#: ``fetch(request)`` or ``fetch(request, ctx)``: answers requests the built-in routing
#: does not (like a Worker); it may forward any of them, upgrades included, to an object
#: with ``await ctx.get_namespace(ns).get(id).fetch(request)``.
Fetch: TypeAlias = (
    "Callable[[Request], Awaitable[Response]]"
    " | Callable[[Request, AppContext], Awaitable[Response]]"
)

__all__ = ["App", "AppBindings", "AppContext", "Authorize", "Fetch", "hook_takes_context"]

# Paths starting with "/_" are the server's own (/_health, /_metrics).
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def hook_takes_context(hook: object) -> bool:
    """Whether an app hook is called ``hook(request, ctx)`` (it takes two positional
    arguments, or ``*args``) rather than ``hook(request)``. Cached per hook.

    Raises:
        TypeError: ``hook`` is not callable, or needs more than two arguments.
    """
    try:
        hash(hook)
    except TypeError:  # a bound method of an unhashable instance, say: not cached
        return _takes_context(hook)
    return _cached_takes_context(hook)


def _takes_context(hook: object) -> bool:
    if not callable(hook):
        raise TypeError(f"an App hook must be an async callable, not {hook!r}")
    try:
        parameters = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): the old form
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    if len(required) > 2:
        raise TypeError(
            f"an App hook is called with (request) or (request, ctx); {hook!r} needs "
            f"{len(required)} positional arguments"
        )
    return len(positional) >= 2


_cached_takes_context = lru_cache(maxsize=256)(_takes_context)


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


class AppBindings(Protocol):
    """What an :class:`AppContext` reads from the host it belongs to (the runtime)."""

    @property
    def env(self) -> Any:
        """The current app's ``env``."""
        ...

    @property
    def wall_clock(self) -> Callable[[], float]:
        """The host's wall clock (epoch seconds)."""
        ...

    def get_namespace(self, name: str) -> Namespace:
        """The namespace ``name``. Raises KeyError for an unknown one."""
        ...


@final
class AppContext:
    """What the app's hooks get besides the request, as a Cloudflare Worker gets ``env``:
    the namespaces (to reach objects through stubs) and the app's ``env``.

    Made by the host, one for its life: after a live code update it reads the new app.
    """

    __slots__ = ("_bindings",)

    def __init__(self, bindings: AppBindings) -> None:
        # Made by the runtime; application code receives it.
        self._bindings = bindings

    def __repr__(self) -> str:
        return f"<AppContext env={self.env!r}>"

    @property
    def env(self) -> Any:
        """The app's ``env``, as its objects get it."""
        return self._bindings.env

    def get_namespace(self, name: str) -> Namespace:
        """The namespace ``name`` of the app, to get stubs of its objects.

        Raises:
            KeyError: the app has no such namespace.
        """
        return self._bindings.get_namespace(name)

    def now(self) -> float:
        """The host's wall-clock time in epoch seconds (it follows Trio's mock clock
        under :mod:`trio_hibernate.testing`, as ``ObjectContext.now`` does)."""
        return self._bindings.wall_clock()
