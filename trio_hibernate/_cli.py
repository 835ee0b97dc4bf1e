"""The command line: ``trio-hibernate serve MODULE:APP`` (also ``python -m trio_hibernate``),
and ``trio-hibernate connect URL``, a reconnecting client for debugging
(:mod:`trio_hibernate.client`).

Signals (see :func:`~trio_hibernate.wait_for_shutdown_signal`): SIGTERM and SIGINT close
every WebSocket with 1001 and exit 0 as soon as every client has answered, after
``--shutdown-timeout`` at most; SIGUSR1 does the same with 1012 (service restart: clients
reconnect at once); a second one of these exits at once with status 130. SIGHUP loads the
app's code again in place, keeping every socket connected, as ``--reload`` does when a
source file changes. Ctrl-C while the app loads or the server starts exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import signal
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Final

import trio

from . import _gcstats
from ._app import App
from ._compression import WebSocketCompression
from ._errors import AppLoadError, StorageError
from ._host import Host
from ._limits import Limits
from ._server import open_server
from ._signals import wait_for_shutdown_signal
from .client import Backoff
from .client._console import connect

__all__ = ["load_app", "main"]

log = logging.getLogger("trio_hibernate.cli")

_RELOAD_POLL_SECONDS: Final = 0.5
#: ``--websocket-compression`` choices.
_COMPRESSION: Final = {
    "off": None,
    "on": WebSocketCompression(),
    "context-takeover": WebSocketCompression(context_takeover=True),
}


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


async def _reload_on_sighup(host: Host, spec: str) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as received:
        async for _ in received:
            await _reload(host, spec)


async def _serve(app: App, args: argparse.Namespace, source: Path | None) -> int:
    serving = False
    try:
        async with open_server(
            app,
            args.host,
            args.port,
            data_dir=args.data_dir,
            idle_timeout=args.idle_timeout,
            close_timeout=args.shutdown_timeout,
            handshake_timeout=args.handshake_timeout,
            request_timeout=args.request_timeout,
            partial_message_timeout=args.partial_message_timeout,
            call_timeout=args.call_timeout,
            limits=Limits(
                max_buffered_bytes=args.max_buffered_bytes,
                max_message_bytes=args.max_message_bytes,
                max_send_buffer_bytes=args.max_send_buffer_bytes,
            ),
            allowed_origins=args.allowed_origin,
            max_connections=args.max_connections,
            max_open_databases=args.max_open_databases,
            websocket_compression=_COMPRESSION[args.websocket_compression],
        ) as server:
            serving = True
            print(
                f"trio-hibernate: listening on http://{server.address[0]}:{server.port} "
                f"(namespaces: {', '.join(sorted(app.objects))}; "
                f"storage: {args.data_dir or 'in memory'})",
                flush=True,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_reload_on_sighup, server.host, args.app)
                if args.reload and source is not None:
                    nursery.start_soon(_watch, server.host, args.app, source)
                await wait_for_shutdown_signal(server)
                nursery.cancel_scope.cancel()
    except (StorageError, ValueError, OSError) as exc:
        if serving:
            raise
        if isinstance(exc, StorageError | ValueError):  # ValueError: max_connections
            return _fail(str(exc))
        # From binding the port (storage problems come as StorageError).
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    return 0


def _connect(args: argparse.Namespace) -> int:
    if args.max_retries is not None and args.max_retries < 0:
        return _fail(f"--max-retries must be at least 0, got {args.max_retries}")
    try:
        return trio.run(
            lambda: connect(
                args.url,
                reliable=args.reliable,
                backoff=Backoff(max_retries=args.max_retries),
                client_id=args.client_id,
            )
        )
    except ValueError as exc:  # a malformed client id
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def _fail(message: str) -> int:
    """Report a usage or configuration error; returns the exit status for it."""
    print(f"trio-hibernate: {message}", file=sys.stderr, flush=True)
    return 2


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


_UNITS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size(text: str) -> int:
    """``65536``, ``64K``, ``256M`` or ``1G`` (binary units) -> bytes."""
    number, unit = text.strip(), ""
    if number[-1:].upper() in _UNITS.keys() - {""}:
        number, unit = number[:-1], number[-1].upper()
    try:
        value = int(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected bytes like 65536, 64K or 256M, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text}")
    return value


def _show_size(value: int) -> str:
    for unit in ("G", "M", "K"):
        if value % _UNITS[unit] == 0:
            return f"{value // _UNITS[unit]}{unit}"
    return str(value)


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
    for flag, default, what in (
        ("--handshake-timeout", 10.0, "seconds a client has to send its HTTP request"),
        ("--request-timeout", 30.0, "seconds to answer a request before a 504"),
        (
            "--partial-message-timeout",
            30.0,
            "seconds a half-received WebSocket message may stall before Close 1008",
        ),
        ("--call-timeout", 30.0, "seconds a stub call waits for its answer"),
    ):
        serve.add_argument(flag, type=_seconds, default=default, help=f"{what} ({default:g})")
    limits = Limits()
    for flag, default, what in (
        (
            "--max-buffered-bytes",
            limits.max_buffered_bytes,
            "bytes held for all clients together (messages, bodies, send buffers)",
        ),
        ("--max-message-bytes", limits.max_message_bytes, "largest inbound message"),
        (
            "--max-send-buffer-bytes",
            limits.max_send_buffer_bytes,
            "bytes piling up for a peer that does not read before it is dropped",
        ),
    ):
        serve.add_argument(
            flag, type=_size, default=default, help=f"{what} ({_show_size(default)}; K/M/G)"
        )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        default=None,
        help="let pages from this Origin open WebSockets (repeatable; '*' for any). "
        "Default: a browser may connect only from this server's own origin",
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
    serve.add_argument(
        "--websocket-compression",
        choices=list(_COMPRESSION),
        default="off",
        help="permessage-deflate for clients that offer it: 'on' keeps no state per idle "
        "socket; 'context-takeover' compresses more, at ~300 KB per socket (off)",
    )
    serve.add_argument("--reload", action="store_true", help="reload the app when its code changes")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    talk = commands.add_parser(
        "connect",
        help="talk to a WebSocket: send stdin lines, print messages, reconnect",
        description="Send each line of stdin as a text message and print every message "
        "received; reconnect as trio_hibernate.client does (state changes on stderr). "
        "Exits 0 once stdin ends and every line is sent, 1 when the server says not to "
        "retry or the retries run out.",
    )
    talk.add_argument("url", help="ws://host:port/namespace/name[?...]")
    talk.add_argument(
        "--reliable", action="store_true", help="send lines as ops the server acknowledges"
    )
    talk.add_argument("--client-id", default=None, help="the _pk to send (default: random)")
    talk.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help="failed reconnects in a row before giving up (default: never)",
    )
    talk.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    0 after a shutdown by signal; 2 for a usage or configuration error (a bad app spec,
    an app that raises while loading, an unusable ``--data-dir``, a port that cannot be
    bound), reported on stderr before anything listens; 130 when interrupted: Ctrl-C
    before the server is up, or a second signal during the shutdown. ``connect``: 0 once
    stdin ends and every line is sent, 1 when the client closes for good.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "connect":
        return _connect(args)
    try:
        try:
            app, source = load_app(args.app)
        except AppLoadError as exc:
            return _fail(str(exc))
        except Exception:  # the app's own code raised: show where, then stop
            traceback.print_exc()
            return _fail(f"cannot load the app {args.app} (the traceback is above)")
        _gcstats.install_from_environment()  # benchmarks: TRIO_HIBERNATE_GC_STATS=path
        return trio.run(_serve, app, args, source)
    except KeyboardInterrupt:
        print("trio-hibernate: interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
