"""Run a trio-hibernate cluster on this machine: PostgreSQL, N hosts and nginx on 127.0.0.1.

As a script, ``python examples/cluster/cluster.py`` starts PostgreSQL 15 (a fresh
database in a temporary directory), three ``trio-hibernate serve`` hosts of
``examples/cluster/app.py`` and nginx in front of them, prints the URLs and waits for
Ctrl-C (or SIGTERM), then stops them all and removes the directory. ``--hosts``,
``--lease-ttl``, ``--app`` and ``--keep`` change that (``--help``).

As a module, the cluster proofs (tests/cluster/) use the same pieces:

- :func:`open_postgres`: ``initdb`` in a temporary directory, run as the unprivileged
  ``postgres`` user when we are root (PostgreSQL refuses to run as root), listening only
  on 127.0.0.1 on a free port and on a Unix socket in that directory, fsync on; a database
  created; its DSN in :attr:`Postgres.dsn`.
- :func:`start_host`: one ``python -m trio_hibernate serve APP --port 0 --cluster DSN
  --host-id NAME ...``; its port read from its "listening on" line.
- :func:`open_nginx`: nginx from the template ``nginx.conf`` beside this file, hashing
  ``/<namespace>/<name>`` over the hosts (``hash $object consistent``).
- :func:`open_cluster`: all of it.

Every child runs in its own session (Ctrl-C in the terminal reaches only this script,
which stops the children in order) with its output drained into a log file in the
directory and into memory (:attr:`Child.output`, for the tests). Stopping a child is
SIGTERM, then SIGKILL to its process group after a bound.

PostgreSQL here trusts every local connection (``initdb -A trust``): fine for a
throw-away database on loopback, not for anything else.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import IO, Final

import attrs
import trio

__all__ = [
    "APP",
    "Child",
    "Cluster",
    "HostProcess",
    "LaunchError",
    "Nginx",
    "Postgres",
    "free_port",
    "missing_binaries",
    "open_cluster",
    "open_nginx",
    "open_postgres",
    "start_host",
    "stop_child",
]

HERE: Final = Path(__file__).resolve().parent
#: The app the hosts serve unless told otherwise.
APP: Final = f"{HERE / 'app.py'}:app"
NGINX_TEMPLATE: Final = HERE / "nginx.conf"


def _pg_bin() -> Path:
    """Where PostgreSQL's server binaries are: ``$PG_BIN``, else Debian's place for the
    newest version installed (they are not on PATH), else ``/usr/lib/postgresql/15/bin``."""
    if configured := os.environ.get("PG_BIN"):
        return Path(configured)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else Path("/usr/lib/postgresql/15/bin")


PG_BIN: Final = _pg_bin()
DATABASE: Final = "trio_hibernate"
#: The unprivileged user PostgreSQL runs as when we are root.
PG_USER: Final = "postgres"
#: The user nginx's workers run as when we are root (the master stays root).
NGINX_USER: Final = ("nobody", "nogroup")
#: Seconds a child gets to exit after SIGTERM before it is SIGKILLed.
STOP_SECONDS: Final = 10.0
#: Seconds to wait for a child to be ready (PostgreSQL's initdb included).
START_SECONDS: Final = 60.0
#: Tries at a free port when a child finds the port taken after all.
PORT_TRIES: Final = 5
#: Bytes of a child's output kept in memory (the log file has all of it).
OUTPUT_KEPT_BYTES: Final = 4 << 20

LISTENING: Final = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
JOINED: Final = re.compile(rb"cluster host (\S+) joined \(incarnation (\d+)\)")
PG_READY: Final = re.compile(rb"database system is ready to accept connections")
PORT_TAKEN: Final = re.compile(rb"[Aa]ddress already in use")


class LaunchError(RuntimeError):
    """A child could not be started: the message says which, why, and where its log is."""


def missing_binaries() -> list[str]:
    """The programs :func:`open_cluster` needs that are not installed (empty if none)."""
    missing = [
        str(PG_BIN / name) for name in ("initdb", "postgres") if not (PG_BIN / name).exists()
    ]
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        missing.append("nginx")
    return missing


def _nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    """A port free on 127.0.0.1 right now (bound to port 0, then closed).

    Another process may take it before ours binds it: the starters retry on "Address
    already in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- a child process ---------------------------------------------------------------------------


@attrs.define(eq=False)
class Child:
    """A child process whose output (stdout and stderr together) is drained by a task.

    The output goes to :attr:`log` and its last :data:`OUTPUT_KEPT_BYTES` stay in
    :attr:`output`; :meth:`wait_for_output` waits for a pattern in it.
    """

    name: str
    process: trio.Process
    log: Path
    output: bytearray = attrs.field(factory=bytearray)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _drained: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pid(self) -> int:
        """The process id (also its process group id: each child leads its own session)."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal), else None."""
        return self.process.returncode

    def text(self) -> str:
        """The output kept in memory, decoded."""
        return self.output.decode(errors="replace")

    async def drain(self) -> None:
        """Copy the child's output to :attr:`log` and :attr:`output` until it closes it."""
        stream = self.process.stdout
        assert stream is not None
        try:
            with self.log.open("ab") as log:
                while chunk := await stream.receive_some(65536):
                    log.write(chunk)
                    log.flush()
                    self.output += chunk
                    if len(self.output) > OUTPUT_KEPT_BYTES:
                        del self.output[: len(self.output) - OUTPUT_KEPT_BYTES]
                    self._changed.set()
                    self._changed = trio.Event()
        finally:
            self._drained.set()
            self._changed.set()

    async def wait_for_output(
        self, pattern: re.Pattern[bytes], seconds: float = START_SECONDS
    ) -> re.Match[bytes]:
        """Wait until ``pattern`` appears in the output.

        Raises:
            LaunchError: the child closed its output (it exited) first, or ``seconds``
                passed; the message has its last lines.
        """
        with trio.move_on_after(seconds):
            while (match := pattern.search(self.output)) is None:
                if self._drained.is_set():
                    raise LaunchError(
                        f"{self.name} exited (status {await self.wait()}) before printing "
                        f"{pattern.pattern!r}; its log {self.log} ends with:\n{self.tail()}"
                    )
                await self._changed.wait()
            return match
        raise LaunchError(
            f"{self.name} did not print {pattern.pattern!r} within {seconds} s; its log "
            f"{self.log} ends with:\n{self.tail()}"
        )

    async def wait(self) -> int:
        """Wait for the child to exit; its status."""
        return await self.process.wait()

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of output."""
        return "\n".join(self.text().splitlines()[-lines:])

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the child (not its group) unless it already exited."""
        if self.process.returncode is None:
            self.process.send_signal(signum)


async def _spawn(
    nursery: trio.Nursery,
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    user: str | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Child:
    """Start ``argv`` in a new session, its output drained by a task in ``nursery``."""
    # With a user, what setpriv or runuser would do, without the extra process: the child
    # calls setgroups([]), setgid and setuid before exec.
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=cwd,
        env=None if env is None else dict(env),
        user=user,
        group=user,
        extra_groups=None if user is None else [],
    )
    child = Child(name, process, log)
    nursery.start_soon(child.drain)
    return child


async def stop_child(child: Child, seconds: float = STOP_SECONDS) -> int:
    """SIGTERM ``child``, wait up to ``seconds``, then SIGKILL its process group; its status.

    Cancellation: shielded, so that a cancelled caller never leaves a child behind.
    """
    with trio.CancelScope(shield=True):
        if child.returncode is None:
            child.signal(signal.SIGTERM)
            with trio.move_on_after(seconds):
                await child.wait()
        _kill_group(child)  # the rest of its group too (PostgreSQL's backends, nginx's workers)
        status = await child.wait()
    return status


def _kill_group(child: Child) -> None:
    with suppress(ProcessLookupError):  # the group is empty: every process in it is gone
        os.killpg(child.pid, signal.SIGKILL)


def _run(argv: Sequence[str], what: str, *, user: str | None, timeout: float) -> None:
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
        user=user,
        group=user,
        extra_groups=None if user is None else [],
    )
    if result.returncode != 0:
        raise LaunchError(
            f"{what} failed (status {result.returncode}): {' '.join(argv)}\n"
            f"{result.stdout}{result.stderr}"
        )


# -- PostgreSQL --------------------------------------------------------------------------------


@attrs.frozen
class Postgres:
    """A running PostgreSQL server and the database made for the cluster."""

    child: Child
    port: int
    directory: Path
    """Its data directory's parent: the Unix socket and the log are here too."""
    database: str = DATABASE

    @property
    def dsn(self) -> str:
        """``postgresql://`` URL of the database (TCP on 127.0.0.1, trusted, no password)."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{self.database}"


def _pg_user() -> str | None:
    return PG_USER if os.geteuid() == 0 else None


def _prepare_pg_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700)
    if (user := _pg_user()) is not None:
        shutil.chown(directory, user, user)


@asynccontextmanager
async def open_postgres(directory: Path, *, database: str = DATABASE) -> AsyncIterator[Postgres]:
    """Initialize and run PostgreSQL in ``directory`` (created; its parent must let the
    ``postgres`` user through), create ``database``; stop the server on the way out.

    Raises:
        LaunchError: initdb, the server or createdb failed (the message has their output).
    """
    _prepare_pg_directory(directory)
    data = directory / "data"
    user = _pg_user()
    await trio.to_thread.run_sync(
        lambda: _run(
            [
                str(PG_BIN / "initdb"),
                *("-D", str(data), "-U", PG_USER, "-A", "trust"),
                *("--encoding", "UTF8", "--locale", "C"),
                "--no-sync",  # initdb's own files; the server runs with fsync on
            ],
            "initdb",
            user=user,
            timeout=START_SECONDS,
        )
    )
    async with trio.open_nursery() as nursery:
        child, port = await _start_postgres(nursery, directory, data)
        try:
            await trio.to_thread.run_sync(
                lambda: _run(
                    [
                        str(PG_BIN / "createdb"),
                        *("-h", "127.0.0.1", "-p", str(port), "-U", PG_USER),
                        database,
                    ],
                    "createdb",
                    user=user,
                    timeout=START_SECONDS,
                )
            )
            yield Postgres(child, port, directory, database)
        finally:
            # SIGTERM is PostgreSQL's "smart" shutdown, which waits for clients to leave;
            # SIGINT ("fast") disconnects them, and is what we want once the hosts are gone.
            with trio.CancelScope(shield=True):
                child.signal(signal.SIGINT)
                await stop_child(child)


async def _start_postgres(nursery: trio.Nursery, directory: Path, data: Path) -> tuple[Child, int]:
    for attempt in range(PORT_TRIES):
        port = free_port()
        child = await _spawn(
            nursery,
            f"postgres 127.0.0.1:{port}",
            [
                str(PG_BIN / "postgres"),
                *("-D", str(data)),
                *("-c", "listen_addresses=127.0.0.1", "-c", f"port={port}"),
                *("-c", f"unix_socket_directories={directory}"),
                *("-c", "fsync=on", "-c", "synchronous_commit=on"),
                *("-c", "max_connections=200"),
            ],
            directory / f"postgres.{attempt}.log",
            user=_pg_user(),
            cwd=directory,
        )
        try:
            await child.wait_for_output(PG_READY)
        except BaseException as exc:
            if not isinstance(exc, LaunchError):  # cancelled, or a bug: leave nothing behind
                await stop_child(child)
                raise
            if PORT_TAKEN.search(child.output) and attempt + 1 < PORT_TRIES:
                await stop_child(child)
                continue
            await stop_child(child)
            raise
        return child, port
    raise AssertionError("unreachable: the last try raises")


# -- hosts -------------------------------------------------------------------------------------


@attrs.frozen
class HostProcess:
    """A ``trio-hibernate serve`` host of the cluster."""

    host_id: str
    child: Child
    port: int

    def url(self, path: str = "/", scheme: str = "ws") -> str:
        """``scheme://127.0.0.1:PORT`` + ``path``."""
        return f"{scheme}://127.0.0.1:{self.port}{path}"


async def start_host(
    nursery: trio.Nursery,
    directory: Path,
    dsn: str,
    host_id: str,
    *,
    key: str,
    lease_ttl: float = 2.0,
    audit: bool = False,
    app: str = APP,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> HostProcess:
    """Start a host serving ``app`` on a port of its choosing; wait until it joined.

    Its output is drained by a task in ``nursery`` into ``directory/<host_id>.log``
    (appended to: a restarted host keeps one log).

    Raises:
        LaunchError: it exited, or did not print its "listening on" and "joined" lines in
            time.
    """
    argv = [
        sys.executable,
        *("-m", "trio_hibernate", "serve", app, "--port", "0"),
        *("--cluster", dsn, "--host-id", host_id, "--cluster-key", key),
        *("--lease-ttl", str(lease_ttl)),
        *(["--cluster-audit"] if audit else []),
        *extra_args,
    ]
    child = await _spawn(nursery, f"host {host_id}", argv, directory / f"{host_id}.log", env=env)
    try:
        listening = await child.wait_for_output(LISTENING)
        await child.wait_for_output(JOINED)
    except BaseException:
        await stop_child(child)
        raise
    return HostProcess(host_id, child, int(listening.group(1)))


# -- nginx -------------------------------------------------------------------------------------


@attrs.frozen
class Nginx:
    """nginx in front of the hosts."""

    child: Child
    port: int

    def url(self, path: str = "/", scheme: str = "ws") -> str:
        """``scheme://127.0.0.1:PORT`` + ``path``."""
        return f"{scheme}://127.0.0.1:{self.port}{path}"


def render_nginx_conf(directory: Path, port: int, host_ports: Sequence[int]) -> str:
    """The template with this cluster's paths, port and upstream servers filled in."""
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in host_ports)
    user = f"user {NGINX_USER[0]} {NGINX_USER[1]};" if os.geteuid() == 0 else ""
    values = {
        "@USER@": user,
        "@DIR@": str(directory),
        "@PORT@": str(port),
        "@UPSTREAM_SERVERS@": servers,
    }
    lines = []
    for line in NGINX_TEMPLATE.read_text().splitlines():
        if not line.lstrip().startswith("#"):  # the comments name the placeholders
            for placeholder, value in values.items():
                line = line.replace(placeholder, value)
        lines.append(line)
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def open_nginx(directory: Path, host_ports: Sequence[int]) -> AsyncIterator[Nginx]:
    """Run nginx (its config, pid, logs and temp files in ``directory``, created) in front
    of the hosts on ``host_ports``; stop it on the way out.

    Raises:
        LaunchError: it did not start (its output says why).
    """
    await trio.Path(directory).mkdir(mode=0o755)
    async with trio.open_nursery() as nursery:
        child, port = await _start_nginx(nursery, directory, host_ports)
        try:
            yield Nginx(child, port)
        finally:
            await stop_child(child)


async def _start_nginx(
    nursery: trio.Nursery, directory: Path, host_ports: Sequence[int]
) -> tuple[Child, int]:
    conf = directory / "nginx.conf"
    for attempt in range(PORT_TRIES):
        port = free_port()
        conf.write_text(render_nginx_conf(directory, port, host_ports))
        child = await _spawn(
            nursery,
            f"nginx 127.0.0.1:{port}",
            [
                _nginx_binary(),
                *("-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")),
            ],
            directory / f"nginx.{attempt}.log",
        )
        try:
            await _wait_listening(child, port)
        except BaseException as exc:
            await stop_child(child)
            if not isinstance(exc, LaunchError):  # cancelled, or a bug
                raise
            error_log = directory / "error.log"
            taken = error_log.exists() and PORT_TAKEN.search(error_log.read_bytes())
            if taken and attempt + 1 < PORT_TRIES:
                continue
            raise
        return child, port
    raise AssertionError("unreachable: the last try raises")


async def _wait_listening(child: Child, port: int) -> None:
    """Wait until ``port`` accepts connections (nginx prints nothing when it is ready)."""
    with trio.move_on_after(START_SECONDS):
        while child.returncode is None:
            with trio.socket.socket() as probe:
                try:
                    await probe.connect(("127.0.0.1", port))
                except ConnectionRefusedError:
                    pass
                else:
                    return
            await trio.sleep(0.05)  # polling a port: there is no event to wait for
        raise LaunchError(f"{child.name} exited (status {child.returncode}): see {child.log}")
    raise LaunchError(f"{child.name} did not listen within {START_SECONDS} s: see {child.log}")


# -- all of it ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class Cluster:
    """PostgreSQL, the hosts and nginx; :meth:`start_host` adds (or restarts) a host."""

    directory: Path
    postgres: Postgres
    key: str
    lease_ttl: float
    audit: bool
    app: str
    host_args: Sequence[str]
    hosts: dict[str, HostProcess]
    nginx: Nginx | None
    _nursery: trio.Nursery

    @property
    def dsn(self) -> str:
        """The database's DSN."""
        return self.postgres.dsn

    async def start_host(self, host_id: str) -> HostProcess:
        """Start host ``host_id`` (again, if it ran before: its old process must be gone)."""
        host = await start_host(
            self._nursery,
            self.directory,
            self.dsn,
            host_id,
            key=self.key,
            lease_ttl=self.lease_ttl,
            audit=self.audit,
            app=self.app,
            extra_args=self.host_args,
        )
        self.hosts[host_id] = host
        return host

    async def stop(self) -> None:
        """Stop nginx and every host (SIGTERM, SIGKILL after a bound), all at once."""
        async with trio.open_nursery() as nursery:
            for host in self.hosts.values():
                nursery.start_soon(stop_child, host.child)


@asynccontextmanager
async def open_cluster(
    hosts: int = 3,
    *,
    lease_ttl: float = 2.0,
    audit: bool = False,
    nginx: bool = True,
    app: str = APP,
    host_args: Sequence[str] = (),
    key: str | None = None,
    keep: bool = False,
) -> AsyncIterator[Cluster]:
    """PostgreSQL, ``hosts`` hosts ``h1``, ``h2``... and (with ``nginx``) nginx, in a new
    temporary directory; all stopped, and the directory removed (unless ``keep``), on
    the way out.

    Raises:
        LaunchError: something did not start (the message says what and where its log is).
    """
    directory = Path(await trio.to_thread.run_sync(tempfile.mkdtemp, "", "trio-hibernate-cluster-"))
    # The postgres user and nginx's workers must get through to their own directories.
    await trio.Path(directory).chmod(0o711)
    try:
        async with open_postgres(directory / "pg") as postgres, trio.open_nursery() as nursery:
            cluster = Cluster(
                directory,
                postgres,
                key or secrets.token_hex(16),
                lease_ttl,
                audit,
                app,
                host_args,
                {},
                None,
                nursery,
            )
            try:
                for i in range(1, hosts + 1):
                    await cluster.start_host(f"h{i}")
                if nginx:
                    ports = [host.port for host in cluster.hosts.values()]
                    async with open_nginx(directory / "nginx", ports) as cluster.nginx:
                        yield cluster
                else:
                    yield cluster
            finally:
                await cluster.stop()
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


# -- the script --------------------------------------------------------------------------------


async def _main(args: argparse.Namespace, out: IO[str]) -> None:
    async with open_cluster(
        args.hosts, lease_ttl=args.lease_ttl, app=args.app, keep=args.keep, audit=args.audit
    ) as cluster:
        assert cluster.nginx is not None
        print(f"PostgreSQL: {cluster.dsn}", file=out)
        for host in cluster.hosts.values():
            print(
                f"host {host.host_id}: {host.url('/', 'http')} (pid {host.child.pid}; "
                f"{host.url('/_cluster', 'http')})",
                file=out,
            )
        print(f"nginx: {cluster.nginx.url('/ledger/<name>')}", file=out)
        print(f"files and logs: {cluster.directory}", file=out)
        print("Ctrl-C to stop", file=out, flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping", file=out, flush=True)
                break
        # Leaving the block stops nginx, the hosts, then PostgreSQL.


def cli() -> None:
    """``python examples/cluster/cluster.py``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3, help="how many hosts (default 3)")
    parser.add_argument("--lease-ttl", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--app", default=APP, help="the app to serve (default: the ledger)")
    parser.add_argument("--audit", action="store_true", help="serve with --cluster-audit")
    parser.add_argument("--keep", action="store_true", help="keep the directory and logs")
    args = parser.parse_args()
    missing = missing_binaries()
    if missing:
        sys.exit(f"cluster.py: not installed: {', '.join(missing)}")
    try:
        trio.run(_main, args, sys.stdout)
    except LaunchError as exc:
        sys.exit(f"cluster.py: {exc}")


if __name__ == "__main__":
    cli()
