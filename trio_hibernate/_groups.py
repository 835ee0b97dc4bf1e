"""Owning context managers raise the caller's own exception, not a one-element group."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["open_owned_nursery"]


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


@asynccontextmanager
async def open_owned_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for an owning context manager whose body is the caller's code.

    If the body raises and the nursery's group holds nothing else (besides the
    ``Cancelled`` it caused), the body's exception propagates as itself.
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
        if body_error is not None and all(
            leaf is body_error or isinstance(leaf, trio.Cancelled) for leaf in _leaves(group)
        ):
            raise body_error from None
        raise
