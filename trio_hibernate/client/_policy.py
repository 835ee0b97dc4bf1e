"""When the client reconnects, and how long it waits first: plain decisions, no I/O.

The rules, as the server states them (see ``docs/client.md``):

1. **Come back** after a Close with a code in :data:`RETRY_CLOSE_CODES` (the server went
   away: 1001 shutdown, 1012 restart, 1013 try again later; the connection dropped: 1006;
   and 1005, 1011, 1014), after a refused upgrade whose status is in
   :data:`RETRY_STATUSES` (503 at the server's connection limit, 409 while the server
   still lists the previous socket with this client's id, other 5xx, 408, 425, 429), and
   after a connect that failed (refused, reset, timed out).
2. **Stop for good** after any other Close (1000 the server is done, 1008 policy, 4xxx
   chosen by the application, ...) or refusal (403 and every other 4xx): retrying would
   get the same answer.
3. **Wait before each attempt** :meth:`Backoff.delay_seconds`: exponential, capped,
   jittered so that clients dropped together do not come back together. The count of
   failed attempts starts again from zero once a connection is established.
"""

from __future__ import annotations

import random
from typing import Final

import attrs

__all__ = ["RETRY_CLOSE_CODES", "RETRY_STATUSES", "Backoff", "retries_close", "retries_status"]

#: Close codes after which the client reconnects.
RETRY_CLOSE_CODES: Final = frozenset({1001, 1005, 1006, 1011, 1012, 1013, 1014})
#: HTTP statuses of a refused upgrade after which the client tries again.
RETRY_STATUSES: Final = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def retries_close(code: int) -> bool:
    """Whether a connection closed with ``code`` is worth opening again (rule 1)."""
    return code in RETRY_CLOSE_CODES


def retries_status(status: int) -> bool:
    """Whether an upgrade refused with HTTP ``status`` is worth asking again (rule 1)."""
    return status in RETRY_STATUSES


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:  # also refuses nan
        raise ValueError(f"Backoff.{attribute.name} must be positive, got {value}")


def _fraction(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"Backoff.{attribute.name} must be within [0, 1], got {value}")


def _not_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:  # also refuses nan
        raise ValueError(f"Backoff.{attribute.name} must be at least 0, got {value}")


def _retries(_: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"Backoff.{attribute.name} must be None or >= 0, got {value}")


@attrs.frozen
class Backoff:
    """How long the client waits before each attempt to reconnect, and how many it makes.

    The wait before the *n*-th attempt in a row (``n`` = 1, 2, ...) is drawn uniformly
    from ``[base * (1 - jitter), base]`` where ``base = min(max_seconds, initial_seconds
    * multiplier ** (n - 1))``. With the defaults: about 0.25-0.5 s, 0.5-1 s, 1-2 s, ...
    up to 15-30 s.

    Attributes:
        initial_seconds: The base wait before the first attempt after a disconnect.
        max_seconds: The largest wait (the cap of ``base``).
        multiplier: How much the base grows per failed attempt (at least 1).
        jitter: The fraction of ``base`` drawn at random (0: no jitter, 1: "full jitter").
        max_retries: Failed attempts in a row after which the client gives up for good
            (None: it never does). A connection that stayed up ``min_uptime_seconds``
            resets the count.
        min_uptime_seconds: How long a connection must last to count as a success: a
            server that accepts and closes at once (1013 "try again later", say) is
            backed off and given up on like one that refuses (PartySocket's minUptime).
    """

    initial_seconds: float = attrs.field(default=0.5, validator=_positive)
    max_seconds: float = attrs.field(default=30.0, validator=_positive)
    multiplier: float = attrs.field(default=2.0, validator=_positive)
    jitter: float = attrs.field(default=0.5, validator=_fraction)
    max_retries: int | None = attrs.field(default=None, validator=_retries)
    min_uptime_seconds: float = attrs.field(default=5.0, validator=_not_negative)

    def __attrs_post_init__(self) -> None:
        if self.multiplier < 1:
            raise ValueError(f"Backoff.multiplier must be at least 1, got {self.multiplier}")
        if self.max_seconds < self.initial_seconds:
            raise ValueError(
                f"Backoff.max_seconds ({self.max_seconds}) is less than initial_seconds "
                f"({self.initial_seconds})"
            )

    def base_seconds(self, attempt: int) -> float:
        """The wait before attempt ``attempt`` (1, 2, ...) without jitter."""
        if attempt < 1:
            raise ValueError(f"attempts are counted from 1, got {attempt}")
        exponent = min(attempt - 1, 64)  # past 2**64 the cap has long been reached
        return min(self.max_seconds, self.initial_seconds * self.multiplier**exponent)

    def delay_seconds(self, attempt: int, rng: random.Random) -> float:
        """The jittered wait before attempt ``attempt`` (1, 2, ...), drawn from ``rng``."""
        base = self.base_seconds(attempt)
        return base * (1 - self.jitter * rng.random())

    def gives_up(self, failures: int) -> bool:
        """Whether ``failures`` failed attempts in a row are one too many."""
        return self.max_retries is not None and failures > self.max_retries
