"""The SQLite store of one object, driven side by side with a dict model.

No Trio here: :class:`SqliteDatabase` is synchronous, so Hypothesis drives it directly
(``put_many``/``delete_many``/``get_many``/``list``/``delete_all`` and the transaction
calls the runtime makes: ``begin``/``commit``/``rollback`` for the turn,
``savepoint``/``release``/``rollback_to`` for ``transaction()``).

The model is two dicts and a stack: ``committed`` (what survives a crash), ``current``
(committed plus the open turn's writes) and one snapshot of ``current`` per open
savepoint. Keys come from a small alphabet chosen around the UTF-8 length boundaries, the
surrogate gap and U+10FFFF, so that ``list(prefix=...)`` and its ``prefix_upper_bound``
meet the awkward cases; the model orders keys by their UTF-8 bytes, as SQLite does.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Final

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from strategies import MAX_CHAR, data_values, utf8_boundary_text

from trio_hibernate import ObjectId
from trio_hibernate._core.codec import decode_data, encode_data
from trio_hibernate._storage.sqlite import SqliteBackend, SqliteDatabase, prefix_upper_bound

NAMESPACE: Final = "store"
OBJECT_ID: Final = ObjectId.from_name(NAMESPACE, "model")

keys = utf8_boundary_text(max_size=4)
values = st.binary(max_size=8)
bounds = st.none() | utf8_boundary_text(max_size=3)
prefixes = (
    st.none()
    | utf8_boundary_text(max_size=3)
    | utf8_boundary_text(max_size=2).map(lambda text: text + MAX_CHAR)
    | st.integers(1, 3).map(lambda n: MAX_CHAR * n)
)
limits = st.none() | st.integers(1, 6)

#: The machine commits hundreds of times per example and every COMMIT flushes to disk;
#: on a memory file system the flush is cheap and the code path is the same. (Durability
#: on a real disk is what ``test_storage_crash.py`` checks.)
SCRATCH: Final = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def utf8(key: str) -> bytes:
    """The order SQLite gives TEXT keys (BINARY collation: memcmp of UTF-8)."""
    return key.encode("utf-8")


def model_list(
    model: dict[str, bytes],
    *,
    prefix: str | None,
    start: str | None,
    end: str | None,
    reverse: bool,
    limit: int | None,
) -> list[tuple[str, bytes]]:
    """What ``SqliteDatabase.list`` should return, computed from first principles."""
    chosen = [
        key
        for key in model
        if (prefix is None or key.startswith(prefix))
        and (start is None or utf8(key) >= utf8(start))
        and (end is None or utf8(key) < utf8(end))
    ]
    chosen.sort(key=utf8, reverse=reverse)
    if limit is not None:
        chosen = chosen[:limit]
    return [(key, model[key]) for key in chosen]


class StorageMachine(RuleBasedStateMachine):
    """A real object database next to its model, with crashes and savepoints."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="th-stateful-", dir=SCRATCH))
        self.backend = SqliteBackend(self.directory)
        self.db: SqliteDatabase = self.backend.open(NAMESPACE, OBJECT_ID)
        self.committed: dict[str, bytes] = {}
        self.current: dict[str, bytes] = {}
        self.savepoints: list[dict[str, bytes]] = []

    def teardown(self) -> None:
        self.db.close()
        self.backend.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- writes ----------------------------------------------------------------------------

    @initialize(items=st.dictionaries(keys, values, max_size=6))
    def seed(self, items: dict[str, bytes]) -> None:
        """Start from some committed data, so crashes and rollbacks have something to keep."""
        self.db.put_many(items.items())
        self.db.commit()
        self.current.update(items)
        self.committed = dict(self.current)

    @rule(key=keys, value=values)
    def put(self, key: str, value: bytes) -> None:
        self.db.put_many([(key, value)])
        self.current[key] = value
        assert self.db.in_transaction

    @rule(key=keys, value=data_values)
    def put_encoded(self, key: str, value: object) -> None:
        """A value as ``Storage.put`` stores it (the data codec), read back as equal."""
        encoded = encode_data(value, what="a value", limit_name="limit", limit_bytes=1 << 20)
        self.db.put_many([(key, encoded)])
        self.current[key] = encoded
        assert decode_data(self.db.get_many([key])[key]) == value

    @rule(items=st.dictionaries(keys, values, max_size=8))
    def put_batch(self, items: dict[str, bytes]) -> None:
        self.db.put_many(items.items())
        self.current.update(items)

    @rule(key=keys)
    def delete(self, key: str) -> None:
        existed = key in self.current
        assert self.db.delete_many([key]) == int(existed)
        self.current.pop(key, None)

    @precondition(lambda self: bool(self.current))
    @rule(data=st.data())
    def delete_existing(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.current, key=utf8)), label="existing key")
        assert self.db.delete_many([key]) == 1
        del self.current[key]

    @rule(batch=st.lists(keys, max_size=8))
    def delete_batch(self, batch: list[str]) -> None:
        expected = len(set(batch) & self.current.keys())
        assert self.db.delete_many(batch) == expected
        for key in batch:
            self.current.pop(key, None)

    @rule()
    def delete_all(self) -> None:
        self.db.delete_all()
        self.current.clear()

    # -- reads -----------------------------------------------------------------------------

    @rule(batch=st.lists(keys, max_size=8))
    def get_many(self, batch: list[str]) -> None:
        found = self.db.get_many(batch)
        wanted = sorted({key for key in batch if key in self.current}, key=utf8)
        assert list(found.items()) == [(key, self.current[key]) for key in wanted]

    @rule(
        prefix=prefixes,
        start=bounds,
        end=bounds,
        reverse=st.booleans(),
        limit=limits,
    )
    def list_range(
        self,
        prefix: str | None,
        start: str | None,
        end: str | None,
        reverse: bool,
        limit: int | None,
    ) -> None:
        got = self.db.list(prefix=prefix, start=start, end=end, reverse=reverse, limit=limit)
        want = model_list(
            self.current, prefix=prefix, start=start, end=end, reverse=reverse, limit=limit
        )
        assert got == want

    @precondition(lambda self: bool(self.current))
    @rule(data=st.data(), reverse=st.booleans(), limit=limits)
    def list_prefix_of_existing(
        self, data: st.DataObject, reverse: bool, limit: int | None
    ) -> None:
        """A prefix cut from a stored key, so prefix listings are rarely empty."""
        key = data.draw(st.sampled_from(sorted(self.current, key=utf8)), label="key")
        cut = data.draw(st.integers(0, len(key)), label="prefix length")
        prefix = key[:cut]
        got = self.db.list(prefix=prefix, start=None, end=None, reverse=reverse, limit=limit)
        want = model_list(
            self.current, prefix=prefix, start=None, end=None, reverse=reverse, limit=limit
        )
        assert got == want

    # -- transactions ----------------------------------------------------------------------

    @precondition(lambda self: len(self.savepoints) < 4)
    @rule()
    def savepoint(self) -> None:
        """``transaction()`` begins: a nested, all-or-nothing group of writes."""
        self.db.savepoint(f"th_txn_{len(self.savepoints)}")
        self.savepoints.append(dict(self.current))
        assert self.db.in_transaction

    @precondition(lambda self: bool(self.savepoints))
    @rule()
    def release(self) -> None:
        """The transaction's function returned: its writes stay, part of the turn."""
        self.savepoints.pop()
        self.db.release(f"th_txn_{len(self.savepoints)}")
        assert self.db.in_transaction

    @precondition(lambda self: bool(self.savepoints))
    @rule()
    def rollback_to(self) -> None:
        """The transaction's function raised: exactly its writes are undone."""
        self.current = self.savepoints.pop()
        self.db.rollback_to(f"th_txn_{len(self.savepoints)}")

    @precondition(lambda self: not self.savepoints)
    @rule()
    def commit(self) -> None:
        """The turn ends and its writes become durable."""
        self.db.commit()
        self.committed = dict(self.current)
        assert not self.db.in_transaction

    @rule()
    def rollback(self) -> None:
        """The turn's commit failed (or the activation was cancelled): forget the turn."""
        self.db.rollback()
        self.current = dict(self.committed)
        self.savepoints.clear()
        assert not self.db.in_transaction

    @rule()
    def crash_and_reopen(self) -> None:
        """The process dies mid-turn: the connection goes without a COMMIT."""
        self.db.close()
        self.db = self.backend.open(NAMESPACE, OBJECT_ID)
        self.current = dict(self.committed)
        self.savepoints.clear()
        assert not self.db.in_transaction

    # -- the invariant ---------------------------------------------------------------------

    @invariant()
    def store_equals_model(self) -> None:
        everything = self.db.list(prefix=None, start=None, end=None, reverse=False, limit=None)
        assert everything == sorted(self.current.items(), key=lambda item: utf8(item[0]))

    @invariant()
    def database_is_sound(self) -> None:
        assert self.db.execute_user("PRAGMA quick_check", ()).fetchall() == [("ok",)]


TestStorageMachine = StorageMachine.TestCase
TestStorageMachine.settings = settings(stateful_step_count=40)


# -- prefix_upper_bound on its own -----------------------------------------------------------


@given(prefix=st.text(min_size=1, max_size=4), key=st.text(max_size=6))
def test_prefix_upper_bound_splits_keys_exactly(prefix: str, key: str) -> None:
    """Every key starting with the prefix sorts below the bound, every other key at or
    past the prefix sorts at or above it (in UTF-8 byte order, surrogates excluded)."""
    try:
        utf8(prefix + key)
    except UnicodeEncodeError:
        return  # lone surrogates are not valid keys
    bound = prefix_upper_bound(prefix)
    if bound is None:
        assert set(prefix) == {MAX_CHAR}
        return
    utf8(bound)  # the bound itself is a valid string
    assert utf8(prefix) < utf8(bound)
    assert utf8(prefix + key) < utf8(bound)
    if not key.startswith(prefix) and utf8(key) >= utf8(prefix):
        assert utf8(key) >= utf8(bound)


@pytest.mark.parametrize(
    ("prefix", "bound"),
    [
        ("a", "b"),
        ("a" + MAX_CHAR, "b"),
        ("\ud7ff", "\ue000"),
        ("x\ud7ff", "x\ue000"),
        ("\uffff", "\U00010000"),
        (MAX_CHAR, None),
        (MAX_CHAR * 3, None),
    ],
)
def test_prefix_upper_bound_examples(prefix: str, bound: str | None) -> None:
    assert prefix_upper_bound(prefix) == bound


def test_uncommitted_writes_are_gone_after_a_reopen(tmp_path: Path) -> None:
    """The crash rule's premise, shown once on its own: a connection closed without a
    COMMIT leaves only committed data, and a second connection never sees a turn's
    uncommitted writes."""
    backend = SqliteBackend(tmp_path)
    db = backend.open(NAMESPACE, OBJECT_ID)
    db.put_many([("kept", b"1")])
    db.commit()
    db.put_many([("lost", b"2")])
    other = sqlite3.connect(backend.path_for(NAMESPACE, OBJECT_ID))
    try:
        assert other.execute("SELECT key FROM _th_kv").fetchall() == [("kept",)]
    finally:
        other.close()
    db.close()
    db = backend.open(NAMESPACE, OBJECT_ID)
    try:
        assert db.get_many(["kept", "lost"]) == {"kept": b"1"}
    finally:
        db.close()
