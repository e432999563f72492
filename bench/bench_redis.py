"""Redis stream source throughput: Mycel against plain redis-py loops.

One stream is filled with small JSON entries, then read to the end by three
consumer groups: one by a plain redis-py loop (``XREADGROUP`` a batch, parse
each entry, ``XACK`` each: the least an at-least-once consumer does), one by
the same loop acknowledging each batch with one ``XACK`` (what a consumer
tuned by hand does), and one by a Mycel flow from a ``redis`` ``stream:``
source into a ``memory`` target. A side is done when its group has read
every entry and acknowledged it. All timings start before connecting.
Several rounds, the best of each side counts (Redis and the CPUs are shared
with other work on this machine, so CPU seconds are printed too).

Needs Redis on 127.0.0.1:6379; run as a script:
``python bench/bench_redis.py [--entries N] [--rounds R]``.

"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from mycel import Runtime
from mycel.testing import load_test_config

URL = "redis://127.0.0.1:6379/0"
BATCH = 100


async def fill(client: Any, stream: str, count: int) -> None:
    """Append ``count`` small JSON entries, pipelined in batches."""
    for start in range(0, count, 1000):
        async with client.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 1000, count)):
                entry = {"order_id": n, "status": "created", "user_id": n % 100}
                pipe.xadd(stream, {"data": json.dumps(entry)})
            await pipe.execute()


async def plain_loop(stream: str, group: str, count: int) -> tuple[float, float]:
    """Wall and CPU seconds for a bare redis-py consumer to ack ``count``."""
    started = time.perf_counter()
    cpu = time.process_time()
    client = aioredis.Redis.from_url(URL)
    seen = 0
    while seen < count:
        response = await client.xreadgroup(
            group, "plain", {stream: ">"}, count=BATCH, block=1000
        )
        for entry_id, fields in response[0][1] if response else ():
            json.loads(fields[b"data"])
            await client.xack(stream, group, entry_id)
            seen += 1
    elapsed = time.perf_counter() - started, time.process_time() - cpu
    await client.aclose()
    return elapsed


async def plain_batched(stream: str, group: str, count: int) -> tuple[float, float]:
    """Like :func:`plain_loop`, but one ``XACK`` per batch read."""
    started = time.perf_counter()
    cpu = time.process_time()
    client = aioredis.Redis.from_url(URL)
    seen = 0
    while seen < count:
        response = await client.xreadgroup(
            group, "plain", {stream: ">"}, count=BATCH, block=1000
        )
        entries = response[0][1] if response else []
        for _, fields in entries:
            json.loads(fields[b"data"])
        if entries:
            await client.xack(stream, group, *(entry_id for entry_id, _ in entries))
        seen += len(entries)
    elapsed = time.perf_counter() - started, time.process_time() - cpu
    await client.aclose()
    return elapsed


async def settled(client: Any, stream: str, group: str, count: int) -> bool:
    for info in await client.xinfo_groups(stream):
        if info["name"].decode() == group:
            return bool(info["entries-read"] >= count and info["pending"] == 0)
    return False


async def mycel_run(
    config_text: str, stream: str, group: str, count: int
) -> tuple[float, float]:
    """Seconds for a Mycel flow to take and acknowledge ``count`` entries.

    Loading the configuration (plugins, parsing) is not timed; starting the
    runtime (connecting, creating the group) is, as connecting is for the
    plain loop.

    """
    runtime = Runtime(load_test_config(config_text))
    watcher = aioredis.Redis.from_url(URL)
    started = time.perf_counter()
    cpu = time.process_time()
    await runtime.start()
    while not await settled(watcher, stream, group, count):
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started, time.process_time() - cpu
    delivered = runtime.metrics.events_out.cell("bench", "mem")[0]
    await runtime.stop(timeout=10)
    await watcher.aclose()
    if delivered != count:
        raise SystemExit(f"mycel delivered {delivered} of {count} entries")
    return elapsed


async def main(count: int, rounds: int) -> None:
    client = aioredis.Redis.from_url(URL)
    best_plain = best_batched = best_mycel = (float("inf"), 0.0)
    try:
        for _ in range(rounds):
            stream = f"mycel-bench-{uuid.uuid4().hex[:8]}"
            try:
                await client.xgroup_create(stream, "plain", id="0", mkstream=True)
                await client.xgroup_create(stream, "batched", id="0")
                await fill(client, stream, count)
                config_text = f"""
                connector "r"   {{ type = "redis"  url = "{URL}"  batch = {BATCH} }}
                connector "mem" {{ type = "memory" }}
                flow "bench" {{
                  from {{ connector = "r"  operation = "stream:{stream}"
                         start = "beginning" }}
                  to   {{ connector = "mem"  target = "sink" }}
                }}
                """
                plain = await plain_loop(stream, "plain", count)
                batched = await plain_batched(stream, "batched", count)
                mycel = await mycel_run(config_text, stream, "bench", count)
                best_plain = min(best_plain, plain)
                best_batched = min(best_batched, batched)
                best_mycel = min(best_mycel, mycel)
            finally:
                await client.delete(stream, stream + ".dead")
    finally:
        await client.aclose()

    value = count / best_mycel[0]
    for name, best in (
        ("plain redis-py loop, XACK per entry", best_plain),
        ("plain redis-py loop, XACK per batch", best_batched),
    ):
        baseline = count / best[0]
        print(
            json.dumps(
                {
                    "bench": "redis_stream_source",
                    "figure": "stream entries read, processed and acknowledged",
                    "unit": "entries/s",
                    "value": round(value),
                    "baseline_name": name,
                    "baseline": round(baseline),
                    "ratio": round(value / baseline, 2),
                    "higher_is_better": True,
                    "aim": ">= 0.5x a plain loop (Mycel runs a whole flow per entry)",
                    "notes": (
                        f"{count} entries, batches of {BATCH}, best of {rounds} "
                        f"rounds; CPU seconds mycel {best_mycel[1]:.2f}, "
                        f"baseline {best[1]:.2f}"
                    ),
                }
            )
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.entries, args.rounds))
    sys.exit(0)
