"""The internal hop between cluster hosts: a request, a WebSocket or a stub call for an
object another host owns, relayed to that host.

The relaying side is here: :func:`relay_fetch` and :func:`relay_call` open a TCP
connection to the owner (:class:`RelayTarget`) and speak HTTP/1.1 (``h11``) to its
internal endpoints, ``/_cluster/relay`` and ``/_cluster/call``; the owner's side, and
the wire format, are in ``_net/relayed.py``. One connection per relayed request or call:
a relayed WebSocket keeps its connection as the socket's.

A WebSocket upgrade is relayed as it came (the client's key, offered subprotocols and
extensions): the owner's object accepts it and the owner answers 101 over the hop. The
client's connection on this host then writes that 101 verbatim and copies bytes both
ways (``_net/splice.py``), so the socket, its frames, tags, attachment, hibernation and
auto-response all live on the owner; this host only holds the two connections.
"""

from __future__ import annotations

import base64
import logging
import socket
from collections.abc import Callable
from typing import Final
from urllib.parse import quote

import attrs
import h11
import trio

from .._core.codec import decode_data, encode_data
from .._core.events import CallChain
from .._errors import (
    DataCloneError,
    LimitExceededError,
    ObjectUnavailableError,
    RemoteCallError,
    StorageCommitError,
    WebSocketStateError,
)
from .._http import Request, Response
from .._ids import ObjectId
from .._limits import Limits
from .._net.relayed import (
    CALL_PATH,
    CONTEXT_HEADER,
    HEADER_PREFIX,
    ID_HEADER,
    KEY_HEADER,
    NAME_HEADER,
    NAMESPACE_HEADER,
    RELAY_PATH,
    URL_HEADER,
)
from .._net.splice import SplicedUpgrade
from .._websocket import attach_splice, record_of, splice_of

__all__ = ["RelayTarget", "relay_call", "relay_fetch", "remote_error"]

log = logging.getLogger("trio_hibernate.cluster")

#: Response headers that describe one hop, not the response: never passed on.
_HOP_BY_HOP: Final = frozenset(
    {b"connection", b"content-length", b"transfer-encoding", b"keep-alive", b"upgrade"}
)
#: Request headers the hop sets itself (framing): the client's are dropped.
_FRAMING: Final = frozenset({"connection", "content-length", "transfer-encoding", "keep-alive"})
#: A relayed request's context travels in one header; the owner reads heads up to 16 KiB.
MAX_CONTEXT_BYTES: Final = 8192
_READ_BYTES: Final = 65536
#: The largest response body relayed (a plain request's answer is held whole in
#: memory on the relaying host, as the owner holds it); past it the client gets 502.
MAX_RELAYED_BODY_BYTES: Final = 64 * 1024 * 1024


@attrs.frozen
class RelayTarget:
    """Where to relay: the owning host's address, and the cluster key it checks."""

    address: str
    """``"HOST:PORT"`` the owner serves on (its ``advertise`` address)."""
    key: str
    """The cluster's shared key (``ClusterConfig.key``): the owner refuses a relay
    without it (403)."""
    timeout: float = 30.0
    """Seconds to connect and get the owner's whole answer (for a WebSocket, its 101)."""

    def host_and_port(self) -> tuple[str, int]:
        """The address split (``[::1]:8080`` gives ``("::1", 8080)``).

        Raises:
            ValueError: the address is not ``HOST:PORT``.
        """
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"a relay address is HOST:PORT, got {self.address!r}")
        return host.removeprefix("[").removesuffix("]"), int(port)


def _object_headers(
    target: RelayTarget, namespace: str, object_id: ObjectId
) -> list[tuple[str, str]]:
    headers = [
        (KEY_HEADER, target.key),
        (NAMESPACE_HEADER, quote(namespace, safe="")),
        (ID_HEADER, object_id.hex),
    ]
    if object_id.name is not None:
        headers.append((NAME_HEADER, quote(object_id.name, safe="")))
    return headers


def _encode_context(context: object) -> str | None:
    """``context`` as the header value the owner decodes, None for None.

    Raises:
        DataCloneError: it is not data.
        LimitExceededError: it is larger than :data:`MAX_CONTEXT_BYTES` encoded.
    """
    if context is None:
        return None
    encoded = encode_data(
        context,
        what="A relayed request's context",
        limit_name="max_message_bytes",
        limit_bytes=Limits().max_message_bytes,
    )
    if len(encoded) > MAX_CONTEXT_BYTES:
        raise LimitExceededError(
            f"A relayed request's context cannot be larger than {MAX_CONTEXT_BYTES} bytes "
            f"when encoded (it travels in a header); this one is {len(encoded)} bytes",
            limit_name="MAX_CONTEXT_BYTES",
            limit=MAX_CONTEXT_BYTES,
            value=len(encoded),
        )
    return base64.b64encode(encoded).decode("ascii")


def _hop_request(
    target: RelayTarget, namespace: str, object_id: ObjectId, request: Request, context: str | None
) -> h11.Request:
    """The request to the owner's :data:`RELAY_PATH`: the client's, its framing redone."""
    upgrade = request.websocket is not None
    headers = [
        (name, value)
        for name, value in request.headers
        if not name.startswith(HEADER_PREFIX) and (upgrade or name not in _FRAMING)
    ]
    if not any(name == "host" for name, _ in headers):
        headers.insert(0, ("host", target.address))
    headers += _object_headers(target, namespace, object_id)
    headers.append((URL_HEADER, request.url))
    if context is not None:
        headers.append((CONTEXT_HEADER, context))
    if not upgrade:
        headers += [("content-length", str(len(request.body))), ("connection", "close")]
    return h11.Request(method=request.method, target=RELAY_PATH, headers=headers)


async def _send(stream: trio.abc.Stream, h: h11.Connection, head: h11.Request, body: bytes) -> None:
    data = h.send(head) or b""
    if body:
        data += h.send(h11.Data(data=body)) or b""
    data += h.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _next_event(stream: trio.abc.Stream, h: h11.Connection, raw: bytearray | None) -> object:
    """The next h11 event of the owner's answer; what was received is added to ``raw``
    (the bytes of a 101 go to the client as they are; a final response's body does not
    need them: None)."""
    while True:
        event = h.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = bytes(await stream.receive_some(_READ_BYTES))
        if raw is not None:
            raw += data
        h.receive_data(data)


async def _read_response(
    stream: trio.abc.Stream, h: h11.Connection, raw: bytearray
) -> tuple[h11.Response | h11.InformationalResponse, bytes]:
    """The owner's response head (its 101, or a final response) and the final one's body."""
    while True:
        event = await _next_event(stream, h, raw)
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return event, b""
            continue  # 100 Continue and the like
        if isinstance(event, h11.Response):
            break
        raise h11.RemoteProtocolError(f"the owner answered {event!r} instead of a response")
    body = bytearray()
    while True:
        part = await _next_event(stream, h, None)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > MAX_RELAYED_BODY_BYTES:
                raise h11.RemoteProtocolError(
                    f"the owner's response body is over {MAX_RELAYED_BODY_BYTES} bytes"
                )
        elif isinstance(part, h11.EndOfMessage):
            return event, bytes(body)
        else:
            raise h11.RemoteProtocolError(f"the owner's response ended early ({part!r})")


def _passed_on(head: h11.Response | h11.InformationalResponse) -> list[tuple[str, str]]:
    """The owner's response headers, less those of the hop itself."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in head.headers
        if name not in _HOP_BY_HOP
    ]


async def relay_fetch(
    target: RelayTarget,
    namespace: str,
    object_id: ObjectId,
    request: Request,
    *,
    unreachable: Callable[[], Response] | None = None,
) -> Response:
    """Forward ``request`` to the object ``namespace``/``object_id`` on the host that
    owns it, and return that host's answer.

    A plain request gets the owner's status, headers (less the hop's own: framing,
    ``connection``) and body. An upgrade (``request.websocket`` set) that the owner's
    object accepts gets ``Response(status=101, websocket=request.websocket)`` with the
    owner's negotiated headers: returned from ``App.fetch``, it makes the client's
    connection write the owner's 101 and splice the client to the owner (see the
    module); a refusal comes back as the owner sent it.

    The request's ``context`` goes along, encoded as data: one that is not data (or
    over :data:`MAX_CONTEXT_BYTES` encoded) answers 500 and logs why. An owner that
    cannot be reached, or does not answer within ``target.timeout``, gets what
    ``unreachable()`` returns (by default 502, or 504 past the timeout), logged. A
    checkpoint.

    Raises:
        WebSocketStateError: the WebSocket was accepted on this host, or relayed already.
    """
    what = f"{request.method} {request.path} for {namespace}/{object_id.name or object_id.hex}"
    ws = request.websocket
    if ws is not None and (record_of(ws) is not None or splice_of(ws) is not None):
        raise WebSocketStateError(
            f"cannot relay {what}: its WebSocket was accepted on this host, or relayed already"
        )
    try:
        context = _encode_context(request.context)
    except (DataCloneError, LimitExceededError) as exc:
        log.error(
            "cannot relay %s to %s: %s; contexts must be data in cluster mode",
            what,
            target.address,
            exc,
        )
        return Response(status=500, body="Internal Server Error\n")
    h = h11.Connection(h11.CLIENT)
    stream: trio.abc.Stream | None = None
    sent = False  # a plain request the owner may have run: its outcome is unknown
    try:
        with trio.fail_after(target.timeout):
            stream = await trio.open_tcp_stream(*target.host_and_port())
            sent = ws is None
            await _send(
                stream,
                h,
                _hop_request(target, namespace, object_id, request, context),
                request.body,
            )
            raw = bytearray()
            head, body = await _read_response(stream, h, raw)
        if isinstance(head, h11.InformationalResponse):
            if ws is None:
                raise h11.RemoteProtocolError("the owner answered 101 to a plain request")
            headers = [(k, v) for k, v in _passed_on(head) if k != "sec-websocket-extensions"]
            response = Response(status=101, websocket=ws, headers=headers)
            _keep_alive(stream, target.timeout)
            attach_splice(ws, SplicedUpgrade(bytes(raw), stream))
            stream = None  # the client's connection owns it now
            return response
        return Response(status=head.status_code, headers=_passed_on(head), body=body)
    except trio.TooSlowError:
        log.warning(
            "relaying %s to %s: no answer within %g s; answering 504",
            what,
            target.address,
            target.timeout,
        )
        if unreachable is not None and not sent:
            return unreachable()
        # Sent: the owner may have run it. Not a "retry later" (503): the outcome is unknown.
        return Response(status=504, body="Gateway Timeout: the outcome is unknown\n")
    except (OSError, trio.BrokenResourceError, h11.ProtocolError, ValueError) as exc:
        log.warning("relaying %s to %s failed: %s; answering 502", what, target.address, exc)
        if unreachable is not None and not sent:
            return unreachable()
        return Response(status=502, body="Bad Gateway\n")
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)


async def relay_call(
    target: RelayTarget,
    namespace: str,
    object_id: ObjectId,
    method: str,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    chain: CallChain = (),
) -> object:
    """Run ``await object.method(*args, **kwargs)`` on the host that owns the object,
    as a stub call there (a turn of the object), and return its result.

    Arguments and result are copied as data, as for any stub call. ``chain`` (the
    objects whose turns wait for this call) goes along, so that a call that would come
    back to one of them, on any host, raises ReentrantCallError there instead of
    deadlocking until the timeout. A checkpoint.

    Raises:
        AttributeError: the object has no such public method.
        RemoteCallError: the method raised on the owner (its class name and message),
            or the owner refused the call (``remote_type`` ``"HTTP <status>"``).
        DataCloneError: an argument is not data.
        LimitExceededError: the arguments are over the owner's default
            ``Limits.max_request_body_bytes`` encoded.
        trio.TooSlowError: no answer within ``target.timeout``.
        OSError, trio.BrokenResourceError: the owner cannot be reached.
    """
    waiting = [[ns, oid.hex, oid.name] for ns, oid, how in chain if how is None or how.active]
    body = encode_data(
        [method, list(args), dict(kwargs), waiting],
        what="A relayed call's arguments",
        limit_name="max_request_body_bytes",
        limit_bytes=Limits().max_request_body_bytes,
    )
    headers = [
        ("host", target.address),
        *_object_headers(target, namespace, object_id),
        ("content-type", "application/cbor"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    h = h11.Connection(h11.CLIENT)
    with trio.fail_after(target.timeout):
        stream = await trio.open_tcp_stream(*target.host_and_port())
        async with stream:
            await _send(
                stream, h, h11.Request(method="POST", target=CALL_PATH, headers=headers), body
            )
            head, answer = await _read_response(stream, h, bytearray())
    if head.status_code != 200:
        text = answer.decode("utf-8", "replace").strip()
        raise RemoteCallError(f"HTTP {head.status_code}", text)
    outcome = decode_data(answer)
    if isinstance(outcome, list) and len(outcome) == 2 and outcome[0] == "value":
        return outcome[1]
    if isinstance(outcome, list) and len(outcome) == 3 and outcome[0] == "error":
        _, remote_type, message = outcome
        raise remote_error(str(remote_type), str(message))
    raise RemoteCallError("HTTP 200", f"the owner answered {outcome!r}, not a call's outcome")


def remote_error(remote_type: str, message: str) -> Exception:
    """The exception a relayed call raises for the owner's ``remote_type``: the
    runtime's own errors as their documented classes (so that callers catch them as
    they would on one host), anything the method itself raised as RemoteCallError."""
    if remote_type == "AttributeError":
        return AttributeError(message)
    if remote_type == "DataCloneError":
        return DataCloneError(message)
    if remote_type in ("StorageCommitError", "ClusterCommitError", "FencedError"):
        return StorageCommitError(message)
    if remote_type == "ObjectUnavailableError":
        return ObjectUnavailableError(message, retry_after=1)
    return RemoteCallError(remote_type, message)


def _keep_alive(stream: trio.abc.Stream, patience: float) -> None:
    """TCP keepalives on a spliced socket's hop, so that an owner's machine lost without
    a FIN ends the relayed socket (its client reconnects) after about ``patience``
    seconds of silence, instead of when TCP gives up, hours later."""
    if not isinstance(stream, trio.SocketStream):
        return
    idle = max(1, round(patience / 2))
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux names; macOS has some of them
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        stream.setsockopt(level, option, value)
