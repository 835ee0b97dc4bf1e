"""The sans-IO core: what the runtime decides, as plain data and plain functions.

Rule 1: this package never imports trio (nor any I/O library), never reads a clock and
never awaits. Time comes in as arguments (``now``), I/O goes out through the small
Protocols it defines (``sockets.Transport``). ``tests/test_layers.py`` enforces it by
reading the source.

Rule 2: every state an object or a socket can be in, and every move between states, is
decided here, in a table with a ``check_valid()``: ``lifecycle.py`` for objects,
``sockets.py`` for sockets. The Trio layer feeds inputs and carries out the answers; it
never writes a state field itself.

Modules: ``events`` (what is queued for an object, and the one-shot ``Reply``),
``lifecycle`` (an object's life across activations and its mailbox), ``sockets`` (the
accepted sockets, their tags and close state), ``gate`` (the output gate), ``codec``
(attachments and call arguments as data), ``frames`` (WebSocket frame encoding),
``wsreader`` (reading client frames, RFC 6455), ``wsevents`` (what they mean, the
closing handshake),
``deflate`` (permessage-deflate: negotiation, the room inflating has, shared frames),
``budget`` (the host-wide byte budget), ``directory`` (the objects a host knows),
``routing`` (a path to the object it names).
"""
