"""Benchmarks of trio-hibernate against its peers, measured in one run; writes a report.

    python bench/run.py              # the full suite (about 20 minutes); nox -s bench
    python bench/run.py --quick      # small N, short runs (under 3 minutes)
    python bench/run.py --servers trio-hibernate trio+wsproto --scenarios echo

Every measurement starts a fresh server pinned to one core (``taskset -c 0``) and a fresh
load generator (``bench/loadgen.py``) pinned to the other, runs one scenario, and kills
both. The servers are run alternately (each repetition goes through every server, in an
order rotated between repetitions), and the report gives medians and the ratios of
trio-hibernate to each peer, all from the same run:

* ``idle``: server RSS (``VmRSS``) before and after opening N WebSockets, each to its own
  echo object, once the objects hibernated (trio-hibernate: ``--idle-timeout 1``, checked
  on ``/_metrics``; workerd: after its 10 s hibernation delay), divided by N.
* ``echo``: 100 sockets, one 32-byte text message in flight on each; messages per second.
* ``broadcast``: 1,000 subscribers and one sender on one object; the sender keeps 8
  broadcasts of 64 bytes in flight; deliveries per second counted at the subscribers.
* ``hibernation`` (trio-hibernate and workerd): with every object hibernated, the
  auto-response (``"ping"`` -> ``"pong"``) and protocol-ping rates, then round trips that
  wake the objects against round trips to the same objects, live.
* ``leak`` (trio-hibernate): RSS after 1,000 hibernate/wake cycles, after many more
  (100,000 in the full run), and after many echoed messages.
* ``rooms`` (trio-hibernate and workerd): 6,000 sockets in 600 rooms of 10 (one
  ``/broadcast/<room>`` object each); 3% of the sockets send a 64-byte message per second
  (a seeded Poisson process, the same for every server) that the room sends to its 10
  sockets; rooms hibernate and wake (trio-hibernate: ``--idle-timeout 1``; workerd: its
  own 10 s). Deliveries lost, latency p50/p99/max, server CPU per delivery, RSS, and the
  trio-hibernate server's garbage-collector pauses per generation
  (``TRIO_HIBERNATE_GC_STATS``, written when the server is stopped with SIGINT).
* ``writes`` (trio-hibernate and workerd): 4 sockets to one object keep 8 messages each
  in flight; each message is a turn that does one ``put`` and replies, the reply held
  until the write is durable (trio-hibernate ``--data-dir``, SQLite ``synchronous=FULL``;
  workerd: a SQLite-backed object on local disk, ``bench/workerd/storage.capnp``).
  Acknowledged writes per second.

Every rated run (echo, broadcast, auto-response, pings, writes, rooms) also records the
CPU time of the server process (``/proc/<pid>/stat``: utime + stime, all its threads)
over the whole call, and reports the rate per server CPU-second and the server CPU-seconds
per million messages, which a noisy neighbour moves much less than the raw rate;
``/proc/stat`` gives what other processes used, of the machine and of the server's core,
and a busy machine is flagged in the console and in the report. Ratios in the targets use
the rate per server CPU-second (the raw ratio is shown beside it), except durable writes,
which are bounded by the disk rather than by CPU.

With ``--profile`` (the default of the full suite), ``py-spy record`` samples the
trio-hibernate server during an extra echo and broadcast run; the report lists the top
frames. workerd is installed from npm into ``bench/.peers/`` (git-ignored) when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
BENCH: Final = ROOT / "bench"
PEERS: Final = BENCH / ".peers"
RESULTS: Final = BENCH / ".results"
WORKERD_VERSION: Final = "1.20261117.1"
TH = "trio-hibernate"


class BenchError(Exception):
    """A measurement failed; the run goes on and the report says so."""


# -- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Sizes and durations of one suite run."""

    reps: int
    throughput_reps: int  # echo and broadcast: short runs, so more of them
    idle_n: int
    idle_n_workerd: int
    echo_conns: int
    echo_payload: int
    warmup: float
    seconds: float
    broadcast_subs: int
    broadcast_payload: int
    broadcast_in_flight: int
    hib_conns: int
    hib_seconds: float
    wake_rounds: int
    workerd_hibernate_wait: float
    leak_conns: int
    leak_warmup_cycles: int
    leak_cycles: int
    leak_messages: int
    profile_seconds: float
    rooms_sockets: int
    rooms_size: int
    rooms_rate: float  # messages per socket per second
    rooms_payload: int
    rooms_idle_timeout: float  # trio-hibernate's --idle-timeout in the rooms run
    rooms_warmup: float
    rooms_seconds: float
    rooms_drain: float
    writes_conns: int
    writes_in_flight: int
    writes_seconds: float


FULL = Config(
    reps=3,
    throughput_reps=5,
    idle_n=10_000,
    idle_n_workerd=5_000,
    echo_conns=100,
    echo_payload=32,
    warmup=1.0,
    seconds=5.0,
    broadcast_subs=1_000,
    broadcast_payload=64,
    broadcast_in_flight=8,
    hib_conns=100,
    hib_seconds=4.0,
    wake_rounds=5,
    workerd_hibernate_wait=12.0,
    leak_conns=1_000,
    leak_warmup_cycles=1_000,
    leak_cycles=100_000,
    leak_messages=1_000_000,
    profile_seconds=5.0,
    rooms_sockets=6_000,
    rooms_size=10,
    rooms_rate=0.03,
    rooms_payload=64,
    rooms_idle_timeout=1.0,
    rooms_warmup=5.0,
    rooms_seconds=30.0,
    rooms_drain=5.0,
    writes_conns=4,
    writes_in_flight=8,
    writes_seconds=5.0,
)

QUICK = Config(
    reps=1,
    throughput_reps=1,
    idle_n=1_000,
    idle_n_workerd=1_000,
    echo_conns=100,
    echo_payload=32,
    warmup=0.5,
    seconds=2.0,
    broadcast_subs=1_000,
    broadcast_payload=64,
    broadcast_in_flight=8,
    hib_conns=50,
    hib_seconds=1.5,
    wake_rounds=2,
    workerd_hibernate_wait=12.0,
    leak_conns=500,
    leak_warmup_cycles=1_000,
    leak_cycles=10_000,
    leak_messages=100_000,
    profile_seconds=2.0,
    rooms_sockets=6_000,
    rooms_size=10,
    rooms_rate=0.03,
    rooms_payload=64,
    rooms_idle_timeout=1.0,
    rooms_warmup=2.0,
    rooms_seconds=10.0,
    rooms_drain=3.0,
    writes_conns=4,
    writes_in_flight=8,
    writes_seconds=2.0,
)


@dataclass(frozen=True)
class ServerSpec:
    """One server under test."""

    key: str
    label: str
    kind: str  # "th", "workerd" or "peer"
    script: str = ""  # bench/<script> for the Python peers
    raw: bool = False  # no WebSocket framing: replies are the client's own frames
    hibernates: bool = False


SERVERS: Final = [
    ServerSpec(TH, "trio-hibernate (this library)", "th", hibernates=True),
    ServerSpec("workerd", "workerd (npm, hibernatable Durable Object)", "workerd", hibernates=True),
    ServerSpec("trio-websocket", "trio-websocket server", "peer", "peer_trio_websocket.py"),
    ServerSpec("websockets", "websockets (asyncio)", "peer", "peer_websockets.py"),
    ServerSpec(
        "trio+wsproto", "trio + wsproto, one task per connection", "peer", "peer_wsproto.py"
    ),
    ServerSpec("trio TCP", "plain trio TCP, no WebSocket (floor)", "peer", "peer_tcp.py", raw=True),
]
SCENARIOS: Final = ["idle", "echo", "broadcast", "hibernation", "leak", "rooms", "writes"]
#: Which servers each scenario runs on.
SCENARIO_SERVERS: Final = {
    "idle": [s.key for s in SERVERS],
    "echo": [s.key for s in SERVERS],
    "broadcast": [s.key for s in SERVERS],
    "hibernation": [TH, "workerd"],
    "leak": [TH],
    "rooms": [TH, "workerd"],
    "writes": [TH, "workerd"],
}


@dataclass
class Options:
    """Command-line choices that are not sizes."""

    python: str
    server_cpu: str | None
    client_cpu: str | None
    workerd: Path | None
    log_dir: Path
    #: Holds the copy of trio_hibernate/ that the trio-hibernate server runs (it is started
    #: with this as its working directory, which ``python -m`` puts first on sys.path).
    th_source: Path


# -- processes ---------------------------------------------------------------------------


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu is not None else argv


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A one-shot HTTP/1.1 GET on 127.0.0.1 (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc/<pid>/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


_TICKS: Final = os.sysconf("SC_CLK_TCK")


def _busy_ticks(cpu: str | None = None) -> int:
    """Busy ticks of all CPUs together, or of core ``cpu`` (/proc/stat: everything but
    idle and iowait; guest time is already in user time)."""
    label = "cpu" if cpu is None else f"cpu{cpu}"
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name == label:
            fields = [int(v) for v in values[:8]]
            return sum(fields) - fields[3] - fields[4]
    raise BenchError(f"no {label} line in /proc/stat")


def _process_ticks(pid: int) -> int:
    """User + system ticks of one process (/proc/<pid>/stat fields 14 and 15)."""
    after_name = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(after_name[11]) + int(after_name[12])


#: Other processes using this many cores of the machine during a run, or this much of the
#: server's core, make its raw rates doubtful (the per-CPU-second figures hold better).
BUSY_MACHINE: Final = 0.25
BUSY_SERVER_CORE: Final = 0.10


class CpuWatch:
    """CPU used during a measurement by the server, the load generator and everything else
    (in cores: 1.0 is one core busy all the time), and the server's CPU-seconds.

    ``server_cpu`` is the core the server is pinned to: what else ran on it is reported
    as ``cpu_other_server_core`` (the noisy neighbour that slows the server down).
    """

    def __init__(self, server_pid: int, loadgen_pid: int, server_cpu: str | None) -> None:
        self.pids = (server_pid, loadgen_pid)
        self.server_cpu = server_cpu
        self.started = time.monotonic()
        self.system = _busy_ticks()
        self.core = _busy_ticks(server_cpu) if server_cpu is not None else 0
        self.procs = [_process_ticks(pid) for pid in self.pids]

    def stop(self) -> dict[str, float]:
        elapsed = max(1e-6, time.monotonic() - self.started)
        seconds = elapsed * _TICKS
        server, loadgen = (
            _process_ticks(p) - t for p, t in zip(self.pids, self.procs, strict=True)
        )
        other = _busy_ticks() - self.system - server - loadgen
        out = {
            "cpu_server": server / seconds,
            "cpu_loadgen": loadgen / seconds,
            "cpu_other": max(0.0, other / seconds),
            "cpu_server_seconds": server / _TICKS,
            "watch_seconds": elapsed,
        }
        if self.server_cpu is not None:
            on_core = _busy_ticks(self.server_cpu) - self.core - server
            out["cpu_other_server_core"] = max(0.0, on_core / seconds)
        return out


def per_message(cpu: dict[str, float], all_messages: float) -> dict[str, float]:
    """Server CPU per message of a rated run: messages per server CPU-second and server
    CPU-seconds per million messages (both over the whole load-generator call)."""
    used = cpu["cpu_server_seconds"]
    if all_messages <= 0 or used <= 0:
        return {}
    return {"rate_per_cpu": all_messages / used, "cpu_s_per_1m": used / all_messages * 1e6}


def busy_note(result: dict[str, Any], prefix: str = "") -> str | None:
    """A warning if other processes were busy during a run (None if the machine was quiet)."""
    machine = result.get(f"{prefix}cpu_other")
    core = result.get(f"{prefix}cpu_other_server_core")
    if machine is None:
        return None
    if machine < BUSY_MACHINE and (core is None or core < BUSY_SERVER_CORE):
        return None
    on_core = "" if core is None else f", {core:.2f} of the server's core"
    return f"other processes used {machine:.2f} cores{on_core}"


class Server:
    """A server under test, in its own process, pinned to the server core."""

    def __init__(
        self,
        spec: ServerSpec,
        options: Options,
        idle_timeout: float = 10.0,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        #: stop() sends SIGINT and waits for a clean exit (trio-hibernate writes its GC
        #: statistics at exit), instead of SIGKILL.
        self.graceful = False
        self.log_path = options.log_dir / f"{spec.key.replace(' ', '_').replace('+', '_')}.log"
        log = self.log_path.open("wb")
        pass_fds: tuple[int, ...] = ()
        listener: socket.socket | None = None
        cwd = ROOT
        if spec.kind == "th":
            cwd = options.th_source
            argv = [
                options.python,
                "-m",
                "trio_hibernate",
                "serve",
                f"{BENCH / 'th_app.py'}:app",
                "--port",
                "0",
                "--idle-timeout",
                repr(idle_timeout),
                "--log-level",
                "warning",
            ]
            if data_dir is not None:
                argv += ["--data-dir", str(data_dir)]
        elif spec.kind == "workerd":
            if options.workerd is None:
                raise BenchError("workerd is not installed (npm missing or failed)")
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
            pass_fds = (listener.fileno(),)
            argv = [
                str(options.workerd),
                "serve",
                f"bench/workerd/{'storage' if data_dir is not None else 'config'}.capnp",
                "--socket-fd",
                f"http={listener.fileno()}",
            ]
            if data_dir is not None:
                argv += ["--directory-path", f"do-storage={data_dir}"]
        else:
            argv = [options.python, f"bench/{spec.script}", "--port", "0"]
        self.proc = subprocess.Popen(
            pinned(options.server_cpu, argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
            env={**os.environ, **env} if env else None,
        )
        log.close()
        self.pid = self.proc.pid  # taskset execs the server: same pid
        try:
            if listener is not None:
                self.port = listener.getsockname()[1]
                listener.close()
                self._wait_http("/_stats")
            else:
                pattern = r"listening on http://[^:]+:(\d+)" if spec.kind == "th" else r"PORT (\d+)"
                self.port = self._wait_port(re.compile(pattern))
        except BaseException:
            self.stop()
            raise

    def _wait_port(self, pattern: re.Pattern[str], timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise BenchError(f"{self.spec.key} exited: {self.log_tail()}")
            time.sleep(0.05)
        raise BenchError(f"{self.spec.key} did not start in {timeout} s: {self.log_tail()}")

    def _wait_http(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.spec.key} exited: {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                if http_get(self.port, path, timeout=2.0)[0] == 200:
                    return
            time.sleep(0.1)
        raise BenchError(f"{self.spec.key} did not answer {path} in {timeout} s")

    def log_tail(self, lines: int = 8) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def rss(self) -> int:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.spec.key} died: {self.log_tail()}")
        return rss_bytes(self.pid)

    def metrics(self) -> dict[str, float]:
        """trio-hibernate's /_metrics as name -> value."""
        status, body = http_get(self.port, "/_metrics")
        if status != 200:
            raise BenchError(f"/_metrics answered {status}")
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def wakes(self) -> int:
        """Objects constructed so far (trio-hibernate and workerd)."""
        if self.spec.kind == "th":
            return int(self.metrics()["trio_hibernate_wakes_total"])
        status, body = http_get(self.port, "/_stats")
        if status != 200:
            raise BenchError(f"/_stats answered {status}")
        return int(json.loads(body)["constructed"])

    def wait_hibernated(self, objects: int, timeout: float, wait_workerd: float) -> float:
        """Wait until ``objects`` objects are hibernated; returns the seconds waited.

        trio-hibernate reports it on /_metrics; workerd does not, so its hibernation delay
        (10 s idle) is waited out.
        """
        started = time.monotonic()
        if self.spec.kind == "workerd":
            time.sleep(wait_workerd)
            return wait_workerd
        if self.spec.kind != "th":
            return 0.0
        deadline = started + timeout
        while True:
            values = self.metrics()
            live = values['trio_hibernate_objects{state="live"}']
            hibernated = values['trio_hibernate_objects{state="hibernated"}']
            if live == 0 and hibernated >= objects:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise BenchError(f"{hibernated:g} of {objects} objects hibernated, {live:g} live")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None and self.graceful:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


class LoadGen:
    """The load generator process, pinned to the client core; one JSON line per call."""

    def __init__(self, port: int, options: Options) -> None:
        self.proc = subprocess.Popen(
            pinned(options.client_cpu, [options.python, "bench/loadgen.py", "--port", str(port)]),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(options.log_dir / "loadgen.log").open("ab"),
        )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._buffer = b""

    def call(self, op: str, wait: float, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + wait
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise BenchError(f"load generator: no answer to {op} in {wait:g} s")
            if self._selector.select(left):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise BenchError(f"load generator exited during {op}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise BenchError(str(result["error"]))
        return result

    def stop(self) -> None:
        self._selector.close()
        if self.proc.poll() is None:
            self.proc.kill()  # its sockets are reset (SO_LINGER 0)
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def session(
    spec: ServerSpec,
    options: Options,
    idle_timeout: float = 10.0,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Server, LoadGen]]:
    server = Server(spec, options, idle_timeout, data_dir, env)
    try:
        gen = LoadGen(server.port, options)
        try:
            time.sleep(0.3)
            yield server, gen
        finally:
            gen.stop()
    finally:
        server.stop()


# -- scenarios -----------------------------------------------------------------------------


def connect(gen: LoadGen, group: str, count: int, **target: str | int) -> float:
    result = gen.call("connect", wait=180, group=group, count=count, timeout=170, **target)
    return float(result["seconds"])


def scenario_idle(spec: ServerSpec, cfg: Config, options: Options) -> dict[str, Any]:
    n = cfg.idle_n_workerd if spec.kind == "workerd" else cfg.idle_n
    with session(spec, options, idle_timeout=1.0) as (server, gen):
        before = server.rss()
        seconds = connect(gen, "idle", n, prefix="/echo/i")
        connected = server.rss()
        if spec.hibernates:
            waited = server.wait_hibernated(n, 60.0, cfg.workerd_hibernate_wait)
            time.sleep(0.5)
        else:
            waited = 1.0
            time.sleep(waited)
        after = server.rss()
    return {
        "n": n,
        "rss_before": before,
        "rss_connected": connected,
        "rss_after": after,
        "per_conn": (after - before) / n,
        "per_conn_live": (connected - before) / n,
        "connect_seconds": seconds,
        "settle_seconds": waited,
    }


def scenario_echo(spec: ServerSpec, cfg: Config, options: Options) -> dict[str, Any]:
    with session(spec, options) as (server, gen):
        connect(gen, "echo", cfg.echo_conns, prefix="/echo/e")
        watch = CpuWatch(server.pid, gen.pid, options.server_cpu)
        result = gen.call(
            "echo",
            wait=cfg.warmup + cfg.seconds + 60,
            group="echo",
            payload=cfg.echo_payload,
            raw=spec.raw,
            warmup=cfg.warmup,
            seconds=cfg.seconds,
        )
        cpu = watch.stop()
    return {
        "rate": result["rate"],
        "messages": result["messages"],
        "seconds": result["seconds"],
        "all_messages": result["all_messages"],
        **cpu,
        **per_message(cpu, result["all_messages"]),
    }


def scenario_broadcast(spec: ServerSpec, cfg: Config, options: Options) -> dict[str, Any]:
    with session(spec, options) as (server, gen):
        connect(gen, "subs", cfg.broadcast_subs, path="/broadcast/room")
        connect(gen, "sender", 1, path="/broadcast/room")
        watch = CpuWatch(server.pid, gen.pid, options.server_cpu)
        result = gen.call(
            "broadcast",
            wait=cfg.warmup + cfg.seconds + 60,
            subs="subs",
            sender="sender",
            payload=cfg.broadcast_payload,
            raw=spec.raw,
            in_flight=cfg.broadcast_in_flight,
            warmup=cfg.warmup,
            seconds=cfg.seconds,
        )
        cpu = watch.stop()
    return {
        **cpu,
        **per_message(cpu, result["all_messages"]),
        "rate": result["rate"],
        "deliveries": result["deliveries"],
        "broadcasts": result["broadcasts"],
        "seconds": result["seconds"],
        "all_messages": result["all_messages"],
    }


def scenario_hibernation(spec: ServerSpec, cfg: Config, options: Options) -> dict[str, Any]:
    n = cfg.hib_conns
    rounds = cfg.wake_rounds if spec.kind == "th" else 1
    out: dict[str, Any] = {"n": n}
    with session(spec, options, idle_timeout=0.5) as (server, gen):
        connect(gen, "h", n, prefix="/echo/h")
        server.wait_hibernated(n, 30.0, cfg.workerd_hibernate_wait)
        before = server.wakes()
        for kind in ("auto", "ping"):
            watch = CpuWatch(server.pid, gen.pid, options.server_cpu)
            result = gen.call(
                "echo",
                wait=cfg.hib_seconds + 60,
                group="h",
                kind=kind,
                warmup=min(0.5, cfg.warmup),
                seconds=cfg.hib_seconds,
            )
            out[f"{kind}_rate"] = result["rate"]
            cpu = watch.stop()
            cpu.update(per_message(cpu, result["all_messages"]))
            out.update({f"{kind}_{k}": v for k, v in cpu.items()})
        out["woken_by_auto_and_ping"] = server.wakes() - before
        wake: list[float] = []
        live: list[float] = []
        woken = 0
        for index in range(rounds):
            if index:
                server.wait_hibernated(n, 30.0, cfg.workerd_hibernate_wait)
            before = server.wakes()
            wake += gen.call("rtt", wait=120, group="h")["rtt_us"]
            woken += server.wakes() - before
            live += gen.call("rtt", wait=120, group="h")["rtt_us"]
    out["wakes_seen"] = woken
    out["wakes_expected"] = n * rounds
    out["wake_p50_us"] = statistics.median(wake)
    out["live_p50_us"] = statistics.median(live)
    out["added_p50_us"] = out["wake_p50_us"] - out["live_p50_us"]
    out["wake_p90_us"] = statistics.quantiles(wake, n=10)[-1]
    out["live_p90_us"] = statistics.quantiles(live, n=10)[-1]
    return out


def scenario_leak(spec: ServerSpec, cfg: Config, options: Options) -> dict[str, Any]:
    idle = 0.02
    gap = 0.05
    total = cfg.leak_conns + cfg.echo_conns
    out: dict[str, Any] = {"idle_timeout": idle, "gap": gap}
    with session(spec, options, idle_timeout=idle) as (server, gen):
        connect(gen, "cycle", cfg.leak_conns, prefix="/echo/c")
        connect(gen, "echo", cfg.echo_conns, prefix="/echo/m")

        def cycles(target: int) -> tuple[int, float]:
            started = time.perf_counter()
            first = server.wakes()
            while (done := server.wakes() - first) < target:
                if time.perf_counter() - started > 600:
                    raise BenchError(f"only {done} of {target} hibernate/wake cycles")
                count = max(cfg.leak_conns, int((target - done) * 1.05))
                gen.call("cycles", wait=900, group="cycle", count=count, gap=gap)
            return done, time.perf_counter() - started

        def messages(count: int) -> float:
            result = gen.call(
                "echo", wait=900, group="echo", warmup=0.0, seconds=0.0, max_messages=count
            )
            return float(result["rate"])

        out["warmup_cycles"], _ = cycles(cfg.leak_warmup_cycles)
        server.wait_hibernated(total, 30.0, 0.0)
        out["rss_start"] = server.rss()
        done, seconds = cycles(cfg.leak_cycles - out["warmup_cycles"])
        out["cycles"], out["cycles_seconds"] = done + out["warmup_cycles"], seconds
        server.wait_hibernated(total, 30.0, 0.0)
        out["rss_after_cycles"] = server.rss()
        out["messages"] = cfg.leak_messages
        out["messages_rate"] = messages(cfg.leak_messages)
        server.wait_hibernated(total, 30.0, 0.0)
        out["rss_end"] = server.rss()
    out["growth_cycles"] = (out["rss_after_cycles"] - out["rss_start"]) / out["rss_start"]
    out["growth"] = (out["rss_end"] - out["rss_start"]) / out["rss_start"]
    return out


def scenario_rooms(spec: ServerSpec, cfg: Config, options: Options) -> dict[str, Any]:
    gc_file = options.log_dir / f"gc-rooms-{time.monotonic_ns()}.json"
    env = {"TRIO_HIBERNATE_GC_STATS": str(gc_file)} if spec.kind == "th" else None
    with session(spec, options, idle_timeout=cfg.rooms_idle_timeout, env=env) as (server, gen):
        server.graceful = spec.kind == "th"  # SIGINT: the GC statistics are written at exit
        rss_before = server.rss()
        connect_seconds = connect(
            gen, "rooms", cfg.rooms_sockets, prefix="/broadcast/r", per_path=cfg.rooms_size
        )
        wakes_before = server.wakes()
        watch = CpuWatch(server.pid, gen.pid, options.server_cpu)
        window_start = time.monotonic_ns()  # the clock of the server's GC statistics
        result = gen.call(
            "rooms",
            wait=cfg.rooms_warmup + cfg.rooms_seconds + cfg.rooms_drain + 120,
            group="rooms",
            room_size=cfg.rooms_size,
            rate=cfg.rooms_rate,
            payload=cfg.rooms_payload,
            warmup=cfg.rooms_warmup,
            seconds=cfg.rooms_seconds,
            drain=cfg.rooms_drain,
        )
        window_end = time.monotonic_ns()
        cpu = watch.stop()
        wakes = server.wakes() - wakes_before
        rss = server.rss()
    out: dict[str, Any] = {
        **result,
        **cpu,
        **per_message(cpu, result["all_messages"]),
        "connect_seconds": connect_seconds,
        "rss_before": rss_before,
        "rss": rss,
        "wakes": wakes,
    }
    if result["all_messages"]:
        out["cpu_us_per_delivery"] = cpu["cpu_server_seconds"] / result["all_messages"] * 1e6
    if spec.kind == "th":
        try:
            stats = json.loads(gc_file.read_text())
            out["gc_whole"] = stats["generations"]
            out["gc"] = gc_window(stats["events"], window_start, window_end)
            if stats["events_dropped"]:
                out["gc_error"] = (
                    f"the server recorded only its first {len(stats['events']):,} collections "
                    f"({stats['events_dropped']:,} more were only counted)"
                )
        except (OSError, ValueError, KeyError) as exc:
            out["gc_error"] = f"no GC statistics from the server ({type(exc).__name__}: {exc})"
    return out


def gc_window(events: list[list[int]], start_ns: int, end_ns: int) -> dict[str, dict[str, Any]]:
    """Per generation, the collections (``[start_ns, pause_ns, generation]``, as
    ``trio_hibernate._gcstats`` writes them) that started within [start_ns, end_ns]:
    count, total, p50, p99 and max pause in ms."""
    out: dict[str, dict[str, Any]] = {}
    for generation in range(3):
        pauses = sorted(
            pause / 1e6
            for started, pause, number in events
            if number == generation and start_ns <= started <= end_ns
        )

        def at(fraction: float, pauses: list[float] = pauses) -> float | None:
            if not pauses:
                return None
            return pauses[min(len(pauses) - 1, math.ceil(fraction * len(pauses)) - 1)]

        out[str(generation)] = {
            "count": len(pauses),
            "total_ms": sum(pauses),
            "p50_ms": at(0.50),
            "p99_ms": at(0.99),
            "max_ms": pauses[-1] if pauses else None,
        }
    return out


def scenario_writes(spec: ServerSpec, cfg: Config, options: Options) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="writes-", dir=options.log_dir))
    try:
        with session(spec, options, idle_timeout=3600.0, data_dir=data_dir) as (server, gen):
            connect(gen, "writers", cfg.writes_conns, path="/writer/w")
            watch = CpuWatch(server.pid, gen.pid, options.server_cpu)
            result = gen.call(
                "echo",
                wait=cfg.warmup + cfg.writes_seconds + 60,
                group="writers",
                kind="put",
                in_flight=cfg.writes_in_flight,
                warmup=cfg.warmup,
                seconds=cfg.writes_seconds,
            )
            cpu = watch.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "rate": result["rate"],
        "messages": result["messages"],
        "seconds": result["seconds"],
        "all_messages": result["all_messages"],
        **cpu,
        **per_message(cpu, result["all_messages"]),
    }


RUNNERS: Final[dict[str, Callable[[ServerSpec, Config, Options], dict[str, Any]]]] = {
    "idle": scenario_idle,
    "echo": scenario_echo,
    "broadcast": scenario_broadcast,
    "hibernation": scenario_hibernation,
    "leak": scenario_leak,
    "rooms": scenario_rooms,
    "writes": scenario_writes,
}


# -- profiling -----------------------------------------------------------------------------


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``, or the frame as it is."""
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{function} ({short})"


#: Frames around everything (the interpreter, ``trio.run``): left out of the inclusive list.
_OUTER_FRAMES: Final = (
    "_run_module_as_main (",
    "_run_code (",
    "<module> (",
    "main (",
    "run (",
    "unrolled_run (",
)


def summarize_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """Top frames of py-spy's collapsed stacks: own time and inclusive time, in %."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        total += count
        if frames[-1].startswith(("get_events (", "poll (")) or "epoll" in frames[-1]:
            idle += count
            continue
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    busy = max(1, total - idle)
    return {
        "samples": total,
        "idle_share": idle / total if total else 0.0,
        "own": [(name, 100 * c / busy) for name, c in own.most_common(top)],
        "inclusive": [
            (name, 100 * c / busy)
            for name, c in inclusive.most_common(top + 12)
            if not name.startswith(_OUTER_FRAMES)
        ][:top],
    }


def profile_th(cfg: Config, options: Options, py_spy: str) -> dict[str, Any]:
    """py-spy on the trio-hibernate server during an echo, a broadcast and an auto-response
    run (the last with every object hibernated)."""
    spec = next(s for s in SERVERS if s.key == TH)
    out: dict[str, Any] = {}
    for name in ("echo", "broadcast", "auto-response"):
        with session(spec, options, idle_timeout=0.5) as (server, gen):
            call: dict[str, Any]
            if name == "broadcast":
                connect(gen, "subs", cfg.broadcast_subs, path="/broadcast/room")
                connect(gen, "sender", 1, path="/broadcast/room")
                call = {"op": "broadcast", "subs": "subs", "sender": "sender"}
            else:
                connect(gen, "echo", cfg.echo_conns, prefix="/echo/p")
                call = {"op": "echo", "group": "echo"}
                if name == "auto-response":
                    server.wait_hibernated(cfg.echo_conns, 30.0, 0.0)
                    call["kind"] = "auto"
            raw_path = options.log_dir / f"py-spy-{name}.txt"
            argv = [py_spy, "record", "--pid", str(server.pid), "--rate", "250"]
            argv += ["--duration", str(int(cfg.profile_seconds)), "--idle"]
            argv += ["--format", "raw", "--output", str(raw_path)]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            op = call.pop("op")
            result = gen.call(
                op,
                wait=cfg.profile_seconds + 60,
                warmup=0.0,
                seconds=cfg.profile_seconds + 1.5,
                **call,
            )
            try:
                _, err = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                raise BenchError("py-spy did not finish") from None
            if spy.returncode != 0 or not raw_path.exists():
                raise BenchError(f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
            out[name] = summarize_profile(raw_path.read_text())
            out[name]["rate_while_sampled"] = result["rate"]
    return out


# -- the run -------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything measured, for the report and the JSON dump."""

    mode: str
    command: str
    started: str
    config: dict[str, Any]
    machine: dict[str, str]
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: Runs during which other processes were busy (see ``busy_note``).
    busy: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    profile_error: str | None = None
    seconds: float = 0.0
    load_before: str = ""
    load_after: str = ""

    def add(self, scenario: str, server: str, result: dict[str, Any]) -> None:
        self.results.setdefault(scenario, {}).setdefault(server, []).append(result)

    def values(self, scenario: str, server: str, key: str) -> list[float]:
        runs = self.results.get(scenario, {}).get(server, [])
        return [float(r[key]) for r in runs if key in r]

    def median(self, scenario: str, server: str, key: str) -> float | None:
        values = self.values(scenario, server, key)
        return statistics.median(values) if values else None


def machine_facts(options: Options) -> dict[str, str]:
    facts = {
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fd limit": str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
        "pinning": (
            f"server on core {options.server_cpu}, load generator on core {options.client_cpu}"
            if options.server_cpu is not None
            else "none (taskset not found)"
        ),
    }
    facts["trio-hibernate source"] = (
        f"{library_source()} (copied at the start of the run; the server ran the copy)"
    )
    for package in ("trio-hibernate", "trio", "wsproto", "h11", "trio-websocket", "websockets"):
        try:
            facts[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            facts[package] = "not installed"
    if options.workerd is not None:
        try:
            version = subprocess.run(
                [str(options.workerd), "--version"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            version = "?"
        facts["workerd"] = f"{version} (npm workerd@{_installed_workerd() or '?'})"
    else:
        facts["workerd"] = "not installed"
    return facts


def source_digest() -> str:
    """A digest of the library's source (trio_hibernate/**/*.py)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "trio_hibernate").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def library_source() -> str:
    """The trio-hibernate source measured: its git commit and the digest of trio_hibernate/."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    if git("status", "--porcelain", "--", "trio_hibernate"):
        commit += " with uncommitted changes"
    return f"commit {commit}, trio_hibernate/ digest {source_digest()}"


def snapshot_library(into: Path) -> Path:
    """Copy trio_hibernate/ into ``into``, so that the whole run measures one version of it
    even if the work tree changes meanwhile; the server is started from the copy."""
    shutil.copytree(
        ROOT / "trio_hibernate",
        into / "trio_hibernate",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return into


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _installed_workerd() -> str | None:
    package = PEERS / "node_modules" / "workerd" / "package.json"
    if not package.exists():
        return None
    return str(json.loads(package.read_text()).get("version"))


def ensure_workerd() -> tuple[Path | None, str | None]:
    """The workerd binary from npm (installed into bench/.peers/ if needed), or an error."""
    binary = PEERS / "node_modules" / "workerd" / "bin" / "workerd"
    if _installed_workerd() != WORKERD_VERSION or not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            return None, "npm not found: workerd skipped"
        PEERS.mkdir(parents=True, exist_ok=True)
        package_json = PEERS / "package.json"
        if not package_json.exists():
            package_json.write_text('{"private": true}\n')
        print(f"installing workerd@{WORKERD_VERSION} into {PEERS} ...", flush=True)
        try:
            subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", f"workerd@{WORKERD_VERSION}"],
                cwd=PEERS,
                check=True,
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"npm install workerd failed: {exc}"
    if not binary.exists():
        return None, "workerd's binary is missing after npm install"
    return binary.resolve(), None


def run_suite(
    run: Run,
    cfg: Config,
    options: Options,
    servers: list[str],
    scenarios: list[str],
    deadline: float,
) -> None:
    specs = {s.key: s for s in SERVERS}
    total = max(cfg.reps, cfg.throughput_reps)
    for rep in range(total):
        for scenario in scenarios:
            reps = cfg.throughput_reps if scenario in ("echo", "broadcast") else cfg.reps
            if rep >= reps or (scenario == "leak" and rep != cfg.reps - 1):
                continue  # the leak check runs once, long
            keys = [k for k in SCENARIO_SERVERS[scenario] if k in servers]
            shift = rep % len(keys) if keys else 0
            keys = keys[shift:] + keys[:shift]  # rotate the order between repetitions
            for key in keys:
                if time.monotonic() > deadline:
                    run.errors.append(f"time budget spent: skipped {scenario}/{key} rep {rep + 1}")
                    continue
                started = time.monotonic()
                print(f"[rep {rep + 1}/{reps}] {scenario:<11} {key:<15}", end=" ", flush=True)
                try:
                    result = RUNNERS[scenario](specs[key], cfg, options)
                except (BenchError, OSError, subprocess.SubprocessError, KeyError) as exc:
                    message = f"{scenario}/{key} rep {rep + 1}: {type(exc).__name__}: {exc}"
                    run.errors.append(message)
                    print(f"FAILED ({message})", flush=True)
                    continue
                result["rep"] = rep + 1
                run.add(scenario, key, result)
                print(f"{_headline(scenario, result)}  ({time.monotonic() - started:.1f} s)")
                for prefix in ("", "auto_", "ping_"):
                    note = busy_note(result, prefix)
                    if note:
                        what = f"{scenario}{' ' + prefix.rstrip('_') if prefix else ''}/{key}"
                        run.busy.append(f"{what} rep {rep + 1}: {note}")
                        print(f"  WARNING: the machine was busy ({what}): {note}", flush=True)


def _headline(scenario: str, r: dict[str, Any]) -> str:
    if scenario == "idle":
        return f"{r['per_conn']:,.0f} B/conn at {r['n']:,}"
    if scenario in ("echo", "broadcast", "writes"):
        per_cpu = r.get("rate_per_cpu")
        return f"{r['rate']:,.0f}/s" + (f" ({per_cpu:,.0f} per CPU-s)" if per_cpu else "")
    if scenario == "rooms":
        return (
            f"lost {r['lost']}, p50 {_fmt(r['p50_ms'], ' ms', 2)}, p99 "
            f"{_fmt(r['p99_ms'], ' ms', 2)}, max {_fmt(r['max_ms'], ' ms', 1)}, "
            f"{_fmt(r.get('cpu_us_per_delivery'), ' us', 1)}/delivery, wakes {r['wakes']:,}, "
            f"RSS {r['rss'] / 2**20:.0f} MiB"
            + (
                ", longest GC pause per generation "
                + "/".join(_fmt(r["gc"][g]["max_ms"], digits=1) for g in ("0", "1", "2"))
                + " ms"
                if "gc" in r
                else ""
            )
        )
    if scenario == "hibernation":
        return (
            f"wake +{r['added_p50_us']:,.0f} us p50, auto {r['auto_rate']:,.0f}/s, "
            f"ping {r['ping_rate']:,.0f}/s, woken {r['wakes_seen']}/{r['wakes_expected']}"
        )
    return (
        f"RSS {r['rss_start'] / 2**20:.1f} -> {r['rss_after_cycles'] / 2**20:.1f} MiB over "
        f"{r['cycles']:,} cycles ({r.get('growth_cycles', r['growth']):+.1%}), "
        f"{r['rss_end'] / 2**20:.1f} MiB after the messages"
    )


# -- the report ----------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


@dataclass(frozen=True)
class Target:
    what: str
    measured: float | None
    limit: float | None
    at_most: bool  # measured <= limit (else >=)
    shown: str  # how the measured value reads ("" for a ratio)
    limit_shown: str = ""  # how the limit reads ("" for a ratio)
    note: str = ""  # how it was measured, what else to know
    #: Why this run cannot judge the target (e.g. quick mode's smaller N); "" if it can.
    unjudged: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None or self.limit is None or self.unjudged:
            return None
        return self.measured <= self.limit if self.at_most else self.measured >= self.limit

    @property
    def measured_text(self) -> str:
        if self.shown:
            return self.shown
        return _fmt_ratio(self.measured)

    @property
    def target_text(self) -> str:
        if self.at_most and self.limit == 0:
            return "0"
        limit = self.limit_shown or ("n/a" if self.limit is None else f"{self.limit:g}x")
        return f"{'<=' if self.at_most else '>='} {limit}"

    @property
    def verdict(self) -> str:
        if self.unjudged:
            return f"n/a ({self.unjudged})"
        return {True: "MET", False: "NOT MET", None: "n/a"}[self.met]

    def line(self) -> str:
        """``echo vs workerd 1.12x (target >= 1.5x): NOT MET``"""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.what} {self.measured_text} (target {self.target_text}): {self.verdict}{note}"


def _rate_ratio(
    run: Run,
    scenario: str,
    peer: str,
    key: str = "rate",
    peer_key: str | None = None,
    peer_scenario: str | None = None,
) -> tuple[float | None, str]:
    """trio-hibernate / ``peer`` of the median rate per server CPU-second, and a note with
    the raw ratio (the per-CPU figure is the one a noisy neighbour does not move).

    ``key`` is ``rate`` or ``<kind>_rate``; the per-CPU figure is ``rate_per_cpu`` or
    ``<kind>_rate_per_cpu``.
    """
    peer_key = peer_key or key
    peer_scenario = peer_scenario or scenario

    def per_cpu_key(rate_key: str) -> str:
        return rate_key.removesuffix("rate") + "rate_per_cpu"

    per_cpu = _ratio(
        run.median(scenario, TH, per_cpu_key(key)),
        run.median(peer_scenario, peer, per_cpu_key(peer_key)),
    )
    raw = _ratio(run.median(scenario, TH, key), run.median(peer_scenario, peer, peer_key))
    return per_cpu, f"per server CPU-second; raw {_fmt_ratio(raw)}"


def targets(run: Run) -> list[Target]:
    """Issue 13's targets, then the earlier ones still checked."""

    def med(scenario: str, server: str, key: str) -> float | None:
        return run.median(scenario, server, key)

    out: list[Target] = []
    for peer, limit in (("workerd", 1.5), ("websockets", 2.0)):
        ratio, note = _rate_ratio(run, "echo", peer)
        out.append(Target(f"echo through an object vs {peer}", ratio, limit, False, "", "", note))
    for kind, what in (("auto", "auto-response"), ("ping", "protocol pings")):
        ratio, note = _rate_ratio(run, "hibernation", "workerd", f"{kind}_rate")
        out.append(Target(f"{what} while hibernated vs workerd's", ratio, 0.6, False, "", "", note))
    for peer, limit, label in (
        ("workerd", 4.0, "workerd"),
        ("websockets", 1.5, "websockets' broadcast()"),
    ):
        ratio, note = _rate_ratio(run, "broadcast", peer)
        out.append(Target(f"broadcast to 1k sockets vs {label}", ratio, limit, False, "", "", note))
    idle = med("idle", TH, "per_conn")
    n_values = run.values("idle", TH, "n")
    out.append(
        Target(
            "RSS per hibernated socket",
            idle,
            6_000,
            True,
            _fmt(idle, " B"),
            "6,000 B at 10k sockets",
            f"at {int(n_values[0]):,} sockets" if n_values else "",
            "" if not n_values or n_values[0] >= 10_000 else "judged at 10,000 sockets only",
        )
    )
    added = med("hibernation", TH, "added_p50_us")
    out.append(
        Target(
            "wake adds to a round trip (p50)",
            added,
            100.0,
            True,
            _fmt(None if added is None else added / 1000, " ms", 3),
            "0.1 ms",
        )
    )
    leak = run.results.get("leak", {}).get(TH, [])
    growth = leak[-1].get("growth_cycles") if leak else None
    out.append(
        Target(
            "RSS after the hibernate/wake cycles vs after 1k",
            growth,
            0.05,
            True,
            "n/a" if growth is None else f"{growth:+.1%}",
            "+5% (flat)",
            f"{leak[-1]['cycles']:,} cycles" if leak else "",
            "" if not leak or leak[-1]["cycles"] >= 100_000 else "judged over 100k cycles only",
        )
    )
    writes = _ratio(med("writes", TH, "rate"), med("writes", "workerd", "rate"))
    out.append(
        Target(
            "acknowledged durable writes/s to one object vs workerd",
            writes,
            1.5,
            False,
            "",
            "",
            "raw rate (bounded by the disk, not the CPU)",
        )
    )
    lost = run.values("rooms", TH, "lost")
    out.append(
        Target(
            "many rooms: deliveries lost",
            sum(lost) if lost else None,
            0,
            True,
            f"{int(sum(lost)):,}" if lost else "n/a",
            "0",
            f"all {len(lost)} runs",
        )
    )
    for key, what in (("p99_ms", "p99 latency"), ("max_ms", "max latency")):
        th_value, wd_value = med("rooms", TH, key), med("rooms", "workerd", key)
        out.append(
            Target(
                f"many rooms: {what} vs workerd's",
                _ratio(th_value, wd_value),
                1.0,
                True,
                "",
                "",
                f"{_fmt(th_value, ' ms', 2)} vs {_fmt(wd_value, ' ms', 2)} (medians of runs)",
            )
        )
    th_cpu = med("rooms", TH, "cpu_us_per_delivery")
    wd_cpu = med("rooms", "workerd", "cpu_us_per_delivery")
    out.append(
        Target(
            "many rooms: CPU per delivery vs workerd's",
            _ratio(th_cpu, wd_cpu),
            0.8,
            True,
            "",
            "",
            f"{_fmt(th_cpu, ' us', 1)} vs {_fmt(wd_cpu, ' us', 1)}",
        )
    )
    # Earlier targets (before issue 13), still checked.
    for peer, limit in (("websockets", 0.65), ("workerd", 0.15)):
        out.append(
            Target(
                f"(earlier) idle RSS per connection vs {peer}",
                _ratio(idle, med("idle", peer, "per_conn")),
                limit,
                True,
                "",
            )
        )
    ratio, note = _rate_ratio(run, "echo", "trio+wsproto")
    out.append(Target("(earlier) echo vs trio+wsproto", ratio, 0.9, False, "", "", note))
    for kind, what in (("auto", "auto-response"), ("ping", "protocol pings")):
        ratio, note = _rate_ratio(
            run, "hibernation", "trio+wsproto", f"{kind}_rate", "rate", "echo"
        )
        out.append(
            Target(
                f"(earlier) {what} while hibernated vs plain echo (trio+wsproto)",
                ratio,
                1.0,
                False,
                "",
                "",
                note,
            )
        )
    return out


#: A load generator using this much of its core may be what limits a rate.
_SATURATED: Final = 0.95


#: The rated rows of the CPU table: (scenario, label, key prefix).
_RATED_ROWS: Final = [
    ("echo", "echo", ""),
    ("broadcast", "broadcast (deliveries)", ""),
    ("hibernation", "auto-response, hibernated", "auto_"),
    ("hibernation", "protocol pings, hibernated", "ping_"),
    ("writes", "durable writes (acks)", ""),
    ("rooms", "many rooms (deliveries)", ""),
]


def _render_cpu(run: Run, servers: list[ServerSpec], add: Callable[[str], None]) -> None:
    """The server CPU table: every rated row of every server."""
    rows = [
        (scenario, label, prefix, spec)
        for scenario, label, prefix in _RATED_ROWS
        for spec in servers
        if run.values(scenario, spec.key, f"{prefix}cpu_server_seconds")
    ]
    if not rows:
        return
    add("### Server CPU per message")
    add("")
    add(
        "Server CPU time (`/proc/<pid>/stat` utime + stime, every thread) over each whole "
        "load-generator call, warm-up included, divided by every message answered in it "
        "(medians of the runs). The rate per server CPU-second is what a core of its own "
        "would give; a noisy neighbour lowers the raw rate much more than this (it still "
        "costs some: shared caches, the hypervisor's steal time). Cores: 1.00 is a core "
        "busy all the time; other processes are given for the machine and for the server's "
        "own core."
    )
    add("")
    add(
        "| row | server | msgs/s | msgs per server CPU-second | server CPU-s per 1M msgs | "
        "server cores | load generator cores | other processes: machine / server's core |"
    )
    add("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for scenario, label, prefix, spec in rows:

        def med(
            key: str, sc: str = scenario, server: str = spec.key, p: str = prefix
        ) -> float | None:
            return run.median(sc, server, p + key)

        rate = _fmt(med("rate"))
        if (med("cpu_loadgen") or 0.0) >= _SATURATED:
            rate += " \\*"
        add(
            f"| {label} | {spec.key} | {rate} | {_fmt(med('rate_per_cpu'))} | "
            f"{_fmt(med('cpu_s_per_1m'), digits=1)} | {_fmt(med('cpu_server'), digits=2)} | "
            f"{_fmt(med('cpu_loadgen'), digits=2)} | {_fmt(med('cpu_other'), digits=2)} / "
            f"{_fmt(med('cpu_other_server_core'), digits=2)} |"
        )
    add("")


def _render_rooms(run: Run, cfg: Config, add: Callable[[str], None]) -> None:
    """The many-rooms table, and the trio-hibernate server's GC pauses during it."""
    specs = [s for s in SERVERS if s.key in run.results.get("rooms", {})]
    if not specs:
        return
    rooms = cfg.rooms_sockets // cfg.rooms_size
    add(
        f"### Many rooms ({cfg.rooms_sockets:,} sockets in {rooms:,} rooms of "
        f"{cfg.rooms_size}; {cfg.rooms_rate:.0%} of the sockets send a "
        f"{cfg.rooms_payload}-byte message per second)"
    )
    add("")
    add(
        f"Each message goes to every socket of its room (the sender too). {cfg.rooms_warmup:g} s "
        f"warm-up, then {cfg.rooms_seconds:g} s measured: latency is from the send to each "
        "delivery, at the load generator, for the messages sent in the measured window; a "
        f"delivery still missing {cfg.rooms_drain:g} s after the last send is lost. CPU per "
        "delivery is the server's CPU over the whole call divided by every delivery in it. "
        f"trio-hibernate runs with `--idle-timeout {cfg.rooms_idle_timeout:g}`, workerd "
        "hibernates after its own 10 s; wakes are objects constructed during the call. "
        "Medians of the runs; max is the median of each run's max."
    )
    add("")
    add(
        "| server | runs | messages | deliveries | lost | p50 ms | p99 ms | max ms | "
        "CPU us per delivery | server cores | RSS with the sockets open | wakes |"
    )
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for spec in specs:

        def med(key: str, server: str = spec.key) -> float | None:
            return run.median("rooms", server, key)

        lost = run.values("rooms", spec.key, "lost")
        rss = med("rss")
        add(
            f"| {spec.label} | {len(lost)} | {_fmt(med('sent'))} | {_fmt(med('deliveries'))} | "
            f"{', '.join(f'{v:,.0f}' for v in lost)} | {_fmt(med('p50_ms'), digits=2)} | "
            f"{_fmt(med('p99_ms'), digits=2)} | {_fmt(med('max_ms'), digits=1)} | "
            f"{_fmt(med('cpu_us_per_delivery'), digits=1)} | "
            f"{_fmt(med('cpu_server'), digits=2)} | "
            f"{'n/a' if rss is None else f'{rss / 2**20:,.0f} MiB'} | {_fmt(med('wakes'))} |"
        )
    add("")
    th_runs = run.results.get("rooms", {}).get(TH, [])
    gc_runs = [r["gc"] for r in th_runs if "gc" in r]
    for r in th_runs:
        if "gc_error" in r:
            add(f"GC statistics of run {r.get('rep', '?')}: {r['gc_error']}")
            add("")
    if not gc_runs:
        return
    whole_runs = [r["gc_whole"] for r in th_runs if "gc_whole" in r]
    add(
        "Garbage-collector pauses in the trio-hibernate server during the many-rooms runs "
        "(`TRIO_HIBERNATE_GC_STATS`: every collection timed through `gc.callbacks`). A "
        "collection stops every task, so the longest pause bounds the latency tail. "
        '"During the load" is the load-generator call (warm-up, measurement, drain); '
        '"whole life" adds the start-up and the connections. Medians of the runs; max is '
        "the longest of all runs."
    )
    add("")
    add(
        "| generation | collections during the load | total ms | p50 ms | p99 ms | max ms | "
        "whole life: collections | max ms |"
    )
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for generation in ("0", "1", "2"):

        def median_of(key: str, runs: list[dict[str, Any]], g: str = generation) -> float | None:
            values = [float(r[g][key]) for r in runs if r.get(g, {}).get(key) is not None]
            return statistics.median(values) if values else None

        def longest(runs: list[dict[str, Any]], g: str = generation) -> float | None:
            values = [float(r[g]["max_ms"]) for r in runs if r.get(g, {}).get("max_ms") is not None]
            return max(values, default=None)

        add(
            f"| {generation} | {_fmt(median_of('count', gc_runs))} | "
            f"{_fmt(median_of('total_ms', gc_runs), digits=1)} | "
            f"{_fmt(median_of('p50_ms', gc_runs), digits=2)} | "
            f"{_fmt(median_of('p99_ms', gc_runs), digits=2)} | "
            f"{_fmt(longest(gc_runs), digits=2)} | {_fmt(median_of('count', whole_runs))} | "
            f"{_fmt(longest(whole_runs), digits=2)} |"
        )
    add("")


def _render_writes(run: Run, cfg: Config, add: Callable[[str], None]) -> None:
    specs = [s for s in SERVERS if s.key in run.results.get("writes", {})]
    if not specs:
        return
    add(
        f"### Acknowledged durable writes to one object ({cfg.writes_conns} sockets, "
        f"{cfg.writes_in_flight} messages in flight each)"
    )
    add("")
    add(
        "Each message is a turn that puts it under one of 16 keys and replies; the reply "
        "is held until the write is durable. trio-hibernate: `--data-dir`, group commit "
        "(each commit `fsync`ed, turns meanwhile join the next one); workerd: a "
        "SQLite-backed Durable Object on local disk "
        "(`bench/workerd/storage.capnp`), the put not awaited (its output gate holds the "
        f"reply). Both on the same file system. {cfg.warmup:g} s warm-up, "
        f"{cfg.writes_seconds:g} s measured."
    )
    add("")
    add("| server | acknowledged writes/s | per server CPU-second | server cores |")
    add("| --- | ---: | ---: | ---: |")
    for spec in specs:
        add(
            f"| {spec.label} | {_fmt(run.median('writes', spec.key, 'rate'))} | "
            f"{_fmt(run.median('writes', spec.key, 'rate_per_cpu'))} | "
            f"{_fmt(run.median('writes', spec.key, 'cpu_server'), digits=2)} |"
        )
    add("")


def render(run: Run, cfg: Config) -> str:
    lines: list[str] = []
    add = lines.append
    servers = [s for s in SERVERS if any(s.key in run.results.get(sc, {}) for sc in SCENARIOS)]
    add("# Benchmarks")
    add("")
    add(
        f"Generated by `bench/run.py` ({run.mode} mode) on {run.started}; the whole run took "
        f"{run.seconds / 60:.1f} minutes. Every number below comes from this one run: servers "
        "were measured alternately, each in a fresh process, and ratios compare medians of "
        f"{cfg.throughput_reps} runs (echo, broadcast) or {cfg.reps} (the rest) per cell. "
        "Regenerate with:"
    )
    add("")
    add("```sh")
    add(run.command)
    add("```")
    add("")
    add(
        "`nox -s bench` is the full run (about 20 minutes; it writes this page); `nox -s bench "
        "-- --quick` a smoke run of about 3 minutes (`bench/.results/benchmarks-quick.md`); "
        "`-- --scenarios rooms writes --servers trio-hibernate workerd` runs some rows only; "
        "`python bench/run.py --from-json bench/.results/results-full.json` renders the page "
        "again from a run's data. Each target of the performance work is under "
        "[Targets](#targets), with whether it was met; what each row measures is under "
        "[Method](#method)."
    )
    add("")
    add("## Results")
    add("")
    add(
        f"| server | idle RSS per connection (N) | echo msgs/s ({cfg.echo_conns} conns, "
        f"{cfg.echo_payload} B) | broadcast deliveries/s ({cfg.broadcast_subs:,} subscribers, "
        f"{cfg.broadcast_payload} B, {cfg.broadcast_in_flight} in flight) |"
    )
    add("| --- | ---: | ---: | ---: |")
    saturated = False
    for spec in servers:
        idle = run.median("idle", spec.key, "per_conn")
        n_values = run.values("idle", spec.key, "n")
        idle_cell = f"{_fmt(idle, ' B')} ({int(n_values[0]):,})" if n_values else "n/a"
        rates = []
        for scenario in ("echo", "broadcast"):
            cell = _fmt(run.median(scenario, spec.key, "rate"))
            if (run.median(scenario, spec.key, "cpu_loadgen") or 0.0) >= _SATURATED:
                cell += " \\*"
                saturated = True
            rates.append(cell)
        add(f"| {spec.label} | {idle_cell} | {rates[0]} | {rates[1]} |")
    add("")
    if saturated:
        add(
            "\\* The load generator's core was busy at least "
            f"{_SATURATED:.0%} of the time (median): that rate may be limited by the load "
            "generator, so it is a lower bound of what the server can do."
        )
        add("")
    add(
        "trio-hibernate divided by each peer (idle RSS: lower is better; rates, per server "
        "CPU-second and raw: higher is better):"
    )
    add("")
    add("| peer | idle RSS ratio | echo ratio per CPU-s (raw) | broadcast ratio per CPU-s (raw) |")
    add("| --- | ---: | ---: | ---: |")
    for spec in servers:
        if spec.key == TH:
            continue
        idle_ratio = _ratio(
            run.median("idle", TH, "per_conn"), run.median("idle", spec.key, "per_conn")
        )
        cells = [_fmt_ratio(idle_ratio)]
        for sc in ("echo", "broadcast"):
            per_cpu = _ratio(
                run.median(sc, TH, "rate_per_cpu"), run.median(sc, spec.key, "rate_per_cpu")
            )
            raw = _ratio(run.median(sc, TH, "rate"), run.median(sc, spec.key, "rate"))
            cells.append(f"{_fmt_ratio(per_cpu)} ({_fmt_ratio(raw)})")
        add(f"| {spec.label} | {' | '.join(cells)} |")
    add("")
    _render_cpu(run, servers, add)
    hib = [s for s in SERVERS if s.key in run.results.get("hibernation", {})]
    if hib:
        add(
            f"### Hibernated objects ({cfg.hib_conns} sockets, one object each, every object "
            "hibernated)"
        )
        add("")
        add(
            "| server | round trip waking the object, p50 | same object live, p50 | added by "
            "the wake | auto-response msgs/s | protocol pings/s | objects woken by those |"
        )
        add("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for spec in hib:

            def med(key: str, server: str = spec.key) -> float | None:
                return run.median("hibernation", server, key)

            woken = run.values("hibernation", spec.key, "woken_by_auto_and_ping")
            add(
                f"| {spec.label} | {_fmt(med('wake_p50_us'), ' us')} | "
                f"{_fmt(med('live_p50_us'), ' us')} | {_fmt(med('added_p50_us'), ' us')} | "
                f"{_fmt(med('auto_rate'))} | {_fmt(med('ping_rate'))} | "
                f"{', '.join(str(int(w)) for w in woken) or 'n/a'} |"
            )
        add("")
        add(
            "A round trip sends one 32-byte message and waits for the echo; the sockets are "
            "visited one after the other, first with every object hibernated (each round trip "
            "constructs its object), then again at once (all live). Wakes seen: "
            + "; ".join(
                f"{s.key} {int(sum(run.values('hibernation', s.key, 'wakes_seen')))} of "
                f"{int(sum(run.values('hibernation', s.key, 'wakes_expected')))}"
                for s in hib
            )
            + "."
        )
        add("")
    leak = run.results.get("leak", {}).get(TH)
    if leak:
        r = leak[-1]
        add("### Leak check (trio-hibernate)")
        add("")
        add(
            f"Idle timeout {r['idle_timeout']} s; {cfg.leak_conns:,} sockets each send a "
            f"message, get the echo, wait {r['gap']} s (the object hibernates) and send again; "
            f"then {cfg.echo_conns} sockets echo {r['messages']:,} messages. RSS is read with "
            f"every object hibernated: after the first {r.get('warmup_cycles', 0):,} cycles, "
            "after all of them, and after the messages."
        )
        add("")
        add(
            "| after 1k cycles | after all cycles | growth over the cycles | after messages | "
            "growth overall | cycles (wakes) | msgs/s |"
        )
        add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        growth_cycles = r.get("growth_cycles")
        add(
            f"| {r['rss_start'] / 2**20:.1f} MiB | {r['rss_after_cycles'] / 2**20:.1f} MiB | "
            f"{'n/a' if growth_cycles is None else f'{growth_cycles:+.1%}'} | "
            f"{r['rss_end'] / 2**20:.1f} MiB | {r['growth']:+.1%} | {r['cycles']:,} in "
            f"{r['cycles_seconds']:.0f} s | {r['messages_rate']:,.0f} |"
        )
        add("")
    _render_rooms(run, cfg, add)
    _render_writes(run, cfg, add)
    add("## Targets")
    add("")
    if run.mode == "quick":
        add(
            "Quick mode is a smoke test: with N = 1,000 the fixed costs of a process weigh on "
            "the per-connection RSS (the target is at 10,000 sockets), the leak check runs "
            f"{cfg.leak_cycles:,} cycles rather than 100,000, and single short runs are noisy. "
            "Judge the targets on a full run."
        )
        add("")
    if run.busy:
        add(
            f"**The machine was busy during {len(run.busy)} run(s)** (other processes used "
            f"at least {BUSY_MACHINE:.2f} cores, or {BUSY_SERVER_CORE:.2f} of the server's "
            "core): their raw rates are doubtful; the per-CPU-second ratios hold better. See "
            '"Noisy neighbours" below.'
        )
        add("")
    add(
        "Ratios of rates are of the rate per server CPU-second (the raw ratio is in the note), "
        "except durable writes (raw)."
    )
    add("")
    add("| target | measured | target | met | note |")
    add("| --- | ---: | ---: | :---: | --- |")
    for t in targets(run):
        verdict = "**NOT MET**" if t.met is False else t.verdict
        add(f"| {t.what} | {t.measured_text} | {t.target_text} | {verdict} | {t.note} |")
    add("")
    if run.profile is not None:
        add("## Profile of the trio-hibernate server (py-spy)")
        add("")
        add(
            "`py-spy record --idle --rate 250` against the server process during an extra "
            "echo run, broadcast run and auto-response run (objects hibernated), outside the "
            "measurements above. Shares are of the samples where the server was not waiting "
            "in `epoll` (the idle share is given separately). Without `--native`, time spent "
            "in a C call (`socket.send`, `recv`) is charged to the Python frame that made it."
        )
        add("")
        for name, prof in run.profile.items():
            add(
                f"**{name}**: {prof['samples']} samples, {prof['idle_share']:.0%} idle (waiting "
                f"for the network); {prof.get('rate_while_sampled', 0):,.0f}/s while sampled."
            )
            add("")
            add("| own time | frame | | inclusive | frame |")
            add("| ---: | --- | --- | ---: | --- |")
            for (own, own_pct), (inc, inc_pct) in zip(prof["own"], prof["inclusive"], strict=False):
                add(f"| {own_pct:.1f}% | `{own}` | | {inc_pct:.1f}% | `{inc}` |")
            add("")
    elif run.profile_error:
        add(f"Profiling was requested but failed: {run.profile_error}")
        add("")
    add("## Machine")
    add("")
    add("| fact | value |")
    add("| --- | --- |")
    for key, value in run.machine.items():
        add(f"| {key} | {value} |")
    add(f"| load average before / after | {run.load_before} / {run.load_after} |")
    add("")
    add("## Method")
    add("")
    add(
        "- Each measurement starts the server in a fresh process pinned to one core and the "
        "load generator (`bench/loadgen.py`: raw non-blocking sockets in one `epoll` loop, "
        "frames encoded and masked in advance, replies counted by size) pinned to the other."
    )
    add(
        f"- Idle RSS: `VmRSS` of the server before and after opening N WebSockets (each to its "
        f"own echo object), divided by N. trio-hibernate runs with `--idle-timeout 1` and is "
        f"read once `/_metrics` shows every object hibernated; workerd is read after "
        f"{cfg.workerd_hibernate_wait:g} s idle (it hibernates objects after 10 s); the other "
        f"peers have no hibernation and are read 1 s after the last connection. workerd gets "
        f"N = {cfg.idle_n_workerd:,}: it holds two descriptors per WebSocket, and past about "
        "9,800 connections the 20,000-descriptor limit makes it drop connections and stop "
        "accepting. trio-hibernate's RSS with every object still live (before they "
        f"hibernate) is {_fmt(run.median('idle', TH, 'per_conn_live'), ' B')} per connection: "
        "an evicted instance's memory goes back to Python's allocator, not to the system, so "
        "hibernation mostly caps growth rather than shrinking RSS."
    )
    add(
        f"- Echo: {cfg.echo_conns} sockets, each keeps one {cfg.echo_payload}-byte text message in "
        f"flight; {cfg.warmup:g} s warm-up, {cfg.seconds:g} s measured."
    )
    add(
        f"- Broadcast: {cfg.broadcast_subs:,} subscribers and a sender on one object (one room); "
        f"the sender keeps {cfg.broadcast_in_flight} broadcasts of {cfg.broadcast_payload} bytes "
        "in flight (one is done when the sender got its own copy and the subscribers got all "
        "theirs); deliveries are counted at the subscribers."
    )
    add(
        f"- Leak check: RSS after {cfg.leak_warmup_cycles:,} hibernate/wake cycles, after "
        f"{cfg.leak_cycles:,}, and after {cfg.leak_messages:,} echoed messages."
    )
    add(
        f"- Many rooms: {cfg.rooms_sockets:,} sockets to {cfg.rooms_sockets // cfg.rooms_size:,} "
        f"`/broadcast/<room>` objects ({cfg.rooms_size} each), opened by one load generator "
        "process (each process stays under the 20,000-descriptor limit: workerd holds two "
        "per WebSocket). Senders are drawn by a seeded Poisson process, the same for every "
        "server; each 64-byte message carries its sequence number and send time. "
        f"trio-hibernate runs with `--idle-timeout {cfg.rooms_idle_timeout:g}`, workerd with its "
        f"own 10 s. {cfg.rooms_warmup:g} s warm-up, {cfg.rooms_seconds:g} s measured, "
        f"{cfg.rooms_drain:g} s at most to drain, {cfg.reps} run(s) per server. The "
        "trio-hibernate server is started with `TRIO_HIBERNATE_GC_STATS=<file>` and stopped "
        "with SIGINT after the load generator closed its sockets, so that it writes its GC "
        "pauses."
    )
    add(
        f"- Durable writes: {cfg.writes_conns} sockets to one `/writer/<name>` object, "
        f"{cfg.writes_in_flight} messages in flight each, {cfg.warmup:g} s warm-up and "
        f"{cfg.writes_seconds:g} s measured; a fresh data directory per run, under "
        "`bench/.results/` (the same file system for both servers). `bench/storage_writes.py` "
        "is the in-process variant (trio-hibernate only, more objects and puts per turn)."
    )
    add(
        "- CPU: `/proc/<pid>/stat` of the server and the load generator (utime + stime of "
        "every thread), and `/proc/stat` for the whole machine and for the server's core "
        '("other processes" is the rest, including kernel threads doing loopback network '
        "work and the hypervisor's steal time). CPU per message divides the server's CPU "
        "over a whole load-generator call by every message answered in it. A run during "
        "which other processes used "
        f"{BUSY_MACHINE:.2f} cores or more, or {BUSY_SERVER_CORE:.2f} of the server's core, is "
        'flagged on the console and listed under "Noisy neighbours".'
    )
    add(
        "- Peers: `bench/peer_trio_websocket.py` (trio-websocket's defaults, `await "
        "send_message` loop), `bench/peer_websockets.py` (websockets' defaults, "
        "`broadcast()`), `bench/peer_wsproto.py` (one task per connection, frame encoded once, "
        "non-blocking `send`), `bench/peer_tcp.py` (no framing: it answers the upgrade, then "
        "echoes or forwards raw bytes), `bench/workerd/` (workerd from npm, a hibernatable "
        "Durable Object per name doing the same). trio-hibernate serves `bench/th_app.py` with "
        "`python -m trio_hibernate serve`."
    )
    add("")
    if run.errors:
        add("## Problems during the run")
        add("")
        for error in run.errors:
            add(f"- {error}")
        add("")
    if run.busy:
        add("## Noisy neighbours")
        add("")
        add(
            "Runs during which other processes used at least "
            f"{BUSY_MACHINE:.2f} cores of the machine or {BUSY_SERVER_CORE:.2f} of the server's "
            "core (from `/proc/stat`, less the server and the load generator):"
        )
        add("")
        for note in run.busy:
            add(f"- {note}")
        add("")
    add("## Every run")
    add("")
    add(
        "The value of each repetition, in the order run (all fields of every run are in "
        f"`bench/.results/results-{run.mode}.json` after a run)."
    )
    add("")
    add("| scenario | server | runs |")
    add("| --- | --- | --- |")
    for scenario, by_server in run.results.items():
        for key, runs in by_server.items():
            each = "; ".join(_headline(scenario, r) for r in runs)
            add(f"| {scenario} | {key} | {each} |")
    add("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small N, short runs (< 3 min)")
    parser.add_argument("--servers", nargs="+", choices=[s.key for s in SERVERS])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS)
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--output", type=Path, help="the report (default docs/benchmarks.md)")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy the trio-hibernate server (default: on, off with --quick)",
    )
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    parser.add_argument("--max-minutes", type=float, help="time budget (default 25; 5 quick)")
    parser.add_argument("--invoked-as", help="the command to print in the report")
    parser.add_argument(
        "--from-json", type=Path, help="only render the report of an earlier run's JSON dump"
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
        earlier = Run(**data)
        target: Path = args.output or (
            ROOT / "docs" / "benchmarks.md"
            if earlier.mode == "full"
            else RESULTS / "benchmarks-quick.md"
        )
        # A run from before a Config field existed gets that field's default of its mode.
        defaults = asdict(FULL if earlier.mode == "full" else QUICK)
        target.write_text(render(earlier, Config(**{**defaults, **earlier.config})))
        print(f"wrote {target}")
        return 0

    cfg = QUICK if args.quick else FULL
    if args.reps:
        cfg = Config(**{**asdict(cfg), "reps": args.reps, "throughput_reps": args.reps})
    mode = "quick" if args.quick else "full"
    output: Path = args.output or (
        RESULTS / "benchmarks-quick.md" if args.quick else ROOT / "docs" / "benchmarks.md"
    )
    profile = args.profile if args.profile is not None else not args.quick
    budget = (args.max_minutes or (5.0 if args.quick else 25.0)) * 60

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Each process holds its own side: the server N sockets (workerd 2N), the load
    # generator N (it raises its own soft limit too).
    needed = max(cfg.idle_n, 2 * cfg.idle_n_workerd, 2 * cfg.rooms_sockets, cfg.broadcast_subs)
    needed += 100
    if hard < needed:
        print(f"the descriptor limit ({hard}) is under {needed}: lower N", file=sys.stderr)
        return 2

    servers = args.servers or [s.key for s in SERVERS]
    scenarios = args.scenarios or SCENARIOS
    workerd, workerd_error = (None, None)
    if "workerd" in servers:
        workerd, workerd_error = ensure_workerd()
    has_taskset = shutil.which("taskset") is not None
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="logs-", dir=RESULTS))
    digest = source_digest()
    options = Options(
        th_source=snapshot_library(log_dir / "source"),
        python=sys.executable,
        server_cpu=args.server_cpu if has_taskset else None,
        client_cpu=args.client_cpu if has_taskset else None,
        workerd=workerd,
        log_dir=log_dir,
    )
    command = args.invoked_as or " ".join(
        ["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]
    )
    run = Run(
        mode=mode,
        command=command,
        started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        config=asdict(cfg),
        machine=machine_facts(options),
        load_before=Path("/proc/loadavg").read_text().strip(),
    )
    if workerd_error:
        run.errors.append(workerd_error)
        servers = [s for s in servers if s != "workerd"]
    began = time.monotonic()
    print(f"{mode} run: servers {', '.join(servers)}; scenarios {', '.join(scenarios)}")
    print(f"logs in {log_dir}", flush=True)
    run_suite(run, cfg, options, servers, scenarios, began + budget)
    if profile and TH in servers:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        print("profiling trio-hibernate with py-spy ...", flush=True)
        try:
            run.profile = profile_th(cfg, options, py_spy)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            run.profile_error = f"{type(exc).__name__}: {exc}"
            print(f"profiling failed: {run.profile_error}")
    run.seconds = time.monotonic() - began
    shutil.rmtree(options.th_source, ignore_errors=True)
    if source_digest() != digest:
        run.errors.append(
            f"trio_hibernate/ changed during the run (now {library_source()}); every "
            "trio-hibernate measurement used the copy taken at the start"
        )
    run.load_after = Path("/proc/loadavg").read_text().strip()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(run, cfg))
    json_path = RESULTS / f"results-{mode}.json"
    json_path.write_text(json.dumps(asdict(run), indent=1, default=str))
    print(f"wrote {output} and {json_path} in {run.seconds / 60:.1f} min")
    if run.busy:
        print(f"WARNING: the machine was busy during {len(run.busy)} run(s):")
        for note in run.busy:
            print(f"  {note}")
    print("targets:")
    for t in targets(run):
        print(f"  {t.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
