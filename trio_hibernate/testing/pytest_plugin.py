"""pytest plugin (registered through the ``pytest11`` entry point).

Fixtures:
    hibernate_host: a :class:`~trio_hibernate.testing.TestHost` running the app returned
        by your ``hibernate_app`` fixture. Combine with pytest-trio's ``autojump_clock``.
    hibernate_host_options: ``{}`` by default; override it to pass
        :func:`~trio_hibernate.testing.open_test_host` options (``idle_timeout``,
        ``data_dir``, ``wait_timeout``, ``limits``...) to ``hibernate_host``. A test's
        ``@pytest.mark.hibernate_host(...)`` marks are applied over it.
    hibernate_strict: False by default; override it (to True, or parametrized) to drop
        every instance after each event.

Strict mode cannot be switched off by accident: ``pytest --hibernate-strict`` makes
every ``hibernate_host`` strict, whatever the fixtures and marks say.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from .._app import App
from ._host import TestHost, open_test_host

__all__ = ["hibernate_host", "hibernate_host_options", "hibernate_strict"]

_MARK = "hibernate_host"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trio-hibernate")
    group.addoption(
        "--hibernate-strict",
        action="store_true",
        default=False,
        help="run every hibernate_host in strict mode (evict after every event); "
        "no fixture or mark can turn it off",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARK}(**options): open_test_host options for the hibernate_host fixture "
        "(idle_timeout=, data_dir= (True: a fresh directory in tmp_path), wait_timeout=, "
        "limits=, strict=True...), applied over the hibernate_host_options fixture",
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.getoption("--hibernate-strict"):
        return "trio-hibernate: --hibernate-strict: every hibernate_host evicts after every event"
    return None


def _strict_flag(config: pytest.Config) -> bool:
    return bool(config.getoption("--hibernate-strict"))


@pytest.fixture
def hibernate_strict(request: pytest.FixtureRequest) -> bool:
    """Whether ``hibernate_host`` evicts after every event: ``--hibernate-strict``.

    Override it to make tests strict (parametrize it with ``[False, True]`` to run each
    test both ways). An override returning False does not turn off
    ``--hibernate-strict``: the command-line flag wins.
    """
    return _strict_flag(request.config)


@pytest.fixture
def hibernate_host_options() -> dict[str, Any]:
    """Keyword arguments for :func:`~trio_hibernate.testing.open_test_host` (``{}``).

    Override it (in a test module or a ``conftest.py``) to set ``idle_timeout``,
    ``data_dir`` (a path, or True for a fresh directory in the test's ``tmp_path``),
    ``wait_timeout``, ``limits`` or any :func:`~trio_hibernate.open_host` option.
    """
    return {}


def _options_of(request: pytest.FixtureRequest, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the test's ``hibernate_host`` marks applied (the closest last)."""
    options = dict(base)
    for mark in reversed(list(request.node.iter_markers(_MARK))):
        if mark.args:
            raise pytest.UsageError(
                f"@pytest.mark.{_MARK} takes keyword options only "
                f"(idle_timeout=..., data_dir=...), not {mark.args!r}"
            )
        options.update(mark.kwargs)
    if options.get("data_dir") is True:
        data_dir = request.getfixturevalue("tmp_path") / "hibernate-data"
        data_dir.mkdir()
        options["data_dir"] = str(data_dir)
    return options


@pytest.fixture
async def hibernate_host(
    request: pytest.FixtureRequest,
    hibernate_app: App,
    hibernate_strict: bool,
    hibernate_host_options: dict[str, Any],
) -> AsyncIterator[TestHost]:
    """A test host for the app of your ``hibernate_app`` fixture, with the options of
    ``hibernate_host_options`` and the test's ``hibernate_host`` marks. Strict when
    ``--hibernate-strict`` is given, or ``hibernate_strict`` or an option asks for it."""
    options = _options_of(request, hibernate_host_options)
    strict = _strict_flag(request.config) or hibernate_strict or bool(options.pop("strict", False))
    async with open_test_host(hibernate_app, strict=strict, **options) as host:
        yield host
