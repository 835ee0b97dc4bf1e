"""The turn commit protocol: when an activation's writes become durable (group commit).

The rules, in the order they apply:

1. **A turn's writes are committed together, when it ends.** They go into the object's
   open SQLite transaction; :meth:`TurnCommit.end_turn` commits them at the end of the
   turn (``COMMIT``, on the event loop thread, with no disk flush), and a worker thread
   then makes the commit durable (:meth:`~.sqlite.SqliteDatabase.flush`, an ``fsync`` of
   the write-ahead log). A transaction that only read is closed without either.
2. **Group commit: turns do not wait for the disk.** The next turn starts as soon as a
   turn ends, while its commit is being flushed (the turn lock is not held across the
   flush). Turns that end while a flush is in flight leave their writes in the open
   transaction; the next turn boundary after the flush lands commits them all as one
   transaction, and one flush makes them durable: one ``fsync`` for every turn that ran
   meanwhile. A commit is only ever made at a turn boundary, by whoever is there: the
   end of a turn or of a background transaction (holding the turn lock), or the
   flusher when the lock is free; so a turn's writes are never split between commits.
   One commit is flushed at a time, and commits become durable in order. Reads always
   see every earlier write, durable or not (one connection, used only by the event loop
   thread: the flush syncs the log through a descriptor of its own). When a flush finds
   the log grown (``sqlite.py``), the next commit also checkpoints it in a worker thread
   before it returns, holding the object as commits did before group commit (a
   background task's storage call waits for it, or raises if synchronous).
3. **Outputs wait for every write made before them** (the output gate, ``gate.py``): a
   message, close or reply waits for the commit carrying the latest write made before
   it, by its own turn or an earlier one; a turn that wrote nothing still waits for the
   writes of the turns before it.
4. **The alarm index may be stale, never missing.** A new alarm reaches the index before
   the commit that stores it, a deletion only after that commit is durable (see
   ``alarms.py``); the scheduler learns the change once the commit is durable.
5. **A failed commit resets the instance.** A failed ``COMMIT`` is rolled back; a failed
   flush leaves its commit in the database, not known to be durable (as after a crash
   between a commit and its reply, the next instance may or may not see those writes:
   none was acknowledged). Either way the writes not yet committed are rolled back (the
   turns that made them saw the failed writes), every message the output gate holds is
   dropped and so is every later one from this instance, the activation is asked to
   stop, and the failure is logged here, once. The end of a turn then carries on; a
   background task's write or transaction raises the storage error to the task.
6. **Unacknowledged writes are dropped.** An activation whose turn is cancelled
   (shutdown, a forced eviction) rolls back the writes not yet committed (that turn's,
   and those of the turns that ended while the last flush was in flight): the output
   gate held every reply that could have acknowledged them. So does an object being
   reset (``ctx.abort()``, a failed ``block_concurrency_while``), at once
   (:meth:`TurnCommit.abandon`). A commit already made is still flushed, and the
   messages held for it are released when it is durable: the activation ends only
   after its flusher (a task in its nursery, shielded from cancellation) has finished,
   so a graceful stop commits and flushes everything.

In memory (a backend that is not durable) there is no flush: the end of a turn commits
inline, and outputs are released at once, as before group commit.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol, final

import trio

from .._containment import object_label
from .api import Storage, StorageState

if TYPE_CHECKING:
    from .._containment import ObjectLog
    from .._core.gate import OutputGate
    from .._ids import ObjectId
    from .._limits import Limits
    from .._turnlock import TurnLock
    from .alarms import AlarmIndex, AlarmKey, AlarmScheduler
    from .backend import ObjectDatabase, StorageBackend

__all__ = ["CommitServices", "CommittedObject", "TurnCommit", "Turns"]

#: A commit being flushed: its number (the output gate's) and its alarm change (a new
#: alarm time, None for a deletion, ``...`` for none).
_InFlight = tuple[int, float | object | None]


class Turns(Protocol):
    """The activation whose storage is committed: its turn lock, turn owner and gate."""

    turn_lock: TurnLock
    owner: trio.lowlevel.Task | None
    gate: OutputGate

    def request_stop(self) -> None:
        """Hibernate as soon as the current turn (if any) is over."""


class CommittedObject(Protocol):
    """The object whose storage is committed."""

    namespace: str
    object_id: ObjectId

    @property
    def alarm_key(self) -> AlarmKey:
        """How the alarm index names the object."""
        ...


class CommitServices(Protocol):
    """What the commit protocol needs from the runtime."""

    @property
    def limits(self) -> Limits: ...
    @property
    def storage_backend(self) -> StorageBackend: ...
    @property
    def alarm_index(self) -> AlarmIndex: ...
    @property
    def alarms(self) -> AlarmScheduler: ...


@final
class TurnCommit:
    """The storage of one activation and the protocol that commits it (see the module).

    Made when the activation's storage is first used; :attr:`storage` is what the
    object's ``ctx.storage`` returns.

    Args:
        activation: the activation the storage belongs to.
        services: the runtime's backend, alarm index and alarm scheduler.
        obj: the object (its namespace, id and alarm key).
        nursery: the activation's nursery, where the flusher runs (the activation ends
            only once it has finished).
        holding: made and entered around a background task's transaction, which holds
            the object as a turn does (stub calls made in it know the object waits).
        on_committed: called after every commit that is durable (the host's counter).
        on_failed: called with what failed when a commit, or opening the object's
            database, fails (the host's storage health, ``/_health``); a later durable
            commit clears it through ``on_committed``.
        log: the object's logger.
    """

    __slots__ = (
        "_activation",
        "_checkpoint_due",
        "_failed",
        "_flushing",
        "_holding",
        "_in_flight",
        "_landed",
        "_log",
        "_nursery",
        "_obj",
        "_on_committed",
        "_on_failed",
        "_services",
        "state",
        "storage",
    )

    def __init__(
        self,
        activation: Turns,
        services: CommitServices,
        obj: CommittedObject,
        *,
        nursery: trio.Nursery,
        holding: Callable[[], AbstractContextManager[object]],
        on_committed: Callable[[], None],
        on_failed: Callable[[str], None],
        log: ObjectLog,
    ) -> None:
        self._activation = activation
        self._services = services
        self._obj = obj
        self._nursery = nursery
        self._holding = holding
        self._on_committed = on_committed
        self._on_failed = on_failed
        self._log = log
        self._in_flight: _InFlight | None = None
        self._flushing = False  # the flusher task runs
        self._checkpoint_due = False  # a flush found the log grown
        self._failed: sqlite3.Error | OSError | None = None
        self._landed = trio.Event()  # set (and replaced) whenever a commit lands or fails
        self.state = StorageState(
            open_db=self._open,
            limits=services.limits,
            gate=activation.gate,
            finish_outside_turn=self.commit_outside_turn,
            in_turn=self._in_turn,
            exclusive=self.exclusive,
        )
        """The runtime's side of the storage (what this protocol drives)."""
        self.storage = Storage(self.state)
        """The activation's ``ctx.storage``."""

    def _open(self) -> ObjectDatabase:
        return _open_database(self._services.storage_backend, self._obj, self._on_failed)

    def _in_turn(self) -> bool:
        return self._activation.owner is trio.lowlevel.current_task()

    # -- the ends of turns -----------------------------------------------------------------

    async def end_turn(self) -> None:
        """The turn is over (rule 1; the caller holds the turn lock): commit the writes
        made so far, unless a flush is in flight (rule 2: its flusher commits them when
        it lands). Returns without waiting for the disk.

        A failed commit was logged and reset the instance (rule 5); it is not raised.
        Cancelled: the writes not yet committed are rolled back (rule 6) first.
        """
        storage = self.state
        if self._failed is not None:
            _drop_uncommitted(self.state)  # after a failed commit nothing more is kept
            return
        if not storage.dirty:
            storage.end_read_only_turn()
            return
        if not self._services.storage_backend.durable:
            with contextlib.suppress(sqlite3.Error, OSError):  # logged, the instance reset
                await self._commit_inline()
            return
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:
            _drop_uncommitted(self.state)
            raise
        if self._flushing:
            storage.close_cursors()  # a cursor lasts one turn, even before its commit
            return
        with contextlib.suppress(sqlite3.Error, OSError):  # logged, the instance reset
            await self._start_commit()

    async def commit(self) -> None:
        """Make every write so far durable (the caller holds the turn lock: a turn
        boundary); returns once it is.

        Raises:
            sqlite3.Error, OSError: a commit failed (now, or one in flight); logged and
                the instance reset (rule 5).
        """
        storage = self.state
        if not self._services.storage_backend.durable:
            if self._failed is not None:
                raise self._failed
            if storage.dirty:
                await self._commit_inline()
            return
        gate = storage.gate
        target = gate.last_write
        while True:
            if self._failed is not None:
                raise self._failed
            if gate.durable >= target:
                return
            if self._in_flight is not None:
                await self._landed.wait()
            elif storage.dirty:
                await self._start_commit()
            else:
                return  # rolled back meanwhile (a reset): nothing is left to flush

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """A background task's transaction: a turn of its own, durable at the end."""
        activation = self._activation
        async with activation.turn_lock:
            activation.owner = trio.lowlevel.current_task()
            try:
                # Like a turn, the transaction holds the object until it ends.
                with self._holding():
                    yield
            finally:
                activation.owner = None
                await self.commit()

    async def commit_outside_turn(self) -> None:
        """Make a background task's write durable before its call returns."""
        async with self._activation.turn_lock:
            await self.commit()

    def abandon(self) -> int:
        """The object is being reset: roll back the writes not yet committed and drop
        the messages held for them (rule 6); returns how many. A commit already made is
        left to its flush, and the messages held for it are released when it lands."""
        return _drop_uncommitted(self.state)

    def release(self) -> None:
        """The activation has ended (its flusher too): drop unacknowledged writes
        (rule 6), hand the database back to the backend."""
        storage = self.state
        if storage.dirty:
            storage.failed()
        db = storage.detach()
        if db is not None:
            obj = self._obj
            self._services.storage_backend.release(obj.namespace, obj.object_id, db)

    # -- commits and flushes ---------------------------------------------------------------

    async def _start_commit(self) -> None:
        """Commit the open transaction and have the flusher make it durable (rule 2).

        The caller is at a turn boundary (it holds the turn lock) and no commit is in
        flight. Waits only for a new alarm to reach the index (rule 4).

        Raises:
            sqlite3.Error, OSError: the commit failed (logged; the instance reset).
        """
        storage = self.state
        change = await _record_new_alarm(storage, self._services.alarm_index, self._obj)
        if not storage.dirty or self._failed is not None:
            return  # reset (or failed) while the alarm was recorded: nothing to commit
        gate = storage.gate
        number = gate.commit_started()
        try:
            storage.commit_sync()
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)
            raise
        storage.dirty = False
        if self._checkpoint_due:
            self._checkpoint_due = False
            await _checkpoint(storage, self._obj, self._log)
        self._in_flight = (number, change)
        storage.committing = True
        if not self._flushing:
            self._flushing = True
            self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        """The flusher (rules 2 and 6): flush the commit in flight, release its outputs,
        commit what turns wrote meanwhile if the lock is free (else its holder will)."""
        storage = self.state
        lock = self._activation.turn_lock
        try:
            with trio.CancelScope(shield=True):
                while (in_flight := self._in_flight) is not None:
                    number, change = in_flight
                    try:
                        await trio.to_thread.run_sync(self._flush_sync, change)
                    except (sqlite3.Error, OSError) as exc:
                        self._in_flight = None
                        self._fail(exc)
                        return
                    self._in_flight = None
                    self._landed_ok(number, change)
                    if storage.dirty and self._failed is None and not lock.locked():
                        lock.acquire_nowait()  # a turn boundary, for the commit only
                        try:
                            with contextlib.suppress(sqlite3.Error, OSError):  # logged
                                await self._start_commit()
                        finally:
                            lock.release()
        finally:
            self._flushing = False
            storage.committing = False
            self._wake()

    def _flush_sync(self, change: float | object | None) -> None:
        """In a worker thread: the flush, then an alarm deletion (rule 4)."""
        if self.state.flush_sync():
            self._checkpoint_due = True
        if change is None:
            self._services.alarm_index.record(self._obj.alarm_key, None)

    async def _commit_inline(self) -> None:
        """In memory: commit and release at once, alarm index included.

        Raises:
            sqlite3.Error, OSError: the commit failed (logged; the instance reset).
        """
        storage = self.state
        change = storage.take_alarm_change()
        number = storage.gate.commit_started()
        try:
            _commit_with_alarm(storage, self._services.alarm_index, self._obj, change)
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)
            raise
        # Done: a cancellation (ctx.abort() from a task) must not land here and report
        # as lost the writes that were just committed.
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._landed_ok(number, change)

    def _landed_ok(self, number: int, change: float | object | None) -> None:
        """Commit ``number`` is durable: release its messages, tell the scheduler."""
        self.state.gate.open(number)
        self._on_committed()
        if change is not ...:
            assert change is None or isinstance(change, float)
            self._services.alarms.schedule(self._obj.alarm_key, change)
        self._wake()

    def _fail(self, exc: sqlite3.Error | OSError) -> None:
        """A commit failed (rule 5): roll back, drop every held message, stop, log."""
        self._failed = exc
        storage = self.state
        storage.rollback()
        dropped = storage.gate.fail()
        self._activation.request_stop()
        label = object_label(self._obj.namespace, self._obj.object_id)
        self._on_failed(f"the storage commit of {label} failed: {exc}")
        self._log.error(
            "storage commit of %s failed: %d held message(s) dropped, the instance is reset",
            label,
            dropped,
            exc_info=exc,
        )
        self._wake()

    def _wake(self) -> None:
        """Wake whoever waits for a commit to land (:meth:`commit`)."""
        self._landed.set()
        self._landed = trio.Event()


async def _record_new_alarm(
    storage: StorageState, index: AlarmIndex, obj: CommittedObject
) -> float | object | None:
    """Take the alarm change of the writes to commit; a new alarm time is written to the
    index first (rule 4). Returns the change."""
    change = storage.take_alarm_change()
    recorded: float | None = None
    while isinstance(change, float) and change != recorded:
        with trio.CancelScope(shield=True):  # short, and a commit must follow it
            await trio.to_thread.run_sync(index.record, obj.alarm_key, change)
        recorded = change
        later = storage.take_alarm_change()  # a background task may have set another
        if later is not ...:
            change = later
    return change


async def _checkpoint(storage: StorageState, obj: CommittedObject, log: ObjectLog) -> None:
    """Checkpoint the database in a worker thread (rule 2; the caller holds the turn
    lock, and no transaction is open). A failure loses nothing (the log keeps the
    commits): it is logged, and the next flush asks again."""
    storage.busy = True
    try:
        with trio.CancelScope(shield=True):  # the connection is the thread's meanwhile
            await trio.to_thread.run_sync(storage.checkpoint_sync)
    except (sqlite3.Error, OSError):
        log.exception("checkpoint of %s failed", object_label(obj.namespace, obj.object_id))
    finally:
        storage.busy = False


def _commit_with_alarm(
    storage: StorageState, index: AlarmIndex, obj: CommittedObject, change: object
) -> None:
    """Commit at once (in memory), the alarm index around it as rule 4 says."""
    if isinstance(change, float):
        index.record(obj.alarm_key, change)
    storage.commit_sync()
    if change is None:
        index.record(obj.alarm_key, None)
    storage.dirty = False


def _open_database(
    backend: StorageBackend, obj: CommittedObject, on_failed: Callable[[str], None]
) -> ObjectDatabase:
    """The object's database; a failure to open it also makes the host unhealthy."""
    try:
        return backend.open(obj.namespace, obj.object_id)
    except (sqlite3.Error, OSError) as exc:  # the caller sees it
        on_failed(
            f"cannot open the database of {object_label(obj.namespace, obj.object_id)}: {exc}"
        )
        raise


def _drop_uncommitted(storage: StorageState) -> int:
    """Roll back the writes not yet committed, drop the messages held for them (rule 6);
    returns how many."""
    if not storage.dirty:
        storage.end_read_only_turn()
        return 0
    storage.rollback()
    return storage.gate.drop(storage.gate.next_commit)
