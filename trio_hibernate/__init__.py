"""trio-hibernate: hibernatable WebSocket objects (Durable Objects style) for Trio.

An application defines :class:`DurableObject` classes and registers them in an
:class:`App`. Each object is addressed by name, accepts WebSockets with tags and small
attachments, and is evicted from memory when idle while its WebSockets stay connected;
the next event constructs it again. Serve an app with :func:`open_server` /
:func:`serve_objects` (and :func:`wait_for_shutdown_signal` to stop on SIGTERM), or run
a :func:`open_host` and hand it sockets.
"""

# General layout (docs/architecture.md has the picture and the rules of each layer):
#
# trio_hibernate/_core/ is the sans-IO core: what the runtime decides, as plain data and
# functions (an object's lifecycle and mailbox, the sockets' close states and tags, the
# output gate, events and their one-shot replies, codecs, frames, the byte budget, the
# table of known objects, routing a path). It never imports trio, never reads a clock,
# never awaits; tests/test_layers.py checks.
#
# The object-facing API is plain Python too, flat: _app, _hooks (what App.authorize and
# App.fetch receive), _object, _context, _websocket, _broadcast, _http, _limits, _ids,
# _autoresponse, _errors (every exception, split by fault), _statistics.
#
# The runtime is the Trio layer for objects, flat as trio keeps its high-level modules:
# _host (the public Host facade and open_host), _runtime (the internal Runtime behind
# it), _directory (an object's entry, its address), _connections (the connections it serves),
# _supervisor (one object's activations), _activation (an activation and how a turn runs on it,
# in the supervisor or inline in a connection task), _critical (critical sections and
# resets: ctx.block_concurrency_while, ctx.abort), _reaper (idle objects), _containment
# (the one place application code's exceptions are caught), _stubs, _oneshot, _turnlock
# (the turn lock), _gctuning (the cycle collector's policy in serve), _gcstats (GC pauses
# for the benchmarks), _dashboard, _logging, _loading (the CLI's app loading and reload).
#
# trio_hibernate/_net/ is bytes on sockets: the per-connection task, the byte channel
# (an OS socket or any trio stream), HTTP and the upgrade, the gatekeeper, the WebSocket
# transport, the writer, the listener, the relay endpoints and the splice of cluster mode.
# It knows the runtime only through the Protocols of _net/owner.py.
#
# trio_hibernate/_storage/ keeps objects' data: the Storage API, the SQLite backend,
# alarms, the turn commit protocol. trio_hibernate/_cluster/ is cluster mode: PostgreSQL
# leases and claims, the fenced storage backend, placement and the internal hop (relay).
# _server, _signals, _descriptors, _logging and _cli put a host on a port and in a
# process; trio_hibernate/testing/ is the test kit.

from ._app import App as App
from ._autoresponse import WebSocketRequestResponsePair as WebSocketRequestResponsePair
from ._cluster.config import ClusterConfig as ClusterConfig
from ._compression import WebSocketCompression as WebSocketCompression
from ._context import ObjectContext as ObjectContext
from ._core.lifecycle import ObjectState as ObjectState
from ._core.sockets import ReadyState as ReadyState
from ._errors import (
    ClusterCommitError as ClusterCommitError,
    ConnectionIdError as ConnectionIdError,
    DataCloneError as DataCloneError,
    FencedError as FencedError,
    HibernateError as HibernateError,
    InvalidCloseCodeError as InvalidCloseCodeError,
    LimitExceededError as LimitExceededError,
    ObjectUnavailableError as ObjectUnavailableError,
    ReentrantCallError as ReentrantCallError,
    RemoteCallError as RemoteCallError,
    StorageCommitError as StorageCommitError,
    StorageError as StorageError,
    WebSocketProtocolError as WebSocketProtocolError,
    WebSocketStateError as WebSocketStateError,
)
from ._hooks import AppContext as AppContext
from ._host import Host as Host, HostOptions as HostOptions, open_host as open_host
from ._http import QueryParams as QueryParams, Request as Request, Response as Response
from ._ids import ObjectId as ObjectId
from ._limits import Limits as Limits
from ._logging import JsonLogFormatter as JsonLogFormatter, configure_logging as configure_logging
from ._object import DurableObject as DurableObject
from ._server import Server as Server, open_server as open_server, serve_objects as serve_objects
from ._signals import wait_for_shutdown_signal as wait_for_shutdown_signal
from ._statistics import HostStatistics as HostStatistics, ObjectStatistics as ObjectStatistics
from ._storage.alarms import AlarmInfo as AlarmInfo
from ._storage.api import SqlCursor as SqlCursor, SqlStorage as SqlStorage, Storage as Storage
from ._stubs import Namespace as Namespace, ObjectStub as ObjectStub
from ._version import __version__ as __version__
from ._websocket import WebSocket as WebSocket

__all__ = [
    "AlarmInfo",
    "App",
    "AppContext",
    "ClusterCommitError",
    "ClusterConfig",
    "ConnectionIdError",
    "DataCloneError",
    "DurableObject",
    "FencedError",
    "HibernateError",
    "Host",
    "HostOptions",
    "HostStatistics",
    "InvalidCloseCodeError",
    "JsonLogFormatter",
    "LimitExceededError",
    "Limits",
    "Namespace",
    "ObjectContext",
    "ObjectId",
    "ObjectState",
    "ObjectStatistics",
    "ObjectStub",
    "ObjectUnavailableError",
    "QueryParams",
    "ReadyState",
    "ReentrantCallError",
    "RemoteCallError",
    "Request",
    "Response",
    "Server",
    "SqlCursor",
    "SqlStorage",
    "Storage",
    "StorageCommitError",
    "StorageError",
    "WebSocket",
    "WebSocketCompression",
    "WebSocketProtocolError",
    "WebSocketRequestResponsePair",
    "WebSocketStateError",
    "__version__",
    "configure_logging",
    "open_host",
    "open_server",
    "serve_objects",
    "wait_for_shutdown_signal",
]


def _fix_module_names() -> None:
    # Public names report the package, not the private module they live in (as trio does).
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trio_hibernate._"):
            obj.__module__ = "trio_hibernate"


_fix_module_names()
del _fix_module_names
