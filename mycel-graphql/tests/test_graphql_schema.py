"""Schema files, typed payloads, the HTTP endpoint and the IDE page."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

import mycel
from mycel.testing import App, eventually, free_port, load_test_config, running
from testsupport.graphql import raw_socket

SDL = """
enum Status { PAID SHIPPED }
type Order { id: ID!  status: Status!  total: Float  items: [String!] }
type Subscription {
  orderUpdated(minTotal: Float): Order
  unused: String
}
"""

CONFIG = """
connector "mem" {{ type = "memory" }}
connector "gql" {{
  type   = "graphql"
  port   = {port}
  schema = "schema.graphql"
}}
flow "orders" {{
  from {{ connector = "mem"  operation = "orders" }}
  retry {{ attempts = 1 }}
  to {{
    connector = "gql"
    operation = "Subscription.orderUpdated"
    filter    = "input.total >= context.args.minTotal"
  }}
}}
"""


@asynccontextmanager
async def typed_server(
    tmp_path: Path, sdl: str = SDL
) -> AsyncIterator[tuple[App, int]]:
    (tmp_path / "schema.graphql").write_text(sdl, encoding="utf-8")
    port = free_port()
    config = load_test_config(CONFIG.format(port=port))
    config.base_dir = tmp_path
    async with running(config) as app:
        yield app, port


async def test_selection_and_arguments_of_a_typed_field(tmp_path: Path) -> None:
    query = "subscription($m: Float) { orderUpdated(minTotal: $m) { id status } }"
    async with typed_server(tmp_path) as (app, port):
        url = f"ws://127.0.0.1:{port}/graphql"
        async with raw_socket(url) as ws:
            await ws.init()
            await ws.send(
                {
                    "id": "1",
                    "type": "subscribe",
                    "payload": {"query": query, "variables": {"m": 10}},
                }
            )
            hub = app.connector("gql").services.hub
            await eventually(lambda: hub.topic_size("orderUpdated") == 1)
            await app.publish(
                "mem", "orders", {"id": 1, "status": "PAID", "total": 5.0}
            )
            await app.publish(
                "mem", "orders", {"id": 2, "status": "SHIPPED", "total": 12.5}
            )
            assert await ws.recv() == {
                "id": "1",
                "type": "next",
                "payload": {"data": {"orderUpdated": {"id": "2", "status": "SHIPPED"}}},
            }


async def dead_letters(app: App) -> list[str]:
    """Why the flows gave up on events, once the memory source is idle."""
    memory = app.memory("mem")
    await memory.drain()
    return [reason for _, _, reason in memory.dead_letters]


async def test_payload_not_matching_the_schema_fails_the_flow_not_the_stream(
    tmp_path: Path,
) -> None:
    async with typed_server(tmp_path) as (app, port):
        url = f"ws://127.0.0.1:{port}/graphql"
        async with raw_socket(url) as ws:
            await ws.init()
            await ws.send(
                {
                    "id": "1",
                    "type": "subscribe",
                    "payload": {
                        "query": "subscription { orderUpdated(minTotal: 0) { id } }"
                    },
                }
            )
            hub = app.connector("gql").services.hub
            await eventually(lambda: hub.topic_size("orderUpdated") == 1)
            await app.publish("mem", "orders", {"id": 1, "status": "LOST", "total": 20})
            assert await dead_letters(app) == [
                "flow 'orders': to 'gql' failed after 1 try: payload does not match "
                "the schema: orderUpdated.status: Enum 'Status' cannot represent "
                "value: 'LOST'"
            ]
            await app.publish("mem", "orders", {"id": 3, "status": "PAID", "total": 20})
            assert await ws.recv() == {
                "id": "1",
                "type": "next",
                "payload": {"data": {"orderUpdated": {"id": "3"}}},
            }


async def test_missing_non_null_field_is_reported_with_its_path(
    tmp_path: Path,
) -> None:
    async with typed_server(tmp_path) as (app, _):
        await app.publish("mem", "orders", {"id": 1, "status": "PAID", "items": [None]})
        assert await dead_letters(app) == [
            "flow 'orders': to 'gql' failed after 1 try: payload does not match the "
            "schema: orderUpdated.items[0]: null where String! is declared"
        ]
        await app.publish("mem", "orders", {"status": "PAID"})
        assert (await dead_letters(app))[1] == (
            "flow 'orders': to 'gql' failed after 1 try: payload does not match the "
            "schema: orderUpdated.id: null where ID! is declared"
        )


async def test_schema_without_the_flows_field_stops_start_up(tmp_path: Path) -> None:
    sdl = "type Subscription { other: String }"
    with pytest.raises(mycel.ConnectorError) as caught:
        async with typed_server(tmp_path, sdl):
            pass
    assert str(caught.value) == (
        f"schema file {str(tmp_path / 'schema.graphql')!r} declares no "
        "Subscription field 'orderUpdated'; the flows publish to it"
    )


async def test_unbound_schema_fields_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mycel.graphql"):
        async with typed_server(tmp_path):
            pass
    assert [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "mycel.graphql"
    ] == [
        (
            "WARNING",
            "connector 'gql': no flow publishes to Subscription field(s) unused; "
            "their subscribers will get nothing",
        )
    ]


async def test_http_query_and_introspection(tmp_path: Path) -> None:
    async with typed_server(tmp_path) as (_, port), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{port}/graphql"
        answer = await http.post(url, json={"query": "{ _mycel }"})
        assert (answer.status_code, answer.json()) == (200, {"data": {"_mycel": True}})
        answer = await http.get(
            url,
            params={"query": '{ __type(name: "Subscription") { fields { name } } }'},
        )
        assert answer.json() == {
            "data": {
                "__type": {"fields": [{"name": "orderUpdated"}, {"name": "unused"}]}
            }
        }
        answer = await http.post(url, json={"query": "subscription { unused }"})
        assert (answer.status_code, answer.json()) == (
            400,
            {
                "errors": [
                    {"message": "subscriptions are served over WebSocket on /graphql"}
                ]
            },
        )
        answer = await http.post(url, content=b"{")
        assert answer.status_code == 400
        assert answer.json()["errors"][0]["message"].startswith(
            "the body is not valid JSON: "
        )


async def test_playground_page_points_at_the_websocket_path() -> None:
    port = free_port()
    config = f"""
    connector "mem" {{ type = "memory" }}
    connector "gql" {{
      type = "graphql"
      port = {port}
      subscriptions {{ path = "/graphql/ws" }}
    }}
    flow "f" {{
      from {{ connector = "mem" operation = "x" }}
      to {{ connector = "gql" operation = "Subscription.x" }}
    }}
    """
    async with running(config), httpx.AsyncClient() as http:
        page = await http.get(
            f"http://127.0.0.1:{port}/graphql", headers={"accept": "text/html"}
        )
        assert page.status_code == 200
        assert "GraphiQL" in page.text
        assert 'u.pathname = "/graphql/ws"' in page.text
