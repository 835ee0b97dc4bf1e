"""Owning context managers raise the caller's own exception, not a one-element group.

The rules, applied to the group a nursery of ours raises (``Cancelled`` leaves are the
nursery's own cancellation of its tasks, or an outer one that the exception raised in
their place carries out just as well):

1. Only ``Cancelled`` leaves: raise one of them, bare (an outer scope catches it).
2. One ``KeyboardInterrupt`` and otherwise only ``Cancelled``: raise it, bare, wherever
   it was delivered (the body, or one of our tasks) and however deeply it was wrapped,
   so that ``except KeyboardInterrupt`` around ``trio.run`` sees it.
3. The body's exception and otherwise only ``Cancelled``: raise the body's exception as
   it was raised (a group the body raised stays that group, not wrapped once more).
4. One other exception, raised by one of our tasks, and otherwise only ``Cancelled``:
   raise it, bare.
5. Anything else (two real errors): the group, unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

import trio

__all__ = ["open_owned_nursery"]


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _single(
    group: BaseExceptionGroup[BaseException], body_error: BaseException | None
) -> BaseException | None:
    """The one exception ``group`` stands for (see the module docstring), or None."""
    leaves = _leaves(group)
    real = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if not real:
        return body_error if isinstance(body_error, trio.Cancelled) else leaves[0]
    if len(real) == 1 and isinstance(real[0], KeyboardInterrupt):
        return real[0]
    # The body's own group comes back rebuilt (a cancel scope splits Cancelled out of
    # groups, which copies them), but its leaves are the same objects.
    if body_error is not None and {id(leaf) for leaf in real} == {
        id(leaf) for leaf in _leaves(body_error) if not isinstance(leaf, trio.Cancelled)
    }:
        return body_error
    return real[0] if len(real) == 1 else None


def _reraise(error: BaseException) -> NoReturn:
    # ``raise`` inside the handler of the group would make the group the error's
    # __context__ (a cycle: the group holds the error), and ``raise ... from None`` would
    # erase an explicit __cause__; restore both as they were.
    context, suppress = error.__context__, error.__suppress_context__
    try:
        raise error
    finally:
        error.__context__, error.__suppress_context__ = context, suppress


@asynccontextmanager
async def open_owned_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for an owning context manager whose body is the caller's code.

    What leaves it is what the caller would expect from the body alone: the body's own
    exception, a bare ``KeyboardInterrupt`` or ``Cancelled``, never a one-element
    exception group (the rules are in this module's docstring).
    """
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                body_error = exc
                raise
    except BaseExceptionGroup as group:
        single = _single(group, body_error)
        if single is None:
            raise
        _reraise(single)
