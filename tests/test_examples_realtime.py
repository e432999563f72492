"""examples/realtime with ``mycel run``: each of its flows driven once.

The example runs against the real services: RabbitMQ (in this test's own
exchange), a private PostgreSQL cluster with logical replication, the
search server of testsupport/search.py, and, for ``external_gql``, a
second Mycel runtime started here whose GraphQL server publishes
``priceChanged``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from _e2e import GqlClient, MycelProcess, ws_connect, ws_frame, ws_join

from mycel.testing import App, eventually, free_port, running
from testsupport.base import ROOT
from testsupport.sse import open_stream

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "realtime"

OTHER_SERVICE = """
connector "mem" {{ type = "memory" }}
connector "gql" {{
  type = "graphql"
  port = {port}
  subscriptions {{
    enabled = true
    path    = "/subscriptions"
  }}
}}
flow "prices" {{
  from {{ connector = "mem"  operation = "prices" }}
  to   {{ connector = "gql"  operation = "Subscription.priceChanged" }}
}}
"""


FLOWS = (
    "broadcast_price", "send_to_room", "send_user_notification",
    "handle_ws_message", "push_updates", "push_order_update", "sync_to_elastic",
    "notify_on_insert", "audit_updates", "order_updates", "react_to_price_change",
    "live_order_updates", "stream_notifications",
)  # fmt: skip


def flow_blocks(text: str) -> dict[str, str]:
    """``flow "NAME" { ... }`` blocks of HCL text (braces matched)."""
    blocks = {}
    for match in re.finditer(r'^flow "([a-z_]+)" \{', text, re.MULTILINE):
        depth, end = 0, match.start()
        for end in range(match.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        blocks[match.group(1)] = text[match.start() : end + 1]
    return blocks


def test_example_keeps_the_spec_flows_as_written() -> None:
    flows = flow_blocks((EXAMPLE / "flows.mycel").read_text())
    assert sorted(flows) == sorted(FLOWS)
    spec = ROOT.parent / "shared" / "SPEC.md"
    if spec.exists():  # the specification sits beside the repository here
        text = spec.read_text()
        sections = text[text.index("## 4.") : text.index("## 8.")]
        written = flow_blocks(sections)
        assert len(written) == 9
        for name, block in written.items():
            assert flows[name] == block


async def rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await (await conn.execute(sql)).fetchall()


async def test_every_flow_of_the_example_runs(
    tmp_path: Path, pg_logical_database: str, rabbit: Any, search_url: str
) -> None:
    dsn = pg_logical_database
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute((EXAMPLE / "schema.sql").read_text())
        await conn.execute("INSERT INTO users VALUES (7, 'ann')")
    ports = {name: free_port() for name in ("ws", "sse", "gql", "admin", "other")}
    environ = {
        "PG_REPLICATION_URL": dsn,
        "DATABASE_URL": dsn,
        "AUDIT_DATABASE_URL": dsn,
        "RABBITMQ_URL": rabbit.url,
        "RABBITMQ_EXCHANGE": rabbit.exchange,
        "RABBITMQ_QUEUE_PREFIX": rabbit.queue_prefix,
        "ELASTICSEARCH_URL": search_url,
        "EXTERNAL_GQL_ENDPOINT": f"http://127.0.0.1:{ports['other']}/graphql",
        "WS_PORT": str(ports["ws"]),
        "SSE_PORT": str(ports["sse"]),
        "GQL_PORT": str(ports["gql"]),
        "ADMIN_PORT": str(ports["admin"]),
    }
    folder = tmp_path / "realtime"
    shutil.copytree(EXAMPLE, folder)
    created = await rabbit.listen(rabbit.queue("test-created"), "order.created")
    async with running(OTHER_SERVICE.format(port=ports["other"])) as other:
        mycel = MycelProcess(
            folder, (folder / "flows.mycel").read_text(), environ,
            admin_port=ports["admin"],
        )  # fmt: skip
        # MycelProcess writes main.mycel: keep the two files as they are.
        (folder / "flows.mycel").unlink()
        await mycel.start()
        try:
            await drive(mycel, other, ports, rabbit, dsn, search_url, created)
        finally:
            code = await mycel.stop()
            assert code == 0, mycel.text


async def drive(
    mycel: MycelProcess,
    other: App,
    ports: dict[str, int],
    rabbit: Any,
    dsn: str,
    search_url: str,
    created: asyncio.Queue[Any],
) -> None:
    ws = f"ws://127.0.0.1:{ports['ws']}/ws"
    sse = f"http://127.0.0.1:{ports['sse']}/events"
    plain = await ws_connect(ws)
    room7 = await ws_join(ws, "7")
    notified = await ws_join(f"{ws}?user_id=1", "notifications")
    orders = await ws_join(f"{ws}?user_id=1", "orders")
    sockets = (plain, room7, notified, orders)
    gql = await GqlClient.open(
        f"ws://127.0.0.1:{ports['gql']}/graphql/ws", {"userId": "1"}
    )
    sub = await gql.subscribe("subscription { orderUpdated }")
    await mycel.wait_metric("mycel_subscribers", 1, connector="gql")
    async with (
        open_stream(sse) as everything,
        open_stream(f"{sse}/orders?user_id=1") as order_stream,
        open_stream(f"{sse}/notifications?user_id=1") as notification_stream,
    ):
        streams = (everything, order_stream, notification_stream)

        # broadcast_price: every WebSocket client.
        await rabbit.publish("price.updated", {"sku": "A-1", "price": 12})
        for client in sockets:
            assert await ws_frame(client) == {
                "type": "message", "data": {"sku": "A-1", "price": 12},
            }  # fmt: skip

        # push_updates: every SSE client.
        await rabbit.publish("system.updates", {"version": 2})
        for stream in streams:
            assert json.loads((await stream.event()).data) == {"version": 2}

        # send_to_room.
        await rabbit.publish("messages", {"channel_id": 7, "text": "hi"})
        assert await ws_frame(room7) == {
            "type": "message", "room": "7", "data": {"channel_id": 7, "text": "hi"},
        }  # fmt: skip

        # send_user_notification and stream_notifications: user 2's first.
        await rabbit.publish("notifications", {"user_id": 2, "text": "not yours"})
        await rabbit.publish("notifications", {"user_id": 1, "text": "yours"})
        assert await ws_frame(notified) == {
            "type": "message", "room": "notifications",
            "data": {"user_id": 1, "text": "yours"},
        }  # fmt: skip
        event = await notification_stream.event()
        assert json.loads(event.data) == {"user_id": 1, "text": "yours"}

        # push_order_update and order_updates.
        await rabbit.publish(
            "order.updated", {"order_id": 9, "status": "late", "user_id": 2}
        )
        await rabbit.publish(
            "order.updated", {"order_id": 5, "status": "shipped", "user_id": 1}
        )
        event = await order_stream.event()
        assert json.loads(event.data) == {
            "order_id": 5, "status": "shipped", "user_id": 1,
        }  # fmt: skip
        assert await gql.recv() == {
            "id": sub, "type": "next",
            "payload": {"data": {"orderUpdated": {"id": 5, "status": "shipped"}}},
        }  # fmt: skip

    # handle_ws_message.
    await plain.send(
        json.dumps({"type": "message", "data": {"channel_id": 3, "text": "from ws"}})
    )

    async def stored() -> bool:
        return await rows(dsn, "SELECT channel_id, text FROM messages") == [
            (3, "from ws")
        ]

    await eventually(stored, timeout=15)

    # The CDC flows: sync_to_elastic, notify_on_insert, live_order_updates.
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO orders (id, user_id, status) VALUES (2, 2, 'new')"
        )
        await conn.execute(
            "INSERT INTO orders (id, user_id, status) VALUES (1, 1, 'new')"
        )
        await conn.execute("UPDATE users SET name = 'anna' WHERE id = 7")
    frame = await ws_frame(orders)
    assert frame["room"] == "orders"
    assert {k: frame["data"][k] for k in ("order_id", "status", "operation")} == {
        "order_id": 1, "status": "new", "operation": "INSERT",
    }  # fmt: skip
    messages = [await asyncio.wait_for(created.get(), 15) for _ in range(2)]
    assert [json.loads(m.body)["id"] for m in messages] == [2, 1]

    # audit_updates.
    async def audited() -> bool:
        return await rows(
            dsn, "SELECT id, name, _operation, _table FROM audit_log"
        ) == [(7, "anna", "UPDATE", "users")]

    await eventually(audited, timeout=15)

    async def indexed() -> bool:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{search_url}/orders/_doc/1")
        return (
            response.status_code == 200
            and response.json()["_source"]["status"] == "new"
        )

    await eventually(indexed, timeout=15)

    # react_to_price_change: the other service's priceChanged, into the table.
    hub = other.connector("gql").services.hub
    await eventually(lambda: hub.topic_size("priceChanged") == 1, timeout=20)
    await other.publish("mem", "prices", {"sku": "A-1", "cents": 1299})

    async def priced() -> bool:
        return await rows(dsn, "SELECT sku, cents FROM price_updates") == [
            ("A-1", 1299)
        ]

    await eventually(priced, timeout=15)
    for client in sockets:
        await client.close()
    await gql.close()
