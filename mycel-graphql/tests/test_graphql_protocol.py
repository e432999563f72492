"""The server's graphql-transport-ws and graphql-ws protocols, by hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import websockets

import mycel_graphql._protocol
from mycel.testing import App, eventually, free_port, running
from mycel_graphql import GraphqlConnector
from testsupport.graphql import RawSocket, raw_socket

FLOWS = """
connector "mem" {{ type = "memory" }}
connector "gql" {{
  type = "graphql"
  port = {port}
  {extra}
  subscriptions {{
    path = "/graphql/ws"
    connection_init_timeout = "{init_timeout}"
    keepalive = "{keepalive}"
  }}
}}
flow "orders" {{
  from {{ connector = "mem"  operation = "orders" }}
  to {{
    connector = "gql"
    operation = "Subscription.orderUpdated"
    filter    = "input.user_id == context.connection_params.userId"
  }}
}}
flow "prices" {{
  from {{ connector = "mem"  operation = "prices" }}
  to {{ connector = "gql"  operation = "Subscription.priceChanged" }}
}}
"""


@asynccontextmanager
async def server(
    extra: str = "", init_timeout: str = "3s", keepalive: str = "0s"
) -> AsyncIterator[tuple[App, str]]:
    port = free_port()
    config = FLOWS.format(
        port=port, extra=extra, init_timeout=init_timeout, keepalive=keepalive
    )
    async with running(config) as app:
        yield app, f"ws://127.0.0.1:{port}/graphql/ws"


async def subscribers(app: App, field: str, count: int) -> None:
    hub = app.connector("gql").services.hub
    await eventually(lambda: hub.topic_size(field) == count)


SUBSCRIBE_PRICES: dict[str, Any] = {
    "id": "p1",
    "type": "subscribe",
    "payload": {"query": "subscription { priceChanged }"},
}


async def test_subscription_receives_published_events_in_order() -> None:
    async with server() as (app, url), raw_socket(url) as ws:
        assert await ws.init() == {"type": "connection_ack"}
        await ws.send(SUBSCRIBE_PRICES)
        await subscribers(app, "priceChanged", 1)
        for price in (1, 2, 3):
            await app.publish("mem", "prices", {"sku": "a", "price": price})
        for price in (1, 2, 3):
            assert await ws.recv() == {
                "id": "p1",
                "type": "next",
                "payload": {"data": {"priceChanged": {"sku": "a", "price": price}}},
            }


async def test_filter_on_connection_params_reaches_only_that_user() -> None:
    query = {"query": "subscription { orderUpdated }"}
    async with server() as (app, url), raw_socket(url) as alice, raw_socket(url) as bob:
        await alice.init({"userId": "alice"})
        await bob.init({"userId": "bob"})
        await alice.send({"id": "a", "type": "subscribe", "payload": query})
        await bob.send({"id": "b", "type": "subscribe", "payload": query})
        await subscribers(app, "orderUpdated", 2)
        await app.publish("mem", "orders", {"user_id": "bob", "n": 1})
        await app.publish("mem", "orders", {"user_id": "alice", "n": 2})
        assert await alice.recv() == {
            "id": "a",
            "type": "next",
            "payload": {"data": {"orderUpdated": {"user_id": "alice", "n": 2}}},
        }
        assert await bob.recv() == {
            "id": "b",
            "type": "next",
            "payload": {"data": {"orderUpdated": {"user_id": "bob", "n": 1}}},
        }


async def test_alias_is_the_response_key() -> None:
    async with server() as (app, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send(
            {
                "id": "1",
                "type": "subscribe",
                "payload": {
                    "query": "subscription Named { p: priceChanged }",
                    "operationName": "Named",
                },
            }
        )
        await subscribers(app, "priceChanged", 1)
        await app.publish("mem", "prices", 7)
        assert await ws.recv() == {
            "id": "1",
            "type": "next",
            "payload": {"data": {"p": 7}},
        }


async def test_ping_gets_pong() -> None:
    async with server() as (_, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send({"type": "ping"})
        assert await ws.recv() == {"type": "pong"}


async def test_keepalive_pings_the_client() -> None:
    async with server(keepalive="50ms") as (_, url), raw_socket(url) as ws:
        await ws.init()
        assert await ws.recv() == {"type": "ping"}


async def test_complete_stops_the_subscription() -> None:
    async with server() as (app, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send(SUBSCRIBE_PRICES)
        await subscribers(app, "priceChanged", 1)
        await ws.send({"id": "p1", "type": "complete"})
        await subscribers(app, "priceChanged", 0)
        await ws.send({"type": "ping"})
        assert await ws.recv() == {"type": "pong"}


async def test_invalid_document_gets_error_message_and_keeps_connection() -> None:
    async with server() as (_, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send(
            {
                "id": "1",
                "type": "subscribe",
                "payload": {"query": "subscription { nothingHere }"},
            }
        )
        assert await ws.recv() == {
            "id": "1",
            "type": "error",
            "payload": [
                {
                    "message": "Cannot query field 'nothingHere' on type "
                    "'Subscription'.",
                    "locations": [{"line": 1, "column": 16}],
                }
            ],
        }
        await ws.send({"type": "ping"})
        assert await ws.recv() == {"type": "pong"}


async def test_query_over_the_socket_answers_once_then_completes() -> None:
    async with server() as (_, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send(
            {"id": "q", "type": "subscribe", "payload": {"query": "{ _mycel }"}}
        )
        assert await ws.recv() == {
            "id": "q",
            "type": "next",
            "payload": {"data": {"_mycel": True}},
        }
        assert await ws.recv() == {"id": "q", "type": "complete"}


async def test_close_4408_without_connection_init() -> None:
    async with server(init_timeout="100ms") as (_, url), raw_socket(url) as ws:
        assert await ws.closed() == (4408, "Connection initialisation timeout")


async def test_close_4429_on_second_connection_init() -> None:
    async with server() as (_, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send({"type": "connection_init"})
        assert await ws.closed() == (4429, "Too many initialisation requests")


async def test_close_4401_on_subscribe_before_ack() -> None:
    async with server() as (_, url), raw_socket(url) as ws:
        await ws.send(SUBSCRIBE_PRICES)
        assert await ws.closed() == (4401, "Unauthorized")


async def test_close_4409_on_duplicate_id() -> None:
    async with server() as (app, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send(SUBSCRIBE_PRICES)
        await ws.send(SUBSCRIBE_PRICES)
        assert await ws.closed() == (4409, "Subscriber for p1 already exists")
        await subscribers(app, "priceChanged", 0)


async def test_close_4400_on_bad_json() -> None:
    async with server() as (_, url), raw_socket(url) as ws:
        await ws.send("{not json")
        code, reason = await ws.closed()
        assert code == 4400
        assert reason.startswith("Invalid message received: ")


async def test_close_4400_on_unknown_message_type() -> None:
    async with server() as (_, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send({"type": "next", "id": "1", "payload": {}})
        assert await ws.closed() == (4400, "Unexpected message of type next received")


async def test_close_4400_on_subscribe_without_query() -> None:
    async with server() as (_, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send({"id": "1", "type": "subscribe", "payload": {"variables": {}}})
        assert await ws.closed() == (
            4400,
            "\"subscribe\" message payload expects the 'query' property to be a string",
        )


async def test_close_4400_on_subscribe_without_id() -> None:
    async with server() as (_, url), raw_socket(url) as ws:
        await ws.init()
        await ws.send({"type": "subscribe", "payload": {"query": "{ _mycel }"}})
        assert await ws.closed() == (
            4400,
            "\"subscribe\" message requires a non-empty 'id' property",
        )


async def test_close_4403_when_the_connection_context_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stands in for an auth block: only connections with a token get in.
    original = mycel_graphql._protocol.connection_context

    def guarded(params: Any, headers: Any, *args: Any, **kw: Any) -> Any:
        if params.get("token") != "ok":
            return None
        return original(params, headers, *args, **kw)

    monkeypatch.setattr(mycel_graphql._protocol, "connection_context", guarded)
    async with server() as (_, url):
        async with raw_socket(url) as ws:
            assert await ws.init({"token": "ok"}) == {"type": "connection_ack"}
        async with raw_socket(url) as ws:
            await ws.send({"type": "connection_init", "payload": {"token": "no"}})
            assert await ws.closed() == (4403, "Forbidden")
        async with raw_socket(url, "graphql-ws") as ws:
            await ws.send({"type": "connection_init", "payload": {}})
            assert await ws.recv() == {
                "type": "connection_error",
                "payload": {"message": "Forbidden"},
            }
            assert await ws.closed() == (1011, "Forbidden")


async def test_close_4406_without_a_known_subprotocol() -> None:
    async with server() as (_, url), raw_socket(url, protocol=None) as ws:
        assert await ws.closed() == (4406, "Subprotocol not acceptable")


async def test_graphql_transport_ws_is_preferred_when_both_are_offered() -> None:
    async with (
        server() as (_, url),
        websockets.connect(
            url,
            subprotocols=["graphql-ws", "graphql-transport-ws"],  # type: ignore[list-item]
        ) as ws,
    ):
        assert ws.subprotocol == "graphql-transport-ws"


@pytest.mark.parametrize(("limit", "most"), [("", 12), ("unsent_limit = null", 20)])
async def test_slow_subscriber_is_dropped_without_slowing_others(
    limit: str, most: int
) -> None:
    big = "x" * 256_000
    port = free_port()
    config = FLOWS.format(
        port=port,
        extra=f"queue_size = 5\n {limit}",
        init_timeout="3s",
        keepalive="0s",
    )
    url = f"ws://127.0.0.1:{port}/graphql/ws"
    # The slow client reads nothing: its socket and buffers fill up.
    async with (
        running(config) as app,
        websockets.connect(
            url,
            subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
            max_queue=1,
            compression=None,
        ) as slow_connection,
        raw_socket(url) as fast,
    ):
        slow = RawSocket(slow_connection)
        assert await slow.init() == {"type": "connection_ack"}
        await fast.init()
        await slow.send(SUBSCRIBE_PRICES)
        await subscribers(app, "priceChanged", 1)
        await fast.send(SUBSCRIBE_PRICES)
        await subscribers(app, "priceChanged", 2)
        hub = app.connector("gql").services.hub
        slow_sub, fast_sub = sorted(hub.subscribers, key=lambda s: s.id)

        # The fast client gets every event while the slow one falls behind.
        sent = 0
        while not slow_sub.closed:
            assert sent < 400, "the slow subscriber was never dropped"
            await app.publish("mem", "prices", {"n": sent, "big": big})
            message = await fast.recv()
            assert message["payload"]["data"]["priceChanged"]["n"] == sent
            sent += 1
        # What the kernel takes for it before the server's buffer and the
        # queue fill: unsent_limit (64 KB) by default, all of send_buffer
        # (256 KB, doubled) without it: 11 and 16 of these events here.
        assert sent <= most
        assert slow_sub.close_reason == "slow consumer: send queue full (5 messages)"
        assert not fast_sub.closed
        await app.publish("mem", "prices", {"n": sent, "big": ""})
        assert (await fast.recv())["payload"]["data"]["priceChanged"]["n"] == sent

        # Once it reads again, it finds the close frame after its backlog.
        while True:
            try:
                await asyncio.wait_for(slow_connection.recv(), 5.0)
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None
                assert (closed.rcvd.code, closed.rcvd.reason) == (
                    1008,
                    "slow consumer: send queue full (5 messages)",
                )
                break


async def test_peer_that_reads_nothing_is_aborted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mycel_graphql._protocol, "DROP_TIMEOUT", 0.2)
    big = "y" * 256_000
    port = free_port()
    config = FLOWS.format(
        port=port, extra="queue_size = 2", init_timeout="3s", keepalive="0s"
    )
    url = f"ws://127.0.0.1:{port}/graphql/ws"
    async with (
        running(config) as app,
        websockets.connect(
            url,
            subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
            max_queue=1,
            compression=None,
            close_timeout=0.5,
        ) as stuck_connection,
    ):
        stuck = RawSocket(stuck_connection)
        await stuck.init()
        await stuck.send(SUBSCRIBE_PRICES)
        await subscribers(app, "priceChanged", 1)
        gql = app.connector("gql")
        assert isinstance(gql, GraphqlConnector) and gql.server is not None
        (sub,) = app.connector("gql").services.hub.subscribers

        # Publish until the hub drops it; it never reads, so it is aborted.
        sent = 0
        while not sub.closed:
            assert sent < 400, "the stuck subscriber was never dropped"
            await app.publish("mem", "prices", {"n": sent, "big": big})
            await app.memory("mem").drain()
            sent += 1
        server = gql.server
        await eventually(lambda: not server.connections)


async def test_legacy_protocol_by_hand() -> None:
    async with (
        server(keepalive="30s") as (app, url),
        raw_socket(url, "graphql-ws") as ws,
    ):
        await ws.send({"type": "connection_init", "payload": {"userId": "u"}})
        assert await ws.recv() == {"type": "connection_ack"}
        assert await ws.recv() == {"type": "ka"}
        await ws.send(
            {
                "id": "1",
                "type": "start",
                "payload": {"query": "subscription { orderUpdated }"},
            }
        )
        await subscribers(app, "orderUpdated", 1)
        await app.publish("mem", "orders", {"user_id": "u", "n": 1})
        assert await ws.recv() == {
            "id": "1",
            "type": "data",
            "payload": {"data": {"orderUpdated": {"user_id": "u", "n": 1}}},
        }
        await ws.send({"id": "1", "type": "stop"})
        await subscribers(app, "orderUpdated", 0)
        await ws.send({"type": "connection_terminate"})
        assert await ws.closed() == (1000, "terminated")


async def test_legacy_protocol_validation_errors_come_as_data_then_complete() -> None:
    async with server() as (_, url), raw_socket(url, "graphql-ws") as ws:
        await ws.send({"type": "connection_init"})
        assert await ws.recv() == {"type": "connection_ack"}
        await ws.send(
            {"id": "9", "type": "start", "payload": {"query": "subscription {"}}
        )
        message = await ws.recv()
        assert message["type"] == "data"
        assert message["payload"]["errors"][0]["message"] == (
            "Syntax Error: Expected Name, found <EOF>."
        )
        assert await ws.recv() == {"id": "9", "type": "complete"}


async def test_legacy_start_before_init_is_an_error() -> None:
    async with server() as (_, url), raw_socket(url, "graphql-ws") as ws:
        await ws.send({"id": "1", "type": "start", "payload": {"query": "{ _mycel }"}})
        assert await ws.recv() == {
            "type": "error",
            "id": "1",
            "payload": {
                "message": "connection not initialised: send connection_init first"
            },
        }


async def test_shutdown_closes_sockets_with_1001() -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/graphql/ws"
    async with raw_socket_after_start(port) as (ws, stop):
        await stop()
        assert await ws.closed() == (1001, "Going away")
    del url


@asynccontextmanager
async def raw_socket_after_start(port: int) -> AsyncIterator[Any]:
    config = FLOWS.format(port=port, extra="", init_timeout="3s", keepalive="0s")
    context = running(config)
    app = await context.__aenter__()
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        stopped = True
        await context.__aexit__(None, None, None)

    try:
        async with raw_socket(f"ws://127.0.0.1:{port}/graphql/ws") as ws:
            await ws.init()
            await ws.send(SUBSCRIBE_PRICES)
            await subscribers(app, "priceChanged", 1)
            yield ws, stop
    finally:
        if not stopped:
            await context.__aexit__(None, None, None)
