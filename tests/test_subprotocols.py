"""Subprotocols (``Sec-WebSocket-Protocol``): what the client offers, what the object
chooses (``ctx.accept_websocket(..., protocol=...)`` or, as on Cloudflare, the header
of the 101), what the 101 says, and ``ws.protocol`` across hibernation.

The client is the ``websockets`` library's (it checks that the server chose one of the
protocols it offered, as browsers do), over in-memory streams.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest
from helpers import Probe, WebsocketsClient, in_memory_host
from trio.testing import MockClock

from trio_hibernate import (
    App,
    AppContext,
    DurableObject,
    ObjectContext,
    ObjectState,
    Request,
    Response,
    WebSocket,
)
from trio_hibernate._websocket import record_of


@attrs.frozen
class Refused:
    """The object's fetch caught this error message."""

    message: str


class Chooser(DurableObject):
    """Accepts with the subprotocol the query asks for: ``?accept=P`` passes
    ``protocol=P`` to ``accept_websocket``, ``?header=P`` sets ``Sec-WebSocket-Protocol:
    P`` on the 101 (both: both). ``?catch`` reports a ValueError to the probe and
    answers 400 instead of letting it out. Every message is answered with
    ``ws.protocol`` and the offer the object saw."""

    def __init__(self, ctx: ObjectContext, env: Probe) -> None:
        super().__init__(ctx, env)
        env.constructing(self)

    async def fetch(self, request: Request) -> Response:
        ws = request.websocket
        assert ws is not None
        query = request.query_params
        try:
            self.ctx.accept_websocket(
                ws, [",".join(request.websocket_protocols)], protocol=query.get("accept")
            )
            header = query.get("header")
            headers = {} if header is None else {"Sec-WebSocket-Protocol": header}
            return Response(status=101, websocket=ws, headers=headers)
        except ValueError as exc:
            if "catch" not in query:
                raise
            self.env.record(Refused(str(exc)))
            return Response(status=400, body=str(exc))

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.send(f"{ws.protocol!r} {self.ctx.get_tags(ws)[0]!r}")


def chooser_host(probe: Probe, **options: Any) -> Any:
    return in_memory_host(App({"c": Chooser}, env=probe), **options)


def chosen_header(client: WebsocketsClient) -> list[str]:
    assert client.response is not None
    return client.response.headers.get_all("Sec-WebSocket-Protocol")


@pytest.mark.parametrize(
    ("offer", "query", "chosen"),
    [
        (["chat.v2", "chat.v1"], "?accept=chat.v1", "chat.v1"),  # any offered one
        (["chat.v2", "chat.v1"], "?header=chat.v2", "chat.v2"),  # Cloudflare's way
        (["chat.v2"], "?accept=chat.v2&header=chat.v2", "chat.v2"),  # both, agreeing
        (["chat.v2", "chat.v1"], "", None),  # offered, none chosen: no header
        ([], "", None),  # nothing offered, nothing chosen
    ],
)
async def test_the_negotiation(
    autojump_clock: MockClock, offer: list[str], query: str, chosen: str | None
) -> None:
    probe = Probe()
    async with chooser_host(probe) as (_host, connect):
        client = await WebsocketsClient.connect(
            connect(), f"/c/a{query}", subprotocols=offer or None, deflate=False
        )
        assert client.accepted, client.response
        assert chosen_header(client) == ([] if chosen is None else [chosen])  # once, or not at all
        assert client.protocol.subprotocol == chosen
        await client.send("which?")
        assert await client.recv() == f"{chosen or ''!r} {','.join(offer)!r}"
        await client.close()


@pytest.mark.parametrize(
    ("offer", "query", "message"),
    [
        (
            ["chat.v1"],
            "?accept=chat.v9",
            "did not offer the subprotocol 'chat.v9' (offered ['chat.v1']",
        ),
        ([], "?accept=chat.v1", "did not offer the subprotocol 'chat.v1' (offered none"),
        (["chat.v1"], "?header=chat.v9", "did not offer the subprotocol 'chat.v9'"),
        (
            ["chat.v1", "chat.v2"],
            "?accept=chat.v1&header=chat.v2",
            "accepted with protocol='chat.v1', but the 101's Sec-WebSocket-Protocol says 'chat.v2'",
        ),
    ],
)
async def test_a_protocol_the_client_did_not_offer_is_an_error_to_the_object(
    autojump_clock: MockClock, offer: list[str], query: str, message: str
) -> None:
    """The object's call raises a ValueError that says what the client offered; the
    protocol is never sent (a browser would fail the connection)."""
    probe = Probe()
    async with chooser_host(probe) as (host, connect):
        client = await WebsocketsClient.connect(
            connect(), f"/c/a{query}&catch", subprotocols=offer or None, deflate=False
        )
        assert client.response is not None
        assert client.response.status_code == 400
        assert chosen_header(client) == []
        [refused] = probe.of(Refused)
        assert message in refused.message, refused.message
        assert host.object_statistics("c", "a").websockets == 0  # nothing was accepted


async def test_an_uncaught_protocol_error_refuses_the_upgrade_with_500(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()
    async with chooser_host(probe) as (_host, connect):
        client = await WebsocketsClient.connect(
            connect(), "/c/a?accept=nope", subprotocols=["chat.v1"], deflate=False
        )
    assert client.response is not None
    assert client.response.status_code == 500
    assert "did not offer the subprotocol 'nope'" in caplog.text


async def test_a_101_made_before_an_accept_that_disagrees_is_refused(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The Response cannot see a protocol chosen after it was made: the server checks
    again before writing the 101, answers 500 and lets the socket go."""

    class Late(DurableObject):
        async def fetch(self, request: Request) -> Response:
            ws = request.websocket
            assert ws is not None
            response = Response(
                status=101, websocket=ws, headers={"sec-websocket-protocol": "chat.v1"}
            )
            self.ctx.accept_websocket(ws, protocol="chat.v2")
            return response

    async with in_memory_host(App({"late": Late})) as (host, connect):
        with caplog.at_level(logging.ERROR):
            client = await WebsocketsClient.connect(
                connect(), "/late/a", subprotocols=["chat.v1", "chat.v2"], deflate=False
            )
        assert client.response is not None
        assert client.response.status_code == 500
        assert "accepted with protocol='chat.v2'" in caplog.text
        assert host.object_statistics("late", "a").websockets == 0


async def test_ws_protocol_survives_hibernation_and_is_shared(autojump_clock: MockClock) -> None:
    probe = Probe()
    async with chooser_host(probe) as (host, connect):
        clients = [
            await WebsocketsClient.connect(
                connect(), "/c/a?accept=chat.v1", subprotocols=["json", "chat.v1"], deflate=False
            )
            for _ in range(2)
        ]
        assert await host.hibernate("c", "a")
        assert host.object_statistics("c", "a").state is ObjectState.HIBERNATED
        for client in clients:
            await client.send("which?")
            assert await client.recv() == "'chat.v1' 'json,chat.v1'"
        assert probe.constructed == 2  # woken again to answer
        [instance] = [ref() for ref in probe.instances if ref() is not None]
        assert isinstance(instance, Chooser)
        first, second = (record_of(ws) for ws in instance.ctx.get_websockets())
        assert first is not None
        assert second is not None
        # One interned string for every socket that chose it.
        assert first.protocol == "chat.v1"
        assert first.protocol is second.protocol
        for client in clients:
            await client.close()


def test_the_offer_as_the_object_reads_it() -> None:
    request = Request(
        method="GET",
        url="/c/a",
        headers=[
            ("sec-websocket-protocol", "chat.v2, chat.v1"),
            ("x-other", "a, b"),
            ("sec-websocket-protocol", " json ,, "),
        ],
    )
    assert request.websocket_protocols == ("chat.v2", "chat.v1", "json")
    assert Request(method="GET", url="/").websocket_protocols == ()


async def test_bad_arguments(autojump_clock: MockClock) -> None:
    class Strict(DurableObject):
        async def fetch(self, request: Request) -> Response:
            ws = request.websocket
            assert ws is not None
            assert ws.protocol == ""  # not accepted yet
            with pytest.raises(TypeError, match="a subprotocol is a str, not bytes"):
                self.ctx.accept_websocket(ws, protocol=b"chat.v1")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="chooses one subprotocol"):
                Response(
                    status=101,
                    websocket=ws,
                    headers=[("sec-websocket-protocol", "chat.v1")] * 2,
                )
            self.ctx.accept_websocket(ws, protocol="chat.v1")
            assert ws.protocol == "chat.v1"
            return Response(status=101, websocket=ws)

    async with in_memory_host(App({"s": Strict})) as (_host, connect):
        client = await WebsocketsClient.connect(
            connect(), "/s/a", subprotocols=["chat.v1"], deflate=False
        )
        assert client.accepted
        assert client.protocol.subprotocol == "chat.v1"
        await client.close()


async def test_through_a_stub(autojump_clock: MockClock) -> None:
    """The Worker pattern: ``App.fetch`` forwards the upgrade with ``stub.fetch``; the
    object that accepts it chooses the protocol, and the 101 it returns names it."""

    async def worker(request: Request, ctx: AppContext) -> Response:
        stub = ctx.get_namespace("c").get_by_name("forwarded")
        return await stub.fetch(request)

    probe = Probe()
    app = App({"c": Chooser}, env=probe, fetch=worker, route_by_path=False)
    async with in_memory_host(app) as (_host, connect):
        client = await WebsocketsClient.connect(
            connect(), "/api/join?header=chat.v1", subprotocols=["chat.v1"], deflate=False
        )
        assert client.accepted, client.response
        assert chosen_header(client) == ["chat.v1"]
        await client.send("which?")
        assert await client.recv() == "'chat.v1' 'chat.v1'"
        await client.close()
