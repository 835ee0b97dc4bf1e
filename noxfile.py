"""Developer tasks. ``nox`` runs the default sessions: tests, lint, typecheck."""

from __future__ import annotations

import nox

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = [
    "pytest>=8",
    "pytest-trio>=0.8",
    "hypothesis>=6.100",
    "trio-websocket>=0.12",
    # A second, independent client: the permessage-deflate and subprotocol tests.
    "websockets>=15",
    # `serve --reload` (the `reload` extra).
    "watchfiles>=0.21",
    "anyio>=4",
]
#: The Python peers of the benchmark suite, and the profiler it runs on trio-hibernate.
BENCH_DEPS = ["trio-websocket>=0.12", "websockets>=17,<18", "wsproto>=1.2", "py-spy>=0.4"]
#: The docs site: Sphinx (autodoc reads the reStructuredText docstrings), MyST for the
#: Markdown pages, the Furo theme.
DOCS_DEPS = ["sphinx>=8.1,<10", "myst-parser>=4", "furo>=2024.8.6"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest arguments after ``--``)."""
    session.install("-e", ".", *TEST_DEPS)
    session.run("pytest", "-m", "not browser and not cluster", *session.posargs)


@nox.session(default=False)
def browser(session: nox.Session) -> None:
    """The chat page and the dashboard in headless Chromium (needs Debian's ``chromium``
    package); screenshots go under pytest's ``tmp_path``."""
    session.install("-e", ".", *TEST_DEPS, "playwright>=1.40")
    # Here a missing Playwright or Chromium fails the tests instead of skipping them;
    # -rP: the summary shows where each test saved its screenshot.
    env = {"TRIO_HIBERNATE_REQUIRE_BROWSER": "1"}
    session.run("pytest", "-m", "browser", "-rP", *session.posargs, env=env)


@nox.session(default=False)
def cluster(session: nox.Session) -> None:
    """The cluster proofs (tests/cluster/): PostgreSQL 15, hosts and nginx as processes on
    127.0.0.1, the 45,000-socket scale run included (about 5 minutes more; ``-- -m
    "cluster and not scale"`` leaves it out). Needs Debian's ``postgresql`` and ``nginx``."""
    # The extra "cluster": psycopg and its pool (the proofs audit the database through it).
    session.install("-e", ".[cluster]", *TEST_DEPS)
    # Here missing PostgreSQL or nginx binaries fail the tests instead of skipping them;
    # -rP: the summary shows what each proof measured (reconnect times, RSS per socket).
    env = {"TRIO_HIBERNATE_REQUIRE_CLUSTER": "1"}
    session.run("pytest", "-m", "cluster", "-rP", *session.posargs, env=env)


@nox.session(default=False)
def conformance(session: nox.Session) -> None:
    """The conformance suite against trio-hibernate, and against workerd if npm is here.

    Prints a side-by-side table per case (``-- --only trio-hibernate`` for one runtime;
    pytest arguments after a second ``--``). See conformance/README.md.
    """
    session.install("-e", ".", "pytest>=8", "hypothesis>=6.100", "websockets>=15")
    session.run("python", "conformance/run.py", *session.posargs)


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Build the docs site into docs/_build/html; any Sphinx warning fails the build."""
    session.install("-e", ".", *DOCS_DEPS)
    session.run(
        # -E -a: read and write every page each time, so no warning hides in a cache.
        *("sphinx-build", "-W", "--keep-going", "-E", "-a", "-b", "html"),
        *("-d", "docs/_build/doctrees", "docs", "docs/_build/html"),
        *session.posargs,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Check formatting and lint rules with ruff."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package, tests, examples, conformance, bench and this file (mypy
    --strict)."""
    # The extra "cluster" too: mypy checks the cluster code against psycopg's types.
    session.install("-e", ".[cluster]", *TEST_DEPS, "mypy>=1.10", "nox", "websockets>=15")
    session.run("mypy", *session.posargs)


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """Serve the example chat on http://127.0.0.1:8080/ (``-- --port N`` to change)."""
    session.install("-e", ".")
    session.run("trio-hibernate", "serve", "examples/chat.py:app", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark against workerd and Python peers; writes docs/benchmarks.md.

    Every performance target in one run, each row saying whether it was met (about 20
    minutes). ``-- --quick`` runs a short version (about 3 minutes, written to
    bench/.results/); other options of ``bench/run.py`` pass through (``--scenarios``,
    ``--servers``). workerd is installed from npm into bench/.peers/.
    """
    session.install("-e", ".", *BENCH_DEPS)
    invoked = " ".join(["nox -s bench", *(["--", *session.posargs] if session.posargs else [])])
    session.run("python", "bench/run.py", "--invoked-as", invoked, *session.posargs)
