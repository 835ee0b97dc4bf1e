"""What a request gets: the server's own paths, the checks made before any object wakes,
routing, ``App.fetch``, and the object's own answer.

Before an object is woken a request passes, in order: the ``/_`` paths (answered by the
server), the WebSocket handshake headers and the origin check (upgrades only: a browser
page from another site may not open a WebSocket here unless ``allowed_origins`` says so),
``App.authorize``, and routing; a path no namespace matches goes to ``App.fetch``, else
404. The app hooks run contained: a hook that raises answers 500.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, final

import attrs

from .._containment import run_app_hook
from .._core.events import FetchEvent
from .._http import Request, Response
from .._oneshot import OneShot
from .._websocket import record_of, settle_protocol
from .http import simple_response

if TYPE_CHECKING:
    import outcome

    from .._core.sockets import SocketRecord
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
    the record of the socket it accepted."""

    response: Response
    link: ObjectLink | None = None
    record: SocketRecord | None = None


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
        """The response to ``request``: from the server itself, an app hook or the object.

        An upgrade the object accepted is answered 101 with the accepted socket's
        record; an accept the object's answer does not confirm is undone, with no event.
        """
        routed = await self.gatekeep(request)
        if isinstance(routed, Response):
            return Answer(routed)
        ws = request.websocket
        entry = routed
        response = await self._fetch(entry, request)
        record = record_of(ws) if ws is not None else None
        wrong = "a WebSocket it did not accept for this request"
        if (
            ws is not None
            and response.status == 101
            and response.websocket is ws
            and record is not None
        ):
            # A subprotocol chosen in the 101's headers (as on Cloudflare) is the socket's.
            wrong = settle_protocol(record, response.headers) or ""
            if not wrong:
                return Answer(response, entry, record)
        if record is not None:
            entry.core.release(record)  # accepted, then refused: undo without any event
            entry.forget_if_unused()
        if response.status == 101:
            log.error("fetch() for %s returned 101 with %s; answering 500", request.path, wrong)
            response = simple_response(500, "Internal Server Error")
        return Answer(response)

    async def gatekeep(self, request: Request) -> ObjectLink | Response:
        """Everything decided before an object wakes: the server's own paths, the
        handshake headers, the origin check, ``App.authorize``, routing, ``App.fetch``."""
        owner = self._owner
        if request.path.startswith("/_"):
            return owner.operations(request)
        if request.websocket is not None:
            refused = check_websocket_headers(request) or check_origin(
                request, owner.allowed_origins
            )
            if refused is not None:
                log.info(
                    "refused a WebSocket upgrade for %s from %s: %d",
                    request.path,
                    self._peer(),
                    refused.status,
                )
                return refused
        app = owner.app
        if app.authorize is not None:
            refused = await run_app_hook("App.authorize", app.authorize, request)
            if refused is not None:
                return refused
        routed = owner.route(request.path)
        if routed is not None:
            return routed
        if app.fetch is not None:
            response = await run_app_hook("App.fetch", app.fetch, request)
            assert response is not None
            if response.status != 101:
                return response
            log.error("App.fetch answered 101 for %s; it cannot accept WebSockets", request.path)
            return simple_response(500, "Internal Server Error")
        return simple_response(404, f"Not Found: {request.path}")

    @staticmethod
    async def _fetch(entry: ObjectLink, request: Request) -> Response:
        """The object's answer. If cancelled first (the request timeout), a socket the
        object accepts later is let go at once."""

        def late(_answer: outcome.Outcome[Response]) -> None:
            # We gave up waiting (504 sent): a socket accepted since is let go.
            ws = request.websocket
            record = record_of(ws) if ws is not None else None
            if record is not None and not record.released:
                entry.core.release(record)
                entry.forget_if_unused()

        answer: OneShot[Response] = OneShot(on_late=late)
        entry.deliver(FetchEvent(request, answer.reply))
        response: Response = (await answer.wait()).unwrap()
        return response
