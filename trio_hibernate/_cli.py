"""The command line: ``trio-hibernate serve MODULE:APP`` (also ``python -m trio_hibernate``),
and ``trio-hibernate connect URL``, a reconnecting client for debugging
(:mod:`trio_hibernate.client`).

Signals (see :func:`~trio_hibernate.wait_for_shutdown_signal`): SIGTERM and SIGINT close
every WebSocket with 1001 and exit 0 as soon as every client has answered, after
``--close-timeout`` at most; SIGUSR1 does the same with 1012 (service restart: clients
reconnect at once); a second one of these exits at once with status 130. SIGHUP loads the
app's code again in place, keeping every socket connected, as ``--reload`` does when a
source file changes. Ctrl-C while the app loads or the server starts exits with 130.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Final

import trio

from . import _gcstats
from ._app import App
from ._cluster.config import ClusterConfig
from ._compression import WebSocketCompression
from ._errors import AppLoadError, StorageError
from ._gctuning import DEFAULT_FULL_EVERY, tune_gc
from ._host import Host, runtime_of
from ._limits import Limits
from ._loading import AppSource, load_app, reload, reload_on_change
from ._logging import configure_logging
from ._server import Server, open_server
from ._signals import wait_for_shutdown_signal
from ._version import __version__
from .client import Backoff
from .client._console import connect

__all__ = ["load_app", "main", "version"]

log = logging.getLogger("trio_hibernate.cli")

#: Where ``serve`` reads the dashboard's token from when ``--dashboard-token`` is not given.
DASHBOARD_TOKEN_VARIABLE: Final = "TRIO_HIBERNATE_DASHBOARD_TOKEN"

#: Where ``serve`` reads the cluster key from when ``--cluster-key`` is not given.
CLUSTER_KEY_VARIABLE: Final = "TRIO_HIBERNATE_CLUSTER_KEY"

#: Exit status of a cluster host that fenced itself (it lost its lease).
EXIT_FENCED: Final = 3

#: ``--websocket-compression`` choices.
_COMPRESSION: Final = {
    "off": None,
    "on": WebSocketCompression(),
    "context-takeover": WebSocketCompression(context_takeover=True),
}


def version() -> str:
    """The installed distribution's version (its metadata), else the package's own."""
    try:
        return importlib.metadata.version("trio-hibernate")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return __version__


async def _reload_on_sighup(host: Host, source: AppSource) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as received:
        async for _ in received:
            await reload(host, source, "SIGHUP")


async def _serve(app: App, args: argparse.Namespace, source: AppSource) -> int:
    serving = False
    fenced: list[str] = []
    try:
        cluster = _cluster_config(args)
        async with open_server(
            app,
            args.address,
            args.port,
            data_dir=args.data_dir,
            idle_timeout=args.idle_timeout,
            hibernate_after_every_event=args.hibernate_after_every_event,
            close_timeout=args.close_timeout,
            handshake_timeout=args.handshake_timeout,
            request_timeout=args.request_timeout,
            partial_message_timeout=args.partial_message_timeout,
            call_timeout=args.call_timeout,
            limits=Limits(
                max_buffered_bytes=args.max_buffered_bytes,
                max_message_bytes=args.max_message_bytes,
                max_send_buffer_bytes=args.max_send_buffer_bytes,
            ),
            allowed_origins=args.allowed_origins,
            max_connections=args.max_connections,
            max_open_databases=args.max_open_databases,
            websocket_compression=_COMPRESSION[args.websocket_compression],
            dashboard=args.dashboard,
            dashboard_token=args.dashboard_token or os.environ.get(DASHBOARD_TOKEN_VARIABLE),
            cluster=cluster,
            shutdown_close_code=1012 if cluster is not None else 1001,
        ) as server:
            serving = True
            storage = (
                f"PostgreSQL, cluster host {cluster.host_id}"
                if cluster is not None
                else args.data_dir or "in memory"
            )
            print(
                f"trio-hibernate: listening on http://{server.address[0]}:{server.port} "
                f"(namespaces: {', '.join(sorted(app.objects))}; "
                f"storage: {storage})",
                flush=True,
            )
            placement = runtime_of(server.host).cluster
            if cluster is not None and placement is not None:  # joined before listening
                print(
                    f"trio-hibernate: cluster host {cluster.host_id} joined "
                    f"(incarnation {placement.incarnation})",
                    flush=True,
                )
            async with trio.open_nursery() as nursery:
                if args.gc == "tuned":
                    await nursery.start(tune_gc)
                nursery.start_soon(_reload_on_sighup, server.host, source)
                if args.reload:
                    nursery.start_soon(reload_on_change, server.host, source)
                async with trio.open_nursery() as waiting:  # whichever comes first

                    async def shut_down_on_signal() -> None:
                        await wait_for_shutdown_signal(server)
                        waiting.cancel_scope.cancel()

                    async def stop_when_fenced() -> None:
                        await _exit_when_fenced(server, fenced)
                        waiting.cancel_scope.cancel()

                    waiting.start_soon(shut_down_on_signal)
                    waiting.start_soon(stop_when_fenced)
                nursery.cancel_scope.cancel()
    except (StorageError, ValueError, OSError) as exc:
        if serving:
            raise
        if isinstance(exc, StorageError | ValueError):  # ValueError: max_connections
            return _fail(str(exc))
        # From binding the port (storage problems come as StorageError).
        return _fail(f"cannot listen on {args.address}:{args.port}: {exc.strerror or exc}")
    if fenced:
        print(f"trio-hibernate: stopped: this host fenced itself: {fenced[0]}", file=sys.stderr)
        return EXIT_FENCED
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


_LOG_LEVELS: Final = ["debug", "info", "warning", "error"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` after every option's help, unless the help already says
    what the default is (a default of None or False means nothing by itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


class _DeprecatedAlias(argparse.Action):
    """An old flag that still works: stores into the new flag's ``dest`` and warns."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kw: Any) -> None:
        self.new = new
        kw["help"] = f"deprecated alias of {new}"
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(
            f"trio-hibernate: {option_string} is deprecated; use {self.new} "
            "(the same as open_host's keyword)",
            file=sys.stderr,
            flush=True,
        )
        setattr(namespace, self.dest, values)


def _add_cluster_flags(serve: argparse.ArgumentParser) -> None:
    cluster = serve.add_argument_group(
        "cluster mode",
        "run as one of several hosts sharing a PostgreSQL database (docs/cluster.md)",
    )
    cluster.add_argument(
        "--cluster",
        metavar="DSN",
        default=None,
        help="PostgreSQL connection string (postgresql://user@host:port/db); objects and "
        "their storage then live in it, one instance per object across the hosts "
        "(needs the 'cluster' extra: psycopg) (default: single-host mode)",
    )
    cluster.add_argument(
        "--host-id",
        default=None,
        help="this host's unique name in the cluster (required with --cluster; default: none)",
    )
    cluster.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        default=None,
        help="where the other hosts reach this one (default: the bound address and port)",
    )
    cluster.add_argument(
        "--lease-ttl",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="membership lease: a host that cannot renew it stops serving, and its "
        "objects move to other hosts once it has expired (the failover time)",
    )
    cluster.add_argument(
        "--cluster-key",
        default=None,
        metavar="KEY",
        help=f"shared secret of the hosts' internal hop (relayed requests and sockets), "
        f"at least 16 characters (default: ${CLUSTER_KEY_VARIABLE}; without one, requests "
        "for objects another host owns are answered 503)",
    )
    cluster.add_argument(
        "--cluster-audit",
        action="store_true",
        help="log every fenced commit in the table th_commit_log (tests; grows without "
        "bound) (default: off)",
    )


def _cluster_config(args: argparse.Namespace) -> ClusterConfig | None:
    """The ClusterConfig of the command line (raises ValueError for a bad one)."""
    if args.cluster is None:
        for flag in ("host_id", "advertise", "cluster_key"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --cluster")
        return None
    if args.host_id is None:
        raise ValueError("--cluster needs --host-id NAME (this host's unique name)")
    if args.data_dir is not None:
        raise ValueError("--cluster keeps storage in PostgreSQL: leave out --data-dir")
    return ClusterConfig(
        dsn=args.cluster,
        host_id=args.host_id,
        advertise=args.advertise,
        lease_ttl=args.lease_ttl,
        key=args.cluster_key or os.environ.get(CLUSTER_KEY_VARIABLE),
        audit=args.cluster_audit,
    )


async def _exit_when_fenced(server: Server, fenced: list[str]) -> None:
    """Cluster mode: once the host has fenced itself, stop the process (status 3)."""
    placement = runtime_of(server.host).cluster
    if placement is not None:
        fenced.append(await placement.wait_fenced())
    else:
        await trio.sleep_forever()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-hibernate",
        description="Serve hibernatable WebSocket objects.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version()}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve an App over HTTP and WebSocket",
        description="Serve an App over HTTP and WebSocket. Flags are named after "
        "open_host's and open_server's keyword arguments (docs/operations.md).",
        formatter_class=_HelpFormatter,
    )
    serve.add_argument(
        "app",
        help="MODULE[:ATTR] or path/to/file.py[:ATTR]: an App, or a function returning "
        "one (ATTR default: app); a file's folder goes on sys.path",
    )
    serve.add_argument("--address", default="127.0.0.1", metavar="ADDRESS", help="address to bind")
    serve.add_argument(
        "--host", dest="address", action=_DeprecatedAlias, new="--address", metavar="ADDRESS"
    )
    serve.add_argument(
        "--port", type=int, default=8080, metavar="PORT", help="port to bind; 0 picks a free one"
    )
    serve.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="directory of the objects' databases (default: none, storage in memory)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="seconds an idle object stays in memory before it hibernates",
    )
    serve.add_argument(
        "--hibernate-after-every-event",
        action="store_true",
        help="strict mode: drop every instance after each event, so state kept only in "
        "memory is lost at once (default: off)",
    )
    serve.add_argument(
        "--close-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="seconds to wait for a peer's answer to our Close (also at shutdown)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        dest="close_timeout",
        action=_DeprecatedAlias,
        new="--close-timeout",
        type=_seconds,
        metavar="SECONDS",
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
        serve.add_argument(flag, type=_seconds, default=default, metavar="SECONDS", help=what)
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
            flag,
            type=_size,
            default=default,
            metavar="SIZE",
            help=f"{what}; K, M, G: binary units (default: {_show_size(default)})",
        )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        dest="allowed_origins",
        default=None,
        metavar="ORIGIN",
        help="let pages from this Origin open WebSockets (repeatable; '*' for any) "
        "(default: a browser may connect only from this server's own origin)",
    )
    serve.add_argument(
        "--dashboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve the live dashboard at /_dashboard: to loopback clients when "
        "listening on loopback, else only with a token",
    )
    serve.add_argument(
        "--dashboard-token",
        default=None,
        metavar="SECRET",
        help="the dashboard opens to whoever presents it (at least 16 characters); "
        f"better given as ${DASHBOARD_TOKEN_VARIABLE}, which a process list does not show "
        "(default: none)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="refuse clients with 503 past this many (default: the fd limit less 256 "
        "less 3 per open database)",
    )
    serve.add_argument(
        "--max-open-databases",
        type=int,
        default=None,
        metavar="N",
        help="object databases open at once, 3 fds each; past it the least recently used "
        "idle one is closed (default: 1/8 of the fd limit less 256)",
    )
    serve.add_argument(
        "--websocket-compression",
        choices=list(_COMPRESSION),
        default="off",
        help="permessage-deflate for clients that offer it: 'on' keeps no state per idle "
        "socket; 'context-takeover' compresses more, at ~300 KB per socket",
    )
    serve.add_argument(
        "--reload",
        action="store_true",
        help="when a .py file of the app's folder that it imported changes, import the "
        "app and those modules again, keeping every WebSocket connected (needs the "
        "'reload' extra: watchfiles) (default: off)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=_LOG_LEVELS, help="the least severe log shown"
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines as text, or one JSON object per line with the object and peer as keys",
    )
    serve.add_argument(
        "--gc",
        default="tuned",
        choices=["tuned", "default"],
        help="the cycle collector: 'tuned' freezes long-lived objects and runs a full "
        f"collection every {DEFAULT_FULL_EVERY:g} s instead of whenever it would "
        "(no long pauses amid traffic: see docs/operations.md); 'default': Python's own",
    )
    _add_cluster_flags(serve)
    talk = commands.add_parser(
        "connect",
        help="talk to a WebSocket: send stdin lines, print messages, reconnect",
        description="Send each line of stdin as a text message and print every message "
        "received; reconnect as trio_hibernate.client does (state changes on stderr). "
        "Exits 0 once stdin ends and every line is sent, 1 when the server says not to "
        "retry or the retries run out.",
        formatter_class=_HelpFormatter,
    )
    talk.add_argument("url", help="ws://host:port/namespace/name[?...]")
    talk.add_argument(
        "--reliable",
        action="store_true",
        help="send lines as ops the server acknowledges (default: plain messages)",
    )
    talk.add_argument("--client-id", default=None, help="the _pk to send (default: a random one)")
    talk.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help="failed reconnects in a row before giving up (default: never give up)",
    )
    talk.add_argument(
        "--log-level", default="warning", choices=_LOG_LEVELS, help="the least severe log shown"
    )
    return parser


def _has_watchfiles() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("watchfiles", "anyio"))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    0 after a shutdown by signal; 2 for a usage or configuration error (a bad app spec,
    an app that raises while loading, an unusable ``--data-dir``, a port that cannot be
    bound), reported on stderr before anything listens; 130 when interrupted: Ctrl-C
    before the server is up, or a second signal during the shutdown. ``connect``: 0 once
    stdin ends and every line is sent, 1 when the client closes for good.
    """
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, log_format=getattr(args, "log_format", "text"))
    if args.command == "connect":
        return _connect(args)
    if args.reload and not _has_watchfiles():
        return _fail("--reload needs watchfiles: pip install 'trio-hibernate[reload]'")
    try:
        source = AppSource(args.app)
        try:
            app = source.load()
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
