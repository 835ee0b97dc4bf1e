"""The PostgreSQL tables of cluster mode, and the statements on them.

Every table is created by the first host that starts (``CREATE ... IF NOT EXISTS`` under
an advisory lock, so that hosts starting together do not race). Times that decide who
owns what (leases) are the database's clock (``now()``), never a host's; alarm times
are epoch seconds from the hosts' wall clocks, as in single-host mode.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SCHEMA", "SCHEMA_LOCK"]

#: ``pg_advisory_xact_lock`` key held while the schema is created.
SCHEMA_LOCK: Final = 0x7468_6962  # "thib"

SCHEMA: Final = """
CREATE SEQUENCE IF NOT EXISTS th_incarnations;
CREATE TABLE IF NOT EXISTS th_hosts (
    host_id text PRIMARY KEY,
    incarnation bigint NOT NULL,
    address text NOT NULL,
    expires_at timestamptz NOT NULL,
    state text NOT NULL,
    joined_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS th_objects (
    namespace text NOT NULL,
    object_id text NOT NULL,
    name text,
    owner text,
    incarnation bigint,
    epoch bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, object_id)
);
CREATE INDEX IF NOT EXISTS th_objects_owner ON th_objects (owner, incarnation);
CREATE TABLE IF NOT EXISTS th_kv (
    namespace text NOT NULL,
    object_id text NOT NULL,
    key text NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (namespace, object_id, key)
);
CREATE TABLE IF NOT EXISTS th_alarms (
    namespace text NOT NULL,
    object_id text NOT NULL,
    name text,
    at double precision NOT NULL,
    PRIMARY KEY (namespace, object_id)
);
CREATE INDEX IF NOT EXISTS th_alarms_at ON th_alarms (at);
CREATE TABLE IF NOT EXISTS th_sql (
    namespace text NOT NULL,
    object_id text NOT NULL,
    image bytea NOT NULL,
    PRIMARY KEY (namespace, object_id)
);
CREATE TABLE IF NOT EXISTS th_commit_log (
    seq bigserial PRIMARY KEY,
    namespace text NOT NULL,
    object_id text NOT NULL,
    epoch bigint NOT NULL,
    host_id text NOT NULL,
    incarnation bigint NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    keys text[] NOT NULL
);
"""

#: Whether the owner row ``h`` (joined on ``o.owner``) holds a live lease for ``o``.
ALIVE: Final = (
    "(h.host_id IS NOT NULL AND h.incarnation = o.incarnation AND h.state = 'alive' "
    "AND h.expires_at > now())"
)
