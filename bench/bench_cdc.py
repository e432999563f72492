"""CDC throughput and latency: Mycel's ``cdc`` source against pg_recvlogical.

Throughput: a private PostgreSQL 15 cluster (``wal_level = logical``, see
``testsupport/postgres.py``) gets one slot per reader and round, then
200,000 row inserts (1,000 per transaction) into a five-column table. Each
round, ``pg_recvlogical`` reads the backlog from its own slot with the same
pgoutput options (into /dev/null, stopping at the end LSN), and Mycel reads
it from another slot through a flow into a ``memory`` target, done when its
confirmed position (every flow finished) reaches the same LSN. Both timings
include connecting. Best of three rounds for each side, alternating who
goes first: other work shares this machine.

Latency: pgbench commits one-row transactions at a steady 1,000 per second
for ten seconds while Mycel streams them into a target that notes, for each
change, the time from its commit timestamp to the flow's delivery.

Mycel runs in this process the way ``mycel run`` runs it: on uvloop, with
what start-up allocated frozen out of the garbage collector's sight.

Run as a script: ``python bench/bench_cdc.py [--changes N] [--rounds R]``.

"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mycel
from mycel import Runtime
from mycel.testing import load_test_config
from mycel_cdc import CdcConnector, Decoder, parse_lsn
from mycel_cdc._setup import TypeResolver
from mycel_cdc._stream import ReplicationStream
from testsupport.postgres import PG_BIN, start_logical_cluster

TABLE = (
    "CREATE TABLE bench (id bigserial PRIMARY KEY, qty int, price numeric(10,2), "
    "name text, at timestamptz DEFAULT now())"
)


def emit(**row: Any) -> None:
    print(json.dumps({"bench": "cdc", **row}), flush=True)


async def sql(dsn: str, *statements: str) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            cursor = await conn.execute(statement)
            if cursor.description is not None:
                rows = await cursor.fetchall()
    return rows


def cdc_config(dsn: str, slot: str, table: str, target: str) -> str:
    return f"""
connector "cdc" {{
  type = "cdc"
  connection_string = "{dsn}"
  tables = ["{table}"]
  slot_name = "{slot}"
  publication = "bench_pub"
}}
{target}
flow "f" {{
  from {{ connector = "cdc" operation = "{table}.INSERT" }}
  to {{ connector = "out" target = "changes" }}
}}
"""


async def stream(text: str, end: int) -> tuple[float, CdcConnector]:
    """Run ``text`` from its start until connector "cdc" confirmed ``end``.

    Seconds taken, connecting included, and the connector, stopped.
    """
    runtime = Runtime(load_test_config(text))
    started = time.perf_counter()
    await runtime.start()
    gc.freeze()  # as mycel run does after start-up (mycel.cli.serve)
    cdc = runtime.connectors["cdc"]
    assert isinstance(cdc, CdcConnector)
    while cdc.confirmed < end:
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    await runtime.stop(timeout=5)
    return elapsed, cdc


async def run_mycel(dsn: str, slot: str, end: int) -> float:
    memory = 'connector "out" { type = "memory" }'
    elapsed, _ = await stream(cdc_config(dsn, slot, "bench", memory), end)
    return elapsed


async def run_decoder(dsn: str, slot: str, end: int) -> float:
    """The connector's own reading and decoding, without the flow engine."""
    started = time.perf_counter()
    stream = await ReplicationStream.open(dsn)
    await stream.start(slot, "bench_pub", 0)
    targets = (None,)
    decoder = Decoder(
        lambda schema, name: {"INSERT": targets}, TypeResolver(dsn).converter
    )
    out: list[Any] = []
    done = 0
    while done < end:
        data = stream.poll()
        if data is None:
            await stream.wait()
            continue
        if data[0] == 119:  # XLogData
            decoder.decode(bytes(data[25:]), int.from_bytes(data[1:9], "big"), out)
            if len(out) >= 512:
                done = max([done, *(i for i in out if isinstance(i, int))])
                out.clear()
        elif data[0] == 107:  # keepalive
            done = max([done, int.from_bytes(data[1:9], "big")])
    elapsed = time.perf_counter() - started
    await stream.close()
    return elapsed


def run_recvlogical(dsn: str, slot: str, end_text: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            str(PG_BIN / "pg_recvlogical"), "-d", dsn, "-S", slot, "--start",
            "-o", "proto_version=1", "-o", "publication_names=bench_pub",
            "-E", end_text, "-f", "/dev/null", "--no-loop",
        ],
        check=True,
    )  # fmt: skip
    return time.perf_counter() - started


# -- latency ------------------------------------------------------------------


class StopwatchTarget(mycel.Connector):
    """Notes commit-to-delivery time of each change (bench only)."""

    type_name = "stopwatch"
    target_operations = (mycel.Operation("note", "note the latency"),)
    default_operation = "note"
    samples: list[float] = []

    async def deliver(self, delivery: mycel.Delivery) -> None:
        now = time.time()
        committed = datetime.fromisoformat(delivery.payload["_commit_time"])
        self.samples.append(now - committed.timestamp())


class _Plugin:
    @mycel.hookimpl
    def mycel_connector_types(self) -> list[type[mycel.Connector]]:
        return [StopwatchTarget]


async def run_latency(
    cluster_dsn: str, tmp: Path, rate: int, seconds: int
) -> list[float]:
    await sql(
        cluster_dsn,
        "CREATE TABLE lat (id bigserial PRIMARY KEY, v int)",
        "ALTER PUBLICATION bench_pub ADD TABLE lat",
    )
    config = load_test_config(
        cdc_config(
            cluster_dsn, "bench_lat", "lat", 'connector "out" { type = "stopwatch" }'
        ),
        plugins=[_Plugin()],
    )
    script = tmp / "insert.sql"
    script.write_text("INSERT INTO lat (v) VALUES (1);\n")
    StopwatchTarget.samples = []
    runtime = Runtime(config)
    await runtime.start()
    try:
        process = await asyncio.create_subprocess_exec(
            str(PG_BIN / "pgbench"), "-n", "-f", str(script), "-R", str(rate),
            "-T", str(seconds), "-c", "2", "-j", "1", cluster_dsn,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await process.wait()
        [(count,)] = await sql(cluster_dsn, "SELECT count(*) FROM lat")
        while len(StopwatchTarget.samples) < count:
            await asyncio.sleep(0.01)
    finally:
        await runtime.stop(timeout=5)
    return StopwatchTarget.samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cluster = await asyncio.to_thread(start_logical_cluster)
    try:
        dsn = cluster.dsn
        # One slot per reader and round, all before the workload is written.
        await sql(dsn, TABLE, "CREATE PUBLICATION bench_pub FOR TABLE bench")
        for n in range(args.rounds):
            for who in ("mycel", "recv", "decode"):
                slot = f"{who}_{n}"
                create = (
                    f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
                )
                await sql(dsn, create)
        batch = 1000
        for start in range(0, args.changes, batch):
            await sql(
                dsn,
                "INSERT INTO bench (qty, price, name) SELECT g, g * 0.25, "
                f"'item ' || g FROM generate_series({start}, {start + batch - 1}) g",
            )
        [(end_text,)] = await sql(dsn, "SELECT pg_current_wal_lsn()::text")
        end = parse_lsn(end_text)

        mycel_times: list[float] = []
        recv_times: list[float] = []
        decode_times: list[float] = []
        for n in range(args.rounds):
            order = ("mycel", "recv", "decode")
            for who in order if n % 2 == 0 else reversed(order):
                if who == "mycel":
                    mycel_times.append(await run_mycel(dsn, f"mycel_{n}", end))
                elif who == "decode":
                    decode_times.append(await run_decoder(dsn, f"decode_{n}", end))
                else:
                    recv_times.append(
                        await asyncio.to_thread(
                            run_recvlogical, dsn, f"recv_{n}", end_text
                        )
                    )
        mycel_rate = args.changes / min(mycel_times)
        recv_rate = args.changes / min(recv_times)
        emit(
            figure="changes per second, one slot into a memory target",
            unit="changes/s", value=round(mycel_rate),
            baseline_name="pg_recvlogical (pgoutput, to /dev/null)",
            baseline=round(recv_rate), ratio=round(mycel_rate / recv_rate, 2),
            higher_is_better=True, aim=">= 1x pg_recvlogical",
            notes=(
                f"{args.changes:,} inserts in 1,000-row transactions, backlog read "
                f"from its own slot; best of {args.rounds} rounds each "
                f"(Mycel {', '.join(f'{t:.2f}s' for t in mycel_times)}; "
                f"pg_recvlogical {', '.join(f'{t:.2f}s' for t in recv_times)})"
            ),
        )  # fmt: skip

        decode_rate = args.changes / min(decode_times)
        emit(
            figure="changes per second, reading and decoding only (no flows)",
            unit="changes/s", value=round(decode_rate),
            baseline_name="pg_recvlogical (pgoutput, to /dev/null)",
            baseline=round(recv_rate), ratio=round(decode_rate / recv_rate, 2),
            higher_is_better=True, aim="report: the connector's share of the cost",
            notes=(
                "mycel_cdc's replication stream and pgoutput decoder into one dict "
                "per row, without the flow engine; same workload, own slot, best of "
                f"{args.rounds} ({', '.join(f'{t:.2f}s' for t in decode_times)})"
            ),
        )  # fmt: skip

        tmp = cluster.directory.parent / f"bench-cdc-{cluster.port}"
        tmp.mkdir(exist_ok=True)
        samples = await run_latency(dsn, tmp, rate=1000, seconds=10)
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            emit(
                figure=f"commit-to-flow latency {name} at 1,000 changes/s",
                unit="ms", value=round(percentile(samples, fraction) * 1000, 2),
                baseline_name=None, baseline=None, ratio=None,
                higher_is_better=False, aim="report",
                notes=(
                    f"{len(samples):,} one-row transactions from pgbench -R 1000; "
                    "commit timestamp to the flow's delivery; mean "
                    f"{statistics.fmean(samples) * 1000:.2f} ms"
                ),
            )  # fmt: skip
    finally:
        await asyncio.to_thread(cluster.stop)


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
