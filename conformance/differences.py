"""Where workerd is expected to fail the suite: trio-hibernate differs there on purpose.

docs/differences.md explains each entry at length. conformance/run.py reads this list: a
case that fails on workerd is fine only if it is here; a case here that passes on workerd
is reported (the difference may be gone and this list out of date).
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["EXPECTED_WORKERD_FAILURES", "Difference", "expected"]


@attrs.frozen
class Difference:
    """One case that fails on workerd by design."""

    case: str
    """The case's name in the table (the test name without ``test_``)."""
    source: str
    """Where trio-hibernate's behaviour is decided (the spec section and its Rule)."""
    summary: str
    """What workerd does instead, in one line."""


EXPECTED_WORKERD_FAILURES: Final = (
    Difference(
        "attachment_limit_is_2048_bytes",
        "spec 4, Rule: the seed's 2,048-byte attachment limit (configurable)",
        "workerd allows 16,384 serialized bytes since 2026-02",
    ),
    Difference(
        "turns_do_not_interleave",
        "spec 6, Rule (ordering): one event at a time per object, even across await",
        "workerd starts the next event while a handler awaits a timer",
    ),
    Difference(
        "runtime_echoes_close",
        "spec 7, Rule: the runtime answers the peer's Close before websocket_close runs",
        "workerd sends no Close back unless the handler calls ws.close(); clients see 1006",
    ),
    Difference(
        "close_handler_sees_closed_socket",
        "spec 7, Rule (consequence): the Close is already answered, so readyState is CLOSED",
        "workerd's webSocketClose sees CLOSING (2)",
    ),
    Difference(
        "event_timeout_cancels_handler",
        "spec 9: an overrunning handler is cancelled; the object is rebuilt, sockets stay",
        "workerd shuts the whole actor down; its sockets and requests then hang",
    ),
)


def expected(case: str) -> Difference | None:
    """The listed difference for ``case``, or None."""
    for difference in EXPECTED_WORKERD_FAILURES:
        if difference.case == case:
            return difference
    return None
