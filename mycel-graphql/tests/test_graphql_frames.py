"""Subscription frames written by the hub straight into the connection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import websockets

import mycel
from mycel.testing import App, eventually, free_port, running
from mycel_graphql import GraphqlConnector
from mycel_graphql._frames import FrameSubscriber
from testsupport.graphql import RawSocket, raw_socket

CONFIG = """
connector "mem" {{ type = "memory" }}
connector "gql" {{
  type       = "graphql"
  port       = {port}
  queue_size = {queue_size}
  subscriptions {{ keepalive = "0s" }}
}}
flow "prices" {{
  from {{ connector = "mem"  operation = "prices" }}
  to   {{ connector = "gql"  operation = "Subscription.priceChanged" }}
}}
"""


def subscribe(op_id: str) -> dict[str, Any]:
    return {
        "id": op_id,
        "type": "subscribe",
        "payload": {"query": "subscription { priceChanged }"},
    }


def next_message(op_id: str, value: Any) -> dict[str, Any]:
    return {
        "id": op_id,
        "type": "next",
        "payload": {"data": {"priceChanged": value}},
    }


@asynccontextmanager
async def served(queue_size: int = 100) -> AsyncIterator[tuple[App, str]]:
    port = free_port()
    async with running(CONFIG.format(port=port, queue_size=queue_size)) as app:
        yield app, f"ws://127.0.0.1:{port}/graphql"


def hub_of(app: App) -> mycel.Hub:
    return app.connector("gql").services.hub


async def test_frames_are_encoded_once_per_document_and_id() -> None:
    async with (
        served() as (app, url),
        raw_socket(url) as first,
        raw_socket(url) as second,
        raw_socket(url) as third,
    ):
        for ws, op_id in ((first, "a"), (second, "a"), (third, "b")):
            assert await ws.init() == {"type": "connection_ack"}
            await ws.send(subscribe(op_id))
        hub = hub_of(app)
        await eventually(lambda: hub.topic_size("priceChanged") == 3)
        assert {type(sub) for sub in hub.subscribers} == {FrameSubscriber}

        message = mycel.Message("priceChanged", {}, {"n": 1})
        assert hub.publish("priceChanged", message) == 3
        assert await first.recv() == next_message("a", {"n": 1})
        assert await second.recv() == next_message("a", {"n": 1})
        assert await third.recv() == next_message("b", {"n": 1})
        frames = sorted(v for k, v in message.cache.items() if isinstance(k, tuple))
        assert frames == [
            b'{"id":"a","type":"next","payload":{"data":{"priceChanged":{"n":1}}}}',
            b'{"id":"b","type":"next","payload":{"data":{"priceChanged":{"n":1}}}}',
        ]


async def test_legacy_frames_are_data_messages() -> None:
    async with served() as (app, url), raw_socket(url, "graphql-ws") as ws:
        await ws.send({"type": "connection_init"})
        assert await ws.recv() == {"type": "connection_ack"}
        await ws.send({**subscribe("7"), "type": "start"})
        await eventually(lambda: hub_of(app).topic_size("priceChanged") == 1)
        await app.publish("mem", "prices", {"n": 2})
        assert await ws.recv() == {
            "id": "7",
            "type": "data",
            "payload": {"data": {"priceChanged": {"n": 2}}},
        }


async def test_subscription_ended_by_the_server_completes_after_its_events() -> None:
    async with served() as (app, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send(subscribe("p"))
        hub = hub_of(app)
        await eventually(lambda: hub.topic_size("priceChanged") == 1)
        (sub,) = hub.subscribers

        # The event written just before the end reaches the client first.
        hub.publish("priceChanged", mycel.Message("priceChanged", {}, {"n": 1}))
        sub.close("removed by the operator")
        assert await ws.recv() == next_message("p", {"n": 1})
        assert await ws.recv() == {"id": "p", "type": "complete"}

        # The connection stays, and the id is free again.
        await ws.send(subscribe("p"))
        await eventually(lambda: hub.topic_size("priceChanged") == 1)
        await app.publish("mem", "prices", {"n": 2})
        assert await ws.recv() == next_message("p", {"n": 2})


async def test_hub_shutdown_closes_the_connection_with_1001() -> None:
    async with served() as (app, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send(subscribe("p"))
        hub = hub_of(app)
        await eventually(lambda: hub.topic_size("priceChanged") == 1)
        hub.close_all("server shutting down")
        assert await ws.closed() == (1001, "Going away")


async def test_client_that_falls_behind_gets_its_backlog_in_order() -> None:
    big = "z" * 200_000
    async with (
        served(queue_size=1000) as (app, url),
        websockets.connect(
            url,
            subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
            max_queue=1,
            compression=None,
            max_size=None,
        ) as connection,
    ):
        ws = RawSocket(connection)
        await ws.init()
        await ws.send(subscribe("p"))
        hub = hub_of(app)
        await eventually(lambda: hub.topic_size("priceChanged") == 1)
        (sub,) = hub.subscribers

        # Published while the client reads nothing: frames queue up behind
        # the full transport buffer instead of going into it.
        sent = 0
        while sub.depth == 0:
            assert sent < 400, "the frames never queued"
            await app.publish("mem", "prices", {"n": sent, "big": big})
            await app.memory("mem").drain()
            sent += 1
        for n in range(sent, sent + 5):
            await app.publish("mem", "prices", {"n": n, "big": big})
        await app.memory("mem").drain()
        assert sub.depth > 0

        # Reading again, it gets every event, in order, and the queue empties.
        for n in range(sent + 5):
            message = await ws.recv()
            assert message["payload"]["data"]["priceChanged"]["n"] == n
        assert not sub.closed
        await eventually(lambda: sub.depth == 0)


async def test_other_asgi_servers_get_frames_through_send() -> None:
    async with served() as (app, _):
        gql = app.connector("gql")
        assert isinstance(gql, GraphqlConnector) and gql.server is not None
        # uvicorn's own WebSocket protocol: no way in below ASGI.
        plain = mycel.AsgiServer(gql.server.app, "127.0.0.1", 0, interface="asgi3")
        await plain.start()
        try:
            url = f"ws://127.0.0.1:{plain.port}/graphql"
            async with raw_socket(url) as ws:
                await ws.init()
                await ws.send(subscribe("p"))
                hub = hub_of(app)
                await eventually(lambda: hub.topic_size("priceChanged") == 1)
                (sub,) = hub.subscribers
                assert type(sub) is mycel.Subscriber
                await app.publish("mem", "prices", {"n": 1})
                await app.publish("mem", "prices", {"n": 2})
                assert await ws.recv() == next_message("p", {"n": 1})
                assert await ws.recv() == next_message("p", {"n": 2})
                sub.close("removed by the operator")
                assert await ws.recv() == {"id": "p", "type": "complete"}
        finally:
            await plain.stop()


async def test_keepalive_ticks_in_both_protocols() -> None:
    port = free_port()
    config = CONFIG.format(port=port, queue_size=100).replace(
        'keepalive = "0s"', 'keepalive = "50ms"'
    )
    url = f"ws://127.0.0.1:{port}/graphql"
    async with (
        running(config),
        raw_socket(url) as modern,
        raw_socket(url, "graphql-ws") as legacy,
    ):
        assert await modern.init() == {"type": "connection_ack"}
        await legacy.send({"type": "connection_init"})
        assert await legacy.recv() == {"type": "connection_ack"}
        for _ in range(3):
            assert await modern.recv(timeout=2) == {"type": "ping"}
            assert await legacy.recv(timeout=2) == {"type": "ka"}
