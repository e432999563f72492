"""CDC into PostgreSQL (the ``audit_updates`` flow): rows/s vs bare asyncpg.

A private PostgreSQL 15 cluster (``wal_level = logical``, see
``testsupport/postgres.py``) holds a backlog of 100,000 row inserts into
``users`` (1,000 per transaction), read by each round from a slot of its
own. Mycel runs the seed's shape of flow, ``cdc`` -> ``database`` with
``target = "INSERT audit_log"``, from its start until every change is
confirmed, that is until each row is committed in ``audit_log`` (connecting
included, as in ``bench_cdc.py``). The baseline, in the same run and the
same cluster: the same 100,000 audit rows written by one bare asyncpg
``executemany`` in one transaction, the fastest a Python program writes
them with the same driver. It does no replication at all, so the ratio
also holds the cost of reading and decoding the WAL. Best of three rounds
each.

Mycel runs in this process the way ``mycel run`` runs it: on uvloop, with
start-up objects frozen out of the garbage collector's sight.
"""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import uvloop
from bench_cdc import stream  # also puts the project on sys.path

from mycel_cdc import parse_lsn
from testsupport.postgres import start_logical_cluster

ROWS = 100_000
REPEAT = 3

TABLES = """
CREATE TABLE users (id int PRIMARY KEY, name text, email text);
CREATE TABLE audit_log (
  seq bigserial PRIMARY KEY, id int, name text, email text,
  _operation text, _table text
);
CREATE PUBLICATION bench_pub FOR TABLE users;
"""

CONFIG = """
connector "cdc" {{
  type              = "cdc"
  connection_string = "{dsn}"
  tables            = ["users"]
  slot_name         = "{slot}"
  publication       = "bench_pub"
}}
connector "audit_db" {{
  type              = "database"
  driver            = "postgres"
  connection_string = "{dsn}"
}}
flow "audit_updates" {{
  from {{ connector = "cdc"       operation = "users.INSERT" }}
  to   {{ connector = "audit_db"  target = "INSERT audit_log" }}
}}
"""


async def through_mycel(
    conn: asyncpg.Connection, dsn: str, slot: str, end: int
) -> float:
    await conn.execute("TRUNCATE audit_log")
    elapsed, cdc = await stream(CONFIG.format(dsn=dsn, slot=slot), end)
    assert not cdc.dead_letters, list(cdc.dead_letters)[:3]
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == ROWS
    return elapsed


async def bare(conn: asyncpg.Connection) -> float:
    await conn.execute("TRUNCATE audit_log")
    args = [
        (i, f"name {i}", f"{i}@example.com", "INSERT", "users") for i in range(ROWS)
    ]
    started = time.perf_counter()
    async with conn.transaction():
        await conn.executemany(
            "INSERT INTO audit_log (id, name, email, _operation, _table) "
            "VALUES ($1, $2, $3, $4, $5)",
            args,
        )
    elapsed = time.perf_counter() - started
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == ROWS
    return elapsed


async def main() -> None:
    cluster = await asyncio.to_thread(start_logical_cluster)
    try:
        dsn = cluster.dsn
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(TABLES)
            slots = [f"audit_{n}" for n in range(REPEAT)]
            for slot in slots:
                await conn.execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot
                )
            for start in range(0, ROWS, 1000):
                await conn.execute(
                    "INSERT INTO users SELECT g, 'name ' || g, g || '@example.com' "
                    "FROM generate_series($1::int, $2::int) g",
                    start,
                    start + 999,
                )
            end = parse_lsn(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
            mycel_times: list[float] = []
            bare_times: list[float] = []
            for n, slot in enumerate(slots):
                if n % 2:
                    bare_times.append(await bare(conn))
                mycel_times.append(await through_mycel(conn, dsn, slot, end))
                if not n % 2:
                    bare_times.append(await bare(conn))
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(cluster.stop)

    mycel_rate, bare_rate = ROWS / min(mycel_times), ROWS / min(bare_times)
    print(
        json.dumps(
            {
                "bench": "cdc_database",
                "figure": "CDC changes into PostgreSQL (audit_updates)",
                "unit": "rows/s",
                "value": round(mycel_rate),
                "baseline_name": "bare asyncpg executemany, one transaction",
                "baseline": round(bare_rate),
                "ratio": round(mycel_rate / bare_rate, 2),
                "higher_is_better": True,
                "aim": "report",
                "notes": (
                    f"{ROWS:,} inserts (1,000 per transaction) read from a slot, "
                    "each committed into audit_log before it is confirmed; "
                    "Mycel's time includes connecting, replication and decoding, "
                    f"which the baseline does not do; best of {REPEAT} "
                    f"(Mycel {', '.join(f'{t:.2f}s' for t in mycel_times)}; "
                    f"bare {', '.join(f'{t:.3f}s' for t in bare_times)})"
                ),
            }
        )
    )


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
