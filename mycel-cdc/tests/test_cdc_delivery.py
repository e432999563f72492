"""Delivery: confirmation after flows finish, failures, restarts."""

import asyncio
import logging

import pytest
from cdc_support import (
    GateTarget,
    cdc_block,
    execute,
    flow,
    gate_plugin,
    query,
    slot_confirmed,
    take,
    unique,
)

from mycel.testing import eventually, running
from mycel_cdc import CdcConnector, parse_lsn
from testsupport.base import service_unavailable
from testsupport.postgres import PostgresUnavailable, start_logical_cluster


def gate_flow(operation: str, *, extra: str = "", failures: int = 0) -> str:
    return (
        f'connector "gate" {{\n  type = "gate"\n  failures = {failures}\n}}\n'
        'flow "f" {\n'
        f'  from {{ connector = "cdc" operation = "{operation}" }}\n'
        f"{extra}"
        '  to { connector = "gate" }\n'
        "}\n"
    )


async def test_slot_is_confirmed_only_after_the_flow_finished(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("confirm")
    await execute(dsn, "CREATE TABLE orders (id int PRIMARY KEY)")
    config = cdc_block(dsn, ["orders"], slot, status_interval="50ms")
    config += gate_flow("orders.INSERT")
    async with running(config, plugins=[gate_plugin]) as app:
        gate = app.connector("gate")
        cdc = app.connector("cdc")
        assert isinstance(gate, GateTarget) and isinstance(cdc, CdcConnector)
        gate.open.clear()
        await execute(dsn, "INSERT INTO orders VALUES (1)")
        held = await asyncio.wait_for(gate.arrived.get(), 10)
        commit = parse_lsn(held["_commit_lsn"])

        # Held in the flow: neither the connector nor the server moved past it.
        assert cdc.confirmed < commit
        assert await slot_confirmed(dsn, slot) < commit

        gate.open.set()
        await asyncio.wait_for(gate.delivered.get(), 10)

        async def confirmed_past_commit() -> bool:
            return await slot_confirmed(dsn, slot) > commit

        await eventually(confirmed_past_commit, timeout=10)


async def test_failing_flow_is_run_again_in_order(pg_logical_database, monkeypatch):
    import mycel_cdc._connector

    monkeypatch.setattr(mycel_cdc._connector, "_RETRY_FIRST", 0.05)
    dsn = pg_logical_database
    slot = unique("retry")
    await execute(dsn, "CREATE TABLE orders (id int PRIMARY KEY)")
    config = cdc_block(dsn, ["orders"], slot)
    config += gate_flow(
        "orders.INSERT", failures=2, extra="  retry {\n    attempts = 1\n  }\n"
    )
    async with running(config, plugins=[gate_plugin]) as app:
        gate = app.connector("gate")
        assert isinstance(gate, GateTarget)
        await execute(
            dsn, "INSERT INTO orders VALUES (1)", "INSERT INTO orders VALUES (2)"
        )
        first = await asyncio.wait_for(gate.delivered.get(), 10)
        second = await asyncio.wait_for(gate.delivered.get(), 10)
    assert (first["id"], second["id"]) == (1, 2)
    assert sorted(gate.tries.values()) == [3, 3]


async def test_permanent_failure_is_skipped_and_recorded(pg_logical_database, caplog):
    dsn = pg_logical_database
    slot = unique("perm")
    await execute(dsn, "CREATE TABLE orders (id int PRIMARY KEY, note text)")
    config = cdc_block(dsn, ["orders"], slot)
    config += flow(
        "f", "orders.INSERT", "out",
        extra='  transform {\n    id = "input.id"\n    n = "input.note.size()"\n  }\n',
    )  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="mycel.cdc"):
        async with running(config) as app:
            out = app.listen("mem", "out")
            await execute(
                dsn,
                "INSERT INTO orders VALUES (1, NULL)",
                "INSERT INTO orders VALUES (2, 'abc')",
            )
            [delivered] = await take(out, 1)
            cdc = app.connector("cdc")
            assert isinstance(cdc, CdcConnector)
            dead = list(cdc.dead_letters)
    assert delivered == {"id": 2, "n": 3}
    assert [(flow_, event["id"]) for flow_, event, _ in dead] == [("f", 1)]
    assert dead[0][2].startswith("flow 'f': transform field 'n' failed")
    [record] = [r for r in caplog.records if r.name == "mycel.cdc"]
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith(
        f"connector 'cdc': flow 'f' failed permanently on INSERT of 'orders' at "
        f"{dead[0][1]['_lsn']}; skipped it: transform field 'n' failed"
    )


async def test_quiet_slot_advances_past_unrelated_writes(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("quiet")
    await execute(
        dsn,
        "CREATE TABLE orders (id int PRIMARY KEY)",
        "CREATE TABLE other (id serial PRIMARY KEY, v text)",
    )
    config = cdc_block(dsn, ["orders"], slot, status_interval="50ms")
    config += flow("f", "orders.*", "out")
    async with running(config):
        start = await slot_confirmed(dsn, slot)
        await execute(
            dsn,
            "INSERT INTO other (v) "
            "SELECT repeat('x', 100) FROM generate_series(1, 2000)",
        )
        [(written,)] = await query(dsn, "SELECT pg_current_wal_lsn()::text")

        async def caught_up() -> bool:
            return await slot_confirmed(dsn, slot) >= parse_lsn(written)

        await eventually(caught_up, timeout=20)
    assert parse_lsn(written) > start


async def test_changes_made_while_stopped_arrive_once_after_restart(
    pg_logical_database,
):
    dsn = pg_logical_database
    slot = unique("resume")
    await execute(dsn, "CREATE TABLE orders (id int PRIMARY KEY)")
    config = cdc_block(dsn, ["orders"], slot) + flow("f", "orders.INSERT", "out")
    async with running(config) as app:
        out = app.listen("mem", "out")
        await execute(dsn, "INSERT INTO orders VALUES (1)")
        assert [e["id"] for e in await take(out, 1)] == [1]
    await execute(dsn, "INSERT INTO orders VALUES (2)", "INSERT INTO orders VALUES (3)")
    async with running(config) as app:
        out = app.listen("mem", "out")
        assert [e["id"] for e in await take(out, 2)] == [2, 3]
        await execute(dsn, "INSERT INTO orders VALUES (4)")
        assert [e["id"] for e in await take(out, 1)] == [4]


@pytest.mark.slow
async def test_postgres_restart_reconnects_and_resumes(caplog):
    # A cluster of its own: restarting the shared one would disturb others.
    try:
        cluster = await asyncio.to_thread(start_logical_cluster)
    except PostgresUnavailable as exc:
        service_unavailable(f"a private PostgreSQL cluster ({exc})")
        raise
    try:
        dsn = cluster.dsn
        slot = unique("restart")
        await execute(dsn, "CREATE TABLE orders (id int PRIMARY KEY)")
        config = cdc_block(dsn, ["orders"], slot, status_interval="50ms")
        config += flow("f", "orders.INSERT", "out")
        with caplog.at_level(logging.INFO, logger="mycel.cdc"):
            async with running(config) as app:
                out = app.listen("mem", "out")
                await execute(dsn, "INSERT INTO orders VALUES (1)")
                assert [e["id"] for e in await take(out, 1)] == [1]

                await asyncio.to_thread(cluster.restart)
                await execute(dsn, "INSERT INTO orders VALUES (2)")
                assert [e["id"] for e in await take(out, 1, timeout=30)] == [2]
                assert out.empty()
    finally:
        await asyncio.to_thread(cluster.stop)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert any(
        level == "WARNING"
        and message.startswith("connector 'cdc': replication stream lost: ")
        for level, message in messages
    )
    assert any(
        level == "INFO"
        and message.startswith("connector 'cdc': replication resumed from ")
        for level, message in messages
    )


@pytest.mark.slow
async def test_status_updates_keep_an_idle_connection_alive(caplog):
    # The server drops a replication connection that is silent for
    # wal_sender_timeout; a cluster of its own so it can be made short.
    try:
        cluster = await asyncio.to_thread(start_logical_cluster)
    except PostgresUnavailable as exc:
        service_unavailable(f"a private PostgreSQL cluster ({exc})")
        raise
    try:
        dsn = cluster.dsn
        slot = unique("alive")
        await execute(
            dsn,
            "CREATE TABLE orders (id int PRIMARY KEY)",
            "ALTER SYSTEM SET wal_sender_timeout = '1s'",
            "SELECT pg_reload_conf()",
        )
        config = cdc_block(dsn, ["orders"], slot, status_interval="200ms")
        config += flow("f", "orders.INSERT", "out")
        with caplog.at_level(logging.WARNING, logger="mycel.cdc"):
            async with running(config) as app:
                out = app.listen("mem", "out")

                async def sender() -> tuple[int, object] | None:
                    rows = await query(
                        dsn,
                        "SELECT pid, reply_time FROM pg_stat_replication "
                        "WHERE application_name = 'mycel-cdc' "
                        "AND reply_time IS NOT NULL",
                    )
                    return rows[0] if rows else None

                async def replying() -> bool:
                    return await sender() is not None

                await eventually(replying, timeout=10)
                pid, first_reply = await sender()

                # Three timeouts' worth of replies from the same WAL sender.
                async def replied_for_3s() -> bool:
                    now = await sender()
                    return (
                        now is not None and (now[1] - first_reply).total_seconds() >= 3
                    )

                await eventually(replied_for_3s, timeout=15, interval=0.2)
                [(still,)] = await query(
                    dsn, "SELECT pid FROM pg_stat_replication "
                    "WHERE application_name = 'mycel-cdc'",
                )  # fmt: skip
                await execute(dsn, "INSERT INTO orders VALUES (1)")
                assert [e["id"] for e in await take(out, 1)] == [1]
        metrics = app.runtime.metrics.render().decode()
    finally:
        await asyncio.to_thread(cluster.stop)
    assert still == pid
    assert [r.getMessage() for r in caplog.records if r.name == "mycel.cdc"] == []
    assert 'mycel_replication_lag_bytes{connector="cdc"}' in metrics
