"""The client driver against our server and against a plain strawberry one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import strawberry
from strawberry.asgi import GraphQL
from strawberry.scalars import JSON

import mycel
from mycel.testing import App, eventually, free_port, running
from mycel_graphql import GraphqlConnector

SERVER = """
connector "mem" {{ type = "memory" }}
connector "gql" {{
  type = "graphql"
  port = {port}
  subscriptions {{ path = "/graphql/ws" }}
}}
flow "prices" {{
  from {{ connector = "mem"  operation = "prices" }}
  to {{
    connector = "gql"
    operation = "Subscription.priceChanged"
    filter    = "input.shop == context.connection_params.shop"
  }}
}}
"""

CLIENT = """
connector "db" {{ type = "memory" }}
connector "external_gql" {{
  type     = "graphql"
  driver   = "client"
  endpoint = "http://127.0.0.1:{port}/graphql"
  connection_params = {{ shop = "north" }}
  subscriptions {{
    enabled  = true
    path     = "{path}"
    protocol = "{protocol}"
  }}
  reconnect {{
    initial_delay = "50ms"
    max_delay     = "200ms"
    healthy_after = "10s"
  }}
}}
flow "react_to_price_change" {{
  from {{
    connector = "external_gql"
    operation = "Subscription.priceChanged"
    {query}
  }}
  to {{ connector = "db"  target = "price_updates" }}
}}
"""


def client_config(
    port: int, path: str = "/graphql/ws", protocol: str = "auto", query: str = ""
) -> str:
    return CLIENT.format(port=port, path=path, protocol=protocol, query=query)


async def subscribed(server: App, count: int = 1) -> None:
    hub = server.connector("gql").services.hub
    await eventually(lambda: hub.topic_size("priceChanged") == count)


def client_of(app: App) -> Any:
    connector = app.connector("external_gql")
    assert isinstance(connector, GraphqlConnector)
    return connector.client


@pytest.mark.parametrize("protocol", ["auto", "graphql-transport-ws", "graphql-ws"])
async def test_client_receives_events_of_our_server(protocol: str) -> None:
    port = free_port()
    async with (
        running(SERVER.format(port=port)) as server,
        running(client_config(port, protocol=protocol)) as client,
    ):
        updates = client.listen("db", "price_updates")
        await subscribed(server)
        await server.publish("mem", "prices", {"shop": "south", "price": 1})
        await server.publish("mem", "prices", {"shop": "north", "price": 2})
        await server.publish("mem", "prices", {"shop": "north", "price": 3})
        for price in (2, 3):
            topic, payload = await asyncio.wait_for(updates.get(), 5)
            assert (topic, payload) == (
                "price_updates",
                {"shop": "north", "price": price},
            )
        assert updates.empty()


async def test_client_keeps_one_connection_for_all_its_flows() -> None:
    port = free_port()
    config = (
        client_config(port)
        + """
flow "second" {
  from { connector = "external_gql"  operation = "Subscription.priceChanged" }
  to   { connector = "db"  target = "second" }
}
"""
    )
    async with running(SERVER.format(port=port)) as server, running(config) as client:
        first = client.listen("db", "price_updates")
        second = client.listen("db", "second")
        await subscribed(server, 2)
        gql = server.connector("gql")
        assert isinstance(gql, GraphqlConnector) and gql.server is not None
        assert len(gql.server.connections) == 1
        await server.publish("mem", "prices", {"shop": "north", "price": 5})
        assert (await asyncio.wait_for(first.get(), 5))[1] == {
            "shop": "north",
            "price": 5,
        }
        assert (await asyncio.wait_for(second.get(), 5))[1] == {
            "shop": "north",
            "price": 5,
        }


async def test_client_resubscribes_after_server_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    async with running(client_config(port)) as client:
        updates = client.listen("db", "price_updates")
        gql_client = client_of(client)
        async with running(SERVER.format(port=port)) as server:
            await subscribed(server)
            await server.publish("mem", "prices", {"shop": "north", "price": 1})
            assert (await asyncio.wait_for(updates.get(), 5))[1]["price"] == 1

        # Down: the client retries, logging each attempt at WARNING.
        with caplog.at_level(logging.WARNING, logger="mycel.graphql"):
            await eventually(
                lambda: sum(r.name == "mycel.graphql" for r in caplog.records) >= 3
            )
        attempts = [r for r in caplog.records if r.name == "mycel.graphql"]
        assert all(r.levelname == "WARNING" for r in attempts)
        assert (
            attempts[0]
            .getMessage()
            .startswith(
                "connector 'external_gql': subscriptions to "
                f"ws://127.0.0.1:{port}/graphql/ws ended ("
            )
        )
        assert "; reconnecting in " in attempts[0].getMessage()
        assert attempts[0].getMessage().endswith("(attempt 1)")
        assert attempts[2].getMessage().endswith("(attempt 3)")

        # Up again: the same flow gets events again, without a restart.
        async with running(SERVER.format(port=port)) as server:
            await subscribed(server)
            await server.publish("mem", "prices", {"shop": "north", "price": 2})
            assert (await asyncio.wait_for(updates.get(), 5))[1]["price"] == 2
        # At least the first session and the one after the restart.
        assert gql_client.connections >= 2


# A plain strawberry server: each subscription reads its own queue.
FEEDS: list[asyncio.Queue[Any]] = []


@strawberry.type
class Price:
    sku: str
    cents: int


@strawberry.type
class Query:
    hello: str = "hi"


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def price_changed(self, sku: str | None = None) -> AsyncGenerator[JSON, None]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        FEEDS.append(queue)
        while True:
            value = await queue.get()
            yield value if sku is None else {"sku": sku, **value}

    @strawberry.subscription
    async def price_object(self, sku: str) -> AsyncGenerator[Price, None]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        FEEDS.append(queue)
        while True:
            yield Price(sku=sku, cents=await queue.get())

    @strawberry.subscription
    async def price_once(self) -> AsyncGenerator[JSON, None]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        FEEDS.append(queue)
        yield await queue.get()


@asynccontextmanager
async def strawberry_server() -> AsyncIterator[int]:
    FEEDS.clear()
    schema = strawberry.Schema(query=Query, subscription=Subscription)
    server = mycel.AsgiServer(GraphQL(schema), "127.0.0.1", 0)
    await server.start()
    try:
        yield server.port
    finally:
        await server.stop()
        FEEDS.clear()


async def test_client_with_query_and_variables_against_plain_strawberry() -> None:
    query = (
        'query = "subscription($sku: String!) { priceChanged: priceObject(sku: $sku) '
        '{ sku cents } }"\n    variables = { sku = "A-1" }'
    )
    config = client_config(0, path="/graphql", query=query).replace(
        "Subscription.priceChanged", "Subscription.priceObject"
    )
    async with (
        strawberry_server() as port,
        running(config.replace("127.0.0.1:0", f"127.0.0.1:{port}")) as client,
    ):
        updates = client.listen("db", "price_updates")
        await eventually(lambda: len(FEEDS) == 1)
        await FEEDS[0].put(250)
        assert await asyncio.wait_for(updates.get(), 5) == (
            "price_updates",
            {"sku": "A-1", "cents": 250},
        )


@pytest.mark.parametrize("protocol", ["graphql-transport-ws", "graphql-ws"])
async def test_client_without_query_against_plain_strawberry(protocol: str) -> None:
    async with (
        strawberry_server() as port,
        running(client_config(port, path="/graphql", protocol=protocol)) as client,
    ):
        updates = client.listen("db", "price_updates")
        await eventually(lambda: len(FEEDS) == 1)
        await FEEDS[0].put({"sku": "B", "cents": 99})
        assert await asyncio.wait_for(updates.get(), 5) == (
            "price_updates",
            {"sku": "B", "cents": 99},
        )


async def test_completed_subscription_is_sent_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with strawberry_server() as port:
        config = client_config(port, path="/graphql").replace(
            "Subscription.priceChanged", "Subscription.priceOnce"
        )
        with caplog.at_level(logging.WARNING, logger="mycel.graphql"):
            async with running(config) as client:
                updates = client.listen("db", "price_updates")
                await eventually(lambda: len(FEEDS) == 1)
                await FEEDS[0].put({"n": 1})
                assert await asyncio.wait_for(updates.get(), 5) == (
                    "price_updates",
                    {"n": 1},
                )
                # strawberry completed it; the client subscribes again.
                await eventually(lambda: len(FEEDS) == 2)
                await FEEDS[1].put({"n": 2})
                assert await asyncio.wait_for(updates.get(), 5) == (
                    "price_updates",
                    {"n": 2},
                )
                assert client_of(client).connections == 1
    warnings = [r for r in caplog.records if r.name == "mycel.graphql"]
    assert warnings[0].levelname == "WARNING"
    message = warnings[0].getMessage()
    assert message.startswith(
        "connector 'external_gql': subscription of flow 'react_to_price_change' "
        "ended (the server completed it); subscribing again in "
    )
    assert message.endswith("s (attempt 1)")


async def test_client_headers_reach_the_servers_filter_context() -> None:
    port = free_port()
    server_config = SERVER.format(port=port).replace(
        "context.connection_params.shop", "context.headers.tenant"
    )
    config = client_config(port).replace(
        "connection_params = {",
        'headers = { tenant = "north" }\n  connection_params = {',
    )
    async with running(server_config) as server, running(config) as client:
        updates = client.listen("db", "price_updates")
        await subscribed(server)
        await server.publish("mem", "prices", {"shop": "south", "price": 1})
        await server.publish("mem", "prices", {"shop": "north", "price": 2})
        assert await asyncio.wait_for(updates.get(), 5) == (
            "price_updates",
            {"shop": "north", "price": 2},
        )
