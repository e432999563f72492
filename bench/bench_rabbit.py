"""RabbitMQ throughput: Mycel against plain aio-pika, as source and target.

The same messages are published once to an exchange that feeds two queues:
one read by a plain aio-pika consumer that acknowledges each message as it
comes (the least any at-least-once consumer does), the other by a Mycel flow
from a ``rabbitmq`` source into a ``memory`` target. Both read with the same
prefetch and both timings start before connecting. Several rounds, the best
of each side counts (the broker is shared with other work on this machine).

As a target, a Mycel flow from a ``memory`` source publishes with publisher
confirms, against plain aio-pika tasks publishing the same messages with
confirms on one channel, with the same concurrency, into the same durable
queue.

Needs RabbitMQ on 127.0.0.1:5672 (guest/guest); run as a script:
``python bench/bench_rabbit.py [--messages N] [--published N] [--rounds R]``.

"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

import aio_pika

from mycel import MemoryConnector, Runtime
from mycel.testing import load_test_config

URL = "amqp://guest:guest@127.0.0.1:5672/"
PREFETCH = 64


async def fill(channel: Any, exchange: Any, count: int) -> None:
    """Publish ``count`` small JSON messages, confirmed, in batches."""
    batch = 500
    for start in range(0, count, batch):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        json.dumps(
                            {"order_id": n, "status": "created", "user_id": n % 100}
                        ).encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    "bench.order.created",
                )
                for n in range(start, min(start + batch, count))
            )
        )


async def wait_depth(channel: Any, queue: str, count: int) -> None:
    while True:
        declared = await channel.declare_queue(queue, passive=True)
        if declared.declaration_result.message_count >= count:
            return
        await asyncio.sleep(0.05)


async def plain_loop(queue_name: str, count: int) -> tuple[float, float]:
    """Wall and CPU seconds for a bare aio-pika consumer to ack ``count``."""
    started = time.perf_counter()
    cpu = time.process_time()
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(queue_name, durable=True)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: Any) -> None:
            nonlocal seen
            json.loads(message.body)
            await message.ack()
            seen += 1
            if seen == count:
                done.set()

        tag = await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - started, time.process_time() - cpu
        await queue.cancel(tag)
    return elapsed


async def mycel_run(config_text: str, count: int) -> tuple[float, float]:
    """Seconds for a Mycel flow to take ``count`` messages into memory.

    Loading the configuration (plugins, parsing) is not timed; starting the
    runtime (connecting, declaring) is, as connecting is for the plain loop.

    """
    runtime = Runtime(load_test_config(config_text))
    delivered = runtime.metrics.events_out.cell("bench", "mem")
    finished = asyncio.Event()
    check_every = 0.005

    async def watch() -> None:
        while delivered[0] < count:
            await asyncio.sleep(check_every)
        finished.set()

    started = time.perf_counter()
    cpu = time.process_time()
    await runtime.start()
    watcher = asyncio.create_task(watch())
    await finished.wait()
    elapsed = time.perf_counter() - started, time.process_time() - cpu
    await watcher
    await runtime.stop(timeout=10)
    return elapsed


async def main(count: int, rounds: int) -> None:
    prefix = f"mycel-bench-{uuid.uuid4().hex[:8]}."
    exchange_name = f"{prefix}x"
    plain_queue = f"{prefix}plain"
    mycel_queue = f"{prefix}q.bench"
    config_text = f"""
    connector "rabbit" {{
      type         = "rabbitmq"
      url          = "{URL}"
      exchange     = "{exchange_name}"
      queue_prefix = "{prefix}q."
      prefetch     = {PREFETCH}
      dead_letter {{
        exchange = "{prefix}dlx"
        queue    = "{prefix}dead"
      }}
    }}
    connector "mem" {{ type = "memory" }}
    flow "bench" {{
      concurrency = {PREFETCH}
      from {{ connector = "rabbit"  operation = "bench.#" }}
      to   {{ connector = "mem"     target = "sink" }}
    }}
    """
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for name in (plain_queue, mycel_queue):
            queue = await channel.declare_queue(name, durable=True)
            await queue.bind(exchange, "bench.#")
        try:
            plain: list[tuple[float, float]] = []
            mycel: list[tuple[float, float]] = []
            for round_ in range(rounds):
                await fill(channel, exchange, count)
                await wait_depth(channel, plain_queue, count)
                await wait_depth(channel, mycel_queue, count)
                # Alternate who goes first, so that drift hurts both alike.
                if round_ % 2:
                    mycel.append(await mycel_run(config_text, count))
                    plain.append(await plain_loop(plain_queue, count))
                else:
                    plain.append(await plain_loop(plain_queue, count))
                    mycel.append(await mycel_run(config_text, count))
        finally:
            for name in (plain_queue, mycel_queue, f"{prefix}dead"):
                await channel.queue_delete(name)
            for name in (exchange_name, f"{prefix}dlx"):
                await channel.exchange_delete(name)

    mycel_rate = count / min(wall for wall, _ in mycel)
    plain_rate = count / min(wall for wall, _ in plain)
    mycel_cpu = min(cpu for _, cpu in mycel) / count * 1e6
    plain_cpu = min(cpu for _, cpu in plain) / count * 1e6
    common = (
        f"{count:,} persistent JSON messages of ~60 bytes, prefetch {PREFETCH}, "
        f"best of {rounds} rounds; Mycel: rabbitmq source -> memory target, "
        "JSON decoded, acked after the flow, acks of messages that finish "
        "together coalesced into one basic.ack(multiple); the plain loop acks "
        "each message through aio-pika's IncomingMessage"
    )
    print(
        json.dumps(
            {
                "bench": "rabbit_source",
                "figure": "messages consumed and acked",
                "unit": "messages/s",
                "value": round(mycel_rate),
                "baseline_name": "plain aio-pika consume-and-ack loop",
                "baseline": round(plain_rate),
                "ratio": round(mycel_rate / plain_rate, 3),
                "higher_is_better": True,
                "aim": ">= 0.8x of the plain loop",
                "notes": (
                    f"{common}; every round, Mycel "
                    f"{[round(count / wall) for wall, _ in mycel]}, plain "
                    f"{[round(count / wall) for wall, _ in plain]}"
                ),
            }
        )
    )
    print(
        json.dumps(
            {
                "bench": "rabbit_source",
                "figure": "consumer CPU per message",
                "unit": "µs/message",
                "value": round(mycel_cpu, 1),
                "baseline_name": "plain aio-pika consume-and-ack loop",
                "baseline": round(plain_cpu, 1),
                "ratio": round(plain_cpu / mycel_cpu, 3),
                "higher_is_better": False,
                "aim": "<= 1.25x the plain loop's CPU",
                "notes": (
                    f"{common}; process CPU time, so less sensitive to other "
                    "load on the machine than the wall-clock figure"
                ),
            },
            ensure_ascii=False,
        )
    )


async def plain_publish(exchange_name: str, count: int) -> tuple[float, float]:
    """Wall and CPU seconds for confirmed publishes by CONCURRENCY tasks."""
    started = time.perf_counter()
    cpu = time.process_time()
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        numbers = iter(range(count))

        async def worker() -> None:
            for n in numbers:
                body = {"order_id": n, "status": "created", "user_id": n % 100}
                await exchange.publish(
                    aio_pika.Message(
                        json.dumps(body, separators=(",", ":")).encode(),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=uuid.uuid4().hex,
                    ),
                    "sink.x",
                )

        await asyncio.gather(*(worker() for _ in range(PREFETCH)))
        return time.perf_counter() - started, time.process_time() - cpu


async def mycel_publish(config_text: str, count: int) -> tuple[float, float]:
    """Wall and CPU seconds for a memory -> rabbitmq flow to publish ``count``."""
    runtime = Runtime(load_test_config(config_text))
    delivered = runtime.metrics.events_out.cell("pub", "rabbit")
    memory = runtime.connectors["mem"]
    assert isinstance(memory, MemoryConnector)
    started = time.perf_counter()
    cpu = time.process_time()
    await runtime.start()
    for n in range(count):
        await memory.publish(
            "in", {"order_id": n, "status": "created", "user_id": n % 100}
        )
    while delivered[0] < count:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started, time.process_time() - cpu
    await runtime.stop(timeout=10)
    return elapsed


async def target_main(count: int, rounds: int) -> None:
    prefix = f"mycel-bench-{uuid.uuid4().hex[:8]}."
    exchange_name = f"{prefix}x"
    sink = f"{prefix}sink"
    config_text = f"""
    connector "rabbit" {{
      type         = "rabbitmq"
      url          = "{URL}"
      exchange     = "{exchange_name}"
      queue_prefix = "{prefix}q."
      dead_letter {{
        exchange = "{prefix}dlx"
        queue    = "{prefix}dead"
      }}
    }}
    connector "mem" {{
      type   = "memory"
      buffer = {count}
    }}
    flow "pub" {{
      concurrency = {PREFETCH}
      from {{ connector = "mem"     operation = "in" }}
      to   {{ connector = "rabbit"  target = "sink.x" }}
    }}
    """
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(sink, durable=True)
        await queue.bind(exchange, "sink.#")
        try:
            plain: list[tuple[float, float]] = []
            mycel: list[tuple[float, float]] = []
            for round_ in range(rounds):
                if round_ % 2:
                    mycel.append(await mycel_publish(config_text, count))
                    await queue.purge()
                    plain.append(await plain_publish(exchange_name, count))
                else:
                    plain.append(await plain_publish(exchange_name, count))
                    await queue.purge()
                    mycel.append(await mycel_publish(config_text, count))
                await queue.purge()
        finally:
            for name in (sink, f"{prefix}dead"):
                await channel.queue_delete(name)
            for name in (exchange_name, f"{prefix}dlx"):
                await channel.exchange_delete(name)

    mycel_rate = count / min(wall for wall, _ in mycel)
    plain_rate = count / min(wall for wall, _ in plain)
    print(
        json.dumps(
            {
                "bench": "rabbit_target",
                "figure": "messages published and confirmed",
                "unit": "messages/s",
                "value": round(mycel_rate),
                "baseline_name": f"{PREFETCH} aio-pika tasks publishing with confirms",
                "baseline": round(plain_rate),
                "ratio": round(mycel_rate / plain_rate, 3),
                "higher_is_better": True,
                "aim": ">= 0.8x of plain aio-pika",
                "notes": (
                    f"{count:,} persistent JSON messages into one durable queue, "
                    f"{PREFETCH} at a time, best of {rounds} rounds; Mycel: memory "
                    "source -> rabbitmq target; every round, Mycel "
                    f"{[round(count / wall) for wall, _ in mycel]}, plain "
                    f"{[round(count / wall) for wall, _ in plain]}; CPU per "
                    f"message, best round: Mycel "
                    f"{min(cpu for _, cpu in mycel) / count * 1e6:.0f} µs, plain "
                    f"{min(cpu for _, cpu in plain) / count * 1e6:.0f} µs"
                ),
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--published", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.messages, args.rounds))
        asyncio.run(target_main(args.published, args.rounds))
    except OSError as exc:
        print(f"RabbitMQ is not reachable at 127.0.0.1:5672: {exc}", file=sys.stderr)
        sys.exit(1)
