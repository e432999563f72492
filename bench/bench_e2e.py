"""End-to-end latency: RabbitMQ publish -> ``mycel run`` -> subscribers.

Run as ``python bench/bench_e2e.py`` (needs RabbitMQ on 127.0.0.1:5672;
``BENCH_E2E_KINDS=ws,sse,gql`` and ``BENCH_E2E_SIZES=1000,10000`` narrow
it). Prints one JSON object per figure (bench/README.md).

Three of the issue's scenarios, each a real ``mycel run`` process:

- ``ws``: RabbitMQ -> WebSocket room with a per-user filter
  (``send_user_notification``), with 1,000 and 10,000 clients;
- ``sse``: RabbitMQ -> SSE stream with a per-user filter
  (``stream_notifications``), 1,000 clients;
- ``gql``: RabbitMQ -> GraphQL subscription with a transform and a per-user
  filter on ``connection_params``, 1,000 clients.

10,000 clients are measured for WebSocket only: one client process cannot
read 10,000 SSE or GraphQL streams fast enough on 2 cores to say anything
about the server. 100 distinct users, so each event reaches 1 % of the
clients. Latency runs from just before the publish (a timestamp in the
body) to the client's receipt, on the same machine's clock:

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

The CDC scenarios are not measured here (bench_cdc.py measures the CDC
source). Clients are raw sockets in a separate process that do the
handshake, answer pings and find the timestamp in each frame or line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
USERS = 100
STEADY_RATE, STEADY_SECONDS = 200, 5
SATURATION = 1_000
KINDS = os.environ.get("BENCH_E2E_KINDS", "ws,sse,gql").split(",")
SIZES = tuple(
    int(n) for n in os.environ.get("BENCH_E2E_SIZES", "1000,10000").split(",")
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# --- clients (own process) ---------------------------------------------------


SENT = re.compile(rb'"sent":\s*([0-9.eE+-]+)')


def _masked(text: str) -> bytes:
    """A client text frame (mask key 0, so the payload is sent as is)."""
    data = text.encode()
    if len(data) < 126:
        return bytes([0x81, 0x80 | len(data)]) + b"\0\0\0\0" + data
    size = struct.pack("!H", len(data))
    return bytes([0x81, 0x80 | 126]) + size + b"\0\0\0\0" + data


async def _client(port: int, user: int, kind: str, sink: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    if kind == "sse":
        writer.write(
            (
                f"GET /events/notifications?user_id={user} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        _ready.append(1)
        while line := await reader.readline():
            if line.startswith(b"data:"):
                now = time.time()
                if found := SENT.search(line):
                    sink.append(now - float(found.group(1)))
        return
    path = "/graphql/ws" if kind == "gql" else f"/ws?user_id={user}"
    if kind == "ws-mycel":
        path += "&rooms=notifications"
    protocol = ""
    if kind == "gql":
        protocol = "Sec-WebSocket-Protocol: graphql-transport-ws\r\n"
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"{protocol}Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    if kind == "gql":
        init = {"type": "connection_init", "payload": {"userId": str(user)}}
        writer.write(_masked(json.dumps(init)))
        subscribe = {
            "id": "1",
            "type": "subscribe",
            "payload": {"query": "subscription { notification }"},
        }
        writer.write(_masked(json.dumps(subscribe)))
    _ready.append(1)
    while True:
        first, second = await reader.readexactly(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await reader.readexactly(8))[0]
        payload = await reader.readexactly(size)
        opcode = first & 0x0F
        if opcode == 0x9:  # ping: answer with a masked pong
            writer.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
        elif opcode == 0x1:
            now = time.time()
            if found := SENT.search(payload):
                sink.append(now - float(found.group(1)))
            elif kind == "gql" and b'"ping"' in payload:
                writer.write(_masked('{"type":"pong"}'))
        elif opcode == 0x8:
            return


_ready: list[int] = []


def client_process(port: int, count: int, kind: str, pipe: Connection) -> None:
    async def main() -> None:
        sink: list[float] = []
        tasks = []
        for start in range(0, count, 500):
            batch = [
                asyncio.create_task(_client(port, i % USERS, kind, sink))
                for i in range(start, min(start + 500, count))
            ]
            tasks += batch
            while len(_ready) < len(tasks):
                await asyncio.sleep(0.01)
        if kind == "gql":
            await asyncio.sleep(1)  # no answer to subscribe: let them settle
        pipe.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command == "close":
                break
            expected, timeout = command
            deadline = time.monotonic() + timeout
            while len(sink) < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            pipe.send(list(sink))
            sink.clear()
        for task in tasks:
            task.cancel()

    _raise_fd_limit()
    asyncio.run(main())


# --- the baseline relay (own process) ----------------------------------------


def relay_process(
    port: int, exchange: str, queue: str, kind: str, pipe: Connection
) -> None:
    async def main() -> None:
        import aio_pika
        from websockets.asyncio.server import broadcast, serve

        by_user: dict[str, set[Any]] = {}

        async def ws_handler(ws: Any) -> None:
            if kind == "gql":
                init = json.loads(await ws.recv())
                await ws.send('{"type":"connection_ack"}')
                await ws.recv()  # subscribe, id "1"
                user = str(init["payload"]["userId"])
            else:
                user = ws.request.path.split("user_id=")[1].split("&")[0]
            by_user.setdefault(user, set()).add(ws)
            try:
                await ws.wait_closed()
            finally:
                by_user[user].discard(ws)

        async def sse_handler(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            user = head.split(b"user_id=")[1].split(b" ")[0].decode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-store\r\n\r\n"
            )
            by_user.setdefault(user, set()).add(writer)
            try:
                await reader.read()
            finally:
                by_user[user].discard(writer)

        connection = await aio_pika.connect(RABBIT)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        ex = await channel.declare_exchange(
            exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        declared = await channel.declare_queue(queue, auto_delete=True)
        await declared.bind(ex, "notifications")

        async def on_message(message: Any) -> None:
            data = json.loads(message.body)
            targets = by_user.get(str(data["user_id"]), set())
            text = json.dumps(data, separators=(",", ":"))
            if kind == "sse":
                chunk = f"data: {text}\n\n".encode()
                for writer in targets:
                    writer.write(chunk)
                return
            if kind == "gql":
                frame = (
                    '{"id":"1","type":"next","payload":{"data":{"notification":%s}}}'
                )
            else:
                frame = '{"type":"message","room":"notifications","data":%s}'
            broadcast(targets, frame % text)

        await declared.consume(on_message, no_ack=True)
        loop = asyncio.get_running_loop()
        if kind == "sse":
            server = await asyncio.start_server(
                sse_handler, "127.0.0.1", port, backlog=4096
            )
            async with server:
                pipe.send("ready")
                await loop.run_in_executor(None, pipe.recv)
        else:
            subprotocols = ["graphql-transport-ws"] if kind == "gql" else None
            async with serve(
                ws_handler,
                "127.0.0.1",
                port,
                compression=None,
                subprotocols=subprotocols,  # type: ignore[arg-type]
            ):
                pipe.send("ready")
                await loop.run_in_executor(None, pipe.recv)
        await connection.close()

    _raise_fd_limit()
    asyncio.run(main())


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
flow "send_user_notification" {{
  from {{ connector = "rabbit"  operation = "notifications" }}
  to {{
    connector = "ws"
    operation = "room:notifications"
    filter    = "input.user_id == context.params.user_id"
  }}
}}
""",
    "sse": """
connector "sse" {{
  type       = "sse"
  port       = {port}
  send_queue = 20000
}}
flow "stream_notifications" {{
  from {{ connector = "rabbit"  operation = "notifications" }}
  to {{
    connector = "sse"
    operation = "stream:notifications"
    filter    = "input.user_id == context.params.user_id"
  }}
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
flow "notification_updates" {{
  from {{ connector = "rabbit"  operation = "notifications" }}
  transform {{
    user_id = "input.user_id"
    n       = "input.n"
    sent    = "input.sent"
  }}
  to {{
    connector = "gql"
    operation = "Subscription.notification"
    filter    = "input.user_id == context.connection_params.userId"
  }}
}}
""",
}

FLOWS = {
    "ws": "send_user_notification",
    "sse": "stream_notifications",
    "gql": "notification_updates",
}


def start_mycel(folder: Path, kind: str, port: int, exchange: str, prefix: str) -> Any:
    admin = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.mycel").write_text(
        (CONFIG + SINKS[kind]).format(
            admin=admin, url=RABBIT, exchange=exchange, prefix=prefix, port=port
        )
    )
    log = (folder / "mycel.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mycel", "--log-level", "WARNING", "run", str(folder)],
        stderr=log,
        stdout=subprocess.DEVNULL,
    )
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if (
                httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1).status_code
                == 200
            ):
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("mycel run exited")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mycel run did not become ready")


# --- measuring ---------------------------------------------------------------


async def publish(exchange: str, steady: bool) -> int:
    import aio_pika

    connection = await aio_pika.connect(RABBIT)
    channel = await connection.channel(publisher_confirms=steady)
    ex = await channel.get_exchange(exchange)
    count = STEADY_RATE * STEADY_SECONDS if steady else SATURATION
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n in range(count):
        if steady:
            delay = start + n / STEADY_RATE - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        body = json.dumps({"user_id": n % USERS, "n": n, "sent": time.time()})
        await ex.publish(aio_pika.Message(body.encode()), "notifications")
    await connection.close()
    return count


def measure(port: int, clients: int, kind: str, exchange: str) -> dict[str, Any]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(
        target=client_process, args=(port, clients, kind, child)
    )
    proc.start()
    assert parent.poll(120), "clients did not connect"
    parent.recv()
    results: dict[str, Any] = {}
    for steady in (True, False):
        started = time.monotonic()
        sent = asyncio.run(publish(exchange, steady))
        expected = sent * clients // USERS
        parent.send((expected, 120))
        latencies = parent.recv()
        elapsed = time.monotonic() - started
        results["steady" if steady else "saturation"] = {
            "latencies": latencies,
            "expected": expected,
            "received": len(latencies),
            "seconds": elapsed,
        }
    parent.send("close")
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    return results


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def emit(**row: Any) -> None:
    row = {"bench": "e2e", **row}
    for key in ("value", "baseline", "ratio"):
        row[key] = round(row[key], 3)
    print(json.dumps(row, ensure_ascii=False), flush=True)


async def cleanup(exchange: str, prefix: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(RABBIT)
    async with connection:
        queues = [f"{prefix}{flow}" for flow in FLOWS.values()]
        for queue in [*queues, f"{prefix}dead"]:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for name in (exchange, f"{exchange}.dlx"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)


PLAN = [("ws", 1_000), ("ws", 10_000), ("sse", 1_000), ("gql", 1_000)]
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


def main() -> None:
    _raise_fd_limit()
    tag = uuid.uuid4().hex[:8]
    exchange, prefix = f"mycel-bench-e2e-{tag}", f"mycel-bench-e2e-{tag}."
    folder = Path(tempfile.mkdtemp(prefix="mycel-bench-e2e-"))
    plan = [(k, n) for k, n in PLAN if k in KINDS and n in SIZES]
    try:
        for kind, clients in plan:
            port = free_port()
            run_dir = folder / f"{kind}-{clients}"
            mycel = start_mycel(run_dir, kind, port, exchange, prefix)
            try:
                client_kind = "ws-mycel" if kind == "ws" else kind
                ours = measure(port, clients, client_kind, exchange)
            finally:
                mycel.send_signal(signal.SIGTERM)
                mycel.wait(60)
                log = (run_dir / "mycel.log").read_text()
                sys.stderr.write(log[-3000:])
            asyncio.run(cleanup(exchange, prefix))

            port = free_port()
            parent, child = multiprocessing.Pipe()
            relay = multiprocessing.Process(
                target=relay_process,
                args=(port, exchange, f"{prefix}relay", kind, child),
            )
            relay.start()
            assert parent.poll(60)
            parent.recv()
            try:
                client_kind = "ws-relay" if kind == "ws" else kind
                theirs = measure(port, clients, client_kind, exchange)
            finally:
                parent.send("stop")
                relay.join(30)
                if relay.is_alive():
                    relay.kill()
            report(kind, clients, ours, theirs)
    finally:
        asyncio.run(cleanup(exchange, prefix))


def report(
    kind: str, clients: int, ours: dict[str, Any], theirs: dict[str, Any]
) -> None:
    for phase in ("steady", "saturation"):
        mine, base = ours[phase], theirs[phase]
        rate = (
            f"{STEADY_RATE} msg/s for {STEADY_SECONDS} s, confirmed publishes"
            if phase == "steady"
            else f"{SATURATION} messages as fast as published, no confirms"
        )
        for q in (50, 95, 99):
            value = percentile(mine["latencies"], q) * 1000
            baseline = percentile(base["latencies"], q) * 1000
            emit(
                figure=f"{kind} latency p{q}, {phase}, {clients:,} clients",
                unit="ms",
                value=value,
                baseline_name=RELAYS[kind],
                baseline=baseline,
                ratio=baseline / value if value else float("nan"),
                higher_is_better=False,
                aim="p99 within 2x of the bare relay",
                notes=(
                    f"{SCENARIOS[kind]}; {rate}; "
                    f"{clients // USERS} clients per event; received "
                    f"{mine['received']}/{mine['expected']} "
                    f"(relay {base['received']}/{base['expected']})"
                ),
            )
        if phase == "saturation":
            ours_rate = SATURATION / mine["seconds"]
            base_rate = SATURATION / base["seconds"]
            emit(
                figure=f"{kind} throughput at saturation, {clients:,} clients",
                unit="events/s",
                value=ours_rate,
                baseline_name=RELAYS[kind],
                baseline=base_rate,
                ratio=ours_rate / base_rate,
                higher_is_better=True,
                aim=">= 0.5x the bare relay",
                notes=(
                    "publish start to the last client's receipt; Mycel "
                    "acknowledges after delivery, the relay never acks"
                ),
            )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
