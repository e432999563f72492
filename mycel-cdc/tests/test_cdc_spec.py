"""The specification's CDC example (section 6), run as written.

Its ``rabbit`` and ``audit_db`` connectors are the real ones: RabbitMQ on
this machine and the ``database`` connector writing into PostgreSQL.
"""

import asyncio
import json
from decimal import Decimal

from cdc_support import execute, query

from mycel.testing import eventually, running

SPEC_EXAMPLE = """
connector "cdc" {
  type              = "cdc"
  driver            = "postgres"
  connection_string = env("PG_REPLICATION_URL")
  tables            = ["orders", "products", "users"]
}
flow "notify_on_insert" {
  from { connector = "cdc"     operation = "orders.INSERT" }
  to   { connector = "rabbit"  target = "order.created" }
}
flow "audit_updates" {
  from { connector = "cdc"       operation = "users.UPDATE" }
  to   { connector = "audit_db"  target = "INSERT audit_log" }
}
"""

AUDIT_DB = """
connector "audit_db" {
  type              = "database"
  driver            = "postgres"
  connection_string = env("AUDIT_DB_URL")
}
"""

SCHEMA = (
    "CREATE TABLE orders (id int PRIMARY KEY, user_id int, total numeric(10,2))",
    "CREATE TABLE products (id int PRIMARY KEY, name text)",
    "CREATE TABLE users (id int PRIMARY KEY, name text)",
    "CREATE TABLE audit_log (seq bigserial PRIMARY KEY, id int, name text, "
    "_operation text, _table text, _schema text, _old jsonb, "
    "_unchanged_toast jsonb, _lsn text, _commit_lsn text, _commit_time timestamptz, "
    "_xid bigint)",
    "INSERT INTO users VALUES (7, 'ann')",
)


async def test_spec_example_runs_as_written(pg_logical_database, rabbit):
    dsn = pg_logical_database
    await execute(dsn, *SCHEMA)
    config = SPEC_EXAMPLE + rabbit.connector("rabbit") + AUDIT_DB
    environ = {"PG_REPLICATION_URL": dsn, "AUDIT_DB_URL": dsn}
    created = await rabbit.listen(rabbit.queue("test-order-created"), "order.created")
    async with running(config, environ=environ):
        await execute(
            dsn,
            "INSERT INTO orders VALUES (1, 7, 19.90)",
            "UPDATE users SET name = 'anna' WHERE id = 7",
            "INSERT INTO products VALUES (3, 'tea')",
        )
        message = await asyncio.wait_for(created.get(), 15)
        body = json.loads(message.body)
        assert message.routing_key == "order.created"
        assert {k: body[k] for k in ("id", "user_id", "total", "_operation",
                                     "_table", "_old")} == {
            "id": 1, "user_id": 7, "total": 19.9, "_operation": "INSERT",
            "_table": "orders", "_old": None,
        }  # fmt: skip

        rows: list[tuple[object, ...]] = []

        async def audited() -> bool:
            rows[:] = await query(
                dsn, "SELECT id, name, _operation, _table, _old FROM audit_log"
            )
            return bool(rows)

        await eventually(audited, timeout=15)
    assert rows == [(7, "anna", "UPDATE", "users", {"id": 7})]
    assert Decimal("19.90") == Decimal(str(body["total"]))


async def test_notify_on_insert_publishes_a_burst_in_commit_order(
    pg_logical_database, rabbit
):
    # The changes of a burst go to the RabbitMQ target as runs, published in
    # order while their confirms are awaited together: the queue holds them
    # in commit order.
    dsn = pg_logical_database
    await execute(dsn, *SCHEMA)
    config = SPEC_EXAMPLE + rabbit.connector("rabbit") + AUDIT_DB
    environ = {"PG_REPLICATION_URL": dsn, "AUDIT_DB_URL": dsn}
    created = await rabbit.listen(rabbit.queue("test-burst"), "order.created")
    async with running(config, environ=environ) as app:
        await execute(
            dsn,
            "INSERT INTO orders SELECT g, g % 7, g FROM generate_series(1, 1000) g",
            *(f"INSERT INTO orders VALUES ({1000 + i}, 1, 1)" for i in range(1, 51)),
        )
        ids = []
        while len(ids) < 1050:
            message = await asyncio.wait_for(created.get(), 15)
            ids.append(json.loads(message.body)["id"])
        sent = app.runtime.metrics.registry.get_sample_value(
            "mycel_events_out_total",
            {"flow": "notify_on_insert", "connector": "rabbit"},
        )
    assert ids == list(range(1, 1051))
    assert sent == 1050
