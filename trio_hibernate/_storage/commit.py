"""The turn commit protocol: when an activation's writes become durable.

The rules, in the order they apply:

1. **A turn commits once, when it ends.** The writes of a turn (one event handler) go
   into the object's open SQLite transaction; :meth:`TurnCommit.end_turn` commits them,
   or closes a transaction that only read without a disk flush.
2. **One commit at a time.** Every commit runs under the activation's turn lock: a turn
   and its commit, a background task's transaction (:meth:`TurnCommit.exclusive`) and the
   commit of a background task's single write (:meth:`TurnCommit.commit_outside_turn`)
   never overlap, and no turn starts while a commit is in flight (the input gate).
3. **The alarm index may be stale, never missing.** A new alarm reaches the index before
   the object's commit, a deletion only after it (see ``alarms.py``); the scheduler
   learns the change once the commit succeeded.
4. **A failed commit resets the instance.** Its writes are rolled back, the messages the
   output gate held are dropped, the activation is asked to stop, and the failure is
   logged here, once. The end of a turn then carries on; a background task's write or
   transaction raises the storage error to the task.
5. **Unacknowledged writes are dropped.** An activation that ends with writes not yet
   committed (it was cancelled mid-turn: shutdown, a forced eviction) rolls them back:
   the output gate held every reply that could have acknowledged them. So does an
   object being reset (``ctx.abort()``, a failed ``block_concurrency_while``), at once
   (:meth:`TurnCommit.abandon`); a commit already in flight still completes.
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
    from .alarms import AlarmIndex, AlarmKey, AlarmScheduler
    from .backend import ObjectDatabase, StorageBackend

__all__ = ["CommitServices", "CommittedObject", "TurnCommit", "Turns"]


class Turns(Protocol):
    """The activation whose storage is committed: its turn lock, turn owner and gate."""

    turn_lock: trio.Lock
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
        holding: made and entered around a background task's transaction, which holds
            the object as a turn does (stub calls made in it know the object waits).
        on_committed: called after every successful commit (the host's counter).
        on_failed: called with what failed when a commit, or opening the object's
            database, fails (the host's storage health, ``/_health``); a later
            successful commit clears it through ``on_committed``.
        log: the object's logger.
    """

    __slots__ = (
        "_activation",
        "_holding",
        "_log",
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
        holding: Callable[[], AbstractContextManager[object]],
        on_committed: Callable[[], None],
        on_failed: Callable[[str], None],
        log: ObjectLog,
    ) -> None:
        self._activation = activation
        self._services = services
        self._obj = obj
        self._holding = holding
        self._on_committed = on_committed
        self._on_failed = on_failed
        self._log = log
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
        obj = self._obj
        try:
            return self._services.storage_backend.open(obj.namespace, obj.object_id)
        except (sqlite3.Error, OSError) as exc:  # the caller sees it; the host is unhealthy
            self._on_failed(f"cannot open the database of {self._label()}: {exc}")
            raise

    def _label(self) -> str:
        """The object as log lines name it (``namespace:name``)."""
        return object_label(self._obj.namespace, self._obj.object_id)

    def _in_turn(self) -> bool:
        return self._activation.owner is trio.lowlevel.current_task()

    async def commit(self) -> None:
        """Make the pending writes durable (rules 3 and 4; the caller holds the turn lock).

        Raises:
            sqlite3.Error, OSError: the commit failed; the writes are rolled back, the
                held messages dropped and the activation asked to stop (logged here).
        """
        storage = self.state
        if not storage.dirty:
            return
        services = self._services
        index = services.alarm_index
        change = storage.take_alarm_change()
        key = self._obj.alarm_key

        def work() -> None:
            # A new alarm reaches the index before the object's commit, a deletion after
            # it: the index may be stale, never missing (see alarms.py).
            if isinstance(change, float):
                index.record(key, change)
            storage.commit_sync()
            if change is None:
                index.record(key, None)

        storage.committing = True
        try:
            if services.storage_backend.durable:
                await trio.to_thread.run_sync(work)
            else:
                # In memory there is no disk flush to keep off the event loop. (It also
                # keeps Trio's autojump clock from jumping while a worker thread commits.)
                work()
                # Done: a cancellation (ctx.abort() from a task) must not land here and
                # report as lost the writes that were just committed.
                await trio.lowlevel.cancel_shielded_checkpoint()
        except (sqlite3.Error, OSError) as exc:
            dropped = storage.failed()
            self._activation.request_stop()
            label = self._label()
            self._on_failed(f"the storage commit of {label} failed: {exc}")
            self._log.exception(
                "storage commit of %s failed: %d held message(s) dropped, the instance is reset",
                label,
                dropped,
            )
            raise
        finally:
            storage.committing = False
        storage.committed()
        self._on_committed()
        if change is not ...:
            assert change is None or isinstance(change, float)
            services.alarms.schedule(key, change)

    async def end_turn(self) -> None:
        """The turn is over: commit its writes (rule 1; the caller holds the turn lock).

        A failed commit was logged and reset the instance (rule 4); it is not raised.
        """
        storage = self.state
        if storage.dirty:
            with contextlib.suppress(sqlite3.Error, OSError):  # logged and reset by commit()
                await self.commit()
        else:
            storage.end_read_only_turn()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """A background task's transaction: a turn of its own, committed at the end."""
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
        """Commit a background task's write before its call returns (rule 2)."""
        async with self._activation.turn_lock:
            await self.commit()

    def abandon(self) -> int:
        """The object is being reset: roll back the writes not yet committed and drop
        the messages the output gate holds (rule 5). Returns how many were dropped.

        A commit in flight (in a worker thread) is left to complete: its writes are
        durable and its messages released as usual.
        """
        storage = self.state
        if storage.committing or not storage.dirty:
            return 0
        return storage.failed()

    def release(self) -> None:
        """The activation has ended: drop unacknowledged writes (rule 5), hand the
        database back to the backend."""
        storage = self.state
        if storage.dirty:
            storage.failed()
        db = storage.detach()
        if db is not None:
            obj = self._obj
            self._services.storage_backend.release(obj.namespace, obj.object_id, db)
