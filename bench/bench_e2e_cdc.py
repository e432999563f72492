"""End-to-end latency: PostgreSQL commit -> ``mycel run`` -> WebSocket clients.

Run as ``python bench/bench_e2e_cdc.py`` (needs the PostgreSQL 15 binaries
for a private cluster, see ``testsupport/postgres.py``, and RabbitMQ on
127.0.0.1:5672). ``BENCH_E2E_CDC_KINDS=ws,chain`` and
``BENCH_E2E_SIZES=1000,10000`` narrow it. Prints one JSON object per figure
(bench/README.md). The clients, the fan-out side of the relays and the
report are shared with ``bench_e2e.py`` (``_e2e.py``).

Two of the issue's scenarios, each a real ``mycel run`` process, with 1,000
and 10,000 WebSocket clients (100 distinct users, so each change reaches
1 % of them):

- ``ws``: CDC -> WebSocket room with a per-user filter: the spec's
  ``live_order_updates`` flow as written (transform, ``room:orders``,
  ``input.user_id == context.params.user_id``) on the examples' ``orders``
  table;
- ``chain``: CDC -> RabbitMQ -> WebSocket, two flows in the same process
  chained through the broker: ``notify_on_insert`` (``orders.INSERT`` to
  the routing key ``order.created``, publisher confirms on, Mycel's default)
  and a flow from ``order.created`` to the same room and filter.

Each change is a one-row INSERT committed by ``pgbench``; the row's
``updated_at`` is ``clock_timestamp()`` taken by the INSERT just before the
commit, and latency runs from it to the client's receipt (the same clock).
It is at most the commit's own duration earlier than the ``_commit_time``
the connector reports, which the spec's transform does not pass on.

- steady: ``pgbench -R 200`` for 5 seconds (Poisson arrivals, two
  connections), random users;
- saturation: 1,000 one-row transactions from four ``pgbench`` connections
  as fast as the server commits them.

The baseline, in the same run with the same clients and pgbench scripts,
does the same job without Mycel: it reads the same table's changes by
logical replication from a slot of its own, as ``pg_recvlogical`` with the
``test_decoding`` plugin (PostgreSQL's own streaming client, text output,
one line per change), piped into a bare relay process that parses each
INSERT line with a regular expression and hands the same payload as
Mycel's to the connections of the row's user (``_e2e.serve_clients``,
``websockets.broadcast`` relay). For ``chain`` the relay publishes each
change (persistent, publisher confirms, one at a time as Mycel's ordered
source does) to a durable queue of its own and its aio-pika consumer (no
acks) feeds the room. Unlike Mycel, the relay confirms the slot position as
soon as pg_recvlogical has read a change, not after delivery (the at-least-
once work Mycel does and the relay does not), and pg_recvlogical's CPU time
is not in the relay's ``CPU server`` note. A relay fed by LISTEN/NOTIFY or
by polling would not be the same job (no WAL decoding, no commit order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import _e2e as e2e  # noqa: E402

from testsupport.postgres import PG_BIN, start_logical_cluster  # noqa: E402

KINDS = os.environ.get("BENCH_E2E_CDC_KINDS", "ws,chain").split(",")
SATURATION_CONNECTIONS = 4

TABLE = """
CREATE TABLE orders (
  id         serial PRIMARY KEY,
  user_id    int NOT NULL,
  status     text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE PUBLICATION bench_orders FOR TABLE orders;
"""
INSERT = f"""\\set u random(0, {e2e.USERS - 1})
INSERT INTO orders (user_id, status, updated_at) VALUES (:u, 'new', clock_timestamp());
"""

CDC = """
service {{
  name       = "bench"
  admin_port = {admin}
}}
connector "cdc" {{
  type              = "cdc"
  driver            = "postgres"
  connection_string = "{dsn}"
  tables            = ["orders"]
  slot_name         = "{slot}"
  publication       = "bench_orders"
}}
connector "ws" {{
  type            = "websocket"
  port            = {port}
  send_queue      = 20000
  max_connections = 20000
}}
"""
RABBIT = """
connector "rabbit" {{
  type         = "rabbitmq"
  url          = "{url}"
  exchange     = "{exchange}"
  queue_prefix = "{prefix}"
  prefetch     = 1000
}}
"""
FLOWS = {
    "ws": """
flow "live_order_updates" {
  from {
    connector = "cdc"
    operation = "orders.*"
  }
  transform {
    order_id = "input.id"
    status = "input.status"
    updated_at = "input.updated_at"
    operation = "input._operation"
  }
  to {
    connector = "ws"
    operation = "room:orders"
    filter = "input.user_id == context.params.user_id"
  }
}
""",
    "chain": """
flow "notify_on_insert" {
  from { connector = "cdc"     operation = "orders.INSERT" }
  to   { connector = "rabbit"  target = "order.created" }
}
flow "push_order_created" {
  from { connector = "rabbit"  operation = "order.created" }
  to {
    connector = "ws"
    operation = "room:orders"
    filter    = "input.user_id == context.params.user_id"
  }
}
""",
}
PATH = "/ws?user_id={user}&rooms=orders"
SCENARIOS = {
    "ws": "CDC -> ws room, transform and per-user filter (live_order_updates)",
    "chain": "CDC -> RabbitMQ -> ws room, per-user filter (two flows)",
}
RELAYS = {
    "ws": "pg_recvlogical (test_decoding) -> websockets.broadcast relay",
    "chain": (
        "pg_recvlogical (test_decoding) -> aio-pika publish, confirmed -> "
        "consumer -> websockets.broadcast relay"
    ),
}
RATES = {
    "steady": f"pgbench -R {e2e.STEADY_RATE} one-row transactions for "
    f"{e2e.STEADY_SECONDS} s",
    "saturation": f"{e2e.SATURATION} one-row transactions from "
    f"{SATURATION_CONNECTIONS} pgbench connections, as fast as committed",
}

# One INSERT as test_decoding writes it.
ROW = re.compile(
    r"^table public\.orders: INSERT: id\[integer\]:(\d+) "
    r"user_id\[integer\]:(\d+) status\[text\]:'([^']*)' "
    r"updated_at\[timestamp with time zone\]:'([^']*)'"
)


# --- the baseline relay (own process) ----------------------------------------


def cdc_relay_process(
    port: int, dsn: str, slot: str, chain: tuple[str, str] | None, pipe: Connection
) -> None:
    """pg_recvlogical's changes to ws clients, through RabbitMQ with ``chain``.

    ``chain`` is ``(exchange, queue)``.
    """

    async def main() -> None:
        import aio_pika

        recv = await asyncio.create_subprocess_exec(
            str(PG_BIN / "pg_recvlogical"), "-d", dsn, "-S", slot, "--start",
            "-f", "-", "-s", "1",
            stdout=subprocess.PIPE,
        )  # fmt: skip
        connection = await aio_pika.connect(e2e.RABBIT) if chain else None

        def payload(found: re.Match[str]) -> tuple[str, dict[str, Any]]:
            order_id, user, status, updated_at = found.groups()
            return user, {
                "order_id": int(order_id),
                "user_id": int(user),
                "status": status,
                "updated_at": updated_at,
                "operation": "INSERT",
            }

        async def read(deliver: e2e.Deliver) -> None:
            assert recv.stdout is not None
            async for line in recv.stdout:
                if found := ROW.match(line.decode()):
                    user, data = payload(found)
                    text = json.dumps(data, separators=(",", ":"))
                    deliver(user, e2e.frame_for("ws", "orders", text))

        async def read_and_publish(deliver: e2e.Deliver) -> None:
            assert recv.stdout is not None and connection is not None and chain
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(
                chain[0], aio_pika.ExchangeType.TOPIC, durable=True
            )
            async for line in recv.stdout:
                if found := ROW.match(line.decode()):
                    _user, data = payload(found)
                    message = aio_pika.Message(
                        json.dumps(data).encode(),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    )
                    await exchange.publish(message, "order.created")

        async def feed(deliver: e2e.Deliver) -> None:
            if connection is None or chain is None:
                tasks.append(asyncio.create_task(read(deliver)))
                return
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            exchange = await channel.declare_exchange(
                chain[0], aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(chain[1], durable=True)
            await queue.bind(exchange, "order.created")

            async def on_message(message: Any) -> None:
                data = json.loads(message.body)
                text = json.dumps(data, separators=(",", ":"))
                deliver(str(data["user_id"]), e2e.frame_for("ws", "orders", text))

            await queue.consume(on_message, no_ack=True)
            tasks.append(asyncio.create_task(read_and_publish(deliver)))

        tasks: list[asyncio.Task[None]] = []
        try:
            await e2e.serve_clients("ws", port, feed, pipe)
        finally:
            recv.terminate()
            await recv.wait()
            for task in tasks:
                task.cancel()
            if connection is not None:
                await connection.close()

    e2e.raise_fd_limit()
    e2e.run_relay(main)


# --- measuring ---------------------------------------------------------------


def sql(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description is not None else []


class Producer:
    """Commits one-row transactions with pgbench; counts them per user."""

    def __init__(self, dsn: str, folder: Path) -> None:
        self.dsn = dsn
        self.script = folder / "insert.sql"
        self.script.write_text(INSERT)

    def __call__(self, steady: bool) -> tuple[dict[int, int], float]:
        [(last,)] = sql(self.dsn, "SELECT coalesce(max(id), 0) FROM orders")
        if steady:
            load = ["-R", str(e2e.STEADY_RATE), "-T", str(e2e.STEADY_SECONDS)]
            load += ["-c", "2", "-j", "1"]
        else:
            per_connection = e2e.SATURATION // SATURATION_CONNECTIONS
            load = ["-t", str(per_connection), "-c", str(SATURATION_CONNECTIONS)]
            load += ["-j", "2"]
        started = time.time()
        subprocess.run(
            [str(PG_BIN / "pgbench"), "-n", "-f", str(self.script), *load, self.dsn],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rows = sql(
            self.dsn,
            f"SELECT user_id, count(*) FROM orders WHERE id > {last} GROUP BY 1",
        )
        return {int(user): int(count) for user, count in rows}, started


def run_mycel(
    kind: str, clients: int, dsn: str, folder: Path, produce: Producer, tag: str
) -> dict[str, e2e.Phase]:
    port, admin = e2e.free_port(), e2e.free_port()
    slot = f"mycel_{kind}_{clients}_{tag}"
    config = CDC.format(admin=admin, dsn=dsn, slot=slot, port=port)
    if kind == "chain":
        config += RABBIT.format(
            url=e2e.RABBIT, exchange=f"bench-cdc-{tag}", prefix=f"bench-cdc-{tag}."
        )
    run_dir = folder / f"{kind}-{clients}"
    mycel = e2e.start_mycel(run_dir, config + FLOWS[kind], admin)
    try:
        return e2e.measure(mycel.pid, port, "ws", PATH, clients, produce)
    finally:
        e2e.stop_mycel(mycel, run_dir)
        drop_slot(dsn, slot)


def run_relay(
    kind: str, clients: int, dsn: str, produce: Producer, tag: str
) -> dict[str, e2e.Phase]:
    port = e2e.free_port()
    slot = f"relay_{kind}_{clients}_{tag}"
    sql(dsn, f"SELECT pg_create_logical_replication_slot('{slot}', 'test_decoding')")
    chain = (f"bench-cdc-{tag}", f"bench-cdc-{tag}.relay") if kind == "chain" else None
    relay, pipe = e2e.start_relay(cdc_relay_process, port, dsn, slot, chain)
    try:
        return e2e.measure(relay.pid, port, "ws", PATH, clients, produce)
    finally:
        e2e.stop_relay(relay, pipe)
        drop_slot(dsn, slot)


def drop_slot(dsn: str, slot: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sql(dsn, f"SELECT pg_drop_replication_slot('{slot}')")
            return
        except psycopg.errors.ObjectInUse:
            time.sleep(0.1)  # the WAL sender lets go moments after its client


def main() -> None:
    e2e.raise_fd_limit()
    tag = uuid.uuid4().hex[:8]
    plan = [(k, n) for k in ("ws", "chain") for n in (1_000, 10_000)]
    plan = [(k, n) for k, n in plan if k in KINDS and n in e2e.SIZES]
    folder = Path(tempfile.mkdtemp(prefix="mycel-bench-e2e-cdc-"))
    cluster = start_logical_cluster()
    exchange = f"bench-cdc-{tag}"
    queues = [f"{exchange}.push_order_created", f"{exchange}.relay"]
    try:
        dsn = cluster.dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(TABLE)
        produce = Producer(dsn, folder)
        for kind, clients in plan:
            ours = run_mycel(kind, clients, dsn, folder, produce, tag)
            if kind == "chain":  # no queue of one run may collect the next's
                asyncio.run(e2e.cleanup(exchange, queues))
            theirs = run_relay(kind, clients, dsn, produce, tag)
            if kind == "chain":
                asyncio.run(e2e.cleanup(exchange, queues))
            e2e.report(
                "e2e_cdc",
                kind,
                clients,
                ours,
                theirs,
                scenario=SCENARIOS[kind],
                relay=RELAYS[kind],
                rates=RATES,
            )
    finally:
        cluster.stop()
        if "chain" in KINDS:
            with contextlib.suppress(Exception):
                asyncio.run(e2e.cleanup(exchange, queues))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
