"""HTTP requests handed to an object's ``fetch`` and the responses it returns."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, final
from urllib.parse import parse_qsl, urlsplit

import attrs

from ._websocket import check_upgrade_headers

if TYPE_CHECKING:
    from ._websocket import WebSocket

__all__ = ["QueryParams", "Request", "Response"]

Headers = tuple[tuple[str, str], ...]

#: RFC 9110 field names (tokens) and field values (visible Latin-1, spaces and tabs, no
#: CR, LF or NUL): anything else could not be written on the wire, or would inject headers.
_FIELD_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE: Final = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def _to_headers(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> Headers:
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for name, val in items:
        if not isinstance(name, str) or not isinstance(val, str):
            raise TypeError(f"header names and values must be str, got {name!r}: {val!r}")
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid HTTP header name (RFC 9110 token)")
        if not _FIELD_VALUE.fullmatch(val):
            raise ValueError(
                f"the value of header {name!r} must be Latin-1 text without CR, LF or other "
                f"control characters, got {val!r}"
            )
        out.append((name, val))
    return tuple(out)


def _to_request_headers(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> Headers:
    """Request headers, checked, with names lower-cased (what :meth:`Request.header`
    and the network side expect)."""
    return tuple((name.lower(), val) for name, val in _to_headers(value))


def header_list(values: Iterable[str]) -> tuple[str, ...]:
    """The elements of comma-separated header values (RFC 9110 section 5.6.1), stripped,
    empty ones dropped: ``["a, b", "c"]`` gives ``("a", "b", "c")``."""
    return tuple(item for value in values for item in (p.strip() for p in value.split(",")) if item)


def split_target(target: str) -> tuple[str, str]:
    """The (path, query) of a request target, without raising.

    An origin-form target (``/a/b?q``) is split as written, so ``//x/y`` is a path and
    not a host; an absolute-form one (``http://h/a?q``) gives its path (``/`` if empty);
    anything that is neither (``*``, an unparsable authority) gives an empty path.
    """
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    try:
        parts = urlsplit(target)
    except ValueError:
        return "", ""
    if parts.scheme.lower() not in ("http", "https", "ws", "wss") or not parts.netloc:
        return "", ""
    return parts.path or "/", parts.query


@final
class QueryParams(Mapping[str, str]):
    """The parsed query string of a request (:attr:`Request.query_params`): read-only.

    A mapping from each name to its **first** value, as Cloudflare's
    ``url.searchParams.get(name)`` (and werkzeug's and aiohttp's ``args[name]``) give;
    :meth:`getlist` gives every value of a name, :meth:`multi_items` every pair in
    order. Parsed as ``urllib.parse.parse_qsl(query, keep_blank_values=True)`` does:
    ``+`` is a space, ``%xx`` escapes are UTF-8 (invalid bytes become U+FFFD), ``a``
    and ``a=`` give ``""``, and ``;`` is not a separator.

    Made by :attr:`Request.query_params`, or from a query string: ``QueryParams("a=1")``.
    """

    __slots__ = ("_first", "_items")

    def __init__(self, query: str = "") -> None:
        if not isinstance(query, str):
            raise TypeError(f"QueryParams takes a query string, not {type(query).__name__}")
        self._items: tuple[tuple[str, str], ...] = tuple(
            parse_qsl(query, keep_blank_values=True, errors="replace")
        )
        first: dict[str, str] = {}
        for name, value in self._items:
            first.setdefault(name, value)
        self._first = first

    def __getitem__(self, name: str) -> str:
        """The first value of ``name``. Raises KeyError if the query has none."""
        return self._first[name]

    def __iter__(self) -> Iterator[str]:
        """The distinct names, in order of first appearance."""
        return iter(self._first)

    def __len__(self) -> int:
        """How many distinct names the query has."""
        return len(self._first)

    def getlist(self, name: str) -> list[str]:
        """Every value of ``name``, in order (Cloudflare's ``getAll``); ``[]`` if none."""
        return [value for key, value in self._items if key == name]

    def multi_items(self) -> list[tuple[str, str]]:
        """Every (name, value) pair, repeated names included, in query order."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"QueryParams({self.multi_items()!r})"


def _to_body(value: bytes | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a body must be bytes or str, not {type(value).__name__}")


@attrs.frozen(kw_only=True)
class Request:
    """An HTTP request, for ``App.authorize``, ``App.fetch`` or an object's ``fetch``.

    For a WebSocket upgrade, :attr:`websocket` is the server end, not yet accepted: call
    ``ctx.accept_websocket(request.websocket, tags)`` and return
    ``Response(status=101, websocket=request.websocket)``; any other response refuses the
    upgrade (and undoes the accept). ``App.fetch``, or an object, may forward the
    request (or a copy made with :meth:`with_headers` / :meth:`with_context`) to any
    object with ``await stub.fetch(request)`` and return the 101 it gets: the object
    that accepted the socket owns it.
    """

    method: str
    """The method, upper case (``"GET"``)."""
    url: str
    """The request target as sent, e.g. ``"/chat/lobby?x=1"``."""
    headers: Headers = attrs.field(default=(), converter=_to_request_headers)
    """Header (name, value) pairs in arrival order; names lower-cased."""
    body: bytes = attrs.field(default=b"", converter=_to_body)
    """The whole body (empty for upgrades)."""
    websocket: WebSocket | None = attrs.field(default=None, eq=False)
    """The WebSocket to accept, when this is an upgrade request. It stays the same object
    in every copy (:meth:`with_headers`, :meth:`with_context`), so a copy forwarded with
    ``stub.fetch`` carries the upgrade."""
    context: Any = attrs.field(default=None, eq=False)
    """A value the app attached for the object (:meth:`with_context`): the verified
    user, say. None on a request from the network: no client can set it, unlike a
    header. Kept in memory and handed over as it is (never copied, never encoded: a
    request never leaves its process), so make it a value nobody mutates (a frozen
    dataclass, a str, a tuple)."""

    @property
    def path(self) -> str:
        """The path part of :attr:`url` (``""`` when the target has none, as ``*``)."""
        return split_target(self.url)[0]

    @property
    def query(self) -> str:
        """The query string of :attr:`url`, without ``?``, as sent (still escaped)."""
        return split_target(self.url)[1]

    @property
    def query_params(self) -> QueryParams:
        """The query string parsed: ``request.query_params.get("room")`` is the first
        value of ``room`` (None if absent), ``.getlist("tag")`` all of them (see
        :class:`QueryParams`). Parsed anew on each access."""
        return QueryParams(self.query)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    @property
    def websocket_protocols(self) -> tuple[str, ...]:
        """The subprotocols the client offers (its ``Sec-WebSocket-Protocol`` headers),
        in its order of preference; ``()`` if none. Choose one with
        ``ctx.accept_websocket(ws, protocol=...)``."""
        return header_list(v for k, v in self.headers if k.lower() == "sec-websocket-protocol")

    def with_headers(
        self,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        remove: Iterable[str] = (),
    ) -> Request:
        """A copy with ``headers`` set and the headers named in ``remove`` taken out.

        A name in ``headers`` replaces every header of that name (case-insensitive);
        the other headers keep their order, the new ones come last, names lower-cased.
        Everything else (the WebSocket of an upgrade, the context) is the same. To
        forward an upgrade with the identity the app verified::

            forwarded = request.with_headers({"x-user": user}, remove=["authorization"])
            return await stub.fetch(forwarded)

        Raises:
            TypeError, ValueError: a name or value that cannot be an HTTP header.
        """
        added = _to_headers(headers)
        if isinstance(remove, str):
            raise TypeError(f"remove takes an iterable of header names, not a str: {remove!r}")
        dropped = {name.lower() for name in remove} | {name.lower() for name, _ in added}
        kept = [(name, value) for name, value in self.headers if name.lower() not in dropped]
        return attrs.evolve(
            self, headers=(*kept, *((name.lower(), value) for name, value in added))
        )

    def with_context(self, context: Any) -> Request:
        """A copy carrying ``context`` (see :attr:`context`) for the object it is sent to.

        Use it in ``App.authorize`` (return the copy) or ``App.fetch`` (forward the copy
        with ``stub.fetch``) to hand the object what the app verified, without a header
        a client could forge.
        """
        return attrs.evolve(self, context=context)


def _status(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not (value == 101 or 200 <= value <= 599)
    ):
        raise ValueError(
            f"a response status is 101 (an upgrade) or an int from 200 to 599, got {value!r}"
        )


#: Headers the server writes itself (framing and the upgrade); a Response may not.
_SERVER_HEADERS: Final = frozenset({"content-length", "transfer-encoding", "connection", "upgrade"})


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
        for name, value in self.headers:
            if name.lower() in _SERVER_HEADERS:
                raise ValueError(
                    f"the server sets the {name!r} header itself; a Response may not "
                    f"(it may only carry {', '.join(sorted(_SERVER_HEADERS))} as the "
                    "server writes them)"
                )
            if value != value.strip(" \t"):
                raise ValueError(
                    f"the value of header {name!r} has leading or trailing whitespace: {value!r}"
                )
        if (self.status == 101) != (self.websocket is not None):
            raise ValueError(
                "a 101 response must carry the accepted websocket, and only a 101 may "
                f"(status={self.status}, websocket={'set' if self.websocket else 'None'})"
            )
        if self.websocket is not None:
            check_upgrade_headers(self.websocket, self.headers)
