"""End-to-end scenarios: real services, ``mycel run`` as a separate process.

1. CDC -> WebSocket room with a per-user filter (``live_order_updates``).
2. RabbitMQ -> SSE stream with a per-user filter (``stream_notifications``).
3. RabbitMQ -> GraphQL subscription with a transform and a filter.
4. CDC -> RabbitMQ -> WebSocket (two flows chained through the broker).

Each client must receive exactly the events of its user, in order, and
nothing else.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _e2e import GqlClient, MycelProcess, ws_frame, ws_join

from mycel.testing import free_port
from testsupport.sse import open_stream

pytestmark = pytest.mark.slow

USERS = 5
PER_USER = 4

LIVE_ORDER_UPDATES = """
flow "live_order_updates" {
  from {
    connector = "cdc"
    operation = "orders.*"
  }
  transform {
    order_id = "input.id"
    status = "input.status"
    updated_at = "input.updated_at"
    operation = "input._operation"
  }
  to {
    connector = "ws"
    operation = "room:orders"
    filter = "input.user_id == context.params.user_id"
  }
}
"""

STREAM_NOTIFICATIONS = """
flow "stream_notifications" {
  from {
    connector = "rabbit"
    operation = "notifications"
  }
  to {
    connector = "sse"
    operation = "stream:notifications"
    filter = "input.user_id == context.params.user_id"
  }
}
"""

ORDER_UPDATES = """
flow "order_updates" {
  from { connector = "rabbit"  operation = "order.updated" }
  transform {
    id     = "input.order_id"
    status = "input.status"
  }
  to {
    connector = "gql"
    operation = "Subscription.orderUpdated"
    filter    = "input.user_id == context.connection_params.userId"
  }
}
"""

CHAINED = """
flow "notify_on_insert" {
  from { connector = "cdc"     operation = "orders.INSERT" }
  to   { connector = "rabbit"  target = "order.created" }
}
flow "push_created" {
  from { connector = "rabbit"  operation = "order.created" }
  transform {
    order_id = "input.id"
    status   = "input.status"
  }
  to {
    connector = "ws"
    operation = "room:orders"
    filter    = "input.user_id == context.params.user_id"
  }
}
"""

ORDERS_TABLE = (
    "CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL, "
    "status text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
    # A DELETE then carries the whole old row (status, user_id), not only
    # the key: the filter and the transform need them.
    "ALTER TABLE orders REPLICA IDENTITY FULL",
)


def cdc_block(slot: str) -> str:
    return f"""
connector "cdc" {{
  type              = "cdc"
  driver            = "postgres"
  connection_string = env("PG_REPLICATION_URL")
  tables            = ["orders"]
  slot_name         = "{slot}"
  publication       = "{slot}"
  status_interval   = "1s"
}}
"""


def ws_block(port: int) -> str:
    return f'connector "ws" {{\n  type = "websocket"\n  port = {port}\n}}\n'


def service_block(admin: int) -> str:
    return f'service {{\n  name = "e2e"\n  admin_port = {admin}\n}}\n'


async def execute(dsn: str, *statements: str, params: Any = None) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement, params)


def slot_name() -> str:
    return f"e2e_{uuid.uuid4().hex[:10]}"


async def test_cdc_to_websocket_room_per_user(
    tmp_path: Path, pg_logical_database: str
) -> None:
    dsn = pg_logical_database
    await execute(dsn, *ORDERS_TABLE)
    port, admin = free_port(), free_port()
    config = (
        service_block(admin) + cdc_block(slot_name()) + ws_block(port)
        + LIVE_ORDER_UPDATES
    )  # fmt: skip
    mycel = MycelProcess(tmp_path / "run", config, {"PG_REPLICATION_URL": dsn})
    await mycel.start()
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        clients = {
            user: [await ws_join(f"{url}?user_id={user}", "orders") for _ in range(2)]
            for user in range(1, USERS + 1)
        }
        stranger = await ws_join(f"{url}?user_id=999", "orders")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for n in range(PER_USER):
                for user in range(1, USERS + 1):
                    order = user * 100 + n
                    await conn.execute(
                        "INSERT INTO orders (id, user_id, status) VALUES (%s, %s, 'new')",
                        (order, user),
                    )
            await conn.execute("UPDATE orders SET status = 'paid' WHERE id = 100")
            await conn.execute("DELETE FROM orders WHERE id = 201")
        for user, sockets in clients.items():
            expected = [(user * 100 + n, "new", "INSERT") for n in range(PER_USER)]
            if user == 1:
                expected.append((100, "paid", "UPDATE"))
            if user == 2:
                expected.append((201, "new", "DELETE"))
            for client in sockets:
                got = []
                for _ in expected:
                    frame = await ws_frame(client)
                    assert frame["type"] == "message" and frame["room"] == "orders"
                    data = frame["data"]
                    assert isinstance(data["updated_at"], str)
                    got.append((data["order_id"], data["status"], data["operation"]))
                assert got == expected
        # The stranger (user 999) got nothing: every change was delivered
        # to the others before, and nothing is waiting for it.
        with pytest.raises(TimeoutError):
            await ws_frame(stranger, timeout=0.5)
        for sockets in clients.values():
            for client in sockets:
                await client.close()
        await stranger.close()
    finally:
        code = await mycel.stop()
        print(mycel.text)
        assert code == 0, mycel.text


async def test_rabbit_to_sse_stream_per_user(tmp_path: Path, rabbit: Any) -> None:
    port = free_port()
    config = (
        rabbit.connector("rabbit")
        + f'connector "sse" {{\n  type = "sse"\n  port = {port}\n}}\n'
        + STREAM_NOTIFICATIONS
    )
    mycel = MycelProcess(tmp_path / "run", config)
    await mycel.start()
    try:
        base = f"http://127.0.0.1:{port}/events/notifications"
        async with (
            open_stream(f"{base}?user_id=1") as one,
            open_stream(f"{base}?user_id=2") as two,
            open_stream(f"{base}?user_id=2") as two_again,
            open_stream(f"{base}?user_id=3") as three,
        ):
            for n in range(PER_USER):
                for user in (1, 2, 4):
                    await rabbit.publish(
                        "notifications", {"user_id": user, "n": n, "text": "héllo"}
                    )
            # A number in the event matches the text parameter, and text too.
            await rabbit.publish("notifications", {"user_id": "1", "n": 99})
            for stream, user in ((one, 1), (two, 2), (two_again, 2)):
                expected = [
                    {"user_id": user, "n": n, "text": "héllo"} for n in range(PER_USER)
                ]
                if user == 1:
                    expected.append({"user_id": "1", "n": 99})
                got = [json.loads((await stream.event()).data) for _ in expected]
                assert got == expected
            # User 3 got nothing but heartbeats.
            with pytest.raises(TimeoutError):
                await three.event(timeout=0.5)
    finally:
        code = await mycel.stop()
        print(mycel.text)
        assert code == 0, mycel.text


async def test_rabbit_to_graphql_subscription_transform_filter(
    tmp_path: Path, rabbit: Any
) -> None:
    port, admin = free_port(), free_port()
    config = (
        service_block(admin)
        + rabbit.connector("rabbit")
        + f"""
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
"""
        + ORDER_UPDATES
    )
    mycel = MycelProcess(tmp_path / "run", config, admin_port=admin)
    await mycel.start()
    try:
        url = f"ws://127.0.0.1:{port}/graphql/ws"
        alice = await GqlClient.open(url, {"userId": "42"})
        bob = await GqlClient.open(url, {"userId": 7})
        subs = {
            "alice": (alice, await alice.subscribe("subscription { orderUpdated }")),
            "bob": (bob, await bob.subscribe("subscription { orderUpdated }")),
        }
        await mycel.wait_metric("mycel_subscribers", 2, connector="gql")
        for n in range(PER_USER):
            for user in (42, 7, 5):
                await rabbit.publish(
                    "order.updated",
                    {"order_id": f"o{user}-{n}", "status": "shipped", "user_id": user},
                )
        for name, user in (("alice", 42), ("bob", 7)):
            client, ident = subs[name]
            for n in range(PER_USER):
                message = await client.recv()
                assert message == {
                    "id": ident,
                    "type": "next",
                    "payload": {
                        "data": {
                            "orderUpdated": {"id": f"o{user}-{n}", "status": "shipped"}
                        }
                    },
                }
        await alice.close()
        await bob.close()
    finally:
        code = await mycel.stop()
        print(mycel.text)
        assert code == 0, mycel.text


async def test_cdc_to_rabbit_to_websocket(
    tmp_path: Path, pg_logical_database: str, rabbit: Any
) -> None:
    dsn = pg_logical_database
    await execute(dsn, *ORDERS_TABLE)
    port = free_port()
    config = (
        cdc_block(slot_name()) + rabbit.connector("rabbit") + ws_block(port) + CHAINED
    )
    mycel = MycelProcess(tmp_path / "run", config, {"PG_REPLICATION_URL": dsn})
    await mycel.start()
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        one = await ws_join(f"{url}?user_id=1", "orders")
        two = await ws_join(f"{url}?user_id=2", "orders")
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for n in range(PER_USER):
                for user in (1, 2, 3):
                    await conn.execute(
                        "INSERT INTO orders (id, user_id, status) VALUES (%s, %s, 'new')",
                        (user * 100 + n, user),
                    )
            # Updates are not INSERTs: notify_on_insert does not take them.
            await conn.execute("UPDATE orders SET status = 'paid'")
        for client, user in ((one, 1), (two, 2)):
            got = [(await ws_frame(client))["data"] for _ in range(PER_USER)]
            assert got == [
                {"order_id": user * 100 + n, "status": "new"} for n in range(PER_USER)
            ]
        with pytest.raises(TimeoutError):
            await ws_frame(one, timeout=0.5)
        await one.close()
        await two.close()
    finally:
        code = await mycel.stop()
        print(mycel.text)
        assert code == 0, mycel.text
