"""The conformance reference object for trio-hibernate.

It speaks the JSON command protocol described in ``conformance/README.md``; its twin for
workerd is ``conformance/worker/reference.js``. Both must answer every command identically
wherever the two runtimes agree, so keep them in step.

Serve it with the command line (no forced-hibernation hook then)::

    trio-hibernate serve conformance/reference_object.py:app --port 8080

or with this file, which also serves the test hook ``POST /conformance/evict/<ns>/<name>``
(it calls :meth:`trio_hibernate.Host.hibernate`)::

    python conformance/reference_object.py --port 0

Routes:

* ``GET /conformance/info``: the implementation and its capabilities (``evict``,
  ``idle_timeout_s``), so that the suite can skip what an endpoint cannot do, visibly.
* ``POST /conformance/evict/<ns>/<name>``: hibernate that object now (``{"evicted": bool}``);
  ``/conformance/evict-id/<ns>/<hex>`` for an object of a unique id.
* ``POST /conformance/unique/<ns>``: a new unique id (``{"ok": true, "id": hex}``).
* ``/ref-id/<hex>[/...]``: forwarded by ``App.fetch`` with a stub to the object of that id
  (upgrades included), as a Worker forwards to ``env.REF.get(id)``.
* ``GET /ref/<name>`` with a WebSocket upgrade: accepted with the options in the
  ``x-accept`` header (JSON: ``tags``, ``attachment`` set before accepting, ``twice``).
* ``GET /ref/<name>/events`` and ``/ref/<name>/stats``: the ``events`` and ``stats`` replies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sqlite3
from collections import Counter
from functools import partial
from itertools import islice
from typing import Any, Final
from urllib.parse import unquote

import trio

from trio_hibernate import (
    App,
    AppContext,
    DataCloneError,
    DurableObject,
    Host,
    InvalidCloseCodeError,
    LimitExceededError,
    ObjectContext,
    ObjectId,
    Request,
    Response,
    WebSocket,
    WebSocketRequestResponsePair,
    WebSocketStateError,
    __version__,
    serve_objects,
)

IMPLEMENTATION: Final = "trio-hibernate"
NAMESPACE: Final = "ref"

#: Constructor runs per object id, for the whole process (the ``stats`` command).
_constructor_runs: Counter[str] = Counter()
#: Object ids whose next construction raises (the ``fail_next_construction`` command).
_fail_next_construction: set[str] = set()
#: Object ids whose next construction runs a slow setup in ``block_concurrency_while``
#: (the ``slow_next_construction`` command), and how long it sleeps, in ms.
_slow_next_construction: dict[str, float] = {}


class _Hooks:
    """What this process knows about its host; empty under ``trio-hibernate serve``."""

    host: Host | None = None
    idle_timeout_s: float | None = None


_LIMIT_KINDS: Final = {
    "max_tags_per_websocket": "too_many_tags",
    "max_tag_bytes": "tag_too_long",
    "max_attachment_bytes": "attachment_too_large",
    "max_auto_response_bytes": "auto_response_too_large",
}
_MESSAGE_KINDS: Final = (
    ("Invalid WebSocket close code", "invalid_close_code"),
    ("must also specify a code", "reason_without_code"),
    ("close reason must not be longer", "reason_too_long"),
    ("already accepted", "already_accepted"),
    ("send() after close", "send_after_close"),
    ("should not exceed", "event_timeout_too_large"),
    ("cannot be negative", "event_timeout_negative"),
    ("whole number", "event_timeout_not_integer"),
)


def error_kind(exc: BaseException) -> str:
    """The protocol's name for an API error (the same names as the JavaScript twin)."""
    if isinstance(exc, DataCloneError):
        return "data_clone"
    if isinstance(exc, LimitExceededError):
        return _LIMIT_KINDS.get(exc.limit_name, "other")
    message = str(exc)
    for fragment, kind in _MESSAGE_KINDS:
        if fragment in message:
            return kind
    return "other"


def _failure(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": error_kind(exc), "message": str(exc)}


_API_ERRORS: Final = (
    DataCloneError,
    LimitExceededError,
    InvalidCloseCodeError,
    WebSocketStateError,
    TypeError,
    ValueError,
)


def _json_response(value: object, status: int = 200, **headers: str) -> Response:
    return Response(
        status=status,
        body=json.dumps(value),
        headers={"content-type": "application/json", **headers},
    )


def _close_code_sendable(code: int) -> bool:
    return 1000 <= code <= 4999 and code not in {1004, 1005, 1006, 1015}


class Reference(DurableObject):
    """Answers the protocol's commands on every socket; records close and error events."""

    def __init__(self, ctx: ObjectContext, env: Any) -> None:
        super().__init__(ctx, env)
        _constructor_runs[ctx.id.hex] += 1
        if ctx.id.hex in _fail_next_construction:
            _fail_next_construction.discard(ctx.id.hex)
            raise RuntimeError("constructor failing on purpose (conformance suite)")
        #: In memory only: lost on every eviction (the ``remember``/``recall`` commands).
        self.memo: object = None
        #: Whether this instance's slow setup has run (the ``setup_state`` command).
        self.setup_done = False
        setup_ms = _slow_next_construction.pop(ctx.id.hex, None)
        if setup_ms is not None:
            ctx.block_concurrency_while(partial(self.setup, setup_ms))

    async def setup(self, ms: float) -> None:
        """The slow setup: sleeps, counts itself in storage, then marks the instance."""
        await trio.sleep(ms / 1000)
        setups = await self.ctx.storage.get("setups")
        await self.ctx.storage.put("setups", (setups if isinstance(setups, int) else 0) + 1)
        self.setup_done = True

    async def fetch(self, request: Request) -> Response:
        rest = request.path.split("/", 3)[3:]
        ws = request.websocket
        if ws is None:
            if rest == ["events"]:
                return _json_response(await self.events_reply())
            if rest == ["stats"]:
                return _json_response(await self.stats_reply())
            return _json_response({"ok": False, "error": "not_found"}, 404)
        options: dict[str, Any] = {}
        header = request.header("x-accept")
        if header is not None:
            try:
                options = json.loads(header)
            except ValueError as exc:
                return _json_response({"ok": False, "error": "bad_json", "message": str(exc)}, 400)
        try:
            if "attachment" in options:
                ws.serialize_attachment(options["attachment"])
            if "tags" in options:
                self.ctx.accept_websocket(ws, options["tags"])
            else:
                self.ctx.accept_websocket(ws)
        except _API_ERRORS as exc:
            return _json_response(_failure(exc), 400)
        headers = {}
        if options.get("twice"):
            second: str | None = None
            try:
                self.ctx.accept_websocket(ws)
            except _API_ERRORS as exc:
                second = error_kind(exc)
            headers["x-second-accept"] = json.dumps(second)
        return Response(status=101, websocket=ws, headers=headers)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        await self.count_message()
        if isinstance(message, bytes):
            ws.send(message)  # binary: echoed as binary
            return
        try:
            request = json.loads(message)
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            ws.send(json.dumps({"echo": message}))
            return
        reply = await self.handle(ws, request)
        if reply is not None:
            ws.send(json.dumps({"re": request.get("id"), **reply}))

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        record: dict[str, Any] = {
            "kind": "close",
            "tags": self.ctx.get_tags(ws),
            "code": code,
            "reason": reason,
            "was_clean": was_clean,
            "ready_state": int(ws.ready_state),
            "attachment": ws.deserialize_attachment(),
            "listed": any(s is ws for s in self.ctx.get_websockets()),
        }
        reply = await self.ctx.storage.get("close_reply")
        if reply is None or reply:
            # What workerd's documentation asks of close handlers; a no-op here, where the
            # runtime has already answered the peer's Close (spec 7, Rule).
            try:
                if _close_code_sendable(code):
                    ws.close(code, reason)
                else:
                    ws.close()
            except _API_ERRORS as exc:
                record["reply_error"] = error_kind(exc)
        await self.append_event(record)

    async def websocket_error(self, ws: WebSocket, error: Exception) -> None:
        await self.append_event(
            {
                "kind": "error",
                "tags": self.ctx.get_tags(ws),
                "attachment": ws.deserialize_attachment(),
            }
        )

    # -- helpers -----------------------------------------------------------------------

    async def count_message(self) -> None:
        count = await self.ctx.storage.get("messages")
        await self.ctx.storage.put("messages", (count if isinstance(count, int) else 0) + 1)

    async def append_event(self, record: dict[str, Any]) -> None:
        events = await self.ctx.storage.get("events")
        await self.ctx.storage.put(
            "events", [*(events if isinstance(events, list) else []), record]
        )

    async def events_reply(self) -> dict[str, Any]:
        events = await self.ctx.storage.get("events")
        return {"ok": True, "events": events if isinstance(events, list) else []}

    async def stats_reply(self) -> dict[str, Any]:
        messages = await self.ctx.storage.get("messages")
        return {
            "ok": True,
            "implementation": IMPLEMENTATION,
            "constructor_runs": _constructor_runs[self.ctx.id.hex],
            "messages": messages if isinstance(messages, int) else 0,
        }

    def targets(self, ws: WebSocket, request: dict[str, Any]) -> list[WebSocket]:
        return self.ctx.get_websockets(request["tag"]) if "tag" in request else [ws]

    def describe(self, ws: WebSocket, socket: WebSocket) -> dict[str, Any]:
        return {
            "tags": self.ctx.get_tags(socket),
            "ready_state": int(socket.ready_state),
            "attachment": socket.deserialize_attachment(),
            "self": socket is ws,
        }

    async def handle(self, ws: WebSocket, request: dict[str, Any]) -> dict[str, Any] | None:
        """The reply body for one command, or None to send no reply."""
        op = request["op"]
        if op == "stats":
            return await self.stats_reply()
        if op == "events":
            return await self.events_reply()
        if op == "remember":
            self.memo = request.get("value")
            return {"ok": True}
        if op == "recall":
            return {"ok": True, "value": self.memo}
        if op == "tags":
            return {"ok": True, "tags": self.ctx.get_tags(ws)}
        if op == "ready_state":
            return {"ok": True, "ready_state": int(ws.ready_state)}
        if op == "get_attachment":
            return {"ok": True, "value": ws.deserialize_attachment()}
        if op == "set_attachment":
            try:
                ws.serialize_attachment(request.get("value"))
            except _API_ERRORS as exc:
                return _failure(exc)
            return {"ok": True}
        if op == "set_attachment_unclonable":
            try:
                ws.serialize_attachment({"f": lambda: 1})
            except _API_ERRORS as exc:
                return _failure(exc)
            return {"ok": True}
        if op == "attachment_copy_semantics":
            return self.copy_semantics(ws)
        if op == "list":
            sockets = self.ctx.get_websockets(request.get("tag"))
            return {"ok": True, "sockets": [self.describe(ws, s) for s in sockets]}
        if op == "broadcast":
            count = 0
            for socket in self.ctx.get_websockets(request.get("tag")):
                if socket.ready_state == 1:
                    socket.send(json.dumps({"push": "broadcast", "data": request.get("data")}))
                    count += 1
            return {"ok": True, "count": count}
        if op == "send":
            errors: list[str | None] = []
            for socket in self.targets(ws, request):
                try:
                    socket.send(str(request.get("data")))
                    errors.append(None)
                except _API_ERRORS as exc:
                    errors.append(error_kind(exc))
            return {"ok": True, "errors": errors}
        if op == "close":
            return self.close(ws, request)
        if op == "set_auto_response":
            try:
                if "request" in request:
                    pair = WebSocketRequestResponsePair(request["request"], request["response"])
                    self.ctx.set_websocket_auto_response(pair)
                else:
                    self.ctx.set_websocket_auto_response()
            except _API_ERRORS as exc:
                return _failure(exc)
            return {"ok": True}
        if op == "get_auto_response":
            current = self.ctx.get_websocket_auto_response()
            return {
                "ok": True,
                "pair": None if current is None else [current.request, current.response],
            }
        if op == "auto_response_timestamp":
            when = self.ctx.get_websocket_auto_response_timestamp(ws)
            return {
                "ok": True,
                "timestamp_ms": None if when is None else round(when.timestamp() * 1000),
            }
        if op == "set_event_timeout":
            try:
                self.ctx.set_hibernatable_websocket_event_timeout(request.get("ms"))
            except _API_ERRORS as exc:
                return _failure(exc)
            return {"ok": True}
        if op == "get_event_timeout":
            return {"ok": True, "ms": self.ctx.get_hibernatable_websocket_event_timeout()}
        if op == "set_close_reply":
            await self.ctx.storage.put("close_reply", bool(request.get("reply")))
            return {"ok": True}
        if op == "sleep":
            await trio.sleep(request["ms"] / 1000)
            return {"ok": True}
        if op == "fail_next_construction":
            _fail_next_construction.add(self.ctx.id.hex)
            return {"ok": True}
        if op == "slow_next_construction":
            _slow_next_construction[self.ctx.id.hex] = float(request["ms"])
            return {"ok": True}
        if op == "setup_state":
            setups = await self.ctx.storage.get("setups")
            return {"ok": True, "setup_done": self.setup_done, "setups": setups or 0}
        if op == "block":
            await self.ctx.block_concurrency_while(partial(trio.sleep, request["ms"] / 1000))
            return {"ok": True}
        if op == "sql":
            return self.sql(request)
        if op == "raise":
            raise RuntimeError("raised on purpose by the conformance suite")
        return {"ok": False, "error": "unknown_op", "message": f"unknown op {op!r}"}

    def sql(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run ``query``; read ``read`` rows (all if absent) with ``raw()``; report."""
        try:
            cursor = self.ctx.storage.sql.exec(request["query"], *request.get("bindings", []))
        except (sqlite3.Error, *_API_ERRORS) as exc:
            return _failure(exc)
        rows_read_at_exec = cursor.rows_read
        rows = islice(cursor.raw(), request.get("read"))  # None: every row
        taken = [list(row) for row in rows]
        return {
            "ok": True,
            "columns": cursor.column_names,
            "rows": taken,
            "rows_read_at_exec": rows_read_at_exec,
            "rows_read": cursor.rows_read,
            "rows_written": cursor.rows_written,
        }

    def copy_semantics(self, ws: WebSocket) -> dict[str, Any]:
        previous = ws.deserialize_attachment()
        value: dict[str, list[int]] = {"list": [1]}
        ws.serialize_attachment(value)
        value["list"].append(2)
        first = ws.deserialize_attachment()
        assert isinstance(first, dict)
        first["list"].append(3)
        second = ws.deserialize_attachment()
        assert isinstance(second, dict)
        ws.serialize_attachment(previous)
        return {
            "ok": True,
            "kept_mutation_after_set": 2 in second["list"],
            "kept_mutation_of_copy": 3 in second["list"],
            "fresh_copy_each_get": first is not second,
        }

    def close(self, ws: WebSocket, request: dict[str, Any]) -> dict[str, Any] | None:
        code = request.get("code")
        reason = request.get("reason")
        targets = self.targets(ws, request)
        send_errors: list[str | None] = []
        close_again_errors: list[str | None] = []
        for socket in targets:
            try:
                socket.close(code, reason)
            except _API_ERRORS as exc:
                return _failure(exc)
            if "then_send" in request:
                try:
                    socket.send(str(request["then_send"]))
                    send_errors.append(None)
                except _API_ERRORS as exc:
                    send_errors.append(error_kind(exc))
            if request.get("then_close"):
                try:
                    socket.close(code, reason)
                    close_again_errors.append(None)
                except _API_ERRORS as exc:
                    close_again_errors.append(error_kind(exc))
        if "tag" not in request:
            return None  # closing oneself leaves no way to reply: the Close frame is the answer
        return {
            "ok": True,
            "count": len(targets),
            "send_errors": send_errors,
            "close_again_errors": close_again_errors,
        }


async def _site(request: Request, ctx: AppContext) -> Response:
    """The Worker-level routes: ``/conformance/...`` (info, the test hooks, new unique ids)
    and ``/ref-id/<hex>[/...]``, forwarded with a stub to the object of that id."""
    parts = request.path.split("/")
    if len(parts) >= 3 and parts[1] == f"{NAMESPACE}-id":
        namespace = ctx.get_namespace(NAMESPACE)
        try:
            object_id = namespace.id_from_string(parts[2])
        except ValueError as exc:
            return _json_response({"ok": False, "error": "bad_id", "message": str(exc)}, 400)
        return await namespace.get(object_id).fetch(request)
    if len(parts) >= 3 and parts[1] == "conformance":
        if parts[2] == "info" and request.method == "GET":
            return _json_response(
                {
                    "implementation": IMPLEMENTATION,
                    "version": __version__,
                    "capabilities": {
                        "evict": _Hooks.host is not None,
                        "idle_timeout_s": _Hooks.idle_timeout_s,
                        "forward": True,
                        "sql": True,
                    },
                }
            )
        if parts[2] == "unique" and request.method == "POST" and len(parts) == 4:
            try:
                namespace = ctx.get_namespace(parts[3])
            except KeyError:
                return _json_response({"ok": False, "error": "not_found"}, 404)
            return _json_response({"ok": True, "id": str(namespace.new_unique_id())})
        if parts[2] in ("evict", "evict-id") and request.method == "POST" and len(parts) == 5:
            host = _Hooks.host
            if host is None:
                return _json_response({"ok": False, "error": "no_evict_hook"}, 501)
            try:
                name = unquote(parts[4])
                target = ObjectId(name) if parts[2] == "evict-id" else name
                evicted = await host.hibernate(parts[3], target)
            except KeyError:
                return _json_response({"ok": False, "error": "not_found"}, 404)
            except ValueError as exc:
                return _json_response({"ok": False, "error": "bad_id", "message": str(exc)}, 400)
            return _json_response({"ok": True, "evicted": evicted})
    return _json_response({"ok": False, "error": "not_found"}, 404)


app = App({NAMESPACE: Reference}, fetch=_site)


async def _serve(address: str, port: int, idle_timeout: float) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_objects(
                app, address, port, idle_timeout=idle_timeout, task_status=task_status
            )
        )
        _Hooks.host = server.host
        _Hooks.idle_timeout_s = idle_timeout
        print(f"reference object listening on {server.url('/', scheme='http')}", flush=True)


def main() -> None:
    """Serve the reference object with the eviction hook (used by conformance/run.py)."""
    parser = argparse.ArgumentParser(description="Serve the conformance reference object.")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--idle-timeout", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_serve, args.address, args.port, args.idle_timeout)


if __name__ == "__main__":
    main()
