"""Small, direct checks of the SQLite layer."""

from __future__ import annotations

import sqlite3

import pytest

from trio_hibernate._storage.sqlite import SqliteDatabase


@pytest.fixture
def db() -> SqliteDatabase:
    return SqliteDatabase(sqlite3.connect(":memory:", isolation_level=None))


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM _th_kv",
        "DELETE FROM _th_meta",
        "INSERT INTO _th_kv VALUES ('k', x'00')",
        "UPDATE _TH_KV SET value = x'00'",
        "DROP TABLE _th_kv",
        "CREATE TABLE _th_mine (a)",
        "CREATE INDEX i ON _th_kv (value)",
    ],
)
def test_sql_cannot_touch_reserved_tables(db: SqliteDatabase, query: str) -> None:
    db.put_many([("k", b"v")])
    with pytest.raises(ValueError, match="reserved for trio-hibernate"):
        db.execute_user(query, ())
    assert db.get_many(["k"]) == {"k": b"v"}


def test_sql_may_mention_reserved_names_in_strings(db: SqliteDatabase) -> None:
    rows = db.execute_user(
        "SELECT name FROM sqlite_master WHERE name IN ('_th_kv', '_th_meta') ORDER BY name", ()
    ).fetchall()
    assert rows == [("_th_kv",), ("_th_meta",)]
    db.execute_user("CREATE TABLE others (a)", ())
    db.execute_user("INSERT INTO others VALUES (?)", (1,))
    assert db.execute_user("SELECT a FROM others", ()).fetchall() == [(1,)]
