"""What the app's hooks (``App.authorize``, ``App.fetch``) get besides the request, as
a Cloudflare Worker gets ``env``, and how they are called: ``hook(request)`` or
``hook(request, ctx)``, as each is declared."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, final

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

__all__ = ["AppBindings", "AppContext", "Authorize", "Fetch", "hook_takes_context"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def hook_takes_context(hook: object) -> bool:
    """Whether an app hook is called ``hook(request, ctx)`` (it takes two positional
    arguments, or ``*args``) rather than ``hook(request)``. Remembered per hook, for as
    long as the hook lives.

    Raises:
        TypeError: ``hook`` is not callable, or needs more than two arguments.
    """
    try:
        return _TAKES_CONTEXT[hook]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable, or unhashable: not remembered
        return _takes_context(hook)
    takes = _takes_context(hook)
    _TAKES_CONTEXT[hook] = takes
    return takes


#: What :func:`hook_takes_context` found, by hook; weak, so that it keeps no hook (nor
#: what a hook's closure holds, a host say) alive.
_TAKES_CONTEXT: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


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


class AppBindings(Protocol):
    """What an :class:`AppContext` reads from the host it belongs to."""

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

    Made by the host for each request it hands to a hook; it reads the host's current
    app (after a live code update, the new one).
    """

    __slots__ = ("_bindings",)

    def __init__(self, bindings: AppBindings) -> None:
        # Made by the connection layer; application code receives it.
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
