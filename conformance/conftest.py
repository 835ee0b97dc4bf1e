"""pytest wiring for the conformance suite: ``--endpoint URL`` and a JSON results file."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from conformance.client import Client, Endpoint

settings.register_profile(
    "conformance",
    deadline=None,
    max_examples=100,
    stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("conformance")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance")
    group.addoption(
        "--endpoint",
        required=True,
        help="base URL of a runtime serving the reference object, e.g. http://127.0.0.1:8787",
    )
    group.addoption(
        "--results-json",
        default=None,
        help="write each case's outcome to this file (used by conformance/run.py)",
    )


@pytest.fixture(scope="session")
def endpoint(pytestconfig: pytest.Config) -> Endpoint:
    """The endpoint under test and the capabilities it announced."""
    return Endpoint.discover(str(pytestconfig.getoption("--endpoint")))


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A fresh object name: every case talks to an object nobody else has used."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"{slug}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def open_client(endpoint: Endpoint, name: str) -> Iterator[Callable[..., Client]]:
    """``open_client(tags=..., attachment=..., twice=...)``: a client of this case's object,
    shut down at the end of the case."""
    clients: list[Client] = []

    def factory(**options: Any) -> Client:
        client = Client.connect(endpoint, name, **options)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.shutdown()


# -- results file -----------------------------------------------------------------------


class ResultsRecorder:
    """Keeps each case's outcome and writes them as JSON when the session ends."""

    def __init__(self, path: Path, endpoint_url: str) -> None:
        self.path = path
        self.endpoint_url = endpoint_url
        self.cases: dict[str, dict[str, str]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        case = report.nodeid.split("::")[-1].removeprefix("test_")
        if report.failed:
            outcome = "failed" if report.when == "call" else "error"
            self.cases[case] = {"outcome": outcome, "message": _crash_line(report)}
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            self.cases[case] = {
                "outcome": "skipped",
                "message": str(reason).removeprefix("Skipped: "),
            }
        elif report.when == "call":
            self.cases[case] = {"outcome": "passed", "message": ""}

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        endpoint = Endpoint.discover(self.endpoint_url)
        result = {
            "endpoint": endpoint.base_url,
            "implementation": endpoint.implementation,
            "capabilities": endpoint.capabilities,
            "cases": self.cases,
        }
        self.path.write_text(json.dumps(result, indent=2) + "\n")


def _crash_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = str(getattr(crash, "message", None) or report.longrepr).strip()
    return message.splitlines()[0][:300] if message else "failed"


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--results-json")
    if path:
        recorder = ResultsRecorder(Path(str(path)), str(config.getoption("--endpoint")))
        config.pluginmanager.register(recorder, "conformance-results")
