"""Cluster mode: several hosts (processes, machines) sharing one PostgreSQL database,
one live instance per object. ``docs/cluster.md`` has the design."""
