"""Plain ``pytest`` leaves out the browser test; ``pytest -m browser`` still selects it.

``pyproject.toml`` puts ``-m "not browser"`` in ``addopts`` so that the suite passes on
a machine without Chromium; ``nox -s browser`` runs ``pytest -m browser``, whose later
``-m`` must replace it. Both are checked on a real pytest run (collection only).
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


def collect(*args: str) -> str:
    """The summary line of ``pytest --collect-only`` on the browser test."""
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
            BROWSER_TEST,
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
        (("-m", "not browser"), f"no tests collected ({BROWSER_TESTS} deselected)"),
    ],
    ids=["default", "nox-browser", "nox-tests"],
)
def test_the_browser_marker_is_deselected_unless_asked_for(
    args: tuple[str, ...], summary: str
) -> None:
    assert collect(*args).startswith(summary)
