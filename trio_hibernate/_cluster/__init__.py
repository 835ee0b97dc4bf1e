"""Cluster mode: many hosts, one instance per object (issue 14; ``docs/cluster.md``).

Modules: ``relay`` (the internal hop between hosts: requests, WebSockets and stub
calls relayed to the host that owns the object).
"""
