"""GraphQL subscriptions benchmark: deliveries per second to 200 subscribers.

Run as ``python bench/bench_graphql.py``. Prints one JSON object:

memory -> graphql (``Subscription.tick``, JSON field) delivered to 200
subscribers over ``graphql-transport-ws``, deliveries per second, against a
plain strawberry server whose subscription resolver reads an asyncio queue
per subscriber (the usual way to fan out with strawberry), served by the
same uvicorn, in the same run.

Each server runs in its own process and publishes as fast as it can (it
waits while more than 50 events per subscriber are queued in its hub; a
server that writes straight into the sockets queues few there). The figure
runs from the moment every client's connection is acknowledged, when the
clients subscribe, to the last event received.

The 200 clients run in this process: raw sockets that do the handshake,
send ``connection_init`` and ``subscribe``, and count WebSocket frames
without decoding them, so that the client costs little and the same for
both servers. Nothing here is a test.

"""

import asyncio
import base64
import json
import multiprocessing
import os
import struct
import sys
import time
from collections.abc import AsyncGenerator
from multiprocessing.connection import Connection
from typing import Any

SUBSCRIBERS = int(os.environ.get("BENCH_GRAPHQL_SUBSCRIBERS", "200"))
EVENTS = int(os.environ.get("BENCH_GRAPHQL_EVENTS", "1000"))
BACKLOG = 50  # events per subscriber the publisher lets queue up


def payload(seq: int) -> dict[str, Any]:
    return {"seq": f"{seq:08d}", "sku": "ABC-123", "price": 101.25}


# Servers (each in its own process)


def serve_mycel(port: int, pipe: Connection) -> None:
    from mycel.testing import running

    config = f"""
    connector "mem" {{ type = "memory" }}
    connector "gql" {{
      type       = "graphql"
      port       = {port}
      queue_size = {BACKLOG * SUBSCRIBERS}
      playground = false
      subscriptions {{ keepalive = "0s" }}
    }}
    flow "ticks" {{
      from {{ connector = "mem"  operation = "tick" }}
      to   {{ connector = "gql"  operation = "Subscription.tick" }}
    }}
    """

    async def main() -> None:
        async with running(config) as app:
            hub = app.connector("gql").services.hub
            memory = app.memory("mem")
            pipe.send("ready")
            while hub.topic_size("tick") < SUBSCRIBERS:
                await asyncio.sleep(0.01)
            for seq in range(EVENTS):
                await memory.publish("tick", payload(seq))
                while hub.queue_depth() > BACKLOG * SUBSCRIBERS:
                    await asyncio.sleep(0.001)
            await asyncio.get_running_loop().run_in_executor(None, pipe.recv)

    asyncio.run(main())


def serve_strawberry(port: int, pipe: Connection) -> None:
    import strawberry
    from strawberry.asgi import GraphQL
    from strawberry.scalars import JSON

    import mycel

    queues: list[asyncio.Queue[Any]] = []

    @strawberry.type
    class Query:
        hello: str = "hi"

    @strawberry.type
    class Subscription:
        @strawberry.subscription
        async def tick(self) -> AsyncGenerator[JSON, None]:  # type: ignore[valid-type]
            queue: asyncio.Queue[Any] = asyncio.Queue()
            queues.append(queue)
            try:
                while True:
                    yield await queue.get()
            finally:
                queues.remove(queue)

    async def main() -> None:
        schema = strawberry.Schema(query=Query, subscription=Subscription)
        server = mycel.AsgiServer(GraphQL(schema), "127.0.0.1", port)
        await server.start()
        pipe.send("ready")
        while len(queues) < SUBSCRIBERS:
            await asyncio.sleep(0.01)
        for seq in range(EVENTS):
            event = payload(seq)
            for queue in queues:
                queue.put_nowait(event)
            while sum(q.qsize() for q in queues) > BACKLOG * SUBSCRIBERS:
                await asyncio.sleep(0.001)
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        await server.stop()

    asyncio.run(main())


# Clients (this process)


def client_frame(text: str) -> bytes:
    """A masked text frame, as a client must send it."""
    data = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    length = len(data)
    if length < 126:
        head = struct.pack("!BB", 0x81, 0x80 | length)
    else:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    return head + mask + masked


class Counter(asyncio.Protocol):
    """Handshake, ``connection_init``, ``subscribe``; then count frames."""

    frames = 0
    target = -1
    done: asyncio.Event | None = None

    def __init__(self, path: str, acked: asyncio.Future[None]) -> None:
        self.path = path
        self.acked = acked
        self.buffer = b""
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Protocol: graphql-transport-ws\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer + data
        if not self.open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.acked.set_exception(RuntimeError(buffer[:60].decode()))
                return
            self.open = True
            buffer = buffer[end + 4 :]
            self.transport.write(client_frame('{"type":"connection_init"}'))

        # Count whole frames; the first one is connection_ack.
        pos, size = 0, len(buffer)
        counted = 0
        while size - pos >= 2:
            length = buffer[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = struct.unpack_from("!H", buffer, pos + 2)[0]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = struct.unpack_from("!Q", buffer, pos + 2)[0]
                head = 10
            if size - pos < head + length:
                break
            if not self.acked.done():
                self.acked.set_result(None)
                self.transport.write(
                    client_frame(
                        '{"id":"1","type":"subscribe","payload":'
                        '{"query":"subscription { tick }"}}'
                    )
                )
            else:
                counted += 1
            pos += head + length
        self.buffer = buffer[pos:]
        if counted:
            cls = Counter
            cls.frames += counted
            if cls.frames >= cls.target and cls.done is not None:
                cls.done.set()


async def measure(name: str, port: int, path: str) -> float:
    """Deliveries per second from every client acknowledged to the last."""
    loop = asyncio.get_running_loop()
    Counter.frames = 0
    Counter.target = SUBSCRIBERS * EVENTS
    Counter.done = asyncio.Event()
    clients = []
    for _ in range(SUBSCRIBERS):
        acked: asyncio.Future[None] = loop.create_future()
        client = Counter(path, acked)
        await loop.create_connection(lambda c=client: c, "127.0.0.1", port)
        clients.append(client)
    await asyncio.wait_for(asyncio.gather(*(c.acked for c in clients)), 30)
    # From here each client subscribes and the server starts publishing
    # once all have: the time runs to the last receipt, so that events the
    # server wrote ahead into socket buffers count only once they are read.
    started = time.perf_counter()
    await asyncio.wait_for(Counter.done.wait(), 170)
    elapsed = time.perf_counter() - started
    for client in clients:
        assert client.transport is not None
        client.transport.close()
    del name
    return Counter.frames / elapsed


def run(name: str, target: Any, path: str) -> float:
    from mycel.testing import free_port

    port = free_port()
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=target, args=(port, child), daemon=True
    )
    process.start()
    try:
        if not parent.poll(60) or parent.recv() != "ready":
            raise RuntimeError(f"{name} server did not start")
        return asyncio.run(measure(name, port, path))
    finally:
        parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()


def main() -> None:
    rate = run("mycel", serve_mycel, "/graphql")
    baseline = run("strawberry", serve_strawberry, "/graphql")
    print(
        json.dumps(
            {
                "bench": "graphql",
                "figure": "memory -> graphql subscription to "
                f"{SUBSCRIBERS} subscribers",
                "unit": "deliveries/s",
                "value": round(rate),
                "baseline_name": "strawberry, resolver reading an asyncio queue per "
                "subscriber",
                "baseline": round(baseline),
                "ratio": round(rate / baseline, 2),
                "higher_is_better": True,
                "aim": ">= 2x",
                "notes": f"{EVENTS} events, graphql-transport-ws, both on uvicorn; "
                f"clients count frames in their own process; {sys.platform}",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
