"""Plain ``pytest`` leaves out the browser test and the cluster proofs; ``pytest -m
browser`` and ``pytest -m cluster`` still select them.

``pyproject.toml`` puts ``-m "not browser and not cluster"`` in ``addopts`` so that the
suite passes on a machine without Chromium, PostgreSQL or nginx; ``nox -s browser`` runs
``pytest -m browser`` and ``nox -s cluster`` ``pytest -m cluster``, whose later ``-m``
must replace it; ``nox -s tests`` passes the same expression as ``addopts``. All are
checked on a real pytest run (collection only).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROWSER_TEST = "tests/test_browser.py"
#: How many tests the browser test file defines (all of them marked ``browser``).
BROWSER_TESTS = len(re.findall(r"^(?:async )?def test_", (ROOT / BROWSER_TEST).read_text(), re.M))
CLUSTER_TESTS_DIR = "tests/cluster"
#: How many tests the cluster proofs define (all of them marked ``cluster``).
CLUSTER_TESTS = sum(
    len(re.findall(r"^(?:async )?def test_", path.read_text(), re.M))
    for path in (ROOT / CLUSTER_TESTS_DIR).glob("test_*.py")
)
#: What ``nox -s tests`` selects.
NOX_TESTS = "not browser and not cluster"


def collect(*args: str, path: str = BROWSER_TEST) -> str:
    """The summary line of ``pytest --collect-only`` on ``path``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *args,
            path,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr
    return lines[-1]


@pytest.mark.parametrize(
    ("args", "summary"),
    [
        ((), f"no tests collected ({BROWSER_TESTS} deselected)"),
        (("-m", "browser"), f"{BROWSER_TESTS} tests collected"),
        (("-m", NOX_TESTS), f"no tests collected ({BROWSER_TESTS} deselected)"),
    ],
    ids=["default", "nox-browser", "nox-tests"],
)
def test_the_browser_marker_is_deselected_unless_asked_for(
    args: tuple[str, ...], summary: str
) -> None:
    assert collect(*args).startswith(summary)


@pytest.mark.parametrize(
    ("args", "summary"),
    [
        ((), f"no tests collected ({CLUSTER_TESTS} deselected)"),
        (("-m", "cluster"), f"{CLUSTER_TESTS} tests collected"),
        (("-m", NOX_TESTS), f"no tests collected ({CLUSTER_TESTS} deselected)"),
        (
            ("-m", "cluster and not scale"),
            f"{CLUSTER_TESTS - 1}/{CLUSTER_TESTS} tests collected (1 deselected)",
        ),
    ],
    ids=["default", "nox-cluster", "nox-tests", "quick-loop"],
)
def test_the_cluster_marker_is_deselected_unless_asked_for(
    args: tuple[str, ...], summary: str
) -> None:
    assert collect(*args, path=CLUSTER_TESTS_DIR).startswith(summary)
