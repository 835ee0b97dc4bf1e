"""Start-up fails fast: an unusable data directory or alarm index is a clear StorageError.

Before the fix, ``open_host`` constructed the host after starting its shielded nursery,
so a storage error there left that nursery running forever: the ``async with`` never
finished, cancellation (even ``fail_after``) could not end it, and a server had already
bound its port. These tests would hang (not fail) on that code.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_hibernate._net.listener
import trio_hibernate._server
import trio_hibernate._storage.alarms
from trio_hibernate import App, DurableObject, StorageError, open_host, open_server

WAIT_SECONDS = 10


class Nothing(DurableObject):
    """An object that is never reached: these hosts never start."""


APP = App({"nothing": Nothing})


def corrupt_index(data_dir: Path) -> Path:
    data_dir.mkdir()
    index = data_dir / "_alarms.sqlite3"
    index.write_bytes(b"this is not a SQLite database, " * 256)
    return index


async def test_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "data"
    a_file.write_text("not a directory")
    with trio.fail_after(WAIT_SECONDS), pytest.raises(StorageError) as raised:
        async with open_host(APP, data_dir=a_file):
            pytest.fail("the host started")
    assert raised.value.path == a_file
    assert str(raised.value) == f"the data directory {a_file} exists and is not a directory"


async def test_a_data_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    inside = tmp_path / "file" / "data"
    with trio.fail_after(WAIT_SECONDS), pytest.raises(StorageError, match="Not a directory"):
        async with open_host(APP, data_dir=inside):
            pytest.fail("the host started")


async def test_an_unwritable_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o500)
    if os.geteuid() == 0:
        # Root may write anywhere, so the kernel would say yes: answer as it would for
        # any other user (the directory is mode 0500).
        real_access = os.access

        def access(path: object, mode: int) -> bool:
            if Path(str(path)) == data_dir and mode & os.W_OK:
                return False
            return real_access(path, mode)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "access", access)
    with trio.fail_after(WAIT_SECONDS), pytest.raises(StorageError, match="not writable"):
        async with open_host(APP, data_dir=data_dir):
            pytest.fail("the host started")


async def test_a_corrupt_alarm_index(tmp_path: Path) -> None:
    index = corrupt_index(tmp_path / "data")
    with trio.fail_after(WAIT_SECONDS), pytest.raises(StorageError) as raised:
        async with open_host(APP, data_dir=tmp_path / "data"):
            pytest.fail("the host started")
    assert raised.value.path == index
    assert str(raised.value) == f"cannot use the alarm index {index}: file is not a database"
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)


async def test_an_alarm_index_with_a_damaged_table(tmp_path: Path) -> None:
    # A valid database whose table does not hold what the index wrote: read at start-up.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with sqlite3.connect(data_dir / "_alarms.sqlite3") as conn:
        conn.execute("CREATE TABLE alarms (namespace, id, name, at)")
        conn.execute("INSERT INTO alarms VALUES ('nothing', 'ab', NULL, 'soon')")
    conn.close()
    with trio.fail_after(WAIT_SECONDS), pytest.raises(StorageError, match="could not convert"):
        async with open_host(APP, data_dir=data_dir):
            pytest.fail("the host started")


async def test_open_server_raises_it_too_and_never_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corrupt_index(tmp_path / "data")
    listened: list[tuple[object, ...]] = []
    real_listen = trio_hibernate._net.listener.listen

    def listen(*args: Any) -> socket.socket:
        listened.append(args)
        return real_listen(*args)

    monkeypatch.setattr(trio_hibernate._server, "listen", listen)
    with trio.fail_after(WAIT_SECONDS), pytest.raises(StorageError, match=r"_alarms\.sqlite3"):
        async with open_server(APP, data_dir=tmp_path / "data"):
            pytest.fail("the server started")
    assert listened == []  # no port was ever open


async def test_ctrl_c_during_start_up_leaves_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt while the host opens its storage (a slow disk, say) used to
    hang like a storage error: the host nursery, already started, was never cancelled."""

    def interrupted(self: object) -> list[object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(trio_hibernate._storage.alarms.AlarmIndex, "load", interrupted)
    with trio.fail_after(WAIT_SECONDS), pytest.raises(KeyboardInterrupt):
        async with open_server(APP, data_dir=tmp_path / "data"):
            pytest.fail("the server started")
