"""docs/cloudflare-api.md stays true: every Python name in its tables exists, every item of
the API audit has a row, and what it calls "in progress" has not landed unnoticed.

The page's tables have four columns: the Cloudflare (or partyserver) name, the Python
names as code spans written from the package (``ObjectContext.accept_websocket``,
``testing.TestWebSocket``), a status and notes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import attrs
import pytest

import trio_hibernate
import trio_hibernate.client
import trio_hibernate.testing

PAGE: Final = Path(__file__).resolve().parents[1] / "docs" / "cloudflare-api.md"
HEADER: Final = re.compile(r"\| (Cloudflare|partyserver) \| trio-hibernate \| status \| notes \|")
CODE_SPAN: Final = re.compile(r"`([^`]+)`")
DOTTED_NAME: Final = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
STATUSES: Final = frozenset({"same", "differs", "extra", "missing", "in progress", "N/A"})
#: Statuses that promise a Python name.
PRESENT: Final = frozenset({"same", "differs", "extra"})

#: The items of the API audit (shared/reference/api-parity.md: 69 Cloudflare rows, 21
#: partyserver rows), by a name each must show in the page's first column.
AUDIT: Final = (
    # DurableObjectState
    "acceptWebSocket",
    "getWebSockets",
    "getTags",
    "setWebSocketAutoResponse",
    "getWebSocketAutoResponse()",
    "getWebSocketAutoResponseTimestamp",
    "setHibernatableWebSocketEventTimeout",
    "getHibernatableWebSocketEventTimeout",
    "blockConcurrencyWhile",
    "ctx.waitUntil(promise)",
    "abort",
    "ctx.id",
    "ctx.storage",
    "ctx.exports",
    "preShutdown",
    # WebSocket
    "ws.send",
    "ws.close",
    "serializeAttachment",
    "deserializeAttachment",
    "readyState",
    "ws.url",
    "ws.protocol",
    "ws.extensions",
    "ws.binaryType",
    "Sec-WebSocket-Protocol",
    "permessage-deflate",
    # handlers
    "fetch(request)",
    "webSocketMessage",
    "webSocketClose",
    "webSocketError",
    "alarm(alarmInfo)",
    # namespaces and ids
    "idFromName",
    "newUniqueId",
    "idFromString",
    "namespace.get(id)",
    "getByName",
    "jurisdiction",
    "locationHint",
    "id.toString()",
    "id.equals",
    "id.name",
    # stubs and RPC
    "stub.fetch",
    "(RPC)",
    "RPC property access",
    "RpcTarget",
    "pipelining",
    "stub.id",
    "stub.name",
    # key-value storage
    "storage.get(key)",
    "storage.put(key, value)",
    "storage.delete(key)",
    "storage.list(",
    "allowConcurrency",
    "allowUnconfirmed",
    "noCache",
    "storage.transaction(fn)",
    "transactionSync",
    "deleteAll",
    "storage.sync()",
    "ctx.storage.kv",
    # alarms
    "getAlarm",
    "setAlarm",
    "deleteAlarm",
    "alarm retries",
    # SQL
    "sql.exec",
    "toArray",
    "cursor.one()",
    "cursor.raw()",
    "columnNames",
    "cursor.next()",
    "rowsRead",
    "rowsWritten",
    "databaseSize",
    "getCurrentBookmark",
    "getBookmarkForTime",
    "onNextSessionRestoreBookmark",
    # limits
    "10 tags per WebSocket",
    "32,768 WebSockets",
    "auto-response 2,048",
    "attachment 2,048",
    "received message 32 MiB",
    "event timeout at most 7 days",
    "KV key 2 KiB",
    "SQL: 100 KB statement",
    "storage per object",
    # partyserver
    "onStart",
    "onConnect",
    "onMessage",
    "onClose",
    "onError",
    "onRequest",
    "onAlarm",
    "onException",
    "getConnectionTags",
    "broadcast(message, without)",
    "getConnection(id)",
    "getConnections(tag)",
    "connection.id",
    "_pk",
    "connection.state",
    "setState",
    "connection.uri",
    "connection.tags",
    "hibernate: true",
    "this.name",
    "this.sql",
    "routePartykitRequest",
    "getServerByName",
    "PartySocket",
)


@attrs.frozen
class Row:
    line: int
    cloudflare: str
    python: tuple[str, ...]
    status: str


def rows() -> list[Row]:
    """The rows of the page's name tables."""
    found: list[Row] = []
    lines = PAGE.read_text().splitlines()
    in_table = False
    for number, line in enumerate(lines, start=1):
        if HEADER.fullmatch(line.strip()):
            in_table = True
            continue
        if not in_table or line.startswith("| ---"):
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        # A cell holds no "|": the test of the cell count below catches one that does.
        cells = [
            cell.strip() for cell in line.strip().removeprefix("|").removesuffix("|").split("|")
        ]
        assert len(cells) == 4, f"docs/cloudflare-api.md:{number}: {len(cells)} cells: {line}"
        found.append(Row(number, cells[0], tuple(CODE_SPAN.findall(cells[1])), cells[2]))
    return found


def resolve(name: str) -> object:
    """The public object ``name`` designates, from the package (``Class.attribute``)."""
    head, *rest = name.split(".")
    if head == "testing":
        package: object = trio_hibernate.testing
        head, *rest = rest
        public = trio_hibernate.testing.__all__
    elif head == "client":
        package = trio_hibernate.client
        head, *rest = rest
        public = trio_hibernate.client.__all__
    else:
        package = trio_hibernate
        public = trio_hibernate.__all__
    if head not in public:
        raise AttributeError(f"{head!r} is not a public name of {package!r}")
    value = getattr(package, head)
    for part in rest:
        value = getattr(value, part)
    return value


def test_the_page_has_its_tables() -> None:
    table_rows = rows()
    assert len(table_rows) >= 90, len(table_rows)


def test_every_python_name_exists() -> None:
    problems = []
    for row in rows():
        for name in row.python:
            if not DOTTED_NAME.fullmatch(name):
                problems.append(f"line {row.line}: `{name}` is not a name (put code in the notes)")
                continue
            try:
                resolve(name)
            except AttributeError as exc:
                problems.append(f"line {row.line}: `{name}`: {exc}")
    assert not problems, "docs/cloudflare-api.md names what does not exist:\n" + "\n".join(problems)


def test_every_row_has_a_known_status() -> None:
    for row in rows():
        assert row.status in STATUSES, f"line {row.line}: status {row.status!r}"
        if row.status in PRESENT:
            assert row.python, f"line {row.line}: {row.status!r} but no Python name"


@pytest.mark.parametrize("item", AUDIT)
def test_the_audit_is_covered(item: str) -> None:
    assert any(item in row.cloudflare for row in rows()), f"no row for {item!r}"


def test_nothing_is_in_progress() -> None:
    """Subprotocols and permessage-deflate, the items issue 11 had "in progress", have
    landed: their rows name the Python names (checked above)."""
    assert [row.cloudflare for row in rows() if row.status == "in progress"] == []
