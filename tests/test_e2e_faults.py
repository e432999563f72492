"""Faults mid-stream: SIGKILL of ``mycel run``, broker and database restarts.

Every test ends with an exact count: each source event reached the sink
that persists (a PostgreSQL table, a RabbitMQ queue) at least once. The
duplicates (at-least-once allows them) are printed: run with ``-s`` to see
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _e2e import MycelProcess, ws_frame, ws_join
from test_e2e_scenarios import (
    CHAINED,
    LIVE_ORDER_UPDATES,
    ORDERS_TABLE,
    STREAM_NOTIFICATIONS,
    cdc_block,
    execute,
    slot_name,
    ws_block,
)

from mycel.testing import eventually, free_port
from testsupport.postgres import (
    LogicalCluster,
    PostgresUnavailable,
    start_logical_cluster,
)
from testsupport.rabbit import broker_stopped
from testsupport.sse import open_stream

pytestmark = pytest.mark.slow

ARCHIVE_ORDERS = """
connector "db" {
  type              = "database"
  driver            = "postgres"
  connection_string = env("PG_REPLICATION_URL")
  batch_size        = 200
}
flow "archive_orders" {
  from { connector = "cdc"  operation = "orders.INSERT" }
  transform {
    order_id = "input.id"
    user_id  = "input.user_id"
  }
  to { connector = "db"  target = "order_log" }
}
"""

ORDER_LOG = (
    "CREATE TABLE order_log (seq bigserial PRIMARY KEY, order_id int, user_id int)"
)

ARCHIVE_NOTIFICATIONS = """
flow "archive_notifications" {
  from { connector = "rabbit"  operation = "notifications" }
  to   { connector = "rabbit"  target = "archived.notifications" }
}
"""


AUDIT_ORDERS = """
connector "db" {
  type              = "database"
  driver            = "postgres"
  connection_string = env("PG_REPLICATION_URL")
}
flow "audit_orders" {
  from { connector = "cdc"  operation = "orders.INSERT" }
  to   { connector = "db"   target = "INSERT order_audit" }
}
"""

ORDER_AUDIT = (
    "CREATE TABLE order_audit (seq bigserial PRIMARY KEY, id int, user_id int, "
    "status text, updated_at timestamptz, _operation text)"
)


async def count_log(dsn: str) -> Counter[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute("SELECT order_id FROM order_log")
        return Counter(row[0] for row in await cursor.fetchall())


async def insert_orders(dsn: str, ids: range, batch: int = 50) -> None:
    """INSERT the orders, ``batch`` per transaction, user = id % 10."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for start in range(ids.start, ids.stop, batch):
            chunk = range(start, min(start + batch, ids.stop))
            async with conn.transaction(), conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO orders (id, user_id, status) VALUES (%s, %s, 'new')",
                    [(i, i % 10) for i in chunk],
                )


def report(name: str, counts: Counter[Any], sent: int) -> None:
    duplicates = sum(counts.values()) - len(counts)
    print(
        f"\n[{name}] sent {sent}, delivered {sum(counts.values())}, "
        f"distinct {len(counts)}, lost {sent - len(counts)}, duplicates {duplicates}"
    )


async def wait_until(check: Callable[[], Any], timeout: float = 60.0) -> None:
    await eventually(check, timeout=timeout, interval=0.1)


async def test_sigkill_cdc_to_websocket_loses_nothing(
    tmp_path: Path, pg_logical_database: str
) -> None:
    """Scenario 1, with the orders also archived in PostgreSQL."""
    dsn = pg_logical_database
    await execute(dsn, *ORDERS_TABLE, ORDER_LOG)
    total = 1500
    port = free_port()
    config = cdc_block(slot_name()) + ws_block(port) + ARCHIVE_ORDERS
    config += LIVE_ORDER_UPDATES
    environ = {"PG_REPLICATION_URL": dsn}
    mycel = MycelProcess(tmp_path / "run", config, environ)
    await mycel.start()
    writer = asyncio.create_task(insert_orders(dsn, range(total)))
    try:
        client = await ws_join(f"ws://127.0.0.1:{port}/ws?user_id=3", "orders")
        # Kill it once it is well into the stream.
        first = await ws_frame(client)
        assert first["data"]["order_id"] % 10 == 3

        async def some_archived() -> bool:
            return len(await count_log(dsn)) >= 150

        await wait_until(some_archived)
        await mycel.kill()
        before = len(await count_log(dsn))
        await writer  # the rest is written while mycel is down
        await mycel.start()

        async def all_archived() -> bool:
            return len(await count_log(dsn)) == total

        await wait_until(all_archived, 90)
        counts = await count_log(dsn)
        report("SIGKILL cdc->ws+db", counts, total)
        print(f"archived before the kill: {before}")
        assert set(counts) == set(range(total))
        # A new WebSocket client gets live changes again.
        client = await ws_join(f"ws://127.0.0.1:{port}/ws?user_id=3", "orders")
        await execute(dsn, "UPDATE orders SET status = 'paid' WHERE id = 13")
        frame = await ws_frame(client)
        assert (frame["data"]["order_id"], frame["data"]["status"]) == (13, "paid")
        await client.close()
    finally:
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer
        await mycel.stop()


async def test_sigkill_cdc_to_database_loses_nothing_and_keeps_commit_order(
    tmp_path: Path, pg_logical_database: str
) -> None:
    """The audit_updates shape: CDC hands the database runs of changes."""
    dsn = pg_logical_database
    await execute(dsn, *ORDERS_TABLE, ORDER_AUDIT)
    total = 3000

    async def audited() -> list[int]:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cursor = await conn.execute("SELECT id FROM order_audit ORDER BY seq")
            return [row[0] for row in await cursor.fetchall()]

    async def paced() -> None:
        # 30 orders per transaction, 100 transactions over about 5 s: the
        # flow keeps up, so the kills land in the middle of the stream,
        # with time to spare for the restart between them.
        for start in range(0, total, 30):
            await insert_orders(dsn, range(start, start + 30))
            await asyncio.sleep(0.05)

    config = cdc_block(slot_name()) + AUDIT_ORDERS
    mycel = MycelProcess(tmp_path / "run", config, {"PG_REPLICATION_URL": dsn})
    await mycel.start()
    writer = asyncio.create_task(paced())
    try:
        # Kill it twice while the changes stream in.
        for share in (0.2, 0.6):

            async def under_way(share: float = share) -> bool:
                return len(set(await audited())) >= share * total

            await wait_until(under_way)
            await mycel.kill()
            assert not writer.done(), "the kill came after the last change"
            await mycel.start()
        await writer

        async def all_audited() -> bool:
            return len(set(await audited())) == total

        await wait_until(all_audited, 90)
        ids = await audited()
    finally:
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer
        await mycel.stop()
    report("SIGKILL cdc->db", Counter(ids), total)
    # Every change at least once, and each first arrived in commit order: a
    # repeat after a restart starts again from the last confirmed change.
    assert list(dict.fromkeys(ids)) == list(range(total))


async def test_sigkill_rabbit_to_sse_loses_nothing(tmp_path: Path, rabbit: Any) -> None:
    """Scenario 2, with every notification also republished to the broker."""
    total = 2000
    port = free_port()
    config = (
        rabbit.connector("rabbit")
        + f'connector "sse" {{\n  type = "sse"\n  port = {port}\n}}\n'
        + STREAM_NOTIFICATIONS
        + ARCHIVE_NOTIFICATIONS
    )
    archived = await rabbit.listen(rabbit.queue("test-archive"), "archived.#")
    counts: Counter[int] = Counter()

    async def drain() -> None:
        while True:
            message = await archived.get()
            counts[json.loads(message.body)["n"]] += 1

    drainer = asyncio.create_task(drain())
    mycel = MycelProcess(tmp_path / "run", config)
    await mycel.start()
    try:
        url = f"http://127.0.0.1:{port}/events/notifications?user_id=1"
        async with open_stream(url) as stream:
            for n in range(total // 2):
                await rabbit.publish("notifications", {"user_id": n % 10, "n": n})
            event = json.loads((await stream.event()).data)
            assert event["user_id"] == 1
            await wait_until(lambda: len(counts) >= 100)
            await mycel.kill()
        before = len(counts)
        for n in range(total // 2, total):
            await rabbit.publish("notifications", {"user_id": n % 10, "n": n})
        await mycel.start()
        async with open_stream(url) as stream:
            await rabbit.publish("notifications", {"user_id": 1, "n": total})
            # Backlog first (user 1's share of it), then the live one.
            while json.loads((await stream.event(timeout=60)).data)["n"] != total:
                pass
        await wait_until(lambda: len(counts) == total + 1, 90)
        report("SIGKILL rabbit->sse+rabbit", counts, total + 1)
        print(f"archived before the kill: {before}")
        assert set(counts) == set(range(total + 1))
    finally:
        drainer.cancel()
        await mycel.stop()


async def test_sigkill_cdc_to_rabbit_to_websocket_loses_nothing(
    tmp_path: Path, pg_logical_database: str, rabbit: Any
) -> None:
    """Scenario 4: every INSERT reaches the broker at least once."""
    dsn = pg_logical_database
    await execute(dsn, *ORDERS_TABLE)
    total = 1500
    port = free_port()
    config = (
        cdc_block(slot_name()) + rabbit.connector("rabbit") + ws_block(port) + CHAINED
    )
    created = await rabbit.listen(rabbit.queue("test-created"), "order.created")
    counts: Counter[int] = Counter()

    async def drain() -> None:
        while True:
            message = await created.get()
            counts[json.loads(message.body)["id"]] += 1

    drainer = asyncio.create_task(drain())
    mycel = MycelProcess(tmp_path / "run", config, {"PG_REPLICATION_URL": dsn})
    await mycel.start()
    writer = asyncio.create_task(insert_orders(dsn, range(total)))
    try:
        client = await ws_join(f"ws://127.0.0.1:{port}/ws?user_id=4", "orders")
        frame = await ws_frame(client, timeout=30)
        assert frame["data"]["order_id"] % 10 == 4
        await wait_until(lambda: len(counts) >= 150)
        await mycel.kill()
        before = len(counts)
        await writer
        await mycel.start()
        client = await ws_join(f"ws://127.0.0.1:{port}/ws?user_id=4", "orders")
        await wait_until(lambda: len(counts) == total, 90)
        report("SIGKILL cdc->rabbit->ws", counts, total)
        print(f"published before the kill: {before}")
        assert set(counts) == set(range(total))
        await execute(
            dsn, f"INSERT INTO orders (id, user_id, status) VALUES ({total}4, 4, 'x')"
        )
        # The WebSocket leg works again (the backlog of user 4 comes first).
        while (await ws_frame(client, timeout=60))["data"][
            "order_id"
        ] != total * 10 + 4:
            pass
        await client.close()
    finally:
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer
        drainer.cancel()
        await mycel.stop()


@pytest.mark.usefixtures("rabbitmq_ctl")
async def test_rabbitmq_restart_mid_stream(tmp_path: Path, rabbit: Any) -> None:
    """Scenario 2 across ``rabbitmqctl stop_app``/``start_app``."""
    total = 400
    port = free_port()
    config = (
        rabbit.connector("rabbit", reconnect_max_delay="2s")
        + f'connector "sse" {{\n  type = "sse"\n  port = {port}\n}}\n'
        + STREAM_NOTIFICATIONS
        + ARCHIVE_NOTIFICATIONS
    )
    archive_queue = rabbit.queue("test-archive")
    channel = await rabbit.channel()
    declared = await channel.declare_queue(archive_queue, durable=True)
    await declared.bind(rabbit.exchange, "archived.#")
    mycel = MycelProcess(tmp_path / "run", config)
    await mycel.start()
    seen: Counter[int] = Counter()
    try:
        url = f"http://127.0.0.1:{port}/events/notifications?user_id=1"
        async with open_stream(url) as stream:

            async def read(until: int) -> None:
                while True:
                    n = json.loads((await stream.event(timeout=60)).data)["n"]
                    seen[n] += 1
                    if n == until:
                        return

            for n in range(total // 2):
                await rabbit.publish("notifications", {"user_id": 1, "n": n})
            async with broker_stopped():
                pass  # stopped, and started again on the way out
            await rabbit.close()
            for n in range(total // 2, total):
                await rabbit.publish("notifications", {"user_id": 1, "n": n})
            await read(total - 1)
            # Duplicates come from redelivery of unacknowledged messages.
            await wait_until(lambda: len(seen) == total, 60)
        report("RabbitMQ restart rabbit->sse", seen, total)
        assert set(seen) == set(range(total))
        assert mycel.alive
        # The archive flow's copies, published before, during and after the
        # restart: the queue is durable and its messages persistent.
        archived = await rabbit.listen(archive_queue, "archived.#")
        await rabbit.publish("notifications", {"user_id": 1, "n": total})
        copies: Counter[int] = Counter()
        while len(copies) < total + 1:
            message = await asyncio.wait_for(archived.get(), 60)
            copies[json.loads(message.body)["n"]] += 1
        report("RabbitMQ restart rabbit->rabbit archive", copies, total + 1)
        assert set(copies) == set(range(total + 1))
    finally:
        assert await mycel.stop() == 0, mycel.text


@pytest.fixture
def private_cluster() -> Any:
    """A cluster of this test alone, so it can be restarted."""
    try:
        cluster = start_logical_cluster()
    except PostgresUnavailable as exc:
        pytest.fail(f"a private PostgreSQL cluster could not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.asynccontextmanager
async def restarted(cluster: LogicalCluster) -> AsyncIterator[None]:
    await asyncio.to_thread(cluster.stop, "fast", remove=False)
    try:
        yield
    finally:
        await asyncio.to_thread(cluster.start)


async def test_postgresql_restart_mid_stream(
    tmp_path: Path, private_cluster: LogicalCluster
) -> None:
    """Scenario 1 plus the archive, across a fast restart of the server."""
    dsn = private_cluster.dsn
    await execute(dsn, *ORDERS_TABLE, ORDER_LOG)
    total = 600
    port = free_port()
    config = cdc_block(slot_name()) + ws_block(port) + ARCHIVE_ORDERS
    config += LIVE_ORDER_UPDATES
    mycel = MycelProcess(tmp_path / "run", config, {"PG_REPLICATION_URL": dsn})
    await mycel.start()
    seen: Counter[int] = Counter()
    try:
        client = await ws_join(f"ws://127.0.0.1:{port}/ws?user_id=5", "orders")
        await insert_orders(dsn, range(total // 2))

        async def half_archived() -> bool:
            return len(await count_log(dsn)) == total // 2

        await wait_until(half_archived)
        async with restarted(private_cluster):
            pass
        await insert_orders(dsn, range(total // 2, total))

        async def all_archived() -> bool:
            return len(await count_log(dsn)) == total

        await wait_until(all_archived, 90)
        while len(seen) < total // 10:
            frame = await ws_frame(client, timeout=60)
            seen[frame["data"]["order_id"]] += 1
        counts = await count_log(dsn)
        report("PostgreSQL restart cdc->db", counts, total)
        report("PostgreSQL restart cdc->ws (user 5)", seen, total // 10)
        assert set(counts) == set(range(total))
        assert set(seen) == {i for i in range(total) if i % 10 == 5}
        assert mycel.alive
        await client.close()
    finally:
        assert await mycel.stop() == 0, mycel.text
