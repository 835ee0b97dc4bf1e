"""What a request gets: the server's own paths, the checks made before any object wakes,
routing, ``App.fetch``, and the object's own answer.

(The internal ``/_cluster`` paths a peer host relays to skip all of it but the handshake
headers: see ``relayed.py``. A 101 that a relay to another host gave is answered by
splicing the client to that host: see ``splice.py``.)

Before an object is woken a request passes, in order: the ``/_`` paths (answered by the
server), the WebSocket handshake headers and the origin check (upgrades only: a browser
page from another site may not open a WebSocket here unless ``allowed_origins`` says so),
``App.authorize`` (which may refuse it, or hand back an annotated copy), and the built-in
routing (``/<namespace>/<name>``, unless ``App.route_by_path`` is off); every other
request goes to ``App.fetch``, else 404. ``App.fetch`` may forward a request, upgrades
included, to any object with ``stub.fetch``: the object that accepts a socket owns it,
whatever the request was routed to. The app hooks run contained: a hook that raises
answers 500.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Final, final

import attrs
import trio

from .._containment import run_app_hook
from .._core.events import FetchEvent
from .._hooks import AppContext
from .._http import Request, Response
from .._oneshot import OneShot
from .._websocket import acceptor_of, end_upgrade, record_of, settle_protocol, splice_of
from .http import simple_response
from .relayed import RELAY_PATHS, answer_relayed
from .splice import SplicedUpgrade

if TYPE_CHECKING:
    from .._core.sockets import SocketRecord
    from .._websocket import WebSocket
    from .owner import ConnectionOwner, ObjectLink

__all__ = [
    "Answer",
    "Gatekeeper",
    "check_origin",
    "check_websocket_headers",
    "is_same_origin",
]

log = logging.getLogger("trio_hibernate.connection")


@attrs.frozen
class Answer:
    """The response to a request, and for an accepted upgrade (a 101) the object and
    the record of the socket it accepted, or for an upgrade relayed to the host that
    owns its object, the owner's connection to splice the client to."""

    response: Response
    link: ObjectLink | None = None
    record: SocketRecord | None = None
    splice: SplicedUpgrade | None = None


_DEFAULT_PORTS: Final = {"http": "80", "ws": "80", "https": "443", "wss": "443"}


def is_same_origin(origin: str, host_header: str | None) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``) names the server that ``Host`` names.

    Compared case-insensitively, with the scheme's default port made explicit; the
    ``null`` origin and anything unparsable are never the same origin.
    """
    if host_header is None:
        return False
    scheme, sep, authority = origin.partition("://")
    default = _DEFAULT_PORTS.get(scheme.lower())
    if not sep or default is None or not authority or "/" in authority:
        return False

    def normal(value: str) -> str:
        value = value.strip().lower()
        if value.endswith("]") or ":" not in value.rpartition("]")[2]:
            value = f"{value}:{default}"
        return value

    return normal(authority) == normal(host_header)


def check_origin(request: Request, allowed: frozenset[str] | None) -> Response | None:
    """Refuse cross-site WebSocket hijacking: a browser upgrade (it carries ``Origin``)
    from another site than the ``Host`` it connects to, unless ``allowed`` (the host's
    ``allowed_origins``; None: the same origin only) lets it in."""
    origin = request.header("origin")
    if origin is None:
        return None  # not a browser: Origin protects browser users only
    if allowed is not None and ("*" in allowed or origin in allowed):
        return None
    if allowed is None and is_same_origin(origin, request.header("host")):
        return None
    return Response(
        status=403,
        body=f"Forbidden: origin {origin!r} is not allowed to open a WebSocket here "
        "(allowed_origins / --allowed-origin)\n",
    )


def check_websocket_headers(request: Request) -> Response | None:
    """A refusal for an upgrade request with a bad version or key (RFC 6455), or None."""
    if request.header("sec-websocket-version") != "13":
        return simple_response(
            426, "Upgrade Required: WebSocket version 13", (("sec-websocket-version", "13"),)
        )
    key = request.header("sec-websocket-key") or ""
    try:
        valid = len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (UnicodeEncodeError, binascii.Error):
        valid = False
    if not valid:
        return simple_response(
            400, "Bad Request: Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455)"
        )
    return None


@final
class Gatekeeper:
    """Answers the requests of one connection (see the module). ``peer`` names the
    client in log lines."""

    __slots__ = ("_owner", "_peer")

    def __init__(self, owner: ConnectionOwner, peer: Callable[[], str]) -> None:
        self._owner = owner
        self._peer = peer

    async def answer(self, request: Request) -> Answer:
        """The response to ``request``: from the server itself, an app hook or an object.

        An upgrade is answered 101 when the answer is a 101 carrying the request's
        WebSocket and an object accepted it: the object the request was routed to, or
        any object that ``App.fetch`` (or an object, in turn) forwarded it to with
        ``stub.fetch``. The :class:`Answer` then names that object, which gets the
        socket's events. A 101 that another host gave for the request's WebSocket (a
        relay, see ``splice.py``) names the connection to splice the client to
        instead. Any other 101 is a bug of the app: 500, logged. An accept the answer
        does not confirm is undone by :meth:`let_go`.
        """
        request, routed = await self.gatekeep(request)
        if isinstance(routed, Response):
            response, answered_by = routed, "App.fetch"
        else:
            response, answered_by = await self._fetch(routed, request), "fetch()"
        ws = request.websocket
        if response.status != 101:
            return Answer(response)
        record = None if ws is None else record_of(ws)
        if ws is not None and record is None and response.websocket is ws:
            spliced = splice_of(ws)
            if isinstance(spliced, SplicedUpgrade):
                return Answer(response, splice=spliced)
        link = None
        if ws is not None and record is not None and not record.released:
            link = self._acceptor(ws)
        if response.websocket is ws and link is not None:
            assert record is not None
            # A subprotocol chosen in the 101's headers (as on Cloudflare) is the socket's.
            why = settle_protocol(record, response.headers)
            if why is None:
                return Answer(response, link, record)
        elif ws is None or response.websocket is not ws:
            why = "a WebSocket that is not this request's"
        else:
            why = (
                "a WebSocket no object accepted, or one its object let go since (a 101 "
                "must carry the socket an object accepted with ctx.accept_websocket; "
                "from App.fetch, return what stub.fetch(request) answered)"
            )
        self._owner.counters.handler_error("App.fetch" if answered_by == "App.fetch" else "fetch")
        log.error("%s for %s answered 101 with %s; answering 500", answered_by, request.path, why)
        return Answer(simple_response(500, "Internal Server Error"))

    def let_go(self, request: Request) -> None:
        """``request`` was answered without an upgrade (refused, a 504, an error): a
        socket an object accepted for it is released, with no event, and one accepted
        from now on is let go at once (``upgrade_ended``)."""
        ws = request.websocket
        if ws is None:
            return
        end_upgrade(ws)
        spliced = splice_of(ws)
        if isinstance(
            spliced, SplicedUpgrade
        ):  # relayed, then not answered with it: the hop is unused
            self._owner.spawn(partial(trio.aclose_forcefully, spliced.upstream))
        record = record_of(ws)
        if record is None or record.released:
            return
        link = self._acceptor(ws)
        if link is not None:
            link.core.release(record)
            link.forget_if_unused()

    def _acceptor(self, ws: WebSocket) -> ObjectLink | None:
        """The object that accepted the upgrading ``ws``, whichever object the request
        was routed or forwarded to (an object holding a socket is known), or None."""
        address = acceptor_of(ws)
        return None if address is None else self._owner.objects.get(*address)

    async def gatekeep(self, request: Request) -> tuple[Request, ObjectLink | Response]:
        """Everything decided before an object wakes: the server's own paths, the
        handshake headers, the origin check, ``App.authorize``, routing, ``App.fetch``.

        Returns the request to go on with (``App.authorize`` may hand back an annotated
        copy) and the object it is routed to, or the response.
        """
        owner = self._owner
        if request.path.startswith("/_"):
            if request.path in RELAY_PATHS:  # from a peer host, for a local object
                ws = request.websocket
                refused = None if ws is None else check_websocket_headers(request)
                if refused is not None:
                    return request, refused
                return await answer_relayed(owner, request)
            return request, owner.operations(request)
        if request.websocket is not None:
            refused = check_websocket_headers(request) or check_origin(
                request, owner.allowed_origins
            )
            if refused is not None:
                cause = "origin" if refused.status == 403 else "handshake"
                owner.counters.refused(cause)
                log.info(
                    "refused a WebSocket upgrade for %s from %s: %d (%s)",
                    request.path,
                    self._peer(),
                    refused.status,
                    cause,
                    extra={"peer": self._peer(), "path": request.path, "cause": cause},
                )
                return request, refused
        app = owner.app
        ctx = AppContext(owner)
        counters = owner.counters
        if app.authorize is not None:
            crashes = counters.handler_errors.get("App.authorize", 0)
            verdict = await run_app_hook(
                "App.authorize",
                app.authorize,
                request,
                ctx,
                may_pass=True,
                on_error=partial(counters.handler_error, "App.authorize"),
            )
            if isinstance(verdict, Response):
                # A refusal (a rate limit's 429 too), unless it is the 500 of a crash.
                if counters.handler_errors.get("App.authorize", 0) == crashes:
                    counters.refused("authorize")
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "App.authorize refused %s %s from %s: %d",
                            request.method,
                            request.path,
                            self._peer(),
                            verdict.status,
                            extra={"peer": self._peer(), "path": request.path},
                        )
                return request, verdict
            if verdict is not None:
                if verdict.websocket is not request.websocket:
                    counters.handler_error("App.authorize")
                    log.error(
                        "App.authorize for %s returned a Request that does not carry the "
                        "request's WebSocket (make it with request.with_context() or "
                        "request.with_headers()); answering 500",
                        request.path,
                    )
                    return request, simple_response(500, "Internal Server Error")
                request = verdict
        if app.route_by_path:
            routed = owner.route(request.path)
            if routed is not None:
                return request, routed
        if app.fetch is not None:
            response = await run_app_hook(
                "App.fetch",
                app.fetch,
                request,
                ctx,
                may_pass=False,
                on_error=partial(counters.handler_error, "App.fetch"),
            )
            assert isinstance(response, Response)
            return request, response
        return request, simple_response(404, f"Not Found: {request.path}")

    @staticmethod
    async def _fetch(entry: ObjectLink, request: Request) -> Response:
        """The object's answer. (If the request timeout cancels the wait, the connection
        lets go of a socket the object accepts: see :meth:`let_go`.)"""
        answer: OneShot[Response] = OneShot()
        entry.deliver(FetchEvent(request, answer.reply))
        response: Response = (await answer.wait()).unwrap()
        return response
