"""Database target: rows/s through a flow into PostgreSQL vs bare asyncpg.

The same 20,000 rows (an int, a short text and a small JSON object) go into
a fresh table twice: once through Mycel (a memory source whose workers hand
the flow what is queued, up to 512 events at a time; the flow engine; the
database target writing each such batch with one commit, every event
succeeding only once its row committed) and once as one bare asyncpg
``executemany`` in a transaction, the fastest a Python program writes them
with the same driver. Each run is repeated and the best kept. The issue's
aim: Mycel at least 0.8 of bare.

Both run in this process the way ``mycel run`` runs Mycel: on uvloop, with
what was allocated before the timed part frozen out of the garbage
collector's sight (``gc.freeze()``, as ``mycel run`` does after start-up).
Both are measured warm, as a flow that has been running for a while is:
before the clock starts, each writes ``WARM_UP`` rows the same way, so that
the connections are open, the statement prepared and the table's columns
read (Mycel opens its pool's connections as load asks for them).

Needs PostgreSQL at ``MYCEL_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``); a database is created
for the run and dropped after it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import uvloop

from mycel import Event
from mycel.testing import running

ROWS = 20_000
WARM_UP = 2_048  # four batches: every pooled connection opened
NAIVE_ROWS = 2_000  # one commit per row is slow: a sample is enough
REPEAT = 3
ADMIN_URL = os.environ.get(
    "MYCEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TABLE = "CREATE TABLE bench_rows (channel_id int, text text, meta jsonb)"

CONFIG = """
connector "ws" {{ type = "memory"  buffer = 50000 }}
connector "db" {{
  type              = "database"
  driver            = "postgres"
  connection_string = "{url}"
  pool_size         = 4
}}
flow "handle_ws_message" {{
  concurrency = 1024
  from {{ connector = "ws"  operation = "message" }}
  to   {{ connector = "db"  target = "bench_rows" }}
}}
"""


def rows() -> list[dict[str, object]]:
    return [
        {"channel_id": i, "text": f"message {i}", "meta": {"n": i, "tag": "x"}}
        for i in range(ROWS)
    ]


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute("DROP TABLE IF EXISTS bench_rows")
    await conn.execute(TABLE)


async def bare(url: str, payloads: list[dict[str, object]]) -> tuple[float, float]:
    conn = await asyncpg.connect(url)
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    try:
        await reset(conn)
        args = [(p["channel_id"], p["text"], p["meta"]) for p in payloads]
        await conn.executemany(
            "INSERT INTO bench_rows (channel_id, text, meta) VALUES ($1, $2, $3)",
            args[:WARM_UP],
        )
        gc.freeze()
        start = time.perf_counter()
        cpu = time.process_time()
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO bench_rows (channel_id, text, meta) VALUES ($1, $2, $3)",
                args,
            )
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        count = await conn.fetchval("SELECT count(*) FROM bench_rows")
        assert count == WARM_UP + ROWS
    finally:
        await conn.close()
    return ROWS / elapsed, cpu / ROWS * 1e6


async def one_by_one(url: str, payloads: list[dict[str, object]]) -> float:
    """What a hand-written consumer without batching does: one INSERT each."""
    pool = await asyncpg.create_pool(url, min_size=4, max_size=4, init=_json_codec)
    try:
        async with pool.acquire() as conn:
            await reset(conn)
        sql = "INSERT INTO bench_rows (channel_id, text, meta) VALUES ($1, $2, $3)"
        limit = asyncio.Semaphore(1024)

        async def insert(p: dict[str, object]) -> None:
            async with limit:
                await pool.execute(sql, p["channel_id"], p["text"], p["meta"])

        start = time.perf_counter()
        await asyncio.gather(*(insert(p) for p in payloads))
        elapsed = time.perf_counter() - start
        assert await pool.fetchval("SELECT count(*) FROM bench_rows") == len(payloads)
    finally:
        await pool.close()
    return len(payloads) / elapsed


async def _json_codec(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


async def through_mycel(
    url: str, payloads: list[dict[str, object]]
) -> tuple[float, float]:
    conn = await asyncpg.connect(url)
    try:
        await reset(conn)
        async with running(CONFIG.format(url=url)) as app:
            source = app.memory("ws")
            for payload in payloads[:WARM_UP]:
                await source.publish("message", payload)
            await source.drain()
            gc.freeze()  # as mycel run does after start-up (mycel.cli.serve)
            start = time.perf_counter()
            cpu = time.process_time()
            for payload in payloads:
                await source.publish("message", payload)
            await source.drain()
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu
            assert not source.dead_letters, list(source.dead_letters)[:3]
        count = await conn.fetchval("SELECT count(*) FROM bench_rows")
        assert count == WARM_UP + ROWS
    finally:
        await conn.close()
    return ROWS / elapsed, cpu / ROWS * 1e6


async def one_at_a_time(
    url: str, payloads: list[dict[str, object]]
) -> tuple[float, float]:
    """As the websocket and RabbitMQ sources hand events over: one per call.

    Each event goes through ``FlowHandle.process`` on its own, from 1024
    tasks at once (the flow's concurrency, as a source's consumers would
    be); the engine hands the events of one loop iteration to the target
    together.
    """
    conn = await asyncpg.connect(url)
    try:
        await reset(conn)
        async with running(CONFIG.format(url=url)) as app:
            handle = app.runtime.flows["handle_ws_message"]
            context = {"topic": "message"}

            async def consume(events: Iterator[dict[str, object]]) -> None:
                for payload in events:
                    await handle.process(Event(payload, context))

            async def run(payloads: list[dict[str, object]]) -> None:
                events = iter(payloads)
                consumers = (consume(events) for _ in range(handle.concurrency))
                await asyncio.gather(*consumers)

            await run(payloads[:WARM_UP])
            gc.freeze()
            start = time.perf_counter()
            cpu = time.process_time()
            await run(payloads)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu
        count = await conn.fetchval("SELECT count(*) FROM bench_rows")
        assert count == WARM_UP + ROWS
    finally:
        await conn.close()
    return ROWS / elapsed, cpu / ROWS * 1e6


async def main() -> None:
    name = f"mycel_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
    try:
        payloads = rows()
        mycel_best = bare_best = single_best = 0.0
        mycel_cpu = bare_cpu = single_cpu = float("inf")
        naive = await one_by_one(url, payloads[:NAIVE_ROWS])
        for _ in range(REPEAT):
            rate, cpu = await bare(url, payloads)
            bare_best, bare_cpu = max(bare_best, rate), min(bare_cpu, cpu)
            rate, cpu = await through_mycel(url, payloads)
            mycel_best, mycel_cpu = max(mycel_best, rate), min(mycel_cpu, cpu)
            rate, cpu = await one_at_a_time(url, payloads)
            single_best, single_cpu = max(single_best, rate), min(single_cpu, cpu)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(
        json.dumps(
            {
                "bench": "database",
                "figure": "rows into PostgreSQL",
                "unit": "rows/s",
                "value": round(mycel_best),
                "baseline_name": "bare asyncpg executemany, one transaction",
                "baseline": round(bare_best),
                "ratio": round(mycel_best / bare_best, 2),
                "higher_is_better": True,
                "aim": ">= 0.8",
                "notes": (
                    f"{ROWS:,} rows (int, text, jsonb), best of {REPEAT}, uvloop, "
                    f"both warm ({WARM_UP:,} rows first); Mycel: memory source, "
                    "flow concurrency 1024, pool_size 4, every event done only "
                    "once its row committed"
                ),
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "database",
                "figure": "rows into PostgreSQL, vs no batching",
                "unit": "rows/s",
                "value": round(mycel_best),
                "baseline_name": "one asyncpg INSERT per row, 1024 at once, pool of 4",
                "baseline": round(naive),
                "ratio": round(mycel_best / naive, 2),
                "higher_is_better": True,
                "aim": "",
                "notes": (
                    "what batching concurrent deliveries buys over a plain "
                    f"consumer; baseline on {NAIVE_ROWS:,} rows, one commit each"
                ),
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "database",
                "figure": "rows into PostgreSQL, handed over one event at a time",
                "unit": "rows/s",
                "value": round(single_best),
                "baseline_name": "bare asyncpg executemany, one transaction",
                "baseline": round(bare_best),
                "ratio": round(single_best / bare_best, 2),
                "higher_is_better": True,
                "aim": "",
                "notes": (
                    "as the websocket and RabbitMQ sources hand events over: "
                    "FlowHandle.process per event from 1024 tasks, the events of "
                    "one loop iteration handed to the target together; "
                    f"{single_cpu:.1f} µs CPU/row"
                ),
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "database",
                "figure": "CPU of this process per row",
                "unit": "µs/row",
                "value": round(mycel_cpu, 1),
                "baseline_name": "bare asyncpg executemany, one transaction",
                "baseline": round(bare_cpu, 1),
                "ratio": round(bare_cpu / mycel_cpu, 2),
                "higher_is_better": False,
                "aim": "",
                "notes": (
                    "where the time goes: Mycel's cost includes the memory source "
                    "and the flow engine, which bare asyncpg does not have; its "
                    "JSON encoder is cheaper than bare's json.dumps"
                ),
            }
        )
    )


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
