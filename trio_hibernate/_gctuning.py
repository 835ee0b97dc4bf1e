"""Keeping Python's cycle collector out of a long-running server's way (``serve``).

A full collection (the oldest generation) walks every object the collector tracks and
stops the whole process meanwhile: with thousands of sockets held open (some 40 tracked
objects each) that is a pause of tens to hundreds of milliseconds, and it comes
whenever enough objects have survived into the oldest generation, in the middle of the
traffic. The objects of a socket or of a hibernated object live for minutes or hours,
and the runtime frees them by reference counting alone (it makes no reference cycles:
``tests/test_gctuning.py`` checks it), so walking them again and again finds nothing.

:func:`tune_gc` therefore, for the life of the server:

1. at start-up, collects once and freezes what exists (``gc.freeze``: the modules,
   classes and functions of the app and the libraries are never walked again);
2. turns the automatic full collection off (the oldest generation's threshold), keeping
   the young generations' collections, which are cheap and find the cycles of
   short-lived objects;
3. every ``freeze_every`` seconds, collects the young generations and freezes what
   survived them: long-lived objects leave the collector's sight;
4. every ``full_every`` seconds, unfreezes everything and runs one full collection, so
   that cycles an application left among long-lived objects are still freed (a pause,
   but a rare one, at a known rate), then freezes again.

Frozen objects are still freed by reference counting as soon as they are unused; only a
cycle among them waits for the next full collection. ``trio-hibernate serve --gc
default`` keeps Python's own behaviour. The pauses can be measured with
``TRIO_HIBERNATE_GC_STATS`` (``_gcstats.py``); ``docs/operations.md`` has the numbers.
"""

from __future__ import annotations

import gc
import logging
from typing import Final, NoReturn

import trio

__all__ = ["DEFAULT_FREEZE_EVERY", "DEFAULT_FULL_EVERY", "tune_gc"]

log = logging.getLogger("trio_hibernate.server")

#: Seconds between two freezes of what survived the young generations.
DEFAULT_FREEZE_EVERY: Final = 10.0
#: Seconds between two full collections (frozen objects included).
DEFAULT_FULL_EVERY: Final = 600.0
#: A threshold the oldest generation's count never reaches: no automatic full collection.
_NEVER: Final = 2**31 - 1


async def tune_gc(
    *,
    freeze_every: float = DEFAULT_FREEZE_EVERY,
    full_every: float = DEFAULT_FULL_EVERY,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run the policy of the module until cancelled; then Python's own behaviour is
    back (thresholds restored, everything unfrozen). Reports started once the first
    freeze is done. Run it in one task per process.

    Raises:
        ValueError: an interval is not positive.
    """
    if not freeze_every > 0 or not full_every > 0:
        raise ValueError(
            f"freeze_every and full_every must be > 0 seconds, not {freeze_every!r} "
            f"and {full_every!r}"
        )
    young, middle, oldest = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, middle, _NEVER)
    log.debug("gc: %d objects frozen at start-up", gc.get_freeze_count())
    task_status.started()
    try:
        next_full = trio.current_time() + full_every
        while True:
            await trio.sleep(freeze_every)
            if trio.current_time() >= next_full:
                gc.unfreeze()
                found = gc.collect()
                next_full = trio.current_time() + full_every
                log.debug("gc: full collection freed %d unreachable objects", found)
            else:
                gc.collect(1)  # the young generations' cycles are not frozen
            gc.freeze()
    finally:
        gc.set_threshold(young, middle, oldest)
        gc.unfreeze()
