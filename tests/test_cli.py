"""The command line, run as a real process: serve, HTTP and WebSocket, signals, reload."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

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
