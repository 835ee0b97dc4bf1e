"""pytest plugin (registered through the ``pytest11`` entry point).

Fixtures:
    hibernate_host: a :class:`~trio_hibernate.testing.TestHost` running the app returned
        by your ``hibernate_app`` fixture. Combine with pytest-trio's ``autojump_clock``.
    hibernate_strict: False by default; override it (or run ``pytest
        --hibernate-strict``) to drop every instance after each event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .._app import App
from ._host import TestHost, open_test_host


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trio-hibernate")
    group.addoption(
        "--hibernate-strict",
        action="store_true",
        default=False,
        help="run every hibernate_host in strict mode (evict after every event)",
    )


@pytest.fixture
def hibernate_strict(request: pytest.FixtureRequest) -> bool:
    """Whether ``hibernate_host`` evicts after every event (``--hibernate-strict``)."""
    return bool(request.config.getoption("--hibernate-strict"))


@pytest.fixture
async def hibernate_host(hibernate_app: App, hibernate_strict: bool) -> AsyncIterator[TestHost]:
    """A test host for the app of your ``hibernate_app`` fixture."""
    async with open_test_host(hibernate_app, strict=hibernate_strict) as host:
        yield host
