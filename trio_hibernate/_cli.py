"""The command line: ``trio-hibernate serve MODULE:APP`` (also ``python -m trio_hibernate``).

Signals: SIGTERM and SIGINT close every WebSocket with 1001 and exit 0 after the
shutdown deadline at most; SIGUSR1 does the same with 1012 (service restart: clients
reconnect at once); SIGHUP loads the app's code again in place, keeping every socket
connected, as ``--reload`` does when a source file changes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Final

import trio

from ._app import App
from ._host import Host
from ._server import serve_objects

__all__ = ["load_app", "main"]

log = logging.getLogger("trio_hibernate.cli")

_RELOAD_POLL_SECONDS: Final = 0.5


class AppLoadError(Exception):
    """The app spec could not be turned into an :class:`App`."""


def _module_from_file(path: Path) -> ModuleType:
    # Compiled from source every time: a cached .pyc is validated by whole-second mtime
    # and size, so an edit of the same length within a second would load stale code.
    name = f"_trio_hibernate_app_{path.stem}"
    module = ModuleType(name)
    module.__file__ = str(path)
    code = compile(path.read_bytes(), str(path), "exec")
    sys.modules[name] = module
    exec(code, module.__dict__)
    return module


def load_app(spec: str, *, fresh: bool = False) -> tuple[App, Path | None]:
    """Load ``MODULE[:ATTR]`` or ``path/to/file.py[:ATTR]`` (ATTR defaults to ``app``).

    ATTR may be an :class:`App` or a function returning one. With ``fresh``, the module
    is executed again (a code update). Returns the app and the source file, if known.

    Raises:
        AppLoadError: the spec does not name an App. Errors raised by the module itself
            (a SyntaxError, say) propagate unchanged.
    """
    target, _, attr = spec.partition(":")
    attr = attr or "app"
    if target.endswith(".py") or "/" in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise AppLoadError(f"no such file: {path}")
        module = _module_from_file(path)
    else:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name != target.split(".")[0] and exc.name != target:
                raise
            raise AppLoadError(f"no module named {target!r} (from {Path.cwd()})") from None
        if fresh:
            source = getattr(module, "__file__", None)
            if source is not None:  # see _module_from_file: never trust the .pyc here
                Path(importlib.util.cache_from_source(source)).unlink(missing_ok=True)
            module = importlib.reload(module)
    found = getattr(module, attr, None)
    if found is None:
        raise AppLoadError(f"{target} has no attribute {attr!r}")
    if not isinstance(found, App) and callable(found):
        found = found()
    if not isinstance(found, App):
        raise AppLoadError(f"{spec} is a {type(found).__name__}, not a trio_hibernate.App")
    source = getattr(module, "__file__", None)
    return found, None if source is None else Path(source)


def _watched_files(source: Path) -> dict[Path, tuple[int, int]]:
    files = {source, *source.parent.glob("*.py")}
    seen = {}
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue  # deleted between glob and stat: its absence is the change
        seen[path] = (stat.st_mtime_ns, stat.st_size)
    return seen


async def _reload(host: Host, spec: str) -> None:
    try:
        app, _ = load_app(spec, fresh=True)
    except Exception:  # a code update must never take the service down: keep the old code
        log.exception("reloading %s failed; still serving the previous code", spec)
        return
    await host.replace_app(app)
    log.info("reloaded %s: objects will be built from the new code", spec)


async def _watch(host: Host, spec: str, source: Path) -> None:
    seen = _watched_files(source)
    while True:
        await trio.sleep(_RELOAD_POLL_SECONDS)
        now = _watched_files(source)
        if now != seen:
            seen = now
            await _reload(host, spec)


async def _serve(app: App, args: argparse.Namespace, source: Path | None) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_objects(
                app,
                args.host,
                args.port,
                task_status=task_status,
                data_dir=args.data_dir,
                idle_timeout=args.idle_timeout,
                close_timeout=args.shutdown_timeout,
                allowed_origins=args.allowed_origin,
                max_connections=args.max_connections,
                max_open_databases=args.max_open_databases,
            )
        )
        print(
            f"trio-hibernate: listening on http://{server.address[0]}:{server.port} "
            f"(namespaces: {', '.join(sorted(app.objects))}; "
            f"storage: {args.data_dir or 'in memory'})",
            flush=True,
        )
        if args.reload and source is not None:
            nursery.start_soon(_watch, server.host, args.app, source)
        watched = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP}
        with trio.open_signal_receiver(*watched) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await _reload(server.host, args.app)
                    continue
                if signum == signal.SIGUSR1:
                    server.host.shutdown_close_code = 1012
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-hibernate", description="Serve hibernatable WebSocket objects."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve an App over HTTP and WebSocket")
    serve.add_argument("app", help="MODULE[:ATTR] or path/to/file.py[:ATTR] (ATTR: app)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (8080; 0 picks one)")
    serve.add_argument("--data-dir", default=None, help="storage directory (in memory)")
    serve.add_argument(
        "--idle-timeout", type=float, default=10.0, help="seconds before an idle object hibernates"
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for clients to answer the Close on shutdown",
    )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        default=None,
        help="accept WebSocket upgrades only from this Origin (repeatable)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="refuse clients with 503 past this many (default: the fd limit less 256 "
        "less 3 per open database)",
    )
    serve.add_argument(
        "--max-open-databases",
        type=int,
        default=None,
        help="object databases open at once, 3 fds each (default: 1/8 of the fd limit "
        "less 256); past it the least recently used idle one is closed",
    )
    serve.add_argument("--reload", action="store_true", help="reload the app when its code changes")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app, source = load_app(args.app)
    except AppLoadError as exc:
        print(f"trio-hibernate: {exc}", file=sys.stderr)
        return 2
    trio.run(_serve, app, args, source)
    return 0
