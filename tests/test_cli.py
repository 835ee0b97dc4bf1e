"""The command line, run as a real process: serve, HTTP and WebSocket, signals, reload."""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from helpers import open_raw_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from wsproto.events import CloseConnection

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+) ")

APP_SOURCE = """
from trio_hibernate import App, DurableObject, Response

class Echo(DurableObject):
    async def fetch(self, request):
        if request.websocket is None:
            return Response(body="plain {version}")
        self.ctx.accept_websocket(request.websocket)
        return Response(status=101, websocket=request.websocket)

    async def websocket_message(self, ws, message):
        ws.send("{version} " + message)

    async def websocket_close(self, ws, code, reason, was_clean):
        print("CLOSE HANDLER RAN", flush=True)

app = App({{"echo": Echo}})
"""


#: ``python -m trio_hibernate`` with a lower soft descriptor limit.
_LIMITED = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, "
    "({nofile}, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
    "sys.argv = ['trio-hibernate', *sys.argv[1:]]; "
    "runpy.run_module('trio_hibernate', run_name='__main__')"
)


class Served:
    def __init__(self, process: trio.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.output = b""

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@asynccontextmanager
async def serve(*args: str, nofile: int | None = None) -> AsyncIterator[Served]:
    """Start ``python -m trio_hibernate serve ...`` on port 0; kill it on the way out.

    ``nofile`` lowers the server's soft file descriptor limit (``RLIMIT_NOFILE``).
    """
    python = [sys.executable, "-m", "trio_hibernate"]
    if nofile is not None:
        python = [sys.executable, "-c", _LIMITED.format(nofile=nofile)]
    process = await trio.lowlevel.open_process(
        [*python, "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    assert process.stdout is not None
    try:
        output = b""
        with trio.fail_after(20):
            while (match := LISTENING.search(output)) is None:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"the server exited early: {output.decode(errors='replace')}"
                output += chunk
        served = Served(process, int(match.group(1)))
        served.output = output
        yield served
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()


async def drain(served: Served) -> None:
    """Read the rest of the server's output (until it exits)."""
    assert served.process.stdout is not None
    while chunk := await served.process.stdout.receive_some(4096):
        served.output += chunk


async def test_serve_http_websocket_and_sigterm_closes_with_1001(tmp_path: Path) -> None:
    app_file = tmp_path / "echo_app.py"
    app_file.write_text(APP_SOURCE.format(version="v1"))
    with trio.fail_after(30):
        async with serve(f"{app_file}:app") as served:
            stream = await trio.open_tcp_stream("127.0.0.1", served.port)
            async with stream:
                await stream.send_all(b"GET /echo/a HTTP/1.1\r\nHost: x\r\n\r\n")
                response = b""
                while chunk := await stream.receive_some(4096):
                    response += chunk
            assert response.startswith(b"HTTP/1.1 200 OK")
            assert response.endswith(b"plain v1")
            sockets: list[WebSocketConnection] = []
            async with trio.open_nursery() as nursery:

                async def client(name: str, *, task_status: trio.TaskStatus[None]) -> None:
                    async with open_websocket_url(served.url(f"/echo/{name}")) as ws:
                        sockets.append(ws)
                        await ws.send_message("hi")
                        assert await ws.get_message() == "v1 hi"
                        task_status.started()
                        with pytest.raises(ConnectionClosed):
                            await ws.get_message()

                await nursery.start(client, "a")
                await nursery.start(client, "b")
                served.process.send_signal(signal.SIGTERM)
            assert [ws.closed.code if ws.closed else None for ws in sockets] == [1001, 1001]
            await drain(served)
            assert await served.process.wait() == 0
    assert b"SIGTERM: shutting down" in served.output
    assert b"CLOSE HANDLER RAN" not in served.output  # shutdown runs no handler


async def test_sigusr1_restart_closes_with_1012(tmp_path: Path) -> None:
    app_file = tmp_path / "echo_app.py"
    app_file.write_text(APP_SOURCE.format(version="v1"))
    with trio.fail_after(30):
        async with serve(f"{app_file}:app") as served:
            async with open_websocket_url(served.url("/echo/r")) as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "v1 hi"
                served.process.send_signal(signal.SIGUSR1)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1012
            assert await served.process.wait() == 0


async def test_reload_uses_new_code_without_disconnecting(tmp_path: Path) -> None:
    app_file = tmp_path / "echo_app.py"
    app_file.write_text(APP_SOURCE.format(version="v1"))
    with trio.fail_after(40):
        async with (
            serve(f"{app_file}:app", "--reload") as served,
            open_websocket_url(served.url("/echo/x")) as ws,
        ):
            await ws.send_message("one")
            assert await ws.get_message() == "v1 one"

            app_file.write_text(APP_SOURCE.format(version="v2"))
            reply: str | bytes = "v1"
            while reply in ("v1", "v1 two"):  # until the watcher has swapped the code
                await ws.send_message("two")
                reply = await ws.get_message()
            assert reply == "v2 two"

            # Broken code: the old code keeps serving and the error is logged.
            app_file.write_text("this is not python (\n")
            while b"reloading" not in served.output:
                assert served.process.stdout is not None
                served.output += await served.process.stdout.receive_some(4096)
            await ws.send_message("three")
            assert await ws.get_message() == "v2 three"
            assert ws.closed is None  # never disconnected
    assert b"still serving the previous code" in served.output
    assert b"SyntaxError" in served.output


SIBLING_APP = """
from greeting import GREETING  # a sibling module: the app's folder is on sys.path
from trio_hibernate import App, DurableObject, Response

class Greeter(DurableObject):
    async def fetch(self, request):
        if request.websocket is None:
            return Response(body=GREETING)
        self.ctx.accept_websocket(request.websocket)
        return Response(status=101, websocket=request.websocket)

    async def websocket_message(self, ws, message):
        ws.send(GREETING + " " + message)

app = App({"greet": Greeter})
"""


def write_sibling_app(folder: Path, greeting: str) -> Path:
    """An app file importing ``GREETING`` from ``greeting.py`` next to it."""
    (folder / "greeting.py").write_text(f"GREETING = {greeting!r}\n")
    app_file = folder / "sibling_app.py"
    app_file.write_text(SIBLING_APP)
    return app_file


async def test_an_app_file_imports_its_sibling_modules(tmp_path: Path) -> None:
    from helpers import http_exchange

    app_file = write_sibling_app(tmp_path, "hello")  # the server runs from ROOT, not here
    async with serve(str(app_file)) as served:
        reply = await http_exchange(served.port, b"GET /greet/a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (reply.status, reply.body) == (200, b"hello")


async def test_reload_imports_an_edited_sibling_module_again(tmp_path: Path) -> None:
    app_file = write_sibling_app(tmp_path, "hello")
    with trio.fail_after(40):
        async with (
            serve(str(app_file), "--reload") as served,
            open_websocket_url(served.url("/greet/x")) as ws,
        ):
            await ws.send_message("one")
            assert await ws.get_message() == "hello one"

            (tmp_path / "greeting.py").write_text("GREETING = 'howdy'\n")  # same length
            reply: str | bytes = "hello two"
            while reply == "hello two":  # until the watcher has reloaded
                await ws.send_message("two")
                reply = await ws.get_message()
            assert reply == "howdy two"
            await read_until(served, b"reloaded")

            # A broken sibling: the previous code keeps serving; fixed, it is reloaded.
            (tmp_path / "greeting.py").write_text("GREETING = (\n")
            await read_until(served, b"still serving the previous code")
            await ws.send_message("three")
            assert await ws.get_message() == "howdy three"
            (tmp_path / "greeting.py").write_text("GREETING = 'hiya'\n")
            while reply != "hiya four":
                await ws.send_message("four")
                reply = await ws.get_message()
            assert ws.closed is None  # never disconnected
    assert b"changed: greeting.py" in served.output


def test_bad_app_spec_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_hibernate", "serve", "no_such_module_here:app"],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert b"no module named 'no_such_module_here'" in result.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m trio_hibernate serve ...`` to its end (it must not hang)."""
    return subprocess.run(
        [sys.executable, "-m", "trio_hibernate", "serve", *args],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )


def test_data_dir_that_is_a_file_exits_2_before_listening(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file")
    result = run_cli("examples/chat.py", "--port", "0", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    message = (
        f"trio-hibernate: the data directory {tmp_path / 'data'} exists and is not a directory"
    )
    assert result.stderr.decode().splitlines() == [message]
    assert b"listening" not in result.stdout


def test_corrupt_alarm_index_exits_2_before_listening(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    index = tmp_path / "data" / "_alarms.sqlite3"
    index.write_bytes(bytes(range(256)) * 64)
    result = run_cli("examples/chat.py", "--port", "0", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"trio-hibernate: cannot use the alarm index {index}: file is not a database"
    ]
    assert b"listening" not in result.stdout


def test_app_raising_at_import_exits_2_with_its_traceback(tmp_path: Path) -> None:
    app_file = tmp_path / "broken_app.py"
    app_file.write_text("raise RuntimeError('the app cannot start')\n")
    result = run_cli(str(app_file), "--port", "0")
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "Traceback (most recent call last)" in stderr
    assert f'File "{app_file}", line 1' in stderr
    assert "RuntimeError: the app cannot start" in stderr
    assert stderr.endswith(
        f"trio-hibernate: cannot load the app {app_file} (the traceback is above)\n"
    )


def test_a_port_in_use_exits_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("examples/chat.py", "--port", str(port))
    assert result.returncode == 2
    # The last line (the descriptor budget is logged before the port is bound).
    assert result.stderr.decode().splitlines()[-1] == (
        f"trio-hibernate: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


async def read_until(served: Served, text: bytes) -> None:
    """Read the server's output until ``text`` appears in it."""
    assert served.process.stdout is not None
    while text not in served.output:
        chunk = await served.process.stdout.receive_some(4096)
        assert chunk, f"the server exited: {served.output.decode(errors='replace')}"
        served.output += chunk


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_second_signal_during_shutdown_exits_at_once(
    tmp_path: Path, second: signal.Signals
) -> None:
    app_file = tmp_path / "echo_app.py"
    app_file.write_text(APP_SOURCE.format(version="v1"))
    with trio.fail_after(30):
        async with (
            serve(f"{app_file}:app", "--close-timeout", "600") as served,
            open_raw_websocket(served.port, "/echo/a") as raw,  # never answers the Close
        ):
            served.process.send_signal(signal.SIGTERM)
            assert isinstance(await raw.next_event(), CloseConnection)
            await read_until(served, b"shutdown: 1 connection(s) still closing")
            served.process.send_signal(second)
            await drain(served)
            assert await served.process.wait() == 130
    assert f"{second.name} again: exiting now, dropping 1 connection(s)".encode() in served.output
    assert served.output.endswith(b"trio-hibernate: interrupted\n")


def test_ctrl_c_while_the_app_loads_exits_130(tmp_path: Path) -> None:
    app_file = tmp_path / "slow_app.py"
    app_file.write_text("import time\nprint('loading', flush=True)\ntime.sleep(60)\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_hibernate", "serve", str(app_file), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"loading\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
        process.communicate()  # reaps it and closes the pipes
    assert process.returncode == 130
    assert stderr == b"trio-hibernate: interrupted\n"


async def test_the_chat_example_run_as_a_script_closes_with_1001_on_sigterm() -> None:
    """``python examples/chat.py`` embeds the server with ``wait_for_shutdown_signal``."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "examples/chat.py", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    served = Served(process, 0)
    try:
        with trio.fail_after(30):
            await read_until(served, b"/chat/<room>")
            match = re.search(rb"listening on ws://127\.0\.0\.1:(\d+)/", served.output)
            assert match is not None, served.output
            served.port = int(match.group(1))
            async with open_websocket_url(served.url("/chat/lobby?nick=alice")) as ws:
                assert await ws.get_message() == "* alice joined"
                process.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1001
            await drain(served)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()
    assert served.output.endswith(b"SIGTERM: stopped\n")


HANGING_APP = """
import trio
from trio_hibernate import App, DurableObject, Response

class Hang(DurableObject):
    async def fetch(self, request):
        await trio.sleep_forever()

app = App({"hang": Hang})
"""


async def test_limit_and_timeout_flags_reach_the_host(tmp_path: Path) -> None:
    from helpers import http_exchange

    app_file = tmp_path / "hang_app.py"
    app_file.write_text(HANGING_APP)
    async with serve(str(app_file), "--request-timeout", "0.5", "--max-buffered-bytes", "1K") as s:
        with trio.fail_after(10):
            reply = await http_exchange(s.port, b"GET /hang/a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.status == 504
        body = b"x" * 2000  # under max_request_body_bytes, over the 1 KiB budget
        request = b"POST /hang/b HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + body
        with trio.fail_after(10):
            reply = await http_exchange(s.port, request)
        assert reply.status == 503
        assert b"max_buffered_bytes" in reply.body


UPGRADE_OFFERING_DEFLATE = (
    b"GET /chat/room?nick=ada HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
)


@pytest.mark.parametrize(
    ("flag", "answer"),
    [
        ((), None),
        (
            ("--websocket-compression", "on"),
            b"permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        ),
        (("--websocket-compression", "context-takeover"), b"permessage-deflate"),
    ],
)
async def test_the_websocket_compression_flag(flag: tuple[str, ...], answer: bytes | None) -> None:
    async with serve("examples/chat.py", *flag) as s:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            async with stream:
                await stream.send_all(UPGRADE_OFFERING_DEFLATE)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some(4096)
                    assert chunk, head
                    head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    found = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-extensions:")
    ]
    assert found == ([] if answer is None else [answer])


@pytest.mark.parametrize(
    ("text", "value"), [("65536", 65536), ("64K", 65536), ("256m", 256 * 2**20), ("1G", 2**30)]
)
def test_size_flags_take_binary_units(text: str, value: int) -> None:
    from trio_hibernate._cli import _size

    assert _size(text) == value


@pytest.mark.parametrize("text", ["", "K", "12Q", "-5", "0", "1.5M"])
def test_bad_sizes_are_refused(text: str) -> None:
    import argparse

    from trio_hibernate._cli import _size

    with pytest.raises(argparse.ArgumentTypeError):
        _size(text)


def test_max_connections_over_the_descriptor_budget_exits_2(tmp_path: Path) -> None:
    result = run_cli(
        "examples/chat.py", "--data-dir", str(tmp_path), "--max-connections", "999999999"
    )
    assert result.returncode == 2
    last = result.stderr.decode().splitlines()[-1]
    assert last.startswith("trio-hibernate: max_connections=999999999 does not fit"), last


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "examples/chat.py:ChatRoom",
            "examples/chat.py:ChatRoom is a DurableObject class, not an App: wrap it as "
            'App({"chatroom": ChatRoom}) and serve that',
        ),
        (
            "examples/chat.py:ChatRom",
            "examples/chat.py:ChatRom: no attribute 'ChatRom' (it defines the App app)",
        ),
        (
            "examples/chat.py:HEARTBEAT",
            "examples/chat.py:HEARTBEAT is a WebSocketRequestResponsePair, not an App "
            "(trio_hibernate.App)",
        ),
        (
            "examples/no_such_app.py",
            f"no such file: {ROOT / 'examples' / 'no_such_app.py'} "
            "(expected a Python file defining an App)",
        ),
    ],
)
def test_a_spec_that_names_no_app_is_one_line_and_exit_2(spec: str, message: str) -> None:
    result = run_cli(spec)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [f"trio-hibernate: {message}"]


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata
    import tomllib

    import trio_hibernate
    from trio_hibernate._cli import main

    installed = importlib.metadata.version("trio-hibernate")
    assert installed == trio_hibernate.__version__
    # The console script `trio-hibernate` is this function.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"trio-hibernate": "trio_hibernate._cli:main"}
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"trio-hibernate {installed}\n"
    result = subprocess.run(
        [sys.executable, "-m", "trio_hibernate", "--version"],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=True,
    )
    assert result.stdout.decode() == f"trio-hibernate {installed}\n"


def _options() -> list[tuple[str, argparse.Action]]:
    from trio_hibernate._cli import _parser

    parser = _parser()
    found = [("", action) for action in parser._actions]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                found += [(command, a) for a in sub._actions]
    return [(command, a) for command, a in found if a.option_strings or command]


def test_every_option_has_help_and_shows_its_default() -> None:
    from trio_hibernate._cli import _HelpFormatter

    formatter = _HelpFormatter("trio-hibernate")
    for command, action in _options():
        name = f"{command} {'/'.join(action.option_strings) or action.dest}"
        assert action.help, f"{name} has no help"
        if not action.option_strings or isinstance(
            action, argparse._HelpAction | argparse._VersionAction
        ):
            continue  # positional arguments have no default
        shown = formatter._get_help_string(action) or ""
        assert "default" in shown or "deprecated alias" in shown, f"{name}: {shown!r}"
        if action.dest == "log_level":
            assert action.choices == ["debug", "info", "warning", "error"]
    help_text = subprocess.run(
        [sys.executable, "-m", "trio_hibernate", "serve", "--help"],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=True,
    ).stdout.decode()
    assert "(default: 127.0.0.1)" in help_text
    assert "(default: 256M)" in help_text


def test_serve_flags_are_named_after_the_api() -> None:
    """Each flag of ``serve`` is an ``open_server``/``open_host`` keyword (``--x-y`` for
    ``x_y``) or a ``Limits`` field, so a reader of either finds the other."""
    import inspect

    import attrs

    from trio_hibernate import ClusterConfig, Limits
    from trio_hibernate._host import open_host
    from trio_hibernate._server import serve_objects

    api = {
        *inspect.signature(open_host.__wrapped__).parameters,  # type: ignore[attr-defined]
        *inspect.signature(serve_objects).parameters,
        *(field.name for field in attrs.fields(Limits)),
        *(field.name for field in attrs.fields(ClusterConfig)),
        "allowed_origin",  # repeatable: one origin each, collected into allowed_origins
        "cluster_key",  # ClusterConfig.key and .audit, prefixed on the command line
        "cluster_audit",
    }
    cli_only = {"help", "app", "reload", "log_level", "log_format", "gc"}
    for command, action in _options():
        if command != "serve" or action.dest in cli_only:
            continue
        primary = action.option_strings[0]
        if "deprecated alias" in (action.help or ""):
            assert action.dest in api, primary
            continue
        assert primary.removeprefix("--").replace("-", "_") in api, primary
        assert action.dest in api, primary


@pytest.mark.parametrize(
    ("old", "new", "value", "expected"),
    [
        ("--shutdown-timeout", "--close-timeout", "5", ("close_timeout", 5.0)),
        ("--host", "--address", "0.0.0.0", ("address", "0.0.0.0")),
    ],
)
def test_old_flag_names_still_work_and_warn(
    old: str,
    new: str,
    value: str,
    expected: tuple[str, object],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from trio_hibernate._cli import _parser

    args = _parser().parse_args(["serve", "app.py", old, value])
    assert getattr(args, expected[0]) == expected[1]
    assert capsys.readouterr().err == (
        f"trio-hibernate: {old} is deprecated; use {new} (the same as open_host's keyword)\n"
    )
    args = _parser().parse_args(["serve", "app.py", new, value])
    assert getattr(args, expected[0]) == expected[1]
    assert capsys.readouterr().err == ""


def test_reload_without_watchfiles_says_what_to_install() -> None:
    blocked = (
        "import sys; sys.modules['watchfiles'] = None; "
        "from trio_hibernate._cli import main; "
        "sys.exit(main(['serve', 'examples/chat.py', '--reload']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, timeout=30, cwd=ROOT, check=False
    )
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "trio-hibernate: --reload needs watchfiles: pip install 'trio-hibernate[reload]'"
    ]


DASHBOARD_STATE = b"GET /_dashboard/state HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def test_the_dashboard_flags() -> None:
    """On by default on loopback; ``--no-dashboard`` turns it off (404); a token from
    ``--dashboard-token`` or the environment opens it (a weak one exits 2, unshown)."""
    from helpers import http_exchange

    async with serve("examples/chat.py:app") as s:
        with trio.fail_after(10):
            assert (await http_exchange(s.port, DASHBOARD_STATE)).status == 200
    async with serve("examples/chat.py:app", "--no-dashboard") as s:
        with trio.fail_after(10):
            assert (await http_exchange(s.port, DASHBOARD_STATE)).status == 404
    token = "a-long-enough-secret-1234"
    with_token = DASHBOARD_STATE.replace(
        b"\r\n\r\n", f"\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    async with serve("examples/chat.py:app", "--dashboard-token", token) as s:
        with trio.fail_after(10):
            assert (await http_exchange(s.port, with_token)).status == 200
            assert (await http_exchange(s.port, DASHBOARD_STATE)).status in (401, 403)
    weak = run_cli("examples/chat.py:app", "--port", "0", "--dashboard-token", "short1")
    assert weak.returncode == 2
    assert b"short1" not in weak.stdout + weak.stderr


def test_the_dashboard_token_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_hibernate._cli import DASHBOARD_TOKEN_VARIABLE

    monkeypatch.setenv(DASHBOARD_TOKEN_VARIABLE, "weak")
    weak = run_cli("examples/chat.py:app", "--port", "0")
    assert weak.returncode == 2
    assert b"dashboard" in weak.stdout + weak.stderr
