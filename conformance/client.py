"""Synchronous clients for the reference protocol (README.md), with a timeout on every wait.

Nothing here knows which runtime answers: an :class:`Endpoint` is a base URL plus what
``GET /conformance/info`` announced, and a :class:`Client` is one WebSocket to one object.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, suppress
from typing import Any, Final
from urllib.parse import quote, urlsplit

from websockets.exceptions import InvalidState, InvalidStatus
from websockets.frames import Close
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect

__all__ = [
    "CLOSE_TIMEOUT_S",
    "NAMESPACE",
    "QUIET_S",
    "REPLY_TIMEOUT_S",
    "Client",
    "Endpoint",
    "UpgradeRefused",
]

#: Longest wait for any answer the protocol promises (a reply, an echo, a Close frame).
REPLY_TIMEOUT_S: Final = 5.0
#: How long "nothing arrives" is watched for (a swallowed message, a missing reply).
QUIET_S: Final = 0.3
#: Longest wait for the Close frame answering ours.
CLOSE_TIMEOUT_S: Final = 2.0
#: The namespace both reference implementations serve the reference object under.
NAMESPACE: Final = "ref"

Message = str | bytes


class UpgradeRefused(Exception):
    """The object refused the WebSocket upgrade; :attr:`body` is its JSON answer."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(f"upgrade refused with HTTP {status}: {body}")
        self.status = status
        self.body = body


def _http_json(method: str, url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=REPLY_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"raw": body.decode("utf-8", "replace")}


class Endpoint:
    """A runtime serving the reference object at :attr:`base_url` (``http://host:port``)."""

    def __init__(self, base_url: str, implementation: str, capabilities: Mapping[str, Any]):
        self.base_url = base_url.rstrip("/")
        self.implementation = implementation
        """What the endpoint says it is (``trio-hibernate``, ``workerd``, or ``unknown``)."""
        self.capabilities = dict(capabilities)
        """``evict`` (bool) and ``idle_timeout_s`` (seconds or None), as announced."""

    @classmethod
    def discover(cls, base_url: str) -> Endpoint:
        """Ask ``GET /conformance/info`` what the endpoint is and can do.

        An endpoint without that route is ``unknown`` with no capabilities: the cases that
        need one are skipped, and say so.
        """
        try:
            status, info = _http_json("GET", base_url.rstrip("/") + "/conformance/info")
        except OSError:
            status, info = 0, {}
        if status != 200 or not isinstance(info, dict):
            return cls(base_url, "unknown", {})
        return cls(
            base_url, str(info.get("implementation", "unknown")), info.get("capabilities", {})
        )

    def __repr__(self) -> str:
        return f"<Endpoint {self.implementation} at {self.base_url}>"

    def has(self, capability: str) -> bool:
        """Whether the endpoint announced ``capability`` (a true value)."""
        return bool(self.capabilities.get(capability))

    def ws_url(self, name: str) -> str:
        """The WebSocket URL of the reference object called ``name``."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}/{NAMESPACE}/{quote(name, safe='')}"

    def ws_url_of_id(self, hex_id: str) -> str:
        """The WebSocket URL that reaches the reference object ``hex_id`` (an id from
        :meth:`new_unique_id`) through the Worker, which forwards it with a stub."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}/{NAMESPACE}-id/{hex_id}"

    def new_unique_id(self) -> str:
        """A new unique object id (``newUniqueId()``), as a string (capability
        ``forward``)."""
        status, body = _http_json("POST", f"{self.base_url}/conformance/unique/{NAMESPACE}")
        assert status == 200, f"unique id: HTTP {status} {body}"
        assert isinstance(body, dict), body
        assert isinstance(body.get("id"), str), body
        return str(body["id"])

    def evict_id(self, hex_id: str) -> bool:
        """:meth:`evict` for the object ``hex_id`` (a unique id)."""
        status, body = _http_json(
            "POST", f"{self.base_url}/conformance/evict-id/{NAMESPACE}/{hex_id}"
        )
        assert status == 200, f"evict hook failed: HTTP {status} {body}"
        assert body.get("ok"), f"evict hook failed: {body}"
        return bool(body["evicted"])

    def evict(self, name: str) -> bool:
        """Hibernate the object now (test hook); True if it had an instance in memory."""
        status, body = _http_json(
            "POST", f"{self.base_url}/conformance/evict/{NAMESPACE}/{quote(name, safe='')}"
        )
        assert status == 200, f"evict hook failed: HTTP {status} {body}"
        assert body.get("ok"), f"evict hook failed: {body}"
        return bool(body["evicted"])

    def object_json(self, name: str, what: str) -> dict[str, Any]:
        """``GET /ref/<name>/<what>`` (``events`` or ``stats``): an event for the object."""
        status, body = _http_json(
            "GET", f"{self.base_url}/{NAMESPACE}/{quote(name, safe='')}/{what}"
        )
        assert status == 200, f"{what}: HTTP {status} {body}"
        assert isinstance(body, dict), f"{what}: {body}"
        return body

    def events(self, name: str) -> list[dict[str, Any]]:
        """The close and error events the object recorded (in storage), oldest first."""
        events = self.object_json(name, "events")["events"]
        assert isinstance(events, list)
        return events

    def wait_for_events(self, name: str, count: int) -> list[dict[str, Any]]:
        """Poll :meth:`events` until at least ``count`` are recorded (or time out)."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:
            events = self.events(name)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.02)


class Client:
    """One WebSocket to one reference object.

    Replies are matched to requests by ``id``; every other message (broadcasts, echoes,
    auto-responses) waits in an inbox in arrival order.
    """

    _ids = itertools.count(1)

    def __init__(self, stack: ExitStack, ws: ClientConnection, name: str) -> None:
        self._stack = stack
        self.ws = ws
        self.name = name
        self.inbox: deque[Message] = deque()

    def response_header(self, name: str) -> str | None:
        """A header of the server's 101 response (case-insensitive), or None."""
        response = self.ws.response
        return None if response is None else response.headers.get(name)

    @classmethod
    def connect(
        cls,
        endpoint: Endpoint,
        name: str,
        *,
        tags: list[str] | None = None,
        attachment: object = ...,
        twice: bool = False,
        url: str | None = None,
    ) -> Client:
        """Open a WebSocket to object ``name``; the object accepts it with these options.

        ``tags=None`` calls accept without tags; ``attachment`` (if given) is serialized
        before accepting; ``twice`` makes the object try to accept the socket again.
        ``url`` replaces the object's URL (``Endpoint.ws_url_of_id``); ``name`` then only
        labels the client.

        Raises:
            UpgradeRefused: the object answered the upgrade with an error (a bad tag...).
        """
        options: dict[str, object] = {}
        if tags is not None:
            options["tags"] = tags
        if attachment is not ...:
            options["attachment"] = attachment
        if twice:
            options["twice"] = True
        stack = ExitStack()
        try:
            ws = stack.enter_context(
                connect(
                    url or endpoint.ws_url(name),
                    additional_headers={"x-accept": json.dumps(options)},
                    open_timeout=REPLY_TIMEOUT_S,
                    close_timeout=CLOSE_TIMEOUT_S,
                    ping_interval=None,
                    compression=None,
                    max_size=None,
                )
            )
        except InvalidStatus as exc:
            stack.close()
            try:
                body = json.loads(exc.response.body or b"{}")
            except ValueError:
                body = {"raw": (exc.response.body or b"").decode("utf-8", "replace")}
            raise UpgradeRefused(exc.response.status_code, body) from None
        except BaseException:
            stack.close()
            raise
        return cls(stack, ws, name)

    def __repr__(self) -> str:
        return f"<Client of {self.name} {self.ws.state.name}>"

    # -- sending ---------------------------------------------------------------------

    def send_op(self, op: str, **fields: object) -> int:
        """Send command ``op`` without waiting; returns its id."""
        request_id = next(self._ids)
        self.ws.send(json.dumps({"id": request_id, "op": op, **fields}))
        return request_id

    def request(self, op: str, **fields: object) -> dict[str, Any]:
        """Send command ``op`` and return the object's reply (``{"ok": ..., ...}``)."""
        return self.reply_to(self.send_op(op, **fields))

    def reply_to(self, request_id: int, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """Wait for the reply to ``request_id``, keeping other messages in the inbox."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no reply to request {request_id} within {timeout} s")
            try:
                message = self.ws.recv(timeout=remaining)
            except TimeoutError:
                raise AssertionError(
                    f"no reply to request {request_id} within {timeout} s"
                ) from None
            if isinstance(message, str):
                decoded = _try_json(message)
                if isinstance(decoded, dict) and decoded.get("re") == request_id:
                    decoded.pop("re")
                    return decoded
            self.inbox.append(message)

    def send(self, message: Message) -> None:
        """Send a raw text or binary message."""
        self.ws.send(message)

    def send_fragments(self, fragments: list[str] | list[bytes]) -> None:
        """Send one message as several frames."""
        parts: list[str | bytes] = list(fragments)
        self.ws.send(iter(parts))

    # -- receiving -------------------------------------------------------------------

    def _recv(self, timeout: float) -> Message:
        try:
            return self.ws.recv(timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"nothing received within {timeout:.2f} s") from None

    def next_message(self, timeout: float = REPLY_TIMEOUT_S) -> Message:
        """The next message that is not a reply: from the inbox, else from the socket."""
        if self.inbox:
            return self.inbox.popleft()
        return self._recv(timeout)

    def next_json(self, timeout: float = REPLY_TIMEOUT_S) -> Any:
        """:meth:`next_message`, which must be a JSON text message, decoded."""
        message = self.next_message(timeout)
        assert isinstance(message, str), f"expected a text message, got {message!r}"
        return json.loads(message)

    def assert_quiet(self, seconds: float = QUIET_S) -> None:
        """Fail if any message is waiting or arrives within ``seconds``."""
        assert not self.inbox, f"unexpected messages: {list(self.inbox)}"
        try:
            message = self.ws.recv(timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message: {message!r}")

    # -- closing ---------------------------------------------------------------------

    @property
    def close_received(self) -> Close | None:
        """The Close frame the server sent, once it arrived (None before or if none)."""
        return self.ws.protocol.close_rcvd

    def close(self, code: int | None = None, reason: str = "") -> Close | None:
        """Send a Close frame (empty when ``code`` is None), wait for the answer, hang up.

        Returns the server's Close frame, or None if none came within CLOSE_TIMEOUT_S (a
        browser would report 1006 then). The TCP connection is dropped as soon as the
        handshake is done, without waiting for the server to end it.
        """
        with self.ws.protocol_mutex:
            try:
                self.ws.protocol.send_close(code, reason)
            except InvalidState:
                pass  # already closing or closed
            else:
                with suppress(OSError):
                    self.ws.send_data()
        frame = self.wait_for_close_frame(CLOSE_TIMEOUT_S)
        self.hang_up()
        return frame

    def wait_for_close_frame(self, timeout: float = REPLY_TIMEOUT_S) -> Close | None:
        """Wait until the server's Close frame arrives; None if it did not in time."""
        deadline = time.monotonic() + timeout
        while self.close_received is None and time.monotonic() < deadline:
            if self.ws.state is State.CLOSED:
                break
            time.sleep(0.005)
        return self.close_received

    def hang_up(self) -> None:
        """Drop the TCP connection now.

        Any automatic answer the client library owes (the echo of a Close frame it
        received) is written first. Without a closing handshake before, the server sees
        the connection end without a Close frame (1006).
        """
        with self.ws.protocol_mutex:
            pass  # the receiving thread writes its answers while holding this lock
        with suppress(OSError):
            self.ws.socket.shutdown(socket.SHUT_RDWR)
        self.ws.wait_closed(CLOSE_TIMEOUT_S)
        self._stack.close()

    def abort(self) -> None:
        """Drop the TCP connection without a Close frame (the server should see 1006)."""
        self.hang_up()

    def send_raw(self, data: bytes) -> None:
        """Write raw bytes on the TCP stream (to break the protocol on purpose)."""
        self.ws.socket.sendall(data)

    def send_raw_in_background(self, chunks: Iterable[bytes]) -> threading.Thread:
        """Write ``chunks`` on the TCP stream from another thread, until done or refused.

        The connection's own send path holds a lock while it writes, so a Close frame that
        arrives during a long write would not be seen until the write ends; writing raw
        from a thread keeps the connection free to notice it.
        """

        def write() -> None:
            try:
                for chunk in chunks:
                    self.ws.socket.sendall(chunk)
            except OSError:
                pass  # the runtime closed the connection: that is the point

        thread = threading.Thread(target=write, name="raw-writer", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        """Release the connection (idempotent): close it with 1000 if it is still open."""
        if self.ws.state is State.OPEN:
            self.close(1000)
        else:
            self.hang_up()


def oversize_binary_frame(length: int, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """A binary client frame of ``length`` payload bytes, in chunks.

    The masking key is zero (allowed by RFC 6455), so the payload needs no masking work.
    """
    yield bytes([0x82, 0x80 | 127]) + struct.pack("!Q", length) + b"\0\0\0\0"
    chunk = b"x" * chunk_bytes
    for start in range(0, length, chunk_bytes):
        yield chunk[: min(chunk_bytes, length - start)]


def masked_frame(first_byte: int, payload: bytes = b"") -> bytes:
    """A client frame (masked, payload under 126 bytes) with the given first byte."""
    assert len(payload) < 126
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([first_byte, 0x80 | len(payload)]) + mask + body


def _try_json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None
