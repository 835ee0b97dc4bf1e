"""The internal endpoints a peer host relays to (cluster mode): ``/_cluster/relay`` and
``/_cluster/call``.

A host that gets a request, a WebSocket or a stub call for an object another host owns
relays it there (``_cluster/relay.py``). On the owner these paths deliver it to the
local object as a :class:`FetchEvent` or a :class:`CallEvent`, through
``ConnectionOwner.deliver_relayed``, and never through ``App.authorize`` or
``App.fetch``: the relaying host ran those already. So a relayed request is never
relayed again.

Only a peer knowing the cluster key gets in (:data:`KEY_HEADER`, compared in constant
time): without it, or with a wrong one, 403 and nothing is delivered. A host with no key
answers 404, as for any unknown path.

The object is named by internal headers (:data:`HEADER_PREFIX`), which the relaying
host strips from what the client sent and the owner strips before the object sees the
request. ``/_cluster/relay`` carries the client's request as it came: its method,
headers and body, its target in :data:`URL_HEADER`, its ``context`` encoded as data
in :data:`CONTEXT_HEADER`; an upgrade is answered 101 over the hop, which then carries
the WebSocket. ``/_cluster/call`` is a POST whose body is the call, encoded as data,
answered 200 with ``["value", result]`` or ``["error", class name, message]``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

import outcome

from .._core.codec import decode_data, encode_data
from .._core.events import CallChain, CallEvent, FetchEvent, Waiting
from .._errors import DataCloneError, LimitExceededError
from .._http import Request, Response
from .._ids import ObjectId
from .._oneshot import OneShot
from .._stubs import RESERVED_METHODS
from .._websocket import relocate
from .http import simple_response

if TYPE_CHECKING:
    from .owner import ConnectionOwner

__all__ = [
    "CALL_PATH",
    "CONTEXT_HEADER",
    "HEADER_PREFIX",
    "ID_HEADER",
    "KEY_HEADER",
    "NAMESPACE_HEADER",
    "NAME_HEADER",
    "RELAY_PATH",
    "RELAY_PATHS",
    "URL_HEADER",
    "answer_relayed",
]

log = logging.getLogger("trio_hibernate.cluster")

RELAY_PATH: Final = "/_cluster/relay"
CALL_PATH: Final = "/_cluster/call"
RELAY_PATHS: Final = frozenset({RELAY_PATH, CALL_PATH})

#: Every internal header starts with this; none reaches an object.
HEADER_PREFIX: Final = "x-trio-hibernate-relay-"
KEY_HEADER: Final = HEADER_PREFIX + "key"
NAMESPACE_HEADER: Final = HEADER_PREFIX + "namespace"  # percent-encoded
ID_HEADER: Final = HEADER_PREFIX + "id"  # 64 hex digits
NAME_HEADER: Final = HEADER_PREFIX + "name"  # percent-encoded; absent for a unique id
URL_HEADER: Final = HEADER_PREFIX + "url"  # the client's request target
CONTEXT_HEADER: Final = HEADER_PREFIX + "context"  # base64 of the encoded context

_CBOR: Final = (("content-type", "application/cbor"),)


async def answer_relayed(owner: ConnectionOwner, request: Request) -> tuple[Request, Response]:
    """The answer to a request for :data:`RELAY_PATHS` (see the module), and the request
    to go on with: for ``/_cluster/relay`` the client's request as the object got it
    (its WebSocket, if an upgrade, is the object's to accept)."""
    key = owner.relay_key
    if key is None:
        return request, simple_response(404, f"Not Found: {request.path}")
    given = request.header(KEY_HEADER)
    if given is None or not hmac.compare_digest(
        given.encode("latin-1"), key.encode("utf-8", "replace")
    ):
        owner.counters.refused("relay_key")
        log.warning(
            "refused a relayed request for %s: %s cluster key (the hosts must share one)",
            request.path,
            "no" if given is None else "a wrong",
        )
        return request, simple_response(403, "Forbidden: a relay needs the cluster key")
    owner.counters.relayed += 1
    try:
        namespace, object_id = _object_of(request)
        if request.path == CALL_PATH:
            return request, await _call(owner, namespace, object_id, request)
        relayed = _original_request(request)
    except ValueError as exc:
        log.error("refused a malformed relayed request for %s: %s", request.path, exc)
        return request, simple_response(400, f"Bad Request: {exc}")
    except LookupError as exc:
        return request, simple_response(404, f"Not Found: {exc}")
    answer: OneShot[Response] = OneShot()
    try:
        owner.deliver_relayed(namespace, object_id, FetchEvent(relayed, answer.reply))
    except LookupError as exc:
        return relayed, simple_response(404, f"Not Found: {exc}")
    response: Response = (await answer.wait()).unwrap()
    return relayed, response


def _object_of(request: Request) -> tuple[str, ObjectId]:
    """The namespace and id the internal headers name. ValueError if they do not."""
    namespace = request.header(NAMESPACE_HEADER)
    hex_id = request.header(ID_HEADER)
    if namespace is None or hex_id is None:
        raise ValueError(f"a relayed request needs {NAMESPACE_HEADER} and {ID_HEADER}")
    name = request.header(NAME_HEADER)
    return unquote(namespace), ObjectId(hex_id, None if name is None else unquote(name))


def _original_request(request: Request) -> Request:
    """The client's request that ``request`` relays. ValueError if it is malformed."""
    url = request.header(URL_HEADER)
    if url is None:
        raise ValueError(f"a relayed request needs {URL_HEADER}")
    context = None
    encoded = request.header(CONTEXT_HEADER)
    if encoded is not None:
        try:
            context = decode_data(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{CONTEXT_HEADER} is not base64 of encoded data: {exc}") from None
    ws = request.websocket
    if ws is not None:
        relocate(ws, url)
    return Request(
        method=request.method,
        url=url,
        headers=[(k, v) for k, v in request.headers if not k.startswith(HEADER_PREFIX)],
        body=request.body,
        websocket=ws,
        context=context,
    )


async def _call(
    owner: ConnectionOwner, namespace: str, object_id: ObjectId, request: Request
) -> Response:
    """Run the call ``request`` carries as a :class:`CallEvent`; its outcome as data."""
    if request.method != "POST":
        raise ValueError(f"{CALL_PATH} takes POST, not {request.method}")
    try:
        call = decode_data(request.body)
    except ValueError as exc:
        raise ValueError(f"the body of {CALL_PATH} is not encoded data: {exc}") from None
    shape = f"the body of {CALL_PATH} is not [method, args, kwargs, chain]"
    if not isinstance(call, list) or len(call) != 4:
        raise ValueError(shape)
    method, args, kwargs, waiters = call
    if not isinstance(method, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError(shape)
    # The objects whose turns wait for this call, on whichever host: they wait while
    # this call does, so a call back to one of them from its turn is refused at once.
    waiting = Waiting()
    chain = _chain(waiters, waiting)
    result: outcome.Outcome[object]
    if method.startswith("_") or method in RESERVED_METHODS:
        result = outcome.Error(AttributeError(f"{method!r} is not a public method to call"))
    else:
        answer: OneShot[object] = OneShot()
        event = CallEvent(method, tuple(args), kwargs, answer.reply, chain)
        owner.deliver_relayed(namespace, object_id, event)
        try:
            result = await answer.wait()
        finally:
            waiting.active = False
    limit = owner.limits.max_message_bytes
    if isinstance(result, outcome.Value):
        try:
            body = encode_data(
                ["value", result.value],
                what="A relayed call's result",
                limit_name="max_message_bytes",
                limit_bytes=limit,
            )
        except (DataCloneError, LimitExceededError) as exc:
            result = outcome.Error(exc)
        else:
            return Response(body=body, headers=_CBOR)
    assert isinstance(result, outcome.Error)
    error = result.error
    # Only the name and message travel: the exception itself may not be data.
    body = encode_data(
        ["error", type(error).__name__, str(error)[:4096]],
        what="A relayed call's error",
        limit_name="max_message_bytes",
        limit_bytes=max(limit, 8192),
    )
    return Response(body=body, headers=_CBOR)


def _chain(waiters: object, waiting: Waiting) -> CallChain:
    """The call chain a relayed call carries (``[[namespace, hex id, name], ...]``)."""
    if not isinstance(waiters, list):
        raise ValueError(f"the call chain of {CALL_PATH} is not a list")
    chain: list[tuple[str, ObjectId, Waiting | None]] = []
    for link in waiters:
        if not (
            isinstance(link, list)
            and len(link) == 3
            and isinstance(link[0], str)
            and isinstance(link[1], str)
            and (link[2] is None or isinstance(link[2], str))
        ):
            raise ValueError(f"a link of the call chain of {CALL_PATH} is malformed")
        chain.append((link[0], ObjectId(link[1], link[2]), waiting))
    return tuple(chain)
