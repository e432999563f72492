"""The database target against a real PostgreSQL, through real flows.

The seed flow ``handle_ws_message`` reads from a WebSocket connector and
``audit_updates`` from a CDC connector. Both are other distributions, so
most tests here drive the same flow shapes from a ``memory`` connector
standing in for them (with a CDC-shaped event for the audit); two tests at
the end run the seed flows once more with the real mycel-ws and mycel-cdc
connectors when those are installed.

"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from mycel import Delivery, DeliveryError, Event
from mycel.testing import App, eventually, free_port, running
from testsupport.base import service_unavailable


@pytest.fixture
async def pg(pg_database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_database)
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    try:
        yield conn
    finally:
        await conn.close()


def config(url: str, flows: str, *, db: str = "db", extra: str = "") -> str:
    return f"""
    connector "ws" {{ type = "memory" }}
    connector "{db}" {{
      type              = "database"
      driver            = "postgres"
      connection_string = "{url}"
      {extra}
    }}
    {flows}
    """


async def settle(app: App, source: str = "ws") -> None:
    await asyncio.wait_for(app.memory(source).drain(), 10)


def dead_letters(app: App, source: str = "ws") -> list[str]:
    return [reason for _, _, reason in app.memory(source).dead_letters]


HANDLE_WS_MESSAGE = """
flow "handle_ws_message" {
  from { connector = "ws"  operation = "message" }
  to   { connector = "db"  target = "messages" }
}
"""

MESSAGES_TABLE = """
CREATE TABLE messages (
  id         serial PRIMARY KEY,
  channel_id int NOT NULL,
  user_id    text,
  text       text,
  meta       jsonb,
  sent_at    timestamptz
)
"""


async def test_handle_ws_message_inserts_each_message(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(MESSAGES_TABLE)
    async with running(config(pg_database, HANDLE_WS_MESSAGE)) as app:
        await app.publish(
            "ws",
            "message",
            {
                "channel_id": 7,
                "user_id": "u1",
                "text": "hello",
                "meta": {"client": "web", "tags": ["a", "b"]},
                "sent_at": "2026-12-03T10:00:00+00:00",
            },
        )
        await app.publish("ws", "message", {"channel_id": 8, "text": "bye"})
        await settle(app)
        assert dead_letters(app) == []

    rows = await pg.fetch("SELECT * FROM messages ORDER BY id")
    assert [dict(r) for r in rows] == [
        {
            "id": 1,
            "channel_id": 7,
            "user_id": "u1",
            "text": "hello",
            "meta": {"client": "web", "tags": ["a", "b"]},
            "sent_at": dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC),
        },
        {
            "id": 2,
            "channel_id": 8,
            "user_id": None,
            "text": "bye",
            "meta": None,
            "sent_at": None,
        },
    ]


async def test_audit_updates_inserts_the_cdc_event(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute("""
        CREATE TABLE audit_log (
          seq        bigserial PRIMARY KEY,
          id         int NOT NULL,
          name       text,
          _operation text NOT NULL,
          _table     text NOT NULL,
          _old       jsonb,
          logged_at  timestamptz NOT NULL DEFAULT now()
        )
    """)
    flows = """
    flow "audit_updates" {
      from { connector = "cdc"       operation = "users.UPDATE" }
      to   { connector = "audit_db"  target = "INSERT audit_log" }
    }
    """
    text = config(pg_database, flows, db="audit_db").replace('"ws"', '"cdc"')
    async with running(text) as app:
        await app.publish(
            "cdc",
            "users.UPDATE",
            {
                "id": 42,
                "name": "Ada Lovelace",
                "_operation": "UPDATE",
                "_table": "users",
                "_old": {"id": 42, "name": "Ada"},
            },
        )
        await app.publish(
            "cdc",
            "users.INSERT",
            {
                "id": 43,
                "name": "not audited",
                "_operation": "INSERT",
                "_table": "users",
                "_old": None,
            },
        )
        await settle(app, "cdc")
        assert dead_letters(app, "cdc") == []

    rows = await pg.fetch(
        "SELECT seq, id, name, _operation, _table, _old FROM audit_log"
    )
    assert [dict(r) for r in rows] == [
        {
            "seq": 1,
            "id": 42,
            "name": "Ada Lovelace",
            "_operation": "UPDATE",
            "_table": "users",
            "_old": {"id": 42, "name": "Ada"},
        }
    ]


async def test_a_key_that_is_not_a_column_fails_the_event_naming_it(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(MESSAGES_TABLE)
    async with running(config(pg_database, HANDLE_WS_MESSAGE)) as app:
        await app.publish("ws", "message", {"channel_id": 1, "colour": "red"})
        await app.publish("ws", "message", {"channel_id": 2, "text": "fine"})
        await settle(app)
        assert dead_letters(app) == [
            "flow 'handle_ws_message': to 'db' failed after 1 try: "
            "table 'messages' has no column 'colour'"
        ]
    assert await pg.fetchval("SELECT array_agg(channel_id) FROM messages") == [2]


async def test_a_column_added_while_running_is_found(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(MESSAGES_TABLE)
    async with running(config(pg_database, HANDLE_WS_MESSAGE)) as app:
        await app.publish("ws", "message", {"channel_id": 1})
        await settle(app)
        await pg.execute("ALTER TABLE messages ADD COLUMN mood text")
        await app.publish("ws", "message", {"channel_id": 2, "mood": "calm"})
        await settle(app)
        assert dead_letters(app) == []
    rows = await pg.fetch("SELECT channel_id, mood FROM messages ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, None), (2, "calm")]


async def test_concurrent_inserts_share_transactions(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(MESSAGES_TABLE)
    flows = HANDLE_WS_MESSAGE.replace(
        'flow "handle_ws_message" {', 'flow "handle_ws_message" {\n concurrency = 64'
    )
    async with running(config(pg_database, flows, extra="pool_size = 2")) as app:
        for i in range(500):
            await app.publish("ws", "message", {"channel_id": i, "text": f"m{i}"})
        await settle(app)
        assert dead_letters(app) == []
        registry = app.runtime.metrics.registry
        rows = registry.get_sample_value(
            "mycel_database_rows_total", {"connector": "db"}
        )
        batches = registry.get_sample_value(
            "mycel_database_batches_total", {"connector": "db"}
        )
    assert rows == 500
    assert batches is not None and batches < 250
    count = await pg.fetchval("SELECT count(DISTINCT channel_id) FROM messages")
    assert count == 500


async def test_a_bad_row_in_a_batch_fails_only_its_own_event(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute("CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL)")
    await pg.execute("INSERT INTO items VALUES (13, 'taken')")
    flows = """
    flow "items" {
      concurrency = 32
      from { connector = "ws"  operation = "items" }
      to   { connector = "db"  target = "items" }
    }
    """
    async with running(config(pg_database, flows, extra="pool_size = 1")) as app:
        for i in range(1, 41):
            await app.publish("ws", "items", {"id": i, "label": f"item {i}"})
        await settle(app)
        assert dead_letters(app) == [
            "flow 'items': to 'db' failed after 1 try: table 'items': "
            'duplicate key value violates unique constraint "items_pkey" '
            "(Key (id)=(13) already exists.)"
        ]
        batches = app.runtime.metrics.registry.get_sample_value(
            "mycel_database_batches_total", {"connector": "db"}
        )
    assert batches is not None and batches < 40
    rows = await pg.fetch("SELECT id, label FROM items ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (i, "taken" if i == 13 else f"item {i}") for i in range(1, 41)
    ]


async def test_upsert_updates_the_row_with_the_same_primary_key(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(
        "CREATE TABLE prices (sku text PRIMARY KEY, price numeric, note text)"
    )
    flows = """
    flow "prices" {
      from { connector = "ws"  operation = "price" }
      to   { connector = "db"  target = "UPSERT prices" }
    }
    """
    async with running(config(pg_database, flows)) as app:
        await app.publish("ws", "price", {"sku": "A", "price": "1.50", "note": "x"})
        await settle(app)
        await app.publish("ws", "price", {"sku": "A", "price": 2.25})
        await app.publish("ws", "price", {"sku": "B", "price": 3})
        await settle(app)
        assert dead_letters(app) == []
    rows = await pg.fetch("SELECT sku, price, note FROM prices ORDER BY sku")
    assert [tuple(r) for r in rows] == [
        ("A", decimal.Decimal("2.25"), "x"),
        ("B", decimal.Decimal("3"), None),
    ]


async def test_upsert_with_an_explicit_key_and_operation(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(
        "CREATE TABLE people (id serial PRIMARY KEY, email text UNIQUE, name text)"
    )
    flows = """
    flow "people" {
      from { connector = "ws"  operation = "person" }
      to {
        connector = "db"
        operation = "upsert"
        target    = "public.people"
        key       = ["email"]
      }
    }
    """
    async with running(config(pg_database, flows)) as app:
        await app.publish("ws", "person", {"email": "a@x", "name": "A"})
        await settle(app)
        await app.publish("ws", "person", {"email": "a@x", "name": "A2"})
        await settle(app)
        assert dead_letters(app) == []
    rows = await pg.fetch("SELECT email, name FROM people")
    assert [tuple(r) for r in rows] == [("a@x", "A2")]


@pytest.mark.parametrize(
    ("target", "payload", "reason"),
    [
        (
            "missing_table",
            {"a": 1},
            "table 'missing_table' does not exist",
        ),
        (
            "${input.t}",
            {"t": "x; DROP TABLE t"},
            "target 'x; DROP TABLE t' is not TABLE, INSERT TABLE or UPSERT "
            "TABLE (TABLE: letters, digits and _, optionally schema.table)",
        ),
        (
            "UPSERT nokey",
            {"a": 1},
            "UPSERT into table 'nokey' needs a conflict key: the table has no "
            "primary key; add key = [...] to the to block",
        ),
        (
            "nokey",
            {"a": "twelve"},
            "table 'nokey' column 'a': 'twelve' is not a valid int4",
        ),
        (
            "nokey",
            [1, 2],
            "table 'nokey': the payload must be an object, not list",
        ),
        (
            "nokey",
            {"a": {"x": 1}},
            "table 'nokey' column 'a': an object or list needs a json or "
            "jsonb column, not int4",
        ),
    ],
)
async def test_bad_deliveries_fail_permanently_with_a_reason(
    pg_database: str, pg: asyncpg.Connection, target: str, payload: Any, reason: str
) -> None:
    await pg.execute("CREATE TABLE nokey (a int)")
    flows = f"""
    flow "f" {{
      from {{ connector = "ws"  operation = "t" }}
      to   {{ connector = "db"  target = "{target}" }}
    }}
    """
    async with running(config(pg_database, flows)) as app:
        await app.publish("ws", "t", payload)
        await settle(app)
        assert dead_letters(app) == [f"flow 'f': to 'db' failed after 1 try: {reason}"]
    assert await pg.fetchval("SELECT count(*) FROM nokey") == 0


async def test_init_sql_creates_tables_at_start(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    extra = (
        'init_sql = "CREATE TABLE IF NOT EXISTS messages (channel_id int, text text)"'
    )
    async with running(config(pg_database, HANDLE_WS_MESSAGE, extra=extra)) as app:
        await app.publish("ws", "message", {"channel_id": 5, "text": "hi"})
        await settle(app)
    rows = await pg.fetch("SELECT channel_id, text FROM messages")
    assert [tuple(r) for r in rows] == [(5, "hi")]


async def test_session_settings_of_init_sql_stay_out_of_the_writes(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    # init_sql runs on one pooled connection; a SET there must not decide
    # where that one connection's rows go later.
    await pg.execute("CREATE TABLE messages (channel_id int, text text)")
    await pg.execute("CREATE SCHEMA elsewhere")
    await pg.execute("CREATE TABLE elsewhere.messages (channel_id int, text text)")
    extra = 'pool_size = 1\n init_sql = "SET search_path TO elsewhere"'
    async with running(config(pg_database, HANDLE_WS_MESSAGE, extra=extra)) as app:
        await app.publish("ws", "message", {"channel_id": 5, "text": "hi"})
        await settle(app)
    assert await pg.fetchval("SELECT count(*) FROM public.messages") == 1
    assert await pg.fetchval("SELECT count(*) FROM elsewhere.messages") == 0


async def test_host_settings_and_masked_password(pg_database: str) -> None:
    name = pg_database.rsplit("/", 1)[1]
    text = f"""
    connector "ws" {{ type = "memory" }}
    connector "db" {{
      type     = "database"
      driver   = "postgres"
      host     = "127.0.0.1"
      port     = 5432
      user     = "postgres"
      password = "s3cret"
      database = "{name}"
      init_sql = "CREATE TABLE t (a int)"
    }}
    flow "f" {{
      from {{ connector = "ws"  operation = "t" }}
      to   {{ connector = "db"  target = "t" }}
    }}
    """
    async with running(text) as app:
        described = app.connector("db").describe()
        assert described["password"] == "***"
        await app.publish("ws", "t", {"a": 1})
        await settle(app)
        assert dead_letters(app) == []


async def test_an_unreachable_server_stops_the_start() -> None:
    text = """
    connector "db" {
      type              = "database"
      driver            = "postgres"
      connection_string = "postgresql://postgres:pw@127.0.0.1:1/nowhere"
      connect_timeout   = "2s"
    }
    connector "ws" { type = "memory" }
    flow "f" {
      from { connector = "ws"  operation = "t" }
      to   { connector = "db"  target = "t" }
    }
    """
    from mycel import ConnectorError

    with pytest.raises(ConnectorError) as caught:
        async with running(text):
            pass
    message = str(caught.value)
    assert message.startswith("database 'db': cannot connect (postgres): ")
    assert "pw" not in message


async def test_lost_connections_are_a_transient_failure_and_retried(
    pg_database: str, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await pg.execute(MESSAGES_TABLE)
    flows = HANDLE_WS_MESSAGE.replace(
        'flow "handle_ws_message" {',
        'flow "handle_ws_message" {\n retry {\n attempts = 3\n delay = "10ms"\n }',
    )
    async with running(config(pg_database, flows, extra="pool_size = 1")) as app:
        await app.publish("ws", "message", {"channel_id": 1})
        await settle(app)
        # The server drops every connection of the connector's pool.
        name = pg_database.rsplit("/", 1)[1]
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        with caplog.at_level(logging.WARNING, "mycel.flow"):
            await app.publish("ws", "message", {"channel_id": 2})
            await settle(app)
        assert dead_letters(app) == []
    rows = await pg.fetch("SELECT channel_id FROM messages ORDER BY id")
    assert [r["channel_id"] for r in rows] == [1, 2]
    # Whether the loss shows at all depends on timing: the pool may notice
    # the closed connection and replace it before the batch goes out. When
    # it shows, it is one transient failure, and the retry writes the row.
    retries = [r.getMessage() for r in caplog.records if r.name == "mycel.flow"]
    assert len(retries) <= 1
    for retry in retries:
        assert retry.startswith(
            "flow 'handle_ws_message': to 'db' failed (try 1 of 3), retrying in "
        )
        reason = retry.split("s: ", 1)[1]
        assert reason.startswith(
            (
                "table 'messages': connection failed: ",
                "table 'messages': connection was closed in the middle of operation",
                "table 'messages': terminating connection due to administrator command",
            )
        ), reason


async def test_a_lock_timeout_is_transient_and_the_retry_succeeds(
    pg_database: str, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await pg.execute(MESSAGES_TABLE)
    flows = HANDLE_WS_MESSAGE.replace(
        'flow "handle_ws_message" {',
        'flow "handle_ws_message" {\n retry {\n attempts = 5\n delay = "300ms"\n }',
    )
    # asyncpg passes unknown URL parameters on as server settings.
    text = config(pg_database + "?lock_timeout=100", flows)
    async with running(text) as app:
        lock = pg.transaction()
        await lock.start()
        await pg.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        with caplog.at_level(logging.WARNING, "mycel.flow"):
            await app.publish("ws", "message", {"channel_id": 1})
            await eventually(
                lambda: any(r.name == "mycel.flow" for r in caplog.records)
            )
            await lock.rollback()
            await settle(app)
        assert dead_letters(app) == []
    retries = [r.getMessage() for r in caplog.records if r.name == "mycel.flow"]
    assert retries[0].startswith(
        "flow 'handle_ws_message': to 'db' failed (try 1 of 5), retrying in "
    )
    assert retries[0].endswith(
        "s: table 'messages': canceling statement due to lock timeout"
    )
    assert await pg.fetchval("SELECT array_agg(channel_id) FROM messages") == [1]


async def test_handle_ws_message_from_a_real_websocket_client(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    # The seed flow exactly as written, with the WebSocket connector of
    # mycel-ws when it is installed (it is, in the project's test runs).
    try:
        from websockets.asyncio.client import connect

        import mycel_ws  # noqa: F401
    except ImportError:
        service_unavailable("mycel-ws, for the WebSocket source")
    await pg.execute(MESSAGES_TABLE)
    port = free_port()
    text = f"""
    connector "ws" {{
      type = "websocket"
      port = {port}
    }}
    connector "db" {{
      type              = "database"
      driver            = "postgres"
      connection_string = "{pg_database}"
    }}
    {HANDLE_WS_MESSAGE}
    """
    async with running(text), connect(f"ws://127.0.0.1:{port}/ws?user_id=u9") as ws:
        frame = {"type": "message", "data": {"channel_id": 4, "text": "from ws"}}
        await ws.send(json.dumps(frame))

        async def arrived() -> bool:
            return bool(await pg.fetchval("SELECT count(*) FROM messages"))

        await eventually(arrived, timeout=10)
    rows = await pg.fetch("SELECT channel_id, user_id, text FROM messages")
    assert [tuple(r) for r in rows] == [(4, None, "from ws")]


async def test_audit_updates_from_real_change_data_capture(
    pg_logical_database: str,
) -> None:
    # The seed flow exactly as written, with the CDC connector of mycel-cdc
    # when it is installed, on a cluster with wal_level = logical.
    try:
        import mycel_cdc  # noqa: F401
    except ImportError:
        service_unavailable("mycel-cdc, for the CDC source")
    conn = await asyncpg.connect(pg_logical_database)
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    try:
        await conn.execute("""
            CREATE TABLE users (id int PRIMARY KEY, name text);
            INSERT INTO users VALUES (1, 'Ada'), (2, 'Grace');
            CREATE TABLE audit_log (
              seq bigserial PRIMARY KEY, id int, name text,
              _operation text, _table text, _old jsonb
            );
        """)
        slot = f"audit_{uuid.uuid4().hex[:10]}"
        text = f"""
        connector "cdc" {{
          type              = "cdc"
          driver            = "postgres"
          connection_string = "{pg_logical_database}"
          tables            = ["users"]
          slot_name         = "{slot}"
        }}
        connector "audit_db" {{
          type              = "database"
          driver            = "postgres"
          connection_string = "{pg_logical_database}"
        }}
        flow "audit_updates" {{
          from {{ connector = "cdc"       operation = "users.UPDATE" }}
          to   {{ connector = "audit_db"  target = "INSERT audit_log" }}
        }}
        """
        async with running(text):
            await conn.execute("UPDATE users SET name = 'Ada Lovelace' WHERE id = 1")
            await conn.execute("INSERT INTO users VALUES (3, 'not audited')")

            async def arrived() -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM audit_log"))

            await eventually(arrived, timeout=15)
        rows = await conn.fetch(
            "SELECT seq, id, name, _operation, _table, _old FROM audit_log"
        )
    finally:
        await conn.close()
    assert [dict(r) for r in rows] == [
        {
            "seq": 1,
            "id": 1,
            "name": "Ada Lovelace",
            "_operation": "UPDATE",
            "_table": "users",
            "_old": {"id": 1},
        }
    ]


def cdc_audit(dsn: str, operation: str) -> str:
    """CDC of ``users`` into ``INSERT audit_log``, the audit_updates shape.

    Skips (fails, in CI) where mycel-cdc is not installed.
    """
    try:
        import mycel_cdc  # noqa: F401
    except ImportError:
        service_unavailable("mycel-cdc, for the CDC source")
    return f"""
    connector "cdc" {{
      type              = "cdc"
      connection_string = "{dsn}"
      tables            = ["users"]
      slot_name         = "audit_{uuid.uuid4().hex[:10]}"
    }}
    connector "audit_db" {{
      type              = "database"
      driver            = "postgres"
      connection_string = "{dsn}"
    }}
    flow "audit" {{
      from {{ connector = "cdc"       operation = "{operation}" }}
      to   {{ connector = "audit_db"  target = "INSERT audit_log" }}
    }}
    """


async def test_cdc_changes_commit_in_their_order_a_run_at_a_time(
    pg_logical_database: str,
) -> None:
    # CDC hands a flow into the database each run of consecutive changes
    # in one go (process_many, ordered). A DELETE carries the key columns
    # only, another column set than INSERT and UPDATE, so a run holds rows
    # of two shapes; they must still commit in the order of the changes.
    text = cdc_audit(pg_logical_database, "users.*")
    conn = await asyncpg.connect(pg_logical_database)
    try:
        await conn.execute("""
            CREATE TABLE users (id int PRIMARY KEY, name text);
            CREATE TABLE audit_log (
              seq bigserial PRIMARY KEY, id int, name text, _operation text
            );
        """)
        async with running(text) as app:

            async def audited(count: int) -> bool:
                return bool(
                    await conn.fetchval("SELECT count(*) FROM audit_log") == count
                )

            async with conn.transaction():
                for i in range(100):
                    await conn.execute("INSERT INTO users VALUES ($1, 'a')", i)
                    await conn.execute("UPDATE users SET name = 'b' WHERE id = $1", i)
                    await conn.execute("DELETE FROM users WHERE id = $1", i)
            await eventually(lambda: audited(300), timeout=15)
            registry = app.runtime.metrics.registry
            labels = {"connector": "audit_db"}
            before = registry.get_sample_value("mycel_database_batches_total", labels)

            # A thousand rows of one shape: a handful of transactions.
            await conn.execute(
                "INSERT INTO users SELECT g, 'c' FROM generate_series(1000, 1999) g"
            )
            await eventually(lambda: audited(1300), timeout=15)
            after = registry.get_sample_value("mycel_database_batches_total", labels)
        rows = await conn.fetch(
            "SELECT id, name, _operation FROM audit_log ORDER BY seq"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in rows[:300]] == [
        change
        for i in range(100)
        for change in ((i, "a", "INSERT"), (i, "b", "UPDATE"), (i, None, "DELETE"))
    ]
    assert [tuple(r) for r in rows[300:]] == [
        (i, "c", "INSERT") for i in range(1000, 2000)
    ]
    assert before is not None and after is not None
    assert after - before <= 20  # one per row without runs


async def test_a_cdc_change_the_database_refuses_fails_alone_in_its_run(
    pg_logical_database: str,
) -> None:
    text = cdc_audit(pg_logical_database, "users.INSERT")
    from mycel_cdc import CdcConnector, parse_lsn

    conn = await asyncpg.connect(pg_logical_database)
    try:
        await conn.execute("""
            CREATE TABLE users (id int PRIMARY KEY, name text);
            CREATE TABLE audit_log (
              seq bigserial PRIMARY KEY, id int, name text CHECK (name <> 'bad')
            );
        """)
        async with running(text) as app:
            await conn.execute(
                "INSERT INTO users SELECT g, CASE WHEN g = 250 THEN 'bad' "
                "ELSE 'ok' END FROM generate_series(1, 500) g"
            )
            end = parse_lsn(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
            cdc = app.connector("cdc")
            assert isinstance(cdc, CdcConnector)
            await eventually(lambda: cdc.confirmed >= end, timeout=15)
            [(flow, event, reason)] = cdc.dead_letters
            query = "SELECT id FROM audit_log ORDER BY seq"
            ids = [r["id"] for r in await conn.fetch(query)]
    finally:
        await conn.close()
    assert (flow, event["id"]) == ("audit", 250)
    assert reason.startswith("flow 'audit': to 'audit_db' failed after 1 try: ")
    assert "check constraint" in reason
    assert ids == [i for i in range(1, 501) if i != 250]


@pytest.mark.parametrize(
    ("extra_keys", "reasons", "rows"),
    [
        (
            None,
            ["table 'messages' has no column 'colour'"],
            [(1, None)],
        ),
        (
            "metadata",
            ["table 'messages' has no column 'colour'"],
            [(1, None)],
        ),
        (
            "error",
            [
                "table 'messages' has no column '_lsn'",
                "table 'messages' has no columns '_lsn', 'colour'",
            ],
            [],
        ),
        ("ignore", [], [(1, None), (2, "kept")]),
    ],
)
async def test_extra_keys_decides_about_keys_that_name_no_column(
    pg_database: str,
    pg: asyncpg.Connection,
    extra_keys: str | None,
    reasons: list[str],
    rows: list[tuple[int, str | None]],
) -> None:
    await pg.execute(MESSAGES_TABLE)
    option = f'extra_keys = "{extra_keys}"' if extra_keys else ""
    flows = f"""
    flow "f" {{
      from {{ connector = "ws"  operation = "m" }}
      to   {{ connector = "db"  target = "messages"  {option} }}
    }}
    """
    async with running(config(pg_database, flows)) as app:
        await app.publish("ws", "m", {"channel_id": 1, "_lsn": "0/16B3748"})
        await settle(app)
        await app.publish(
            "ws", "m", {"channel_id": 2, "text": "kept", "_lsn": "0/1", "colour": "red"}
        )
        await settle(app)
        assert dead_letters(app) == [
            f"flow 'f': to 'db' failed after 1 try: {reason}" for reason in reasons
        ]
    found = await pg.fetch("SELECT channel_id, text FROM messages ORDER BY id")
    assert [tuple(r) for r in found] == rows


def deliveries(target: str, payloads: list[Any]) -> list[Delivery]:
    return [Delivery("f", "insert", target, p, p, {}) for p in payloads]


def outcome_texts(outcomes: list[BaseException | None]) -> list[str | None]:
    return [None if outcome is None else str(outcome) for outcome in outcomes]


ITEMS_TABLE = "CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL, qty int)"


async def test_deliver_many_fails_only_the_deliveries_at_fault(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(ITEMS_TABLE)
    await pg.execute("INSERT INTO items VALUES (13, 'taken', NULL)")
    payloads: list[Any] = [
        {"id": 1, "label": "a"},
        "not an object",
        {"id": 2, "label": "b", "colour": "red"},
        {"id": 3, "label": "c", "qty": "many"},
        {"id": 13, "label": "again"},
        {"id": 4, "label": None},
        {"id": 5, "label": "e", "qty": 7},
        {"label": "f", "id": 6},
    ]
    async with running(config(pg_database, "")) as app:
        connector = app.connector("db")
        outcomes = await connector.deliver_many(deliveries("items", payloads))
        committed = app.runtime.metrics.registry.get_sample_value(
            "mycel_database_rows_total", {"connector": "db"}
        )
    assert outcome_texts(outcomes) == [
        None,
        "table 'items': the payload must be an object, not str",
        "table 'items' has no column 'colour'",
        "table 'items' column 'qty': 'many' is not a valid int4",
        "table 'items': duplicate key value violates unique constraint "
        '"items_pkey" (Key (id)=(13) already exists.)',
        'table \'items\': null value in column "label" of relation "items" '
        "violates not-null constraint (Failing row contains (4, null, null).)",
        None,
        None,
    ]
    assert all(
        isinstance(outcome, DeliveryError) and outcome.permanent
        for outcome in outcomes
        if outcome is not None
    )
    assert committed == 3
    rows = await pg.fetch("SELECT id, label, qty FROM items ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (1, "a", None),
        (5, "e", 7),
        (6, "f", None),
        (13, "taken", None),
    ]


async def test_a_batch_of_a_known_shape_still_checks_each_payload(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    # Once a shape's plan is known, a batch of it is made column by column;
    # a payload that differs (other keys, values to convert, not an object,
    # another table) must still be caught and fail, or be converted, alone.
    await pg.execute(ITEMS_TABLE)
    await pg.execute("CREATE TABLE other (id int, label text)")
    batches: list[list[Any]] = [
        [{"id": 1, "label": "a"}, {"id": 2, "label": "b"}],
        [{"id": 3, "label": "c"}, {"id": 4, "colour": "red"}, {"label": "e", "id": 5}],
        [{"id": 40, "label": "x"}, {"id": 41, "label": "y", "colour": "red"}],
        [{"id": 6, "label": "f"}, {"id": "7", "label": 7}],
        [{"id": 8, "label": "h"}, {"label": "i", "id": 9}],
        [{"id": 10, "label": "j"}, ["id", "label"]],
    ]
    async with running(config(pg_database, "")) as app:
        connector = app.connector("db")
        outcomes = [
            outcome_texts(await connector.deliver_many(deliveries("items", batch)))
            for batch in batches
        ]
        mixed = await connector.deliver_many(
            deliveries("items", [{"id": 11, "label": "k"}])
            + deliveries("other", [{"id": 12, "label": "l"}])
        )
    assert outcomes == [
        [None, None],
        [None, "table 'items' has no column 'colour'", None],
        [None, "table 'items' has no column 'colour'"],
        [None, None],
        [None, None],
        [None, "table 'items': the payload must be an object, not list"],
    ]
    assert mixed == [None, None]
    rows = await pg.fetch("SELECT id, label FROM items ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (1, "a"),
        (2, "b"),
        (3, "c"),
        (5, "e"),
        (6, "f"),
        (7, "7"),
        (8, "h"),
        (9, "i"),
        (10, "j"),
        (11, "k"),
        (40, "x"),
    ]
    assert await pg.fetchval("SELECT label FROM other WHERE id = 12") == "l"


async def test_a_batch_of_events_is_one_transaction_and_one_bad_row_fails_alone(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(ITEMS_TABLE)
    await pg.execute("INSERT INTO items VALUES (13, 'taken', NULL)")
    flows = """
    flow "items" {
      from { connector = "ws"  operation = "items" }
      to   { connector = "db"  target = "items" }
    }
    """
    events = [Event({"id": i, "label": f"item {i}"}) for i in range(1, 41)]
    async with running(config(pg_database, flows, extra="pool_size = 1")) as app:
        outcomes = await app.runtime.flows["items"].process_many(events)
        registry = app.runtime.metrics.registry
        batches = registry.get_sample_value(
            "mycel_database_batches_total", {"connector": "db"}
        )
        failed = registry.get_sample_value(
            "mycel_events_failed_total", {"flow": "items"}
        )
    # The batch failed, so its 40 rows went in one by one: 39 commits.
    assert batches == 39
    assert failed == 1
    assert (
        outcome_texts(outcomes)
        == [None] * 12
        + [
            "flow 'items': to 'db' failed after 1 try: table 'items': "
            'duplicate key value violates unique constraint "items_pkey" '
            "(Key (id)=(13) already exists.)"
        ]
        + [None] * 27
    )
    rows = await pg.fetch("SELECT id, label FROM items ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (i, "taken" if i == 13 else f"item {i}") for i in range(1, 41)
    ]


async def test_a_batch_of_good_events_commits_together(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(ITEMS_TABLE)
    flows = """
    flow "items" {
      from { connector = "ws"  operation = "items" }
      to   { connector = "db"  target = "items" }
    }
    """
    events = [Event({"id": i, "label": f"item {i}"}) for i in range(1, 301)]
    async with running(config(pg_database, flows, extra="batch_size = 100")) as app:
        outcomes = await app.runtime.flows["items"].process_many(events)
        batches = app.runtime.metrics.registry.get_sample_value(
            "mycel_database_batches_total", {"connector": "db"}
        )
    assert outcomes == [None] * 300
    assert batches == 3
    assert await pg.fetchval("SELECT count(*) FROM items") == 300


async def test_process_many_retries_each_delivery_of_a_batch_that_failed_transiently(
    pg_database: str, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await pg.execute(MESSAGES_TABLE)
    flows = HANDLE_WS_MESSAGE.replace(
        'flow "handle_ws_message" {',
        'flow "handle_ws_message" {\n retry {\n attempts = 5\n delay = "300ms"\n }',
    )
    text = config(pg_database + "?lock_timeout=100", flows)
    events = [Event({"channel_id": i}) for i in range(3)]
    async with running(text) as app:
        lock = pg.transaction()
        await lock.start()
        await pg.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        with caplog.at_level(logging.WARNING, "mycel.flow"):
            task = asyncio.create_task(
                app.runtime.flows["handle_ws_message"].process_many(events)
            )
            await eventually(
                lambda: sum(r.name == "mycel.flow" for r in caplog.records) == 3
            )
            await lock.rollback()
            outcomes = await asyncio.wait_for(task, 10)
        retries = app.runtime.metrics.registry.get_sample_value(
            "mycel_retries_total", {"flow": "handle_ws_message", "connector": "db"}
        )
    assert outcomes == [None, None, None]
    assert retries == 3
    rows = await pg.fetchval(
        "SELECT array_agg(channel_id ORDER BY channel_id) FROM messages"
    )
    assert rows == [0, 1, 2]


async def test_values_are_converted_by_their_own_type_whatever_came_before(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    # Rows of one shape share a plan; the plan must not take one row's
    # verdict (no conversion needed) for another's.
    await pg.execute("CREATE TABLE typed (seq serial, n int8, t text, d numeric)")
    payloads: list[Any] = [
        {"n": 1, "t": "one", "d": 1},
        {"n": "2", "t": 2, "d": 2.25},
        {"n": 3, "t": True, "d": "3.5"},
        {"n": 4, "t": {"k": [1]}, "d": decimal.Decimal("4")},
        {"n": None, "t": None, "d": None},
    ]
    async with running(config(pg_database, "")) as app:
        connector = app.connector("db")
        for batch in (payloads[:1], payloads):
            outcomes = await connector.deliver_many(deliveries("typed", batch))
            assert outcomes == [None] * len(batch)
    rows = await pg.fetch("SELECT n, t, d FROM typed ORDER BY seq")
    assert [tuple(r) for r in rows] == [
        (1, "one", decimal.Decimal("1")),
        (1, "one", decimal.Decimal("1")),
        (2, "2", decimal.Decimal("2.25")),
        (3, "true", decimal.Decimal("3.5")),
        (4, '{"k":[1]}', decimal.Decimal("4")),
        (None, None, None),
    ]


async def test_a_cancelled_writer_leaves_the_rows_queued_behind_it_to_others(
    pg_database: str, pg: asyncpg.Connection
) -> None:
    # The first delivery writes in its own task (pool_size 1: the only
    # writer); the second queues behind it. Cancelling the first must not
    # strand the second.
    await pg.execute(ITEMS_TABLE)
    async with running(config(pg_database, "", extra="pool_size = 1")) as app:
        db = app.connector("db")
        assert await db.deliver_many(
            deliveries("items", [{"id": 0, "label": "z"}])
        ) == [None]
        lock = pg.transaction()
        await lock.start()
        await pg.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        first = asyncio.create_task(
            db.deliver_many(deliveries("items", [{"id": 1, "label": "a"}]))
        )

        async def first_waits_for_the_lock() -> bool:
            waiting = await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
            return bool(waiting == 1)

        await eventually(first_waits_for_the_lock)
        second = asyncio.create_task(
            db.deliver_many(deliveries("items", [{"id": 2, "label": "b"}]))
        )
        await asyncio.sleep(0)  # the second queues its row, behind the first
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await lock.rollback()
        assert await asyncio.wait_for(second, 10) == [None]
    rows = await pg.fetch("SELECT id FROM items ORDER BY id")
    assert [r["id"] for r in rows] == [0, 2]
