"""``ctx.storage.sql``: Cloudflare's SQL API (``exec``, the cursor, ``database_size``, limits).

Three tiers. The statement splitter is plain Python, checked against SQLite's own
``sqlite3_complete()``. :class:`~trio_hibernate.SqlStorage` and its cursor are driven
directly, on a :class:`~trio_hibernate.Storage` over an in-memory database, as inside
one turn. What depends on turns (a cursor's lifetime, the commit, hibernation) runs in a
test host.

Where the expected behaviour is Cloudflare's, the comment names the workerd source or
the Cloudflare documentation it comes from.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import trio
from hypothesis import given, strategies as st
from trio.testing import MockClock

from trio_hibernate import (
    App,
    DurableObject,
    LimitExceededError,
    Limits,
    ObjectContext,
    Request,
    Response,
    SqlCursor,
    Storage,
)
from trio_hibernate._core.gate import OutputGate
from trio_hibernate._storage.api import StorageState
from trio_hibernate._storage.backend import ObjectDatabase
from trio_hibernate._storage.sqlite import SqliteDatabase
from trio_hibernate._storage.statements import split_statements, statement_ends
from trio_hibernate.testing import TestHost, open_test_host

WAIT: Final = 30.0

#: Cloudflare's own example (developers.cloudflare.com/durable-objects/api/sql-storage),
#: two statements in one ``exec``.
CLOUDFLARE_EXAMPLE: Final = """CREATE TABLE IF NOT EXISTS artist(
      artistid    INTEGER PRIMARY KEY,
      artistname  TEXT
    );INSERT INTO artist (artistid, artistname) VALUES
      (123, 'Alice'),
      (456, 'Bob'),
      (789, 'Charlie');"""
#: Where its first statement ends.
SEMICOLON: Final = CLOUDFLARE_EXAMPLE.index(";")


# -- splitting a query into statements -------------------------------------------------------

#: Pieces that exercise every token and state of sqlite3_complete(): quotes of each
#: kind, both comment styles, the words of CREATE [TEMP] TRIGGER ... END, parameters.
SQL_PIECES: Final = [
    *("SELECT", "1", "x", "a$b", "_", "é", "\U0001f600", "(", ")", "-", "/", "*", "~", "@"),
    *(" ", "\n", "\t", "\r", "\f", "\v", ";", ";", ";"),
    *("'", '"', "`", "[", "]", "--", "/*", "*/"),
    *("CREATE", "create", "TEMP", "temporary", "TRIGGER", "tRiGgEr", "END", "eNd", "EXPLAIN"),
    *("BEGIN", "$", ":", "?", "#"),
]


@given(st.lists(st.sampled_from(SQL_PIECES), max_size=16).map("".join))
def test_statements_end_where_sqlite_says_a_statement_is_complete(query: str) -> None:
    # A ";" ends a statement exactly when SQLite calls the text up to it complete (and
    # the ";" is a token, not inside a trailing "--" comment: then adding text after it
    # would still leave the statement complete).
    expected = [
        index
        for index, char in enumerate(query)
        if char == ";"
        and sqlite3.complete_statement(query[: index + 1])
        and not sqlite3.complete_statement(query[: index + 1] + "x")
    ]
    assert statement_ends(query) == expected


@pytest.mark.parametrize(
    ("query", "statements"),
    [
        (
            CLOUDFLARE_EXAMPLE,
            [CLOUDFLARE_EXAMPLE[: SEMICOLON + 1], CLOUDFLARE_EXAMPLE[SEMICOLON + 1 :]],
        ),
        ("SELECT 1", ["SELECT 1"]),
        ("SELECT 1;  \n", ["SELECT 1;"]),
        ("SELECT ';'; SELECT \"a;b\"", ["SELECT ';';", 'SELECT "a;b"']),
        ("SELECT `;`, [;] -- ;\n; SELECT 2", ["SELECT `;`, [;] -- ;\n;", "SELECT 2"]),
        ("SELECT 1 /* ; */; SELECT 2 /* ; */", ["SELECT 1 /* ; */;", "SELECT 2 /* ; */"]),
        ("-- comment\nSELECT 1", ["-- comment\nSELECT 1"]),
        # Empty statements and comments before a statement are SQLite's to skip.
        ("SELECT 1;; /* c */ ;SELECT 2", ["SELECT 1;", "; /* c */ ;SELECT 2"]),
        (
            "CREATE TRIGGER t AFTER INSERT ON a BEGIN INSERT INTO b VALUES (1); "
            "UPDATE b SET x = CASE WHEN 1 THEN 2 END; END; SELECT 3",
            [
                "CREATE TRIGGER t AFTER INSERT ON a BEGIN INSERT INTO b VALUES (1); "
                "UPDATE b SET x = CASE WHEN 1 THEN 2 END; END;",
                "SELECT 3",
            ],
        ),
        ("EXPLAIN CREATE TEMP TRIGGER t AFTER INSERT ON a BEGIN SELECT 1; END;", None),
        # workerd skips \v after a statement (SQLite's tokenizer would refuse it).
        ("SELECT 1;\v", ["SELECT 1;"]),
        ("SELECT 1;\vSELECT 2", ["SELECT 1;", "SELECT 2"]),
    ],
)
def test_split_statements(query: str, statements: list[str] | None) -> None:
    split = [statement.text for statement in split_statements(query)]
    assert split == (statements if statements is not None else [query])


@pytest.mark.parametrize(
    ("query", "verb", "read_only"),
    [
        ("select 1", "SELECT", True),
        ("VALUES (1)", "VALUES", True),
        ("EXPLAIN DELETE FROM t", "EXPLAIN", True),
        (
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n FROM c) SELECT n FROM c",
            "SELECT",
            True,
        ),
        ("WITH x AS (SELECT 1) DELETE FROM t WHERE a IN x", "DELETE", False),
        ("/* c */ insert into t values (1)", "INSERT", False),
        ("PRAGMA table_info(t)", "PRAGMA", False),
    ],
)
def test_statements_know_whether_they_can_write(query: str, verb: str, read_only: bool) -> None:
    (statement,) = split_statements(query)
    assert (statement.verb, statement.read_only) == (verb, read_only)


@pytest.mark.parametrize(
    "query",
    # workerd: sql.exec('') and sql.exec(';') throw "SQL code did not contain a
    # statement", and so does 'SELECT 123; SELECT 456; -- trailing comment'.
    [
        "",
        "   \n",
        ";",
        " -- only a comment",
        "SELECT 1; -- trailing",
        "SELECT 1;;",
        "SELECT 1; /**/",
    ],
)
def test_a_query_needs_a_statement_and_nothing_after_the_last(query: str) -> None:
    with pytest.raises(sqlite3.ProgrammingError, match="did not contain a statement"):
        split_statements(query)


@pytest.mark.parametrize(
    "query", ["SELECT ?; SELECT 1", "SELECT :a; SELECT 1", "SELECT 1; SELECT $x; SELECT 2"]
)
def test_only_the_last_statement_can_have_parameters(query: str) -> None:
    # workerd: "When executing multiple SQL statements in a single call, only the last
    # statement can have parameters."
    with pytest.raises(sqlite3.ProgrammingError, match="only the last one can have parameters"):
        split_statements(query)


def test_parameters_in_strings_and_comments_are_not_parameters() -> None:
    statements = split_statements("SELECT '?', \":a\" /* ? */; -- $x\nSELECT ?")
    assert [statement.has_parameters for statement in statements] == [False, True]


# -- SqlStorage and its cursor, inside one turn ---------------------------------------------


def state_on(db: ObjectDatabase, limits: Limits | None = None) -> StorageState:
    """The runtime's side of a storage over ``db``, used as inside a turn (no commit
    ever runs unless a test calls the commit steps itself)."""

    def outside_a_turn() -> Any:
        raise AssertionError("these tests run inside a turn")

    return StorageState(
        open_db=lambda: db,
        limits=limits or Limits(),
        gate=OutputGate(),
        finish_outside_turn=outside_a_turn,
        in_turn=lambda: True,
        exclusive=outside_a_turn,
    )


def storage_on(db: ObjectDatabase, limits: Limits | None = None) -> Storage:
    """A ``ctx.storage`` over ``db`` (see :func:`state_on`)."""
    return Storage(state_on(db, limits))


@pytest.fixture
def db() -> SqliteDatabase:
    return SqliteDatabase(sqlite3.connect(":memory:", isolation_level=None))


@pytest.fixture
def state(db: SqliteDatabase) -> StorageState:
    return state_on(db)


@pytest.fixture
def storage(state: StorageState) -> Storage:
    return Storage(state)


def count(storage: Storage, table: str) -> int:
    (n,) = storage.sql.exec(f"SELECT count(*) FROM {table}").one().values()
    assert isinstance(n, int)
    return n


def test_cloudflares_example_runs_both_statements(storage: Storage) -> None:
    cursor = storage.sql.exec(CLOUDFLARE_EXAMPLE)
    # The cursor is the last statement's (Cloudflare: "the returned cursor is only for
    # the last SQL statement").
    assert (cursor.column_names, cursor.rows_written, cursor.to_list()) == ([], 3, [])
    assert storage.sql.exec("SELECT artistname FROM artist ORDER BY artistid").rows == [
        ("Alice",),
        ("Bob",),
        ("Charlie",),
    ]


def test_the_bindings_go_to_the_last_statement(storage: Storage) -> None:
    cursor = storage.sql.exec(
        "CREATE TABLE t (x); INSERT INTO t VALUES ('?'); INSERT INTO t VALUES (?), (?)", 1, 2
    )
    assert cursor.rows_written == 2
    assert storage.sql.exec("SELECT x FROM t ORDER BY rowid").rows == [("?",), (1,), (2,)]
    with pytest.raises(sqlite3.ProgrammingError, match="only the last one"):
        storage.sql.exec("INSERT INTO t VALUES (?); SELECT 1", 3)


def test_triggers_with_semicolons_in_a_multi_statement_exec(storage: Storage) -> None:
    storage.sql.exec(
        """
        CREATE TABLE a (x);
        CREATE TABLE log (line TEXT);
        CREATE TRIGGER a_log AFTER INSERT ON a BEGIN
            INSERT INTO log VALUES ('inserted; ' || new.x);
            INSERT INTO log VALUES ('twice -- really');
        END;
        INSERT INTO a VALUES (1); /* a ; in a comment */ INSERT INTO a VALUES (2);
        """
    )
    assert storage.sql.exec("SELECT line FROM log ORDER BY rowid").rows == [
        ("inserted; 1",),
        ("twice -- really",),
        ("inserted; 2",),
        ("twice -- really",),
    ]


@pytest.mark.parametrize(
    ("failing", "error"),
    [
        ("INSERT INTO missing VALUES (1)", sqlite3.OperationalError),
        ("INSERT INTO t VALUES (2)", sqlite3.IntegrityError),  # a duplicate key
        ("SELECT * FROM _th_kv", ValueError),
        ("COMMIT", ValueError),
        ("SELECT zeroblob(2000001)", LimitExceededError),
        ("SELEC 1", sqlite3.OperationalError),
    ],
)
def test_a_failing_statement_undoes_the_whole_exec(
    storage: Storage, failing: str, error: type[Exception]
) -> None:
    # Cloudflare keeps what the statements before the failing one did (they ran in the
    # request's implicit transaction); here the exec is all or nothing.
    storage.sql.exec("CREATE TABLE t (x PRIMARY KEY); INSERT INTO t VALUES (1)")
    with pytest.raises(error):
        storage.sql.exec(
            f"INSERT INTO t VALUES (2); CREATE TABLE u (y); DELETE FROM t WHERE x = 1; {failing}"
        )
    assert storage.sql.exec("SELECT x FROM t").rows == [(1,)]
    assert storage.sql.exec("SELECT name FROM sqlite_master WHERE name = 'u'").rows == []
    # The turn's transaction is intact, and so is the exec after it.
    assert storage.sql.exec("INSERT INTO t VALUES (3); SELECT count(*) AS n FROM t").one() == {
        "n": 2
    }


@pytest.mark.parametrize(
    "query",
    [
        "BEGIN",
        "BEGIN TRANSACTION",
        "COMMIT",
        "END",
        "ROLLBACK",
        "SAVEPOINT s",
        "RELEASE s",
        "ROLLBACK TO s",
        "CREATE TABLE t (x); INSERT INTO t VALUES (1); COMMIT",
    ],
)
def test_transaction_control_is_refused(storage: Storage, db: SqliteDatabase, query: str) -> None:
    # workerd: "To execute a transaction, please use the state.storage.transaction() or
    # state.storage.transactionSync() APIs instead of the SQL BEGIN TRANSACTION or
    # SAVEPOINT statements."
    with pytest.raises(ValueError, match=r"transaction control .*storage\.transaction"):
        storage.sql.exec(query)
    assert db.in_transaction  # the turn's transaction was not ended
    assert storage.sql.exec("SELECT name FROM sqlite_master WHERE name = 't'").rows == []


@pytest.mark.parametrize(
    "query",
    [
        "CREATE TEMP TRIGGER spy AFTER INSERT ON _th_kv BEGIN SELECT 1; END",
        "CREATE TEMP VIEW v AS SELECT * FROM _th_kv; SELECT * FROM v",
        "CREATE VIEW _th_view AS SELECT 1",
        "CREATE TABLE ok (x); SELECT * FROM _th_meta",
    ],
)
def test_reserved_tables_stay_reserved(storage: Storage, query: str) -> None:
    with pytest.raises(ValueError, match="reserved for trio-hibernate"):
        storage.sql.exec(query)
    assert storage.sql.exec("SELECT count(*) AS n FROM sqlite_temp_master").one() == {"n": 0}


def ten_rows(storage: Storage) -> None:
    storage.sql.exec("CREATE TABLE t (n INTEGER PRIMARY KEY, s TEXT)")
    for n in range(1, 11):
        storage.sql.exec("INSERT INTO t VALUES (?, ?)", n, f"row {n}")


def test_the_cursor_reads_rows_as_dicts_tuples_or_one_at_a_time(storage: Storage) -> None:
    ten_rows(storage)
    cursor = storage.sql.exec("SELECT n, s FROM t ORDER BY n")
    assert isinstance(cursor, SqlCursor)
    assert cursor.column_names == ["n", "s"]
    assert cursor.columns == ("n", "s")
    # Every way of reading takes from the same position (Cloudflare's next(), raw(),
    # iteration and toArray() share one query).
    assert next(cursor) == {"n": 1, "s": "row 1"}
    assert next(cursor.raw()) == (2, "row 2")
    for row in cursor:
        assert row == {"n": 3, "s": "row 3"}
        break
    assert cursor.rows[:2] == [(4, "row 4"), (5, "row 5")]
    assert cursor.to_list() == []  # .rows read them all
    assert list(cursor) == []
    with pytest.raises(StopIteration):
        next(cursor)
    # A repeated column name keeps its last value, as a JS object does.
    assert storage.sql.exec("SELECT 1 AS a, 2 AS a").one() == {"a": 2}
    assert storage.sql.exec("SELECT 1 AS a, 2 AS a").column_names == ["a", "a"]


def test_one_wants_exactly_one_row(storage: Storage) -> None:
    ten_rows(storage)
    assert storage.sql.exec("SELECT s FROM t WHERE n = 3").one() == {"s": "row 3"}
    with pytest.raises(ValueError, match="exactly one row, got 0"):
        storage.sql.exec("SELECT s FROM t WHERE n > 10").one()
    cursor = storage.sql.exec("SELECT s FROM t WHERE n > 7")
    with pytest.raises(ValueError, match="exactly one row, got 3"):
        cursor.one()
    assert cursor.to_list() == []
    cursor = storage.sql.exec("SELECT s FROM t WHERE n >= 9 ORDER BY n")
    assert next(cursor) == {"s": "row 9"}
    assert cursor.one() == {"s": "row 10"}  # the only row *left*


def test_rows_are_read_as_the_cursor_is_read(storage: Storage) -> None:
    ten_rows(storage)
    cursor = storage.sql.exec("SELECT n FROM t ORDER BY n")
    # workerd's own test: the cursor is one row ahead of what it returned.
    assert cursor.rows_read == 1
    for seen, _ in enumerate(cursor, start=1):
        assert cursor.rows_read == min(seen + 1, 10)
    assert cursor.rows_read == 10
    # A row SQLite cannot compute fails when the rows before it are read, not in exec.
    # (Python's sqlite3 computes the row after the one it returns, and the cursor holds
    # one ready: reading the 3rd row computes the 5th. The rows before the error are
    # still returned; the 4th is lost, as sqlite3 loses it.)
    late_failure = storage.sql.exec(
        "SELECT CASE WHEN n = 5 THEN zeroblob(2000001) ELSE n END AS v FROM t ORDER BY n"
    )
    assert [next(late_failure)["v"] for _ in range(3)] == [1, 2, 3]
    with pytest.raises(LimitExceededError, match="max_sql_row_bytes"):
        next(late_failure)
    assert late_failure.to_list() == []


def test_rows_written(storage: Storage) -> None:
    sql = storage.sql
    assert sql.exec("CREATE TABLE t (x); CREATE TABLE log (x)").rows_written == 0
    assert sql.exec("INSERT INTO t VALUES (1), (2), (3)").rows_written == 3
    assert sql.exec("UPDATE t SET x = x + 1 WHERE x > 1").rows_written == 2
    assert sql.exec("SELECT * FROM t").rows_written == 0
    # RETURNING: every write happens at once, before any row is read.
    returning = sql.exec("DELETE FROM t WHERE x > 2 RETURNING x")
    assert (returning.rows_written, returning.rows_read) == (2, 1)
    assert sorted(returning.rows) == [(3,), (4,)]
    # A trigger's writes count, as they do on Cloudflare.
    sql.exec("CREATE TRIGGER t_log AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.x); END")
    assert sql.exec("INSERT INTO t VALUES (7)").rows_written == 2
    # Only the last statement counts.
    assert sql.exec("INSERT INTO t VALUES (8); SELECT count(*) FROM t").rows_written == 0


def test_writes_close_the_output_gate_reads_do_not(storage: Storage, state: StorageState) -> None:
    storage.sql.exec("SELECT 1; WITH x AS (SELECT 2) SELECT * FROM x")
    assert not state.dirty
    storage.sql.exec("CREATE TABLE t (x)")  # writes no row, but the schema
    assert state.dirty


def test_database_size_counts_the_pages_in_use(storage: Storage, db: SqliteDatabase) -> None:
    sql = storage.sql
    page_size = db.execute_user("PRAGMA page_size").fetchall()[0][0]
    assert isinstance(page_size, int)
    empty = sql.database_size
    assert empty > 0
    assert empty % page_size == 0
    sql.exec("CREATE TABLE big (b); INSERT INTO big VALUES (zeroblob(100000))")
    grown = sql.database_size
    assert grown >= empty + 100_000
    sql.exec("DROP TABLE big")
    # Freed pages are not counted (workerd: page_count - freelist_count).
    assert sql.database_size == empty


# -- limits ---------------------------------------------------------------------------------


def check_limit_error(
    excinfo: pytest.ExceptionInfo[LimitExceededError], name: str, limit: int, value: int
) -> None:
    error = excinfo.value
    assert (error.limit_name, error.limit, error.value) == (name, limit, value)
    assert f"Limits.{name}" in str(error)
    assert str(limit) in str(error)


def test_the_query_size_limit(storage: Storage) -> None:
    limit = Limits().max_sql_statement_bytes
    assert limit == 100_000  # Cloudflare: 100 KB
    padding = "SELECT '" + "x" * (limit - len("SELECT ''")) + "'"
    assert len(padding) == limit
    assert storage.sql.exec(padding).one() == {padding[len("SELECT ") :]: "x" * (limit - 9)}
    with pytest.raises(LimitExceededError) as excinfo:
        storage.sql.exec(padding + " ")
    check_limit_error(excinfo, "max_sql_statement_bytes", limit, limit + 1)
    # Bytes of UTF-8, all the statements of the query together (as in workerd).
    with pytest.raises(LimitExceededError) as excinfo:
        storage.sql.exec("SELECT 1;" * (limit // 9) + "SELECT 'é'")
    assert excinfo.value.value == 9 * (limit // 9) + len("SELECT 'é'".encode())


def test_the_bound_parameters_limit(storage: Storage) -> None:
    limit = Limits().max_sql_bound_parameters
    assert limit == 100  # Cloudflare: 100 per query
    query = "SELECT " + " + ".join(["?"] * limit) + " AS total"
    assert storage.sql.exec(query, *[1] * limit).one() == {"total": limit}
    with pytest.raises(LimitExceededError) as excinfo:
        storage.sql.exec(query + " + ?", *[1] * (limit + 1))
    check_limit_error(excinfo, "max_sql_bound_parameters", limit, limit + 1)
    assert storage.sql.exec(f"SELECT ?{limit} AS last", *range(limit)).one() == {"last": 99}
    with pytest.raises(LimitExceededError) as excinfo:
        storage.sql.exec(f"SELECT ?{limit + 1}")  # SQLite's own check: value is limit + 1
    check_limit_error(excinfo, "max_sql_bound_parameters", limit, limit + 1)


def test_the_columns_limit(storage: Storage) -> None:
    limit = Limits().max_sql_columns
    assert limit == 100  # Cloudflare: 100 per table
    columns = ", ".join(f"c{n}" for n in range(limit))
    storage.sql.exec(f"CREATE TABLE wide ({columns})")
    assert len(storage.sql.exec("SELECT * FROM wide").column_names) == limit
    with pytest.raises(LimitExceededError) as excinfo:
        storage.sql.exec(f"CREATE TABLE wider ({columns}, one_more)")
    check_limit_error(excinfo, "max_sql_columns", limit, limit + 1)
    with pytest.raises(LimitExceededError, match="too many columns"):
        storage.sql.exec("ALTER TABLE wide ADD COLUMN one_more")
    with pytest.raises(LimitExceededError, match="max_sql_columns"):
        storage.sql.exec("SELECT " + ", ".join(["1"] * (limit + 1)))


def test_the_row_size_limit(storage: Storage) -> None:
    limit = Limits().max_sql_row_bytes
    assert limit == 2_000_000  # Cloudflare: 2 MB for a string, BLOB or row
    # A bound value: checked before anything runs, with its size.
    assert storage.sql.exec("SELECT length(?) AS n", b"x" * limit).one() == {"n": limit}
    with pytest.raises(LimitExceededError) as excinfo:
        storage.sql.exec("SELECT length(?)", b"x" * (limit + 1))
    check_limit_error(excinfo, "max_sql_row_bytes", limit, limit + 1)
    with pytest.raises(LimitExceededError) as excinfo:
        storage.sql.exec("SELECT length(?)", "é" * (limit // 2 + 1))  # UTF-8 bytes
    assert excinfo.value.value == limit + 2
    # A computed value: SQLite's own check (it does not say the size: limit + 1).
    assert storage.sql.exec("SELECT length(zeroblob(?)) AS n", limit).one() == {"n": limit}
    with pytest.raises(LimitExceededError) as excinfo:
        storage.sql.exec("SELECT zeroblob(?)", limit + 1)
    check_limit_error(excinfo, "max_sql_row_bytes", limit, limit + 1)
    # A row: its record is the BLOB plus a 5-byte header.
    storage.sql.exec("CREATE TABLE b (x); INSERT INTO b VALUES (zeroblob(?))", limit - 5)
    with pytest.raises(LimitExceededError, match="max_sql_row_bytes"):
        storage.sql.exec("INSERT INTO b VALUES (zeroblob(?))", limit - 4)


async def test_limits_are_configurable_and_the_runtime_is_not_bound_by_them(
    db: SqliteDatabase,
) -> None:
    storage = storage_on(db, Limits(max_sql_bound_parameters=2, max_sql_columns=2))
    assert storage.sql.exec("SELECT ?, ?", 1, 2).rows == [(1, 2)]
    with pytest.raises(LimitExceededError, match="at most 2 bindings; got 3"):
        storage.sql.exec("SELECT ?, ?, ?", 1, 2, 3)
    with pytest.raises(LimitExceededError, match="max_sql_columns"):
        storage.sql.exec("SELECT 1, 2, 3")
    # The key-value API binds up to 128 keys at once and stores 3-column rows: the SQL
    # limits apply to the object's SQL only.
    keys = [f"k{n}" for n in range(128)]
    await storage.put(dict.fromkeys(keys, 1))
    assert len(await storage.get(keys)) == 128


# -- a cursor's lifetime ---------------------------------------------------------------------


COMMITTED: Final = (
    "closed with rows left unread: its transaction was committed (at the end of the turn "
    "that made it, or for a write made outside a turn)"
)


def test_a_cursor_left_unread_is_closed_when_the_transaction_commits(
    storage: Storage, state: StorageState
) -> None:
    ten_rows(storage)
    unread = storage.sql.exec("SELECT n FROM t ORDER BY n")
    assert next(unread) == {"n": 1}
    finished = storage.sql.exec("SELECT n FROM t WHERE n = 1")
    assert finished.to_list() == [{"n": 1}]
    returning = storage.sql.exec("UPDATE t SET s = 'x' WHERE n < 3 RETURNING n")
    state.commit_sync()  # what the runtime runs when the turn ends
    with pytest.raises(RuntimeError, match=re.escape(COMMITTED)):
        next(unread)
    with pytest.raises(RuntimeError, match="read a cursor within the turn that made it"):
        unread.to_list()
    with pytest.raises(RuntimeError, match="closed with rows left unread"):
        returning.one()
    # What it knew stays; a cursor read to its end is just empty.
    assert (unread.column_names, unread.rows_read, unread.rows_written) == (["n"], 2, 0)
    assert finished.to_list() == []


def test_a_read_only_turn_ends_its_cursors_too(storage: Storage, state: StorageState) -> None:
    ten_rows(storage)
    state.commit_sync()
    state.committed()
    cursor = storage.sql.exec("SELECT n FROM t")
    assert not state.dirty
    state.end_read_only_turn()
    with pytest.raises(RuntimeError, match=re.escape(COMMITTED)):
        cursor.one()


def test_a_cursor_is_not_stepped_while_its_transaction_commits(
    storage: Storage, db: SqliteDatabase
) -> None:
    # A ctx.start_soon task may read a cursor while the turn's commit runs in a worker
    # thread, which holds this lock (as in test_descriptors) and ends the cursors.
    ten_rows(storage)
    cursor = storage.sql.exec("SELECT n FROM t ORDER BY n")
    with db._commit_lock, pytest.raises(RuntimeError, match="being committed"):
        next(cursor)


def test_a_rollback_ends_cursors(storage: Storage, state: StorageState) -> None:
    ten_rows(storage)
    cursor = storage.sql.exec("SELECT n FROM t")
    state.failed()  # a failed commit, or an activation cancelled mid-turn
    with pytest.raises(RuntimeError, match="its transaction was rolled back"):
        list(cursor)


async def test_delete_all_ends_cursors(storage: Storage) -> None:
    ten_rows(storage)
    cursor = storage.sql.exec("SELECT n FROM t")
    await storage.delete_all()  # a pending read would keep its table from being dropped
    with pytest.raises(RuntimeError, match=r"storage\.delete_all\(\) ran"):
        list(cursor)
    assert storage.sql.exec("SELECT name FROM sqlite_master WHERE name = 't'").rows == []


# -- through a host: turns, commits, hibernation --------------------------------------------

Script = Callable[["Runner", Request], Awaitable[str]]


class Runner(DurableObject):
    """Runs the script its request path names (``env`` maps names to scripts)."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        self.scripts: dict[str, Script] = env
        self.kept: dict[str, Any] = {}

    async def fetch(self, request: Request) -> Response:
        return Response(body=await self.scripts[request.path.rsplit("/", 1)[-1]](self, request))


@asynccontextmanager
async def runner_host(scripts: dict[str, Script], data_dir: Path) -> AsyncIterator[TestHost]:
    async with open_test_host(App({"sql": Runner}, env=scripts), data_dir=str(data_dir)) as host:
        yield host


async def run(host: TestHost, script: str) -> str:
    with trio.fail_after(WAIT):
        response = await host.fetch("sql", "one", f"/{script}")
    assert response.status == 200, response.body
    return response.body.decode()


async def test_a_cursor_kept_past_its_turn_cannot_be_read(clock: MockClock, tmp_path: Path) -> None:
    async def start(runner: Runner, request: Request) -> str:
        runner.ctx.storage.sql.exec(CLOUDFLARE_EXAMPLE)
        cursor = runner.ctx.storage.sql.exec("SELECT artistname FROM artist ORDER BY artistid")
        runner.kept["cursor"] = cursor
        await trio.sleep(1)  # within its turn, a cursor may be read across awaits
        return str(next(cursor))

    async def later(runner: Runner, request: Request) -> str:
        try:
            next(runner.kept["cursor"])
        except RuntimeError as exc:
            return str(exc)
        return "read"

    async def names(runner: Runner, request: Request) -> str:
        return repr(runner.ctx.storage.sql.exec("SELECT artistname FROM artist").rows)

    scripts: dict[str, Script] = {"start": start, "later": later, "names": names}
    async with runner_host(scripts, tmp_path) as host:
        assert await run(host, "start") == "{'artistname': 'Alice'}"
        assert "closed with rows left unread" in await run(host, "later")
        assert await host.hibernate("sql", "one")
        assert await run(host, "names") == repr([("Alice",), ("Bob",), ("Charlie",)])


async def test_a_failed_exec_caught_by_the_handler_keeps_the_rest_of_the_turn(
    clock: MockClock, tmp_path: Path
) -> None:
    async def write(runner: Runner, request: Request) -> str:
        sql = runner.ctx.storage.sql
        sql.exec("CREATE TABLE t (x UNIQUE); INSERT INTO t VALUES ('before')")
        with pytest.raises(sqlite3.IntegrityError):
            sql.exec("INSERT INTO t VALUES ('half'); INSERT INTO t VALUES ('before')")
        sql.exec("INSERT INTO t VALUES ('after')")
        return "written"

    async def read(runner: Runner, request: Request) -> str:
        return repr(runner.ctx.storage.sql.exec("SELECT x FROM t ORDER BY rowid").rows)

    async with runner_host({"write": write, "read": read}, tmp_path) as host:
        assert await run(host, "write") == "written"
    async with runner_host({"write": write, "read": read}, tmp_path) as host:
        assert await run(host, "read") == repr([("before",), ("after",)])


async def test_a_background_write_commits_and_closes_the_tasks_cursor(
    clock: MockClock, tmp_path: Path
) -> None:
    outcome: list[str] = []
    done = trio.Event()

    async def background(runner: Runner) -> None:
        storage = runner.ctx.storage
        await storage.sync()  # the turn that started the task may still be committing
        cursor = storage.sql.exec("SELECT artistid FROM artist ORDER BY artistid")
        outcome.append(str(next(cursor)))
        await storage.put("k", "v")  # committed before it returns: the transaction ends
        try:
            next(cursor)
        except RuntimeError as exc:
            outcome.append(str(exc))
        finally:
            done.set()

    async def start(runner: Runner, request: Request) -> str:
        runner.ctx.storage.sql.exec(CLOUDFLARE_EXAMPLE)
        runner.ctx.start_soon(lambda: background(runner))
        return "started"

    async with runner_host({"start": start}, tmp_path) as host:
        assert await run(host, "start") == "started"
        with trio.fail_after(WAIT):
            await done.wait()
    assert outcome == [
        "{'artistid': 123}",
        f"this SQL cursor was {COMMITTED}; read a cursor within the turn that made it "
        "(to_list() keeps its rows)",
    ]


async def test_database_size_survives_hibernation(clock: MockClock, tmp_path: Path) -> None:
    async def fill(runner: Runner, request: Request) -> str:
        sql = runner.ctx.storage.sql
        sql.exec("CREATE TABLE b (x); INSERT INTO b VALUES (zeroblob(50000))")
        return str(sql.database_size)

    async def size(runner: Runner, request: Request) -> str:
        return str(runner.ctx.storage.sql.database_size)

    async with runner_host({"fill": fill, "size": size}, tmp_path) as host:
        filled = int(await run(host, "fill"))
        assert filled > 50_000
        assert await host.hibernate("sql", "one")
        assert int(await run(host, "size")) == filled
