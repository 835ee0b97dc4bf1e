"""Bytes on sockets: HTTP/1.1, the WebSocket upgrade and frames, writing, listening.

Rule: this package knows the runtime only through the ``ConnectionOwner`` Protocol it
defines; it never imports ``_host``, ``_runtime`` or ``_supervisor``. It may import the
sans-IO ``_core`` and the object-facing value types (``_http``, ``_websocket``,
``_errors``, ``_limits``). ``tests/test_layers.py`` enforces it.

Modules: ``owner`` (the Protocols), ``channel`` (an OS socket or a ``trio.abc.Stream``),
``connection`` (the per-connection task and its phases), ``http`` (one request and its
response, the 101), ``gatekeeper`` (what a request gets before and from its object),
``websocket`` (the WebSocket transport), ``deflate`` (a socket's permessage-deflate),
``writer`` (synchronous writes, the backlog, the lingering close), ``listener`` (the
accept loop), ``operations`` (``/_health``, ``/_metrics``), ``relayed`` (the
``/_cluster`` endpoints peer hosts relay to), ``splice`` (a client spliced to the host
that owns its WebSocket's object).
"""
