"""Reference Node.js clients against the server, both subprotocols."""

from __future__ import annotations

from typing import Any

from mycel.testing import App, eventually, free_port, running

SPEC_CONFIG = """
connector "rabbit" {{ type = "memory" }}
connector "gql" {{
  type = "graphql"
  port = {port}
  subscriptions {{
    enabled   = true
    transport = "websocket"
    path      = "/graphql/ws"
    keepalive = "30s"
  }}
}}
flow "order_updates" {{
  from {{ connector = "rabbit"  operation = "order.updated" }}
  transform {{
    id     = "input.order_id"
    status = "input.status"
  }}
  to {{
    connector = "gql"
    operation = "Subscription.orderUpdated"
    filter    = "input.user_id == context.connection_params.userId"
  }}
}}
"""


async def subscribers(app: App, count: int) -> None:
    hub = app.connector("gql").services.hub
    await eventually(lambda: hub.topic_size("orderUpdated") == count)


async def publish_orders(app: App) -> None:
    for order_id, user in ((1, "bob"), (2, "alice"), (3, "alice"), (4, "bob")):
        await app.publish(
            "rabbit",
            "order.updated",
            {"order_id": order_id, "status": f"s{order_id}", "user_id": user},
        )


async def test_graphql_ws_reference_client_gets_only_its_users_orders(
    graphql_js_client: Any,
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/graphql/ws"
    query = "subscription { orderUpdated }"
    async with running(SPEC_CONFIG.format(port=port)) as app:
        alice_args = {
            "url": url,
            "query": query,
            "count": 2,
            "connectionParams": {"userId": "alice"},
        }
        bob_args = {**alice_args, "connectionParams": {"userId": "bob"}}
        async with (
            graphql_js_client("subscribe.mjs", alice_args) as alice,
            graphql_js_client("subscribe.mjs", bob_args) as bob,
        ):
            assert await alice.line() == {"event": "connected"}
            assert await bob.line() == {"event": "connected"}
            await subscribers(app, 2)
            await publish_orders(app)
            for client, ids in ((alice, (2, 3)), (bob, (1, 4))):
                for order_id in ids:
                    assert await client.line() == {
                        "event": "next",
                        "payload": {
                            "data": {
                                "orderUpdated": {
                                    "id": order_id,
                                    "status": f"s{order_id}",
                                }
                            }
                        },
                    }
                # The client disposes itself after two events: a normal close.
                assert await client.line() == {
                    "event": "closed",
                    "code": 1000,
                    "reason": "Normal Closure",
                }
            await subscribers(app, 0)


async def test_graphql_ws_reference_client_sees_validation_errors(
    graphql_js_client: Any,
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/graphql/ws"
    async with running(SPEC_CONFIG.format(port=port)) as app:
        args = {"url": url, "query": "subscription { orderUpdated { id } }", "count": 1}
        async with graphql_js_client("subscribe.mjs", args) as client:
            assert await client.line() == {"event": "connected"}
            assert await client.line() == {
                "event": "error",
                "payload": [
                    {
                        "message": "Field 'orderUpdated' must not have a selection "
                        "since type 'JSON' has no subfields.",
                        "locations": [{"line": 1, "column": 29}],
                    }
                ],
            }
        assert app.connector("gql").services.hub.topic_size("orderUpdated") == 0


async def test_legacy_graphql_ws_subprotocol_over_raw_ws(
    graphql_js_client: Any,
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/graphql/ws"
    async with running(SPEC_CONFIG.format(port=port)) as app:
        args = {
            "url": url,
            "query": "subscription { orderUpdated }",
            "count": 2,
            "connectionParams": {"userId": "alice"},
        }
        async with graphql_js_client("legacy.mjs", args) as client:
            assert await client.line() == {"event": "open", "protocol": "graphql-ws"}
            assert await client.line() == {"type": "connection_ack"}
            assert await client.line() == {"type": "ka"}
            await subscribers(app, 1)
            await publish_orders(app)
            for order_id in (2, 3):
                assert await client.line() == {
                    "id": "1",
                    "type": "data",
                    "payload": {
                        "data": {
                            "orderUpdated": {"id": order_id, "status": f"s{order_id}"}
                        }
                    },
                }
            assert await client.line() == {"event": "closed", "code": 1000}
            assert await client.wait() == 0
        await subscribers(app, 0)
