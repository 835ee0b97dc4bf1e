"""The one place an exception raised by application code is contained (house rule 5).

Application code is an object's constructor and handlers, its ``ctx.start_soon`` tasks and
the app's hooks (``App.authorize``, ``App.fetch``). When it raises, the runtime logs the
exception once, with its traceback and the object's name (:func:`object_label`), counts
it by hook (``/_metrics``), and carries on: what
the caller sees instead (a 500, a Close 1011, a retried alarm) is decided by the code that
entered :class:`Containment`, after the ``with`` block.

Only :class:`Exception` is contained. ``trio.Cancelled``, ``KeyboardInterrupt`` and
``SystemExit`` pass through unchanged. A stub call does not contain: the caller's
``await stub.call(...)`` raises what the method raised.

``ctx.abort()`` is not an exception of the application's: it resets the object and
raises :class:`~._errors.ObjectAborted` to unwind the code that called it, which
:data:`abort_ends_here` stops where that code was entered.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, TypeAlias, final

import trio

from ._errors import ObjectAborted
from ._hooks import hook_takes_context
from ._http import Request, Response

if TYPE_CHECKING:
    from types import TracebackType

    from ._hooks import AppContext
    from ._ids import ObjectId

__all__ = [
    "Containment",
    "ObjectLog",
    "abort_ends_here",
    "object_label",
    "object_log",
    "run_app_hook",
]

log: Final = logging.getLogger("trio_hibernate.object")

ObjectLog: TypeAlias = "logging.LoggerAdapter[logging.Logger]"


def object_label(namespace: str, object_id: ObjectId) -> str:
    """How log lines name an object: ``namespace:name``, or ``namespace:<64 hex digits>``
    when it was addressed by id (``id_from_string``, ``new_unique_id``)."""
    return f"{namespace}:{object_id.name or object_id.hex}"


def object_log(namespace: str, object_id: ObjectId) -> ObjectLog:
    """The object logger, with ``object`` (:func:`object_label`), ``namespace``,
    ``object_id`` (hex) and ``object_name`` (None for an object addressed by id) on every
    record (keys of the JSON log format)."""
    return logging.LoggerAdapter(
        log,
        {
            "object": object_label(namespace, object_id),
            "namespace": namespace,
            "object_id": object_id.hex,
            "object_name": object_id.name,
        },
    )


@final
class Containment:
    """A context manager that contains an :class:`Exception` raised in its body.

    The exception is logged at ``ERROR`` with its traceback, as ``message % args``, and
    the ``with`` statement ends there; the code after it runs. Anything else (a
    cancellation, ``KeyboardInterrupt``) propagates.

    An instance keeps no state between uses: it can be made once and entered many times,
    also by several tasks at once (the supervisor keeps one for ``websocket_message``, so
    a message costs no allocation for it).

    Args:
        logger: where the record goes (an :func:`object_log` for an object's code).
        message: a ``%``-format naming the code that raised and what happens instead.
        args: the format's arguments, formatted only if something is logged.
        on_error: called once per contained exception (the host's counter of handler
            errors for this hook), before the record is logged.
    """

    __slots__ = ("_args", "_logger", "_message", "_on_error")

    def __init__(
        self,
        logger: logging.Logger | ObjectLog,
        message: str,
        *args: object,
        on_error: Callable[[], object] | None = None,
    ) -> None:
        self._logger = logger
        self._message = message
        self._args = args
        self._on_error = on_error

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None or not issubclass(exc_type, Exception):
            return False
        assert exc is not None
        if self._on_error is not None:
            self._on_error()
        self._logger.error(self._message, *self._args, exc_info=(exc_type, exc, tb))
        return True

    def __repr__(self) -> str:
        return f"<Containment {self._message!r}>"


def _only_aborts(exc: BaseException) -> bool:
    """``exc`` is an :class:`ObjectAborted`, or a group of them (with the cancellations
    of the tasks the abort cancelled beside it, in a nursery of the application's)."""
    if isinstance(exc, ObjectAborted):
        return True
    if not isinstance(exc, BaseExceptionGroup):
        return False
    _, rest = exc.split((ObjectAborted, trio.Cancelled))
    return rest is None and exc.subgroup(ObjectAborted) is not None


@final
class _AbortEndsHere:
    """See :data:`abort_ends_here`."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return exc is not None and _only_aborts(exc)


#: ``with abort_ends_here:`` stops the unwinding started by ``ctx.abort()``
#: (:class:`ObjectAborted`) where object code is entered (a turn, a ``ctx.start_soon``
#: task, the constructor and its critical sections): the object was reset already, by
#: ``abort()``; what follows the ``with`` block carries on. Anything else passes through.
#: One instance, no state: it costs a turn no allocation.
abort_ends_here: Final = _AbortEndsHere()


_ERROR_500: Final = "Internal Server Error\n"


async def run_app_hook(
    what: str,
    hook: Callable[..., Awaitable[object]],
    request: Request,
    ctx: AppContext,
    *,
    may_pass: bool,
    on_error: Callable[[], object] | None = None,
) -> Response | Request | None:
    """Run an app-level hook (``App.authorize``, ``App.fetch``), containing its crash.

    The hook is called ``hook(request, ctx)`` or ``hook(request)``, as it is declared.
    Returns what the hook returned: a :class:`Response`, or, with ``may_pass`` (a hook
    that may let the request through: ``App.authorize``), None or a :class:`Request`.
    A 500 if it raised or returned anything else (both logged, and ``on_error`` called).
    """
    with Containment(
        log,
        "%s raised for %s %s; answering 500",
        what,
        request.method,
        request.path,
        on_error=on_error,
    ):
        if hook_takes_context(hook):
            result: object = await hook(request, ctx)
        else:
            result = await hook(request)
        if isinstance(result, Response) or (
            may_pass and (result is None or isinstance(result, Request))
        ):
            return result
        wanted = "a Response, a Request or None" if may_pass else "a Response"
        if on_error is not None:
            on_error()
        log.error("%s returned %r, not %s; answering 500", what, result, wanted)
    return Response(status=500, body=_ERROR_500)
