"""End-to-end latency: RabbitMQ publish -> ``mycel run`` -> WebSocket client.

Run as ``python bench/bench_e2e.py`` (needs RabbitMQ on 127.0.0.1:5672).
Prints one JSON object per figure (bench/README.md).

The scenario is ``send_user_notification`` of the specification: messages
published to RabbitMQ go to a WebSocket room through a per-user filter
(``input.user_id == context.params.user_id``). 1,000 and then 10,000
clients are connected, 100 distinct users, so each event reaches 1 % of
the clients. Latency runs from just before the publish (a timestamp in the
body) to the client's receipt of the frame, on the same machine's clock:

- steady: 200 messages per second for 5 seconds, publisher confirms on;
- saturation: 1,000 messages published as fast as the client can (no
  confirms), so the figure includes the queueing of a full pipe.

The baseline, measured in the same run with the same clients and the same
publisher: a bare relay written here, an aio-pika consumer (no acks, like
a relay that does not care about loss) feeding ``websockets.broadcast`` to
the connections of the message's ``user_id`` (a dict index, as Mycel's hub
has), in its own process like ``mycel run``. Mycel acknowledges each
message only after its flow finished; the relay does not.

Only the WebSocket path is measured: CDC, SSE and GraphQL end-to-end
latencies are not part of this benchmark. Clients are raw sockets in a
separate process that do the handshake, answer pings and parse frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
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


async def _client(port: int, user: int, room: bool, sink: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    path = f"/ws?user_id={user}" + ("&rooms=notifications" if room else "")
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
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
            frame = json.loads(payload)
            data = frame.get("data")
            if isinstance(data, dict) and "sent" in data:
                sink.append(now - data["sent"])
        elif opcode == 0x8:
            return


_ready: list[int] = []


def client_process(port: int, count: int, room: bool, pipe: Connection) -> None:
    async def main() -> None:
        sink: list[float] = []
        tasks = []
        for start in range(0, count, 500):
            batch = [
                asyncio.create_task(_client(port, i % USERS, room, sink))
                for i in range(start, min(start + 500, count))
            ]
            tasks += batch
            while len(_ready) < len(tasks):
                await asyncio.sleep(0.01)
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


def relay_process(port: int, exchange: str, queue: str, pipe: Connection) -> None:
    async def main() -> None:
        import aio_pika
        import websockets
        from websockets.asyncio.server import broadcast, serve

        by_user: dict[str, set[Any]] = {}

        async def handler(ws: Any) -> None:
            user = ws.request.path.split("user_id=")[1].split("&")[0]
            by_user.setdefault(user, set()).add(ws)
            try:
                await ws.wait_closed()
            finally:
                by_user[user].discard(ws)

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
            targets = by_user.get(str(data["user_id"]), ())
            frame = json.dumps(
                {"type": "message", "room": "notifications", "data": data},
                separators=(",", ":"),
            )
            broadcast(targets, frame)

        await declared.consume(on_message, no_ack=True)
        async with serve(handler, "127.0.0.1", port, max_size=2**20, compression=None):
            pipe.send("ready")
            await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        await connection.close()
        del websockets

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
"""


def start_mycel(folder: Path, port: int, exchange: str, prefix: str) -> Any:
    admin = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.mycel").write_text(
        CONFIG.format(
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


def measure(port: int, clients: int, room: bool, exchange: str) -> dict[str, Any]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(
        target=client_process, args=(port, clients, room, child)
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
        for queue in (f"{prefix}send_user_notification", f"{prefix}dead"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for name in (exchange, f"{exchange}.dlx"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)


def main() -> None:
    _raise_fd_limit()
    tag = uuid.uuid4().hex[:8]
    exchange, prefix = f"mycel-bench-e2e-{tag}", f"mycel-bench-e2e-{tag}."
    folder = Path(tempfile.mkdtemp(prefix="mycel-bench-e2e-"))
    try:
        for clients in SIZES:
            port = free_port()
            mycel = start_mycel(folder / str(clients), port, exchange, prefix)
            try:
                ours = measure(port, clients, True, exchange)
            finally:
                mycel.send_signal(signal.SIGTERM)
                mycel.wait(60)
                log = (folder / str(clients) / "mycel.log").read_text()
                sys.stderr.write(log[-3000:])
            asyncio.run(cleanup(exchange, prefix))

            port = free_port()
            parent, child = multiprocessing.Pipe()
            relay = multiprocessing.Process(
                target=relay_process,
                args=(port, exchange, f"{prefix}relay", child),
            )
            relay.start()
            assert parent.poll(60)
            parent.recv()
            try:
                theirs = measure(port, clients, False, exchange)
            finally:
                parent.send("stop")
                relay.join(30)
                if relay.is_alive():
                    relay.kill()
            report(clients, ours, theirs)
    finally:
        asyncio.run(cleanup(exchange, prefix))


def report(clients: int, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
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
                figure=f"latency p{q}, {phase}, {clients:,} clients",
                unit="ms",
                value=value,
                baseline_name="aio-pika consumer -> websockets.broadcast relay",
                baseline=baseline,
                ratio=baseline / value if value else float("nan"),
                higher_is_better=False,
                aim="p99 within 2x of the bare relay",
                notes=(
                    f"RabbitMQ -> ws room with per-user filter; {rate}; "
                    f"{clients // USERS} clients per event; received "
                    f"{mine['received']}/{mine['expected']} "
                    f"(relay {base['received']}/{base['expected']})"
                ),
            )
        if phase == "saturation":
            ours_rate = SATURATION / mine["seconds"]
            base_rate = SATURATION / base["seconds"]
            emit(
                figure=f"throughput at saturation, {clients:,} clients",
                unit="events/s",
                value=ours_rate,
                baseline_name="aio-pika consumer -> websockets.broadcast relay",
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
