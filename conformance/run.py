"""Run the conformance suite against trio-hibernate and, if npm is here, against workerd.

    python conformance/run.py [--only trio-hibernate|workerd] [-- PYTEST ARGS]

Starts each runtime serving the reference object on a free loopback port, runs
``pytest conformance --endpoint URL`` against it, stops it, and prints one table:
case | trio-hibernate | workerd. workerd comes from npm (the pinned ``workerd`` package,
installed into conformance/.workerd/, which git ignores).

Exit status: 1 if a case fails on trio-hibernate, or fails on workerd without being listed
in conformance/differences.py; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conformance.differences import EXPECTED_WORKERD_FAILURES, expected  # noqa: E402

#: The workerd release the suite was checked against (override: CONFORMANCE_WORKERD_VERSION).
WORKERD_VERSION: Final = "1.20261117.1"
WORKERD_DIR: Final = HERE / ".workerd"
#: trio-hibernate's idle timeout for the run: short, so the idle case is quick, and far
#: longer than any step of the suite, so objects never hibernate on their own mid-case.
TRIO_IDLE_TIMEOUT_S: Final = 4.0
START_TIMEOUT_S: Final = 30.0
NPM_TIMEOUT_S: Final = 300.0

IMPLEMENTATIONS: Final = ("trio-hibernate", "workerd")


def log(message: str) -> None:
    print(f"conformance: {message}", flush=True)


# -- servers ----------------------------------------------------------------------------


def _wait_until_serving(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/conformance/info", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"not serving after {START_TIMEOUT_S} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@contextmanager
def trio_hibernate_server(workdir: Path) -> Iterator[str]:
    """Serve conformance/reference_object.py (with its eviction hook); yields the URL."""
    log_path = workdir / "trio-hibernate.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "reference_object.py"),
                "--port",
                "0",
                "--idle-timeout",
                str(TRIO_IDLE_TIMEOUT_S),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    try:
        url = _read_url(process, log_path)
        _wait_until_serving(url, process, log_path)
        log(f"trio-hibernate serving on {url} (log: {log_path})")
        yield url
    finally:
        _stop(process, signal.SIGINT)  # KeyboardInterrupt: the host closes every socket


def _read_url(process: subprocess.Popen[bytes], log_path: Path) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT_S
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not selector.select(remaining):
            raise RuntimeError(f"trio-hibernate did not start:\n{_tail(log_path)}")
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            raise RuntimeError(f"trio-hibernate exited:\n{_tail(log_path)}")
        line += chunk
    selector.close()
    # "reference object listening on http://127.0.0.1:PORT/"
    return line.decode().split("listening on", 1)[1].strip().rstrip("/")


def install_workerd() -> Path | None:
    """The workerd binary from npm (installed on first use), or None if npm is missing."""
    npm = shutil.which("npm")
    if npm is None:
        return None
    version = os.environ.get("CONFORMANCE_WORKERD_VERSION", WORKERD_VERSION)
    manifest = WORKERD_DIR / "node_modules" / "workerd" / "package.json"
    installed = json.loads(manifest.read_text())["version"] if manifest.is_file() else None
    if installed != version:
        log(f"installing workerd@{version} into {WORKERD_DIR} with npm")
        WORKERD_DIR.mkdir(exist_ok=True)
        subprocess.run(
            [npm, "install", "--prefix", str(WORKERD_DIR), "--no-audit", "--no-fund",
             "--loglevel=error", f"workerd@{version}"],
            check=True,
            timeout=NPM_TIMEOUT_S,
        )  # fmt: skip
    for binary in sorted(
        (WORKERD_DIR / "node_modules" / "@cloudflare").glob("workerd-*/bin/workerd")
    ):
        return binary
    fallback = WORKERD_DIR / "node_modules" / ".bin" / "workerd"
    if fallback.exists():
        return fallback
    raise RuntimeError(f"npm installed workerd@{version} but no binary was found")


@contextmanager
def workerd_server(binary: Path, workdir: Path) -> Iterator[str]:
    """Serve conformance/worker/config.capnp on a free loopback port; yields the URL."""
    storage = workdir / "workerd-storage"
    storage.mkdir()
    log_path = workdir / "workerd.log"
    # Bind here and hand the socket over: no window in which another process takes the port.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [str(binary), "serve", "config.capnp", "--experimental",
                 "--socket-fd", f"http={listener.fileno()}",
                 "--directory-path", f"do-storage={storage}"],
                cwd=HERE / "worker",
                stdout=log_file,
                stderr=log_file,
                pass_fds=[listener.fileno()],
            )  # fmt: skip
    finally:
        listener.close()
    try:
        _wait_until_serving(url, process, log_path)
        log(f"workerd serving on {url} (log: {log_path})")
        yield url
    finally:
        _stop(process, signal.SIGTERM)


# -- the suite --------------------------------------------------------------------------


def run_suite(
    implementation: str, url: str, workdir: Path, pytest_args: list[str]
) -> dict[str, Any]:
    """Run the suite against ``url``; returns the results file's contents."""
    results = workdir / f"{implementation}.json"
    command = [
        sys.executable, "-m", "pytest", str(HERE),
        "--endpoint", url, "--results-json", str(results), *pytest_args,
    ]  # fmt: skip
    log(f"running the suite against {implementation}: {' '.join(command[1:])}")
    if implementation == "workerd":
        # workerd fails the listed differences on purpose: keep its pytest report (and
        # its "N failed" line, which would read like ours) in a log; the table says all.
        WORKERD_DIR.mkdir(exist_ok=True)
        report = WORKERD_DIR / "last-run.log"
        with report.open("w") as out:
            subprocess.run(command, cwd=ROOT, check=False, stdout=out, stderr=subprocess.STDOUT)
        log(f"workerd's pytest report: {report}")
    else:
        subprocess.run(command, cwd=ROOT, check=False)
    if not results.is_file():
        return {"implementation": implementation, "cases": {}, "error": "no results file"}
    data: dict[str, Any] = json.loads(results.read_text())
    return data


def cell(implementation: str, case: str, result: dict[str, str] | None) -> tuple[str, bool]:
    """The table cell for one case on one implementation, and whether it is a failure."""
    if result is None:
        return "-", False
    outcome = result["outcome"]
    if outcome == "passed":
        if implementation == "workerd" and expected(case) is not None:
            return "pass (listed difference not seen)", False
        return "pass", False
    if outcome == "skipped":
        return f"skip: {result['message']}", False
    if implementation == "workerd" and expected(case) is not None:
        return "differs (listed)", False
    return ("FAIL" if outcome == "failed" else "ERROR") + f": {result['message']}", True


def report(runs: dict[str, dict[str, Any] | str]) -> bool:
    """Print the side-by-side table; True if it holds a failure that counts."""
    cases: list[str] = []
    for run in runs.values():
        if isinstance(run, dict):
            cases += [case for case in run["cases"] if case not in cases]
    rows: list[tuple[str, ...]] = [("case", *IMPLEMENTATIONS)]
    failed = False
    for case in cases:
        cells = []
        for implementation in IMPLEMENTATIONS:
            run = runs.get(implementation, "not run")
            if isinstance(run, str):
                cells.append(run)
                continue
            text, bad = cell(implementation, case, run["cases"].get(case))
            failed |= bad
            cells.append(text)
        rows.append((case, *cells))
    for implementation, run in runs.items():
        if isinstance(run, dict) and not run["cases"]:
            failed = True
            log(f"{implementation}: the suite produced no results ({run.get('error')})")
    widths = [min(max(len(row[i]) for row in rows), 60) for i in range(len(rows[0]))]
    print()
    for index, row in enumerate(rows):
        print(" | ".join(_fit(text, widths[i]) for i, text in enumerate(row)).rstrip())
        if index == 0:
            print("-+-".join("-" * width for width in widths))
    print()
    for difference in EXPECTED_WORKERD_FAILURES:
        print(f"  listed difference {difference.case}: {difference.source}")
    print()
    return failed


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=IMPLEMENTATIONS, help="run against one runtime only")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed on to pytest")
    args = parser.parse_args()
    wanted = [args.only] if args.only else list(IMPLEMENTATIONS)
    runs: dict[str, dict[str, Any] | str] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        workdir = Path(tmp)
        if "trio-hibernate" in wanted:
            with trio_hibernate_server(workdir) as url:
                runs["trio-hibernate"] = run_suite("trio-hibernate", url, workdir, args.pytest_args)
        if "workerd" in wanted:
            binary = install_workerd()
            if binary is None:
                runs["workerd"] = "not run: npm not found"
                log("npm not found: skipping workerd")
            else:
                with workerd_server(binary, workdir) as url:
                    runs["workerd"] = run_suite("workerd", url, workdir, args.pytest_args)
        failed = report(runs)
    log(f"done in {time.monotonic() - started:.0f} s: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
