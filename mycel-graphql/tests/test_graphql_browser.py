"""A subscription from headless Chromium's own WebSocket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mycel.testing import eventually, free_port, running

CONFIG = """
connector "mem" {{ type = "memory" }}
connector "gql" {{
  type = "graphql"
  port = {port}
  subscriptions {{ path = "/graphql/ws" }}
}}
flow "orders" {{
  from {{ connector = "mem"  operation = "orders" }}
  to {{
    connector = "gql"
    operation = "Subscription.orderUpdated"
    filter    = "input.user_id == context.connection_params.userId"
  }}
}}
"""

SUBSCRIBE = """
(url) => new Promise((resolve, reject) => {
  const socket = new WebSocket(url, "graphql-transport-ws");
  socket.onopen = () => socket.send(JSON.stringify(
    {type: "connection_init", payload: {userId: "7"}}));
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "connection_ack") {
      socket.send(JSON.stringify({id: "1", type: "subscribe",
        payload: {query: "subscription { orderUpdated }"}}));
      window.subscribed = true;
    } else if (message.type === "next") {
      resolve({protocol: socket.protocol, message});
      socket.close(1000);
    }
  };
  socket.onerror = () => reject(new Error("websocket error"));
})
"""


@pytest.mark.browser
async def test_browser_websocket_gets_its_users_orders(page: Any) -> None:
    port = free_port()
    async with running(CONFIG.format(port=port)) as app:
        await page.goto(f"http://127.0.0.1:{port}/graphql?query=%7B_mycel%7D")
        answer = asyncio.ensure_future(
            page.evaluate(SUBSCRIBE, f"ws://127.0.0.1:{port}/graphql/ws")
        )
        hub = app.connector("gql").services.hub
        await eventually(lambda: hub.topic_size("orderUpdated") == 1)
        await app.publish("mem", "orders", {"user_id": 8, "n": 1})
        await app.publish("mem", "orders", {"user_id": 7, "n": 2})
        assert await asyncio.wait_for(answer, 10) == {
            "protocol": "graphql-transport-ws",
            "message": {
                "id": "1",
                "type": "next",
                "payload": {"data": {"orderUpdated": {"user_id": 7, "n": 2}}},
            },
        }
