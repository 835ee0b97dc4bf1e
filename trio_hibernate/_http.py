"""HTTP requests handed to an object's ``fetch`` and the responses it returns."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs

if TYPE_CHECKING:
    from ._websocket import WebSocket

__all__ = ["Request", "Response"]

Headers = tuple[tuple[str, str], ...]


def _to_headers(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> Headers:
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for name, val in items:
        if not isinstance(name, str) or not isinstance(val, str):
            raise TypeError(f"header names and values must be str, got {name!r}: {val!r}")
        out.append((name, val))
    return tuple(out)


def _to_body(value: bytes | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a body must be bytes or str, not {type(value).__name__}")


@attrs.frozen(kw_only=True)
class Request:
    """An HTTP request routed to an object.

    For a WebSocket upgrade, :attr:`websocket` is the server end, not yet accepted: call
    ``ctx.accept_websocket(request.websocket, tags)`` and return
    ``Response(status=101, websocket=request.websocket)``; any other response refuses the
    upgrade (and undoes the accept).
    """

    method: str
    """The method, upper case (``"GET"``)."""
    url: str
    """The request target as sent, e.g. ``"/chat/lobby?x=1"``."""
    headers: Headers = attrs.field(default=(), converter=_to_headers)
    """Header (name, value) pairs in arrival order; names lower-cased."""
    body: bytes = attrs.field(default=b"", converter=_to_body)
    """The whole body (empty for upgrades)."""
    websocket: WebSocket | None = attrs.field(default=None, eq=False)
    """The WebSocket to accept, when this is an upgrade request."""

    @property
    def path(self) -> str:
        """The path part of :attr:`url`."""
        return urlsplit(self.url).path

    @property
    def query(self) -> str:
        """The query string of :attr:`url`, without ``?``."""
        return urlsplit(self.url).query

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None


def _status(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError(f"an HTTP status is an int from 100 to 599, got {value!r}")


@attrs.frozen(kw_only=True)
class Response:
    """What ``fetch`` returns. ``status=101`` with :attr:`websocket` completes an upgrade."""

    status: int = attrs.field(default=200, validator=_status)
    """The status code."""
    body: bytes = attrs.field(default=b"", converter=_to_body)
    """The body; a ``str`` is encoded as UTF-8."""
    headers: Headers = attrs.field(default=(), converter=_to_headers)
    """Extra headers. ``content-length`` is set by the server."""
    websocket: WebSocket | None = attrs.field(default=None, eq=False)
    """The accepted WebSocket, for a 101 response."""

    def __attrs_post_init__(self) -> None:
        if (self.status == 101) != (self.websocket is not None):
            raise ValueError(
                "a 101 response must carry the accepted websocket, and only a 101 may "
                f"(status={self.status}, websocket={'set' if self.websocket else 'None'})"
            )
