"""End-to-end latency: RabbitMQ publish -> ``mycel run`` -> subscribers.

Run as ``python bench/bench_e2e.py`` (needs RabbitMQ on 127.0.0.1:5672;
``BENCH_E2E_KINDS=ws,sse,gql`` and ``BENCH_E2E_SIZES=1000,10000`` narrow
it, ``BENCH_E2E_CLIENT_PROCS`` sets how many client processes share the
connections, by default one per 5,000 clients). Prints one JSON object per
figure (bench/README.md). ``bench_e2e_cdc.py`` measures the CDC scenarios
with the same clients and relays.

Three of the issue's scenarios, each a real ``mycel run`` process, with
1,000 and 10,000 clients:

- ``ws``: RabbitMQ -> WebSocket room with a per-user filter
  (``send_user_notification``);
- ``sse``: RabbitMQ -> SSE stream with a per-user filter
  (``stream_notifications``);
- ``gql``: RabbitMQ -> GraphQL subscription with a transform and a per-user
  filter on ``connection_params``.

100 distinct users, so each event reaches 1 % of the clients. Latency runs
from just before the publish (a timestamp in the body) to the client's
receipt, on the same machine's clock:

- steady: 200 messages per second for 5 seconds, publisher confirms on;
- saturation: 1,000 messages published as fast as the client can (no
  confirms), so the figure includes the queueing of a full pipe.

The baseline, measured in the same run with the same clients and the same
publisher: a bare relay written here per protocol, an aio-pika consumer (no
acks, like a relay that does not care about loss) feeding the connections
of the message's ``user_id`` (a dict index, as Mycel's hub has) through
``websockets.broadcast``, raw SSE writes, or graphql-transport-ws ``next``
frames, in its own process like ``mycel run``. Mycel acknowledges each
message only after its flow finished; the relays do not.

The clients and the relays' fan-out side are in ``_e2e.py``. 10,000 SSE
and GraphQL clients used to be left out on the grounds that one client
process could not read them fast enough on 2 cores. Measured, that was not
so: the old client (one ``asyncio.StreamReader`` per connection, one
``readline`` per event, one process) read 10,000 SSE streams from the bare
relay at 20,000 events/s with a 3.1 ms median (33 ms p99), while Mycel's
stream showed a 3.2 s median with the same client. The clients are now
``asyncio.Protocol`` objects that scan each read in one pass (cheaper, so
they disturb the server less: 18 ms p99 against the same relay), one
process per 5,000 connections, and every figure notes the CPU time the
server and the clients used in that phase, so that a phase limited by its
clients rather than by the server shows it.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _e2e import (
    RABBIT,
    SATURATION,
    SIZES,
    STEADY_RATE,
    STEADY_SECONDS,
    USERS,
    Deliver,
    cleanup,
    frame_for,
    free_port,
    measure,
    raise_fd_limit,
    report,
    run_relay,
    serve_clients,
    start_mycel,
    start_relay,
    stop_mycel,
    stop_relay,
)

KINDS = os.environ.get("BENCH_E2E_KINDS", "ws,sse,gql").split(",")


def rabbit_relay_process(
    port: int, exchange: str, queue: str, kind: str, pipe: Connection
) -> None:
    async def main() -> None:
        import aio_pika

        connection = await aio_pika.connect(RABBIT)

        async def feed(deliver: Deliver) -> None:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            ex = await channel.declare_exchange(
                exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            declared = await channel.declare_queue(queue, auto_delete=True)
            await declared.bind(ex, "notifications")

            async def on_message(message: Any) -> None:
                data = json.loads(message.body)
                text = json.dumps(data, separators=(",", ":"))
                deliver(str(data["user_id"]), frame_for(kind, "notifications", text))

            await declared.consume(on_message, no_ack=True)

        await serve_clients(kind, port, feed, pipe)
        await connection.close()

    raise_fd_limit()
    run_relay(main)


# --- mycel run ---------------------------------------------------------------

CONFIG = """
service {{
  name       = "bench"
  admin_port = {admin}
}}
connector "rabbit" {{
  type         = "rabbitmq"
  url          = "{url}"
  exchange     = "{exchange}"
  queue_prefix = "{prefix}"
  prefetch     = 1000
  dead_letter {{
    exchange = "{exchange}.dlx"
    queue    = "{prefix}dead"
  }}
}}
"""

SINKS = {
    "ws": """
connector "ws" {{
  type            = "websocket"
  port            = {port}
  send_queue      = 20000
  max_connections = 20000
}}
""",
    "sse": """
connector "sse" {{
  type       = "sse"
  port       = {port}
  send_queue = 20000
}}
""",
    "gql": """
connector "gql" {{
  type       = "graphql"
  port       = {port}
  queue_size = 20000
  subscriptions {{
    enabled = true
    path    = "/graphql/ws"
  }}
}}
""",
}

FLOWS = {
    "ws": """
flow "send_user_notification" {
  from { connector = "rabbit"  operation = "notifications" }
  to {
    connector = "ws"
    operation = "room:notifications"
    filter    = "input.user_id == context.params.user_id"
  }
}
""",
    "sse": """
flow "stream_notifications" {
  from { connector = "rabbit"  operation = "notifications" }
  to {
    connector = "sse"
    operation = "stream:notifications"
    filter    = "input.user_id == context.params.user_id"
  }
}
""",
    "gql": """
flow "notification_updates" {
  from { connector = "rabbit"  operation = "notifications" }
  transform {
    user_id = "input.user_id"
    n       = "input.n"
    sent    = "input.sent"
  }
  to {
    connector = "gql"
    operation = "Subscription.notification"
    filter    = "input.user_id == context.connection_params.userId"
  }
}
""",
}

FLOW_NAMES = {
    "ws": "send_user_notification",
    "sse": "stream_notifications",
    "gql": "notification_updates",
}

PATHS = {
    "ws": "/ws?user_id={user}&rooms=notifications",
    "sse": "/events/notifications?user_id={user}",
    "gql": "/graphql/ws",
}
GQL_QUERY = "subscription { notification }"


# --- measuring ---------------------------------------------------------------


async def publish(exchange: str, steady: bool) -> tuple[dict[int, int], float]:
    import aio_pika

    connection = await aio_pika.connect(RABBIT)
    channel = await connection.channel(publisher_confirms=steady)
    ex = await channel.get_exchange(exchange)
    count = STEADY_RATE * STEADY_SECONDS if steady else SATURATION
    loop = asyncio.get_running_loop()
    started, start = time.time(), loop.time()
    for n in range(count):
        if steady:
            delay = start + n / STEADY_RATE - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        body = json.dumps({"user_id": n % USERS, "n": n, "sent": time.time()})
        await ex.publish(aio_pika.Message(body.encode()), "notifications")
    await connection.close()
    return {user: count // USERS for user in range(USERS)}, started


PLAN = [(k, n) for k in ("ws", "sse", "gql") for n in (1_000, 10_000)]
RELAYS = {
    "ws": "aio-pika consumer -> websockets.broadcast relay",
    "sse": "aio-pika consumer -> bare asyncio SSE relay",
    "gql": "aio-pika consumer -> bare graphql-transport-ws relay (websockets)",
}
SCENARIOS = {
    "ws": "RabbitMQ -> ws room, per-user filter",
    "sse": "RabbitMQ -> SSE stream, per-user filter (stream_notifications)",
    "gql": "RabbitMQ -> GraphQL subscription, transform and per-user filter",
}
RATES = {
    "steady": f"{STEADY_RATE} msg/s for {STEADY_SECONDS} s, confirmed publishes",
    "saturation": f"{SATURATION} messages as fast as published, no confirms",
}


def main() -> None:
    raise_fd_limit()
    tag = uuid.uuid4().hex[:8]
    exchange, prefix = f"mycel-bench-e2e-{tag}", f"mycel-bench-e2e-{tag}."
    queues = [f"{prefix}{flow}" for flow in FLOW_NAMES.values()] + [f"{prefix}dead"]
    folder = Path(tempfile.mkdtemp(prefix="mycel-bench-e2e-"))
    plan = [(k, n) for k, n in PLAN if k in KINDS and n in SIZES]

    def produce(steady: bool) -> tuple[dict[int, int], float]:
        return asyncio.run(publish(exchange, steady))

    try:
        for kind, clients in plan:
            port, admin = free_port(), free_port()
            run_dir = folder / f"{kind}-{clients}"
            config = (CONFIG + SINKS[kind]).format(
                admin=admin, url=RABBIT, exchange=exchange, prefix=prefix, port=port
            )
            mycel = start_mycel(run_dir, config + FLOWS[kind], admin)
            try:
                ours = measure(
                    mycel.pid, port, kind, PATHS[kind], clients, produce, GQL_QUERY
                )
            finally:
                stop_mycel(mycel, run_dir)
            asyncio.run(cleanup(exchange, queues))

            port = free_port()
            relay, pipe = start_relay(
                rabbit_relay_process, port, exchange, f"{prefix}relay", kind
            )
            try:
                theirs = measure(
                    relay.pid, port, kind, PATHS[kind], clients, produce, GQL_QUERY
                )
            finally:
                stop_relay(relay, pipe)
            report(
                "e2e",
                kind,
                clients,
                ours,
                theirs,
                scenario=SCENARIOS[kind],
                relay=RELAYS[kind],
                rates=RATES,
            )
    finally:
        asyncio.run(cleanup(exchange, queues))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
