"""WebSocket upgrades forwarded through stubs: ``App.fetch`` (or ``App.authorize``, or an
object) picks the object, any object, and the one that accepts owns the socket.

The app below is the Cloudflare Worker pattern: ``App.fetch`` authenticates the client,
then forwards the upgrade with ``stub.fetch`` to a match picked from a custom URL
(``/api/match/<id>/ws``, a unique id), from a query parameter (``/api/join?room=``, a
name) or through another object (``/api/lobby``: the lobby forwards it on). Most tests
run a real server on 127.0.0.1 (``helpers.serve``); the last ones use
``trio_hibernate.testing``.
"""

from __future__ import annotations

import re
from typing import Any, Final

import attrs
import pytest
import trio
from helpers import (
    WAIT_SECONDS,
    Probe,
    ask,
    closed_by_server,
    http_exchange,
    open_client,
    recv_text,
    refused_upgrade,
    send,
    serve,
    settle,
)

from trio_hibernate import (
    App,
    AppContext,
    DurableObject,
    ObjectContext,
    ObjectId,
    Request,
    Response,
    WebSocket,
    WebSocketRequestResponsePair,
)
from trio_hibernate.testing import UpgradeRejected, open_test_host

#: Tokens the app accepts, and the user each one proves.
TOKENS: Final = {"t-ann": "ann", "t-bob": "bob"}


@attrs.frozen
class User:
    """What the app verified, handed to the object as ``request.context``."""

    name: str


@attrs.frozen
class Constructed:
    namespace: str
    object_id: str


@attrs.frozen
class Closed:
    namespace: str
    object_id: str
    user: str
    code: int
    reason: str
    clean: bool


def verified_user(request: Request) -> User | None:
    """The user the request's token proves (``?token=`` or ``authorization``), or None."""
    token = request.query_params.get("token", request.header("authorization") or "")
    name = TOKENS.get(token)
    return None if name is None else User(name)


class Match(DurableObject):
    """Accepts the upgrades forwarded to it, tagged with the verified user (the request's
    context, or the ``x-user`` header); answers ``who`` with what it knows of the socket,
    ``say:<text>`` by sending ``<user>: <text>`` to everyone in the match, and
    ``close:<code>`` by closing with that code. ``ping`` gets ``pong`` without a wake."""

    def __init__(self, ctx: ObjectContext, env: Probe) -> None:
        super().__init__(ctx, env)
        env.constructing(self)
        env.record(Constructed(ctx.namespace, ctx.id.hex))

    async def fetch(self, request: Request) -> Response:
        user = request.context.name if isinstance(request.context, User) else None
        user = user or request.header("x-user") or "anonymous"
        ws = request.websocket
        if ws is None:
            return Response(body=f"{self.ctx.id.hex} sees {user}")
        ws.serialize_attachment({"user": user})
        self.ctx.accept_websocket(ws, [user, "players"])
        self.ctx.set_websocket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
        return Response(status=101, websocket=ws)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        assert isinstance(message, str)
        attachment = ws.deserialize_attachment()
        assert isinstance(attachment, dict)
        user = attachment["user"]
        if message == "who":
            tags = ",".join(self.ctx.get_tags(ws))
            ws.send(f"{self.ctx.namespace} {self.ctx.id.hex} {user} {tags}")
        elif message.startswith("say:"):
            for peer in self.ctx.get_websockets("players"):
                peer.send(f"{user}: {message.removeprefix('say:')}")
        elif message.startswith("close:"):
            ws.close(int(message.removeprefix("close:")), "bye")

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        attachment = ws.deserialize_attachment()
        assert isinstance(attachment, dict)
        self.env.record(
            Closed(self.ctx.namespace, self.ctx.id.hex, attachment["user"], code, reason, was_clean)
        )


class Lobby(DurableObject):
    """Forwards every request to the match called ``from-lobby``: an upgrade through two
    stubs (App.fetch -> lobby -> match)."""

    def __init__(self, ctx: ObjectContext, env: Probe) -> None:
        super().__init__(ctx, env)
        env.record(Constructed(ctx.namespace, ctx.id.hex))

    async def fetch(self, request: Request) -> Response:
        return await self.ctx.get_namespace("match").get_by_name("from-lobby").fetch(request)


#: Requests App.fetch kept instead of answering them (``/api/keep``).
kept: list[Request] = []


async def worker(request: Request, ctx: AppContext) -> Response:
    """``App.fetch``: authenticate, then forward to the object the URL picks."""
    matches = ctx.get_namespace("match")
    if request.path == "/api/bare-101" and request.websocket is not None:
        return Response(status=101, websocket=request.websocket)  # no object accepted it
    user = verified_user(request)
    if user is None:
        return Response(status=403, body="who are you?\n")
    request = request.with_context(user)
    if found := re.fullmatch(r"/api/match/([0-9a-f]{64})/ws", request.path):
        return await matches.get(matches.id_from_string(found[1])).fetch(request)
    if request.path == "/api/join":
        room = request.query_params.get("room", "lobby")
        return await matches.get_by_name(room).fetch(request)
    if request.path == "/api/lobby":
        return await ctx.get_namespace("lobby").get_by_name("main").fetch(request)
    if request.path == "/api/header":
        forwarded = request.with_context(None).with_headers(
            {"X-User": f"{user.name} (header)"}, remove=["authorization"]
        )
        return await matches.get_by_name("by-header").fetch(forwarded)
    if request.path == "/api/refuse-after-accept":
        await matches.get_by_name("refused").fetch(request)
        return Response(status=409, body="changed my mind\n")
    if request.path == "/api/keep":
        kept.append(request)
        return Response(status=503, body="later\n")
    if request.path == "/api/hang-after-accept":
        await matches.get_by_name("hung").fetch(request)
        await trio.sleep_forever()
    return Response(status=404, body="no such route\n")


def make_app(probe: Probe, **options: Any) -> App:
    return App({"match": Match, "lobby": Lobby}, env=probe, fetch=worker, **options)


def match_id(probe: Probe, index: int = -1) -> str:
    """The hex id of the ``index``-th match constructed."""
    return [c.object_id for c in probe.of(Constructed) if c.namespace == "match"][index]


# -- through a real server -------------------------------------------------------------------


async def test_app_fetch_authenticates_then_forwards_to_a_unique_id_object(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = Probe()
    async with serve(make_app(probe)) as server:
        unique = server.host.get_namespace("match").new_unique_id()
        async with open_client(server, f"/api/match/{unique.hex}/ws?token=t-ann") as ws:
            assert await ask(ws, "who") == f"match {unique.hex} ann ann,players"
            stats = server.host.object_statistics("match", unique)
            assert stats.websockets == 1
        await probe.wait_for(lambda: bool(probe.of(Closed)))
    assert probe.of(Closed) == [Closed("match", unique.hex, "ann", 1000, "", True)]


async def test_a_request_refused_before_forwarding_wakes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = Probe()
    async with serve(make_app(probe)) as server:
        unique = ObjectId.unique()
        refusal = await refused_upgrade(server.port, f"/api/match/{unique.hex}/ws?token=bad")
        assert (refusal.status, refusal.body) == (403, b"who are you?\n")
        assert server.host.statistics().wakes == 0
        assert probe.constructed == 0


async def test_query_parameter_routing_reaches_one_object_by_name(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = Probe()
    async with (
        serve(make_app(probe)) as server,
        open_client(server, "/api/join?room=r1&token=t-ann") as ann,
        open_client(server, "/api/join?room=r1&token=t-bob") as bob,
        open_client(server, "/api/join?room=r2&token=t-bob") as elsewhere,
    ):
        await send(ann, "say:hello")
        assert await recv_text(ann) == "ann: hello"
        assert await recv_text(bob) == "ann: hello"
        r1 = server.host.get_namespace("match").id_from_name("r1")
        assert (await ask(bob, "who")).startswith(f"match {r1.hex} bob ")
        assert (await ask(elsewhere, "who")).split()[1] != r1.hex
        assert server.host.object_statistics("match", "r1").websockets == 2


async def test_an_object_forwards_the_upgrade_to_another(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = Probe()
    async with serve(make_app(probe)) as server:
        async with open_client(server, "/api/lobby?token=t-bob") as ws:
            target = server.host.get_namespace("match").id_from_name("from-lobby")
            assert await ask(ws, "who") == f"match {target.hex} bob bob,players"
            assert server.host.object_statistics("match", "from-lobby").websockets == 1
            assert server.host.object_statistics("lobby", "main").websockets == 0
            await ws.aclose(4001, "done")
        await probe.wait_for(lambda: bool(probe.of(Closed)))
    # The match, which accepted the socket, heard its close; the lobby did not.
    assert probe.of(Closed) == [Closed("match", target.hex, "bob", 4001, "done", True)]


async def test_a_forwarded_socket_hibernates_and_wakes_its_own_object(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = Probe()
    async with serve(make_app(probe)) as server:
        host = server.host
        unique = host.get_namespace("match").new_unique_id()
        async with (
            open_client(server, f"/api/match/{unique.hex}/ws?token=t-ann") as ws,
            open_client(server, "/api/lobby?token=t-bob") as other,
        ):
            assert await ask(ws, "who") == f"match {unique.hex} ann ann,players"
            await ask(other, "who")
            assert await host.hibernate("match", unique)
            assert await host.hibernate("match", "from-lobby")
            await settle()
            assert all(ref() is None for ref in probe.instances)  # the instances are gone
            wakes = host.statistics().wakes
            assert await ask(ws, "ping") == "pong"  # the auto-response, without a wake
            assert host.statistics().wakes == wakes
            # Tags and attachment survived; the message woke the match it belongs to.
            assert await ask(ws, "who") == f"match {unique.hex} ann ann,players"
            assert host.statistics().wakes == wakes + 1
            assert probe.of(Constructed)[-1] == Constructed("match", unique.hex)
            assert host.object_statistics("match", "from-lobby").state.name == "HIBERNATED"


async def test_close_codes_both_ways_on_a_forwarded_socket(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = Probe()
    async with serve(make_app(probe)) as server:
        unique = server.host.get_namespace("match").new_unique_id()
        target = f"/api/match/{unique.hex}/ws?token=t-bob"
        async with open_client(server, target) as ws:
            await send(ws, "close:4002")
            assert await closed_by_server(ws) == (4002, "bye")
        async with open_client(server, target) as ws:
            await ws.aclose(4003, "leaving")
        await probe.wait_for(lambda: len(probe.of(Closed)) == 2)
        assert server.host.object_statistics("match", unique).websockets == 0
    assert [(c.code, c.reason) for c in probe.of(Closed)] == [(4002, "bye"), (4003, "leaving")]


async def test_headers_set_by_the_app_reach_the_object(autojump_clock: trio.abc.Clock) -> None:
    probe = Probe()
    async with serve(make_app(probe)) as server:
        async with open_client(server, "/api/header?token=t-ann") as ws:
            assert (await ask(ws, "who")).endswith(" ann (header) ann (header),players")
        reply = await http_exchange(
            server.port, b"GET /api/header HTTP/1.1\r\nHost: x\r\nAuthorization: t-bob\r\n\r\n"
        )
    assert reply.status == 200
    assert reply.body.endswith(b" sees bob (header)")


async def test_a_101_from_app_fetch_that_no_object_accepted_is_500(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(make_app(Probe())) as server:
        refusal = await refused_upgrade(server.port, "/api/bare-101")
    assert refusal.status == 500
    assert "App.fetch for /api/bare-101 answered 101 with a WebSocket no object accepted" in (
        caplog.text
    )


async def test_an_accept_the_app_does_not_return_is_undone(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = Probe()
    async with serve(make_app(probe)) as server:
        refusal = await refused_upgrade(server.port, "/api/refuse-after-accept?token=t-ann")
        assert (refusal.status, refusal.body) == (409, b"changed my mind\n")
        assert server.host.object_statistics("match", "refused").websockets == 0
        assert probe.of(Closed) == []  # let go with no event


async def test_an_upgrade_answered_before_any_object_accepts_it_is_let_go(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = Probe()
    async with serve(make_app(probe)) as server:
        refusal = await refused_upgrade(server.port, "/api/keep?token=t-ann")
        assert refusal.status == 503
        [request] = kept
        kept.clear()  # it holds the host (through its socket): let it go with the test
        # The request was answered: an object accepting its socket now lets it go.
        stub = server.host.get_namespace("match").get_by_name("late")
        response = await stub.fetch(request)
        assert response.status == 101
        assert server.host.object_statistics("match", "late").websockets == 0
        assert request.websocket is not None
        request.websocket.send("nobody hears this")  # dropped silently
        assert probe.of(Closed) == []


@pytest.mark.parametrize("where", ["in the object", "in App.fetch after the accept"])
async def test_the_request_timeout_lets_go_of_a_forwarded_upgrade(
    where: str, autojump_clock: trio.abc.Clock
) -> None:
    release = trio.Event()

    class SlowMatch(Match):
        async def fetch(self, request: Request) -> Response:
            if self.ctx.id.name == "slow":
                await release.wait()
            return await super().fetch(request)

    probe = Probe()
    app = App({"match": SlowMatch, "lobby": Lobby}, env=probe, fetch=worker)
    async with serve(app, request_timeout=3) as server:
        name, target = (
            ("slow", "/api/join?room=slow&token=t-ann")
            if where == "in the object"
            else ("hung", "/api/hang-after-accept?token=t-ann")
        )
        refusal = await refused_upgrade(server.port, target)
        assert refusal.status == 504
        release.set()
        await settle()  # the slow object accepts the socket and answers, too late
        assert server.host.object_statistics("match", name).websockets == 0
        assert probe.of(Closed) == []
        with trio.fail_after(WAIT_SECONDS):
            assert await server.host.hibernate("match", name)
        assert server.host.statistics().hibernated_objects == 0  # forgotten: nothing left


async def test_route_by_path_can_be_turned_off(autojump_clock: trio.abc.Clock) -> None:
    probe = Probe()
    without_fetch = App({"match": Match}, env=probe, route_by_path=False)
    async with serve(without_fetch) as server:
        assert (await refused_upgrade(server.port, "/match/a")).status == 404
        reply = await http_exchange(server.port, b"GET /match/a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.status == 404
    async with serve(make_app(probe, route_by_path=False)) as server:
        # /<ns>/<name> is App.fetch's now: it refuses a request without a token, and
        # has no such route.
        assert (await refused_upgrade(server.port, "/match/a")).status == 403
        refusal = await refused_upgrade(server.port, "/match/a?token=t-ann")
        assert (refusal.status, refusal.body) == (404, b"no such route\n")
        async with open_client(server, "/api/join?room=a&token=t-ann") as ws:
            assert (await ask(ws, "who")).startswith("match ")  # its own routes still work
    assert probe.constructed == 1


# -- App.authorize annotates -------------------------------------------------------------------


async def authorize(request: Request) -> Response | Request:
    user = verified_user(request)
    return Response(status=401, body="token?\n") if user is None else request.with_context(user)


async def test_authorize_hands_the_verified_user_to_a_name_routed_object(
    autojump_clock: trio.abc.Clock,
) -> None:
    probe = Probe()
    app = App({"match": Match}, env=probe, authorize=authorize)
    async with serve(app) as server:
        assert (await refused_upgrade(server.port, "/match/m")).status == 401
        async with open_client(server, "/match/m?token=t-bob") as ws:
            assert (await ask(ws, "who")).endswith(" bob bob,players")
        reply = await http_exchange(
            server.port, b"GET /match/m HTTP/1.1\r\nHost: x\r\nAuthorization: t-ann\r\n\r\n"
        )
    assert reply.body.endswith(b" sees ann")


async def test_authorize_must_keep_the_websocket(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async def swaps(request: Request) -> Request:
        return Request(method=request.method, url=request.url, headers=request.headers)

    async with serve(App({"match": Match}, env=Probe(), authorize=swaps)) as server:
        assert (await refused_upgrade(server.port, "/match/m")).status == 500
    assert "does not carry the request's WebSocket" in caplog.text


# -- the API pieces --------------------------------------------------------------------------


def test_with_headers_and_with_context_copy_the_request() -> None:
    original = Request(
        method="GET", url="/x", headers=[("authorization", "t"), ("x-a", "1"), ("X-User", "z")]
    )
    copy = original.with_headers({"X-User": "ann", "x-b": "2"}, remove=["Authorization"])
    assert copy.headers == (("x-a", "1"), ("x-user", "ann"), ("x-b", "2"))
    assert original.header("authorization") == "t"  # the original is unchanged
    user = User("ann")
    annotated = copy.with_context(user)
    assert annotated.context is user
    assert copy.context is None
    assert annotated.with_headers({"x-c": "3"}).context is user
    with pytest.raises(ValueError, match="header name"):
        original.with_headers({"bad name": "v"})
    with pytest.raises(TypeError, match="not a str"):
        original.with_headers(remove="authorization")


def test_app_hooks_take_request_or_request_and_context() -> None:
    async def three(request: Request, ctx: AppContext, extra: object) -> Response:
        raise AssertionError

    with pytest.raises(TypeError, match=r"App\.fetch: .* needs 3 positional arguments"):
        App({"match": Match}, fetch=three)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"App\.authorize: an App hook must be an async callable"):
        App({"match": Match}, authorize="nope")  # type: ignore[arg-type]


# -- through trio_hibernate.testing --------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
async def test_forwarding_under_the_testing_toolkit(
    strict: bool, autojump_clock: trio.abc.Clock
) -> None:
    probe = Probe()
    async with open_test_host(make_app(probe), strict=strict) as host:
        unique = host.host.get_namespace("match").new_unique_id()
        target = f"/api/match/{unique.hex}/ws"
        with pytest.raises(UpgradeRejected) as refused:
            await host.connect_to(target)
        assert refused.value.status == 403
        ws = await host.connect_to(target, headers={"authorization": "t-ann"})
        with trio.fail_after(WAIT_SECONDS):
            await ws.send("who")
            assert await ws.receive() == f"match {unique.hex} ann ann,players"
            with host.assert_not_woken():
                await ws.send("ping")
                assert await ws.receive() == "pong"
            assert await ws.close(4000, "bye") == (4000, "bye")
            await probe.wait_for(lambda: bool(probe.of(Closed)))
        assert probe.of(Closed) == [Closed("match", unique.hex, "ann", 4000, "bye", True)]
        if strict:  # every event built a new instance, of the right object
            assert {c.object_id for c in probe.of(Constructed)} == {unique.hex}
            assert len(probe.of(Constructed)) >= 3


class _AcceptThenAbort(DurableObject):
    async def fetch(self, request: Request) -> Response:
        ws = request.websocket
        assert ws is not None
        self.ctx.accept_websocket(ws)
        self.ctx.abort("after accepting")
        raise AssertionError("not reached")


async def _forward_to_aborter(request: Request, ctx: AppContext) -> Response:
    return await ctx.get_namespace("b").get_by_name("one").fetch(request)


@pytest.mark.parametrize("target", ["/b/one", "/elsewhere"])
async def test_an_object_reset_after_accepting_answers_500(
    target: str, autojump_clock: trio.abc.Clock
) -> None:
    """An object that accepts the upgrade, then is reset (ctx.abort) before the 101:
    the client gets the 500 a reset fetch gets, not a dropped connection (found by
    review: the reset's socket shutdown aborted the connection mid-exchange)."""
    app = App({"b": _AcceptThenAbort}, fetch=_forward_to_aborter)
    async with open_test_host(app) as host:
        with trio.fail_after(30):
            with pytest.raises(UpgradeRejected) as refused:
                await host.connect_to(target)
            assert refused.value.status == 500
            assert host.statistics().websockets == 0
