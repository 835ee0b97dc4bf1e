"""The cluster's statements on PostgreSQL, as synchronous functions of a connection.

They run in worker threads (:class:`~._cluster.pg.Postgres`): psycopg's async API does
not run under Trio, its blocking one does, one pooled connection per call. Each function
is one transaction (``with conn.transaction()``), committed when it returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs

from .schema import ALIVE, SCHEMA, SCHEMA_LOCK

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "Claimed",
    "Held",
    "HostRow",
    "ObjectData",
    "OwnedElsewhere",
    "Writes",
    "claim",
    "commit_writes",
    "create_schema",
    "due_orphans",
    "hosts",
    "join",
    "leave",
    "load",
    "release",
    "renew",
]

#: How many due alarms of orphaned objects one sweep claims at most.
SWEEP_BATCH: Final = 100


@attrs.frozen
class Held:
    """A host's hold on the cluster: its name and the incarnation of this process."""

    host_id: str
    incarnation: int


@attrs.frozen
class ObjectData:
    """An object's stored state, as a claim or a reload reads it."""

    epoch: int
    entries: list[tuple[str, bytes]]
    alarm: float | None
    image: bytes | None = None
    """The object's SQLite database as ``sql.exec`` left it (``serialize()``), or None
    if it never used SQL."""


@attrs.frozen
class Claimed:
    """This host now owns the object (``data.epoch`` is its fencing token)."""

    data: ObjectData


@attrs.frozen
class OwnedElsewhere:
    """Another host owns the object: ``address`` reaches it; ``expires_in`` is what is
    left of its lease (seconds, by the database clock)."""

    host_id: str
    address: str
    expires_in: float


@attrs.frozen
class HostRow:
    """A row of ``th_hosts`` as ``/_cluster`` shows it."""

    host_id: str
    incarnation: int
    address: str
    state: str
    expires_in: float


@attrs.define
class Writes:
    """The writes of one or more committed turns of an object, to apply in PostgreSQL:
    ``cleared`` (``delete_all``) first, then ``entries`` (key -> value, None deletes),
    then the alarm (a time, None to delete it, ``...`` unchanged), and the object's SQL
    database as a whole (``image``, None: unchanged). ``sql``: a turn wrote with
    ``sql.exec`` (its commit takes the image)."""

    cleared: bool = False
    entries: dict[str, bytes | None] = attrs.Factory(dict)
    alarm: float | object | None = ...
    image: bytes | None = None
    sql: bool = False

    def copy(self) -> Writes:
        """An independent copy (a savepoint's)."""
        return Writes(self.cleared, dict(self.entries), self.alarm, self.image, self.sql)

    def merge(self, later: Writes) -> None:
        """Fold ``later`` (committed after these) into these."""
        if later.cleared:
            self.cleared = True
            self.entries = dict(later.entries)
        else:
            self.entries.update(later.entries)
        if later.alarm is not ...:
            self.alarm = later.alarm
        if later.image is not None:
            self.image = later.image

    @property
    def empty(self) -> bool:
        """Nothing to write."""
        return not self.cleared and not self.entries and self.alarm is ... and self.image is None


def create_schema(conn: psycopg.Connection) -> None:
    """Create the tables if they are missing (every host does, under a lock)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute(SCHEMA)


def join(conn: psycopg.Connection, host_id: str, address: str, ttl: float) -> Held | float:
    """Take a lease for ``host_id`` with a new incarnation, unless a live process holds
    it: then the seconds its lease has left (two processes never share a host id). A
    previous incarnation's objects are nobody's once this one joined: they can be
    claimed at once."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO th_hosts (host_id, incarnation, address, expires_at, state) "
            "VALUES (%s, nextval('th_incarnations'), %s, now() + make_interval(secs => %s), "
            "'alive') ON CONFLICT (host_id) DO UPDATE SET incarnation = excluded.incarnation, "
            "address = excluded.address, expires_at = excluded.expires_at, state = 'alive', "
            "joined_at = now() WHERE th_hosts.state <> 'alive' OR th_hosts.expires_at <= now() "
            "RETURNING incarnation",
            (host_id, address, ttl),
        ).fetchone()
        if row is not None:
            return Held(host_id, int(row[0]))
        left = conn.execute(
            "SELECT extract(epoch FROM expires_at - now()) FROM th_hosts WHERE host_id = %s",
            (host_id,),
        ).fetchone()
    assert left is not None
    return max(0.0, float(left[0]))


def renew(conn: psycopg.Connection, held: Held, ttl: float) -> bool:
    """Extend the lease by ``ttl`` from now (database clock). False: the lease is gone
    (another process joined with this host id): this process must stop serving."""
    with conn.transaction():
        cur = conn.execute(
            "UPDATE th_hosts SET expires_at = now() + make_interval(secs => %s) "
            "WHERE host_id = %s AND incarnation = %s AND state = 'alive' "
            "AND expires_at > now()",
            (ttl, held.host_id, held.incarnation),
        )
        return cur.rowcount == 1


def leave(conn: psycopg.Connection, held: Held) -> int:
    """Graceful leave: release every object this incarnation owns and end the lease.
    Returns how many objects were released."""
    with conn.transaction():
        cur = conn.execute(
            "UPDATE th_objects SET owner = NULL, incarnation = NULL "
            "WHERE owner = %s AND incarnation = %s",
            (held.host_id, held.incarnation),
        )
        released = cur.rowcount
        conn.execute(
            "UPDATE th_hosts SET state = 'left', expires_at = now() "
            "WHERE host_id = %s AND incarnation = %s",
            (held.host_id, held.incarnation),
        )
    return released


def _read_data(conn: psycopg.Connection, namespace: str, hex_id: str, epoch: int) -> ObjectData:
    entries = conn.execute(
        "SELECT key, value FROM th_kv WHERE namespace = %s AND object_id = %s ORDER BY key",
        (namespace, hex_id),
    ).fetchall()
    alarm = conn.execute(
        "SELECT at FROM th_alarms WHERE namespace = %s AND object_id = %s", (namespace, hex_id)
    ).fetchone()
    image = conn.execute(
        "SELECT image FROM th_sql WHERE namespace = %s AND object_id = %s", (namespace, hex_id)
    ).fetchone()
    return ObjectData(
        epoch,
        [(k, bytes(v)) for k, v in entries],
        None if alarm is None else float(alarm[0]),
        None if image is None else bytes(image[0]),
    )


def claim(
    conn: psycopg.Connection, held: Held, namespace: str, hex_id: str, name: str | None
) -> Claimed | OwnedElsewhere | None:
    """Own the object unless another live host does: a new epoch (the fencing token
    every later commit of this host checks), and the object's data read in the same
    transaction. An owner whose lease expired (by the database clock) is dead. None:
    the claimer's own lease has expired (it must stop serving)."""
    with conn.transaction():
        alive = conn.execute(
            "SELECT 1 FROM th_hosts WHERE host_id = %s AND incarnation = %s "
            "AND state = 'alive' AND expires_at > now()",
            (held.host_id, held.incarnation),
        ).fetchone()
        if alive is None:
            return None
        conn.execute(
            "INSERT INTO th_objects (namespace, object_id, name) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (namespace, hex_id, name),
        )
        row = conn.execute(
            "SELECT o.owner, o.incarnation, h.address, "
            f"{ALIVE}, extract(epoch FROM h.expires_at - now()) "
            "FROM th_objects o LEFT JOIN th_hosts h ON h.host_id = o.owner "
            "WHERE o.namespace = %s AND o.object_id = %s FOR UPDATE OF o",
            (namespace, hex_id),
        ).fetchone()
        assert row is not None
        owner, incarnation, address, alive, expires_in = row
        mine = owner == held.host_id and incarnation == held.incarnation
        if alive and not mine:
            return OwnedElsewhere(owner, address, float(expires_in))
        epoch_row = conn.execute(
            "UPDATE th_objects SET owner = %s, incarnation = %s, epoch = epoch + 1 "
            "WHERE namespace = %s AND object_id = %s RETURNING epoch",
            (held.host_id, held.incarnation, namespace, hex_id),
        ).fetchone()
        assert epoch_row is not None
        return Claimed(_read_data(conn, namespace, hex_id, int(epoch_row[0])))


def _fence(conn: psycopg.Connection, held: Held, namespace: str, hex_id: str, epoch: int) -> bool:
    """Lock the object's row if this host still owns it under ``epoch``."""
    cur = conn.execute(
        "SELECT 1 FROM th_objects WHERE namespace = %s AND object_id = %s AND owner = %s "
        "AND incarnation = %s AND epoch = %s FOR UPDATE",
        (namespace, hex_id, held.host_id, held.incarnation, epoch),
    )
    return cur.fetchone() is not None


def load(
    conn: psycopg.Connection, held: Held, namespace: str, hex_id: str, epoch: int
) -> ObjectData | None:
    """The object's data if this host still owns it under ``epoch``, else None."""
    with conn.transaction():
        if not _fence(conn, held, namespace, hex_id, epoch):
            return None
        return _read_data(conn, namespace, hex_id, epoch)


def commit_writes(
    conn: psycopg.Connection,
    held: Held,
    namespace: str,
    hex_id: str,
    name: str | None,
    epoch: int,
    writes: Writes,
    *,
    audit: bool,
) -> bool:
    """Apply ``writes`` in one transaction that first checks the fencing token (this
    host still owns the object under ``epoch``, row locked). False: fenced, nothing
    written. Raises psycopg errors (the outcome is unknown if the connection failed).

    Without ``cleared`` it is one statement, so one round trip (autocommit makes it its
    own transaction): the fence is a ``FOR UPDATE`` CTE, and every write CTE runs only
    ``WHERE EXISTS`` the fence row.
    """
    if writes.cleared:
        return _commit_cleared(conn, held, namespace, hex_id, name, epoch, writes, audit=audit)
    query, params = _fenced_statement(held, namespace, hex_id, name, epoch, writes, audit=audit)
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0]) == 1


#: One object's commit in a batch: namespace, hex id, name, epoch, writes (not cleared).
BatchItem = tuple[str, str, str | None, int, Writes]


def commit_batch(
    conn: psycopg.Connection, held: Held, items: list[BatchItem], *, audit: bool
) -> list[bool]:
    """The commits of several objects in one transaction (one ``fsync`` for all): each
    its own fenced statement, sent in a pipeline. A fenced object writes nothing and
    gets False; the others commit. An error fails them all (nothing is written)."""
    if len(items) == 1:  # one statement, its own transaction: one round trip
        return [commit_writes(conn, held, *items[0], audit=audit)]
    ordered = sorted(range(len(items)), key=lambda i: items[i][:2])  # one lock order
    results = [False] * len(items)
    # BEGIN, the statements and COMMIT go out together: one round trip.
    with conn.pipeline(), conn.transaction():
        cursors = [
            (i, conn.execute(*_fenced_statement(held, *items[i], audit=audit))) for i in ordered
        ]
    for i, cursor in cursors:
        row = cursor.fetchone()
        assert row is not None
        results[i] = int(row[0]) == 1
    return results


_FENCED_COMMIT: Final = (
    "WITH fence AS (SELECT 1 FROM th_objects WHERE namespace = %(ns)s "
    "AND object_id = %(id)s AND owner = %(owner)s AND incarnation = %(inc)s "
    "AND epoch = %(epoch)s FOR UPDATE), "
    "del AS (DELETE FROM th_kv WHERE namespace = %(ns)s AND object_id = %(id)s "
    "AND key = ANY(%(deleted)s::text[]) AND EXISTS (SELECT 1 FROM fence)), "
    "ins AS (INSERT INTO th_kv (namespace, object_id, key, value) "
    "SELECT %(ns)s, %(id)s, k, v FROM unnest(%(keys)s::text[], %(values)s::bytea[]) "
    "AS t(k, v) WHERE EXISTS (SELECT 1 FROM fence) "
    "ON CONFLICT (namespace, object_id, key) DO UPDATE SET value = excluded.value), "
    "alarm_del AS (DELETE FROM th_alarms WHERE %(alarm_delete)s "
    "AND namespace = %(ns)s AND object_id = %(id)s AND EXISTS (SELECT 1 FROM fence)), "
    "alarm_set AS (INSERT INTO th_alarms (namespace, object_id, name, at) "
    "SELECT %(ns)s, %(id)s, %(name)s, %(at)s WHERE %(alarm_set)s "
    "AND EXISTS (SELECT 1 FROM fence) ON CONFLICT (namespace, object_id) "
    "DO UPDATE SET at = excluded.at), "
    "image AS (INSERT INTO th_sql (namespace, object_id, image) "
    "SELECT %(ns)s, %(id)s, %(image)s::bytea WHERE %(image)s::bytea IS NOT NULL "
    "AND EXISTS (SELECT 1 FROM fence) ON CONFLICT (namespace, object_id) "
    "DO UPDATE SET image = excluded.image), "
    "log AS (INSERT INTO th_commit_log (namespace, object_id, epoch, host_id, "
    "incarnation, keys) SELECT %(ns)s, %(id)s, %(epoch)s, %(owner)s, %(inc)s, "
    "%(all_keys)s::text[] WHERE %(audit)s AND EXISTS (SELECT 1 FROM fence)) "
    "SELECT count(*) FROM fence"
)


def _fenced_statement(
    held: Held,
    namespace: str,
    hex_id: str,
    name: str | None,
    epoch: int,
    writes: Writes,
    *,
    audit: bool,
) -> tuple[str, dict[str, object]]:
    """The one statement of a commit without ``cleared``: the fence is a ``FOR UPDATE``
    CTE, and every write CTE runs only ``WHERE EXISTS`` the fence row; it returns how
    many fence rows there are (1: committed, 0: fenced)."""
    deleted = [k for k, v in writes.entries.items() if v is None]
    stored = [(k, v) for k, v in writes.entries.items() if v is not None]
    alarm_set = isinstance(writes.alarm, float)
    return _FENCED_COMMIT, {
        "ns": namespace,
        "id": hex_id,
        "name": name,
        "owner": held.host_id,
        "inc": held.incarnation,
        "epoch": epoch,
        "deleted": deleted,
        "keys": [k for k, _ in stored],
        "values": [v for _, v in stored],
        "alarm_delete": writes.alarm is None,
        "alarm_set": alarm_set,
        "at": writes.alarm if alarm_set else None,
        "audit": audit,
        "all_keys": sorted(writes.entries),
        "image": writes.image,
    }


def _commit_cleared(
    conn: psycopg.Connection,
    held: Held,
    namespace: str,
    hex_id: str,
    name: str | None,
    epoch: int,
    writes: Writes,
    *,
    audit: bool,
) -> bool:
    """:func:`commit_writes` after a ``delete_all``: under the fence, the object's
    entries and alarm go first, then the fenced statement writes what came after."""
    with conn.transaction():
        if not _fence(conn, held, namespace, hex_id, epoch):
            return False
        where = (namespace, hex_id)
        conn.execute("DELETE FROM th_kv WHERE namespace = %s AND object_id = %s", where)
        conn.execute("DELETE FROM th_alarms WHERE namespace = %s AND object_id = %s", where)
        later = attrs.evolve(writes, cleared=False)
        conn.execute(*_fenced_statement(held, namespace, hex_id, name, epoch, later, audit=audit))
    return True


def release(conn: psycopg.Connection, held: Held, namespace: str, hex_id: str, epoch: int) -> None:
    """Give the object up (it has nothing left on this host), if still ours at ``epoch``."""
    with conn.transaction():
        conn.execute(
            "UPDATE th_objects SET owner = NULL, incarnation = NULL WHERE namespace = %s "
            "AND object_id = %s AND owner = %s AND incarnation = %s AND epoch = %s",
            (namespace, hex_id, held.host_id, held.incarnation, epoch),
        )


def hosts(conn: psycopg.Connection) -> list[HostRow]:
    """Every host the cluster has known, with its lease state now."""
    with conn.transaction():
        rows = conn.execute(
            "SELECT host_id, incarnation, address, CASE WHEN state <> 'alive' THEN state "
            "WHEN expires_at > now() THEN 'alive' ELSE 'expired' END, "
            "extract(epoch FROM expires_at - now()) FROM th_hosts ORDER BY host_id"
        ).fetchall()
    return [HostRow(h, int(i), a, s, float(e)) for h, i, a, s, e in rows]


def due_orphans(
    conn: psycopg.Connection, now: float, namespaces: list[str]
) -> list[tuple[str, str, str | None]]:
    """Objects of ``namespaces`` with an alarm due at ``now`` (epoch seconds) and no
    live owner."""
    with conn.transaction():
        rows = conn.execute(
            "SELECT a.namespace, a.object_id, a.name FROM th_alarms a "
            "LEFT JOIN th_objects o USING (namespace, object_id) "
            "LEFT JOIN th_hosts h ON h.host_id = o.owner "
            f"WHERE a.at <= %s AND a.namespace = ANY(%s) AND NOT coalesce({ALIVE}, false) "
            "ORDER BY a.at LIMIT %s",
            (now, namespaces, SWEEP_BATCH),
        ).fetchall()
    return [(ns, oid, name) for ns, oid, name in rows]
