"""Cluster mode: several hosts (processes, machines) sharing one PostgreSQL database,
one live instance per object. ``docs/cluster.md`` has the design.

``relay``: the internal hop to the host that owns an object (requests, WebSockets and
stub calls relayed; the owner's side is ``_net/relayed.py``).
"""
