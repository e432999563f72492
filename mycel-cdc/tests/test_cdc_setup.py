"""Start-up: configuration checks, publication and slot, clear errors."""

import asyncio
import subprocess

import pytest
from cdc_support import cdc_block, execute, flow, query, unique

from mycel import ConfigError, ConnectorError
from mycel.testing import eventually, load_test_config, running
from testsupport.base import port_open, service_unavailable


def test_table_outside_tables_is_a_configuration_error():
    config = cdc_block("postgresql://x@127.0.0.1/db", ["orders"], "s") + flow(
        "f", "customers.INSERT", "out"
    )
    with pytest.raises(ConfigError) as caught:
        load_test_config(config)
    assert str(caught.value) == (
        "the configuration has 1 problem:\n"
        "  test.mycel:11: flow 'f': table 'customers' is not in the connector's "
        "tables (orders); add it to tables."
    )


def test_public_schema_may_be_written_or_left_out():
    config = cdc_block("postgresql://x@127.0.0.1/db", ["public.orders"], "s") + flow(
        "f", "orders.UPDATE", "out"
    )
    assert "f" in load_test_config(config).flows


def test_bad_settings_are_reported_together():
    config = (
        'connector "cdc" {\n  type = "cdc"\n  driver = "mysql"\n'
        '  connection_string = "postgresql://x@h/db"\n  tables = ["a b"]\n'
        '  slot_name = "Bad-Slot"\n}\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_test_config(config)
    assert str(caught.value) == (
        "the configuration has 3 problems:\n"
        "  test.mycel:3: connector 'cdc': setting 'driver' = 'mysql': Input should "
        "be 'postgres'.\n"
        "  test.mycel:5: connector 'cdc': setting 'tables' = ['a b']: 'a b' is not "
        "a table name; write name or schema.name.\n"
        "  test.mycel:6: connector 'cdc': setting 'slot_name' = 'Bad-Slot': "
        "'Bad-Slot' is not a valid name: use lowercase letters, digits and "
        "underscores, at most 63 characters."
    )


async def test_creates_publication_and_permanent_slot(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("create")
    await execute(dsn, "CREATE TABLE orders (id int PRIMARY KEY)")
    config = cdc_block(dsn, ["orders"], slot) + flow("f", "orders.*", "out")
    async with running(config):
        slots = await query(
            dsn,
            "SELECT plugin, temporary, active FROM pg_replication_slots "
            "WHERE slot_name = %s",
            slot,
        )
        tables = await query(
            dsn,
            "SELECT schemaname, tablename FROM pg_publication_tables "
            "WHERE pubname = %s",
            slot,
        )
    assert slots == [("pgoutput", False, True)]
    assert tables == [("public", "orders")]

    # The slot outlives the process, so changes made meanwhile are kept (the
    # server notices the closed connection a moment later).
    async def released() -> bool:
        rows = await query(
            dsn, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", slot
        )
        return rows == [(False,)]

    await eventually(released, timeout=10)


async def test_existing_publication_without_a_table_is_an_error(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("pub")
    await execute(
        dsn,
        "CREATE TABLE orders (id int PRIMARY KEY)",
        "CREATE TABLE users (id int PRIMARY KEY)",
        f"CREATE PUBLICATION {slot} FOR TABLE orders",
    )
    config = cdc_block(dsn, ["orders", "users"], slot) + flow("f", "users.*", "out")
    with pytest.raises(ConnectorError) as caught:
        async with running(config):
            pass
    assert str(caught.value) == (
        f"connector 'cdc': publication '{slot}' exists but does not publish "
        f"public.users: run ALTER PUBLICATION {slot} ADD TABLE public.users, or "
        "set another publication name"
    )


async def test_missing_table_is_an_error(pg_logical_database):
    slot = unique("missing")
    config = cdc_block(pg_logical_database, ["nope"], slot) + flow("f", "nope.*", "o")
    with pytest.raises(ConnectorError) as caught:
        async with running(config):
            pass
    assert str(caught.value) == (
        f"connector 'cdc': cannot create publication '{slot}': "
        'relation "public.nope" does not exist'
    )


async def test_wal_level_other_than_logical_says_how_to_fix_it():
    # The machine's own server runs with the default wal_level.
    if not port_open("127.0.0.1", 5432):
        service_unavailable("PostgreSQL on 127.0.0.1:5432")
    dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
    [(level,)] = await query(dsn, "SHOW wal_level")
    assert level != "logical"
    config = cdc_block(dsn, ["orders"], unique("wal")) + flow("f", "orders.*", "o")
    with pytest.raises(ConnectorError) as caught:
        async with running(config):
            pass
    assert str(caught.value) == (
        f"connector 'cdc': PostgreSQL has wal_level = '{level}', and change data "
        "capture needs 'logical': run ALTER SYSTEM SET wal_level = logical (or set "
        "it in postgresql.conf) and restart PostgreSQL"
    )


async def test_role_without_replication_says_how_to_fix_it(pg_logical_database):
    dsn = pg_logical_database
    role = unique("norepl")
    await execute(dsn, f"CREATE ROLE {role} LOGIN")
    try:
        config = cdc_block(
            dsn.replace("postgres@", f"{role}@"), ["orders"], unique("r")
        ) + flow("f", "orders.*", "o")
        with pytest.raises(ConnectorError) as caught:
            async with running(config):
                pass
    finally:
        await execute(dsn, f"DROP ROLE {role}")
    assert str(caught.value) == (
        f"connector 'cdc': role '{role}' may not start logical replication: run "
        f'ALTER ROLE "{role}" REPLICATION as a superuser, or connect as a role '
        "that has it"
    )


async def test_slot_used_by_another_consumer_is_an_error(
    pg_logical_database, pg_logical_cluster, monkeypatch
):
    import mycel_cdc._setup

    monkeypatch.setattr(mycel_cdc._setup, "SLOT_RELEASE_WAIT", 0.5)
    dsn = pg_logical_database
    slot = unique("busy")
    await execute(
        dsn,
        "CREATE TABLE orders (id int PRIMARY KEY)",
        f"CREATE PUBLICATION {slot} FOR TABLE orders",
        f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')",
    )
    other = subprocess.Popen(
        [str(pg_logical_cluster.pg_recvlogical), "-d", dsn, "-S", slot, "--start",
         "-o", "proto_version=1", "-o", f"publication_names={slot}", "-f", "/dev/null"],
    )  # fmt: skip
    try:

        async def active() -> bool:
            rows = await query(
                dsn, "SELECT active_pid FROM pg_replication_slots "
                "WHERE slot_name = %s AND active", slot,
            )  # fmt: skip
            return bool(rows)

        await eventually(active, timeout=10)
        [(pid,)] = await query(
            dsn,
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
            slot,
        )
        config = cdc_block(dsn, ["orders"], slot) + flow("f", "orders.*", "o")
        with pytest.raises(ConnectorError) as caught:
            async with running(config):
                pass
    finally:
        other.terminate()
        await asyncio.to_thread(other.wait, 10)
    assert str(caught.value) == (
        f"connector 'cdc': replication slot '{slot}' is in use by another consumer "
        f"(PID {pid}); stop that consumer, or give this connector its own slot_name"
    )


async def test_unreachable_server_is_an_error():
    config = cdc_block(
        "postgresql://postgres:secret@127.0.0.1:1/db", ["orders"], "s"
    ) + flow("f", "orders.*", "o")
    with pytest.raises(ConnectorError) as caught:
        async with running(config):
            pass
    text = str(caught.value)
    assert text.startswith("connector 'cdc': cannot connect to PostgreSQL: ")
    assert "secret" not in text


def test_describe_masks_the_password():
    from mycel.testing import load_test_config

    config = load_test_config(
        cdc_block("postgresql://u:secret@h/db", ["t"], "s") + flow("f", "t.*", "o")
    )
    from mycel import Runtime

    runtime = Runtime(config)
    assert runtime.connector("cdc").describe()["connection_string"] == (
        "postgresql://u:***@h/db"
    )
    config = load_test_config(
        cdc_block("host=h password=secret dbname=db", ["t"], "s")
        + flow("f", "t.*", "o")
    )
    assert Runtime(config).connector("cdc").describe()["connection_string"] == (
        "host=h password=*** dbname=db"
    )


async def test_status_interval_near_the_server_timeout_is_warned(
    pg_logical_database, caplog
):
    import logging

    dsn = pg_logical_database
    await execute(dsn, "CREATE TABLE orders (id int PRIMARY KEY)")
    [(timeout_ms,)] = await query(
        dsn, "SELECT setting::int FROM pg_settings WHERE name = 'wal_sender_timeout'"
    )
    config = cdc_block(dsn, ["orders"], unique("slow"), status_interval="40s")
    config += flow("f", "orders.*", "o")
    with caplog.at_level(logging.WARNING, logger="mycel.cdc"):
        async with running(config):
            pass
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"status_interval 40.0s is not well below the server's "
            f"wal_sender_timeout of {timeout_ms}ms; the server may drop the "
            "connection",
        )
    ]
