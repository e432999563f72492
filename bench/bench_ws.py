"""WebSocket connector benchmarks: broadcast rate, filter cost, memory.

Run as ``python bench/bench_ws.py``. Prints one JSON object per figure:

1. memory -> ws broadcast to 1,000 clients, deliveries per second, against
   a bare ``websockets.broadcast`` server in the same process, the same
   client process connecting to each in turn (best of two rounds each).
2. 10,000 clients in one room with a per-user filter (``input.user_id ==
   context.params.user_id``, 10 clients per user): server cost per event of
   the indexed filter against evaluating the filter for every subscriber.
3. Memory per idle connection at 10,000 connections (RSS growth of a fresh
   server process divided by the connections), against a bare websockets
   server in its own fresh process.

Clients run in a separate process: raw sockets that do the handshake and
count the bytes they receive, so that the client costs little and the same
for both servers. Nothing here is a test.

"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import multiprocessing
import os
import resource
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

CLIENTS = 1_000
MESSAGES = 200
ROUNDS = 2
IDLE = 10_000
USERS = 1_000  # 10 idle clients per user id
BATCH = 200  # handshakes in flight at once


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def payload(seq: int) -> dict[str, Any]:
    # Fixed width, so that every frame has the same length.
    return {"seq": f"{seq:08d}", "sku": "ABC-123", "price": 101.25}


# Client process


class _Counter(asyncio.Protocol):
    """A WebSocket client that does the handshake, then counts bytes."""

    received = 0
    target = -1
    done: asyncio.Event | None = None

    def __init__(self, path: str, opened: asyncio.Future[None]) -> None:
        self.path = path
        self.opened = opened
        self.head = b""
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(RuntimeError(self.head[:60].decode()))
                return
            self.open = True
            data = self.head[end + 4 :]
            self.opened.set_result(None)
        cls = _Counter
        cls.received += len(data)
        if cls.received >= cls.target and cls.done is not None:
            cls.done.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or RuntimeError("closed"))


async def _clients_main(pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    clients: list[_Counter] = []
    while True:
        command, *args = await loop.run_in_executor(None, pipe.recv)
        if command == "connect":
            port, paths = args
            for start in range(0, len(paths), BATCH):
                batch = []
                for path in paths[start : start + BATCH]:
                    opened: asyncio.Future[None] = loop.create_future()
                    client = _Counter(path, opened)
                    await loop.create_connection(lambda c=client: c, "127.0.0.1", port)
                    clients.append(client)
                    batch.append(opened)
                await asyncio.gather(*batch)
            pipe.send(("connected", len(clients)))
        elif command == "expect":
            _Counter.received = 0
            _Counter.target = args[0]
            _Counter.done = asyncio.Event()
            pipe.send(("ready",))
            await _Counter.done.wait()
            pipe.send(("done", _Counter.received))
        elif command == "close":
            for client in clients:
                assert client.transport is not None
                client.transport.abort()
            clients.clear()
            pipe.send(("closed",))
        else:
            return


def clients_process(pipe: Connection) -> None:
    raise_fd_limit()
    asyncio.run(_clients_main(pipe))


class Clients:
    """The client process, driven from the server process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=clients_process, args=(child,), daemon=True)
        self.process.start()

    async def call(self, *message: Any) -> Any:
        self.pipe.send(message)
        return await asyncio.get_running_loop().run_in_executor(None, self.pipe.recv)

    async def send(self, *message: Any) -> None:
        self.pipe.send(message)

    async def reply(self) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.pipe.recv)

    def stop(self) -> None:
        self.pipe.send(("exit",))
        self.process.join(10)


async def wait_for(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("benchmark setup timed out")
        await asyncio.sleep(0.01)


# Figure 1: broadcast rate


def writer_task_subscriber() -> type:
    """The alternative to direct writes: a writer task per connection.

    The core's queueing Subscriber, drained by one task per client that
    awaits ``send()`` for each message.

    """
    from websockets.exceptions import ConnectionClosed

    from mycel import Subscriber

    class TaskSubscriber(Subscriber):
        __slots__ = ("connection", "writer")

        def __init__(self, *args: Any, connection: Any, batch: Any) -> None:
            super().__init__(*args)
            self.connection = connection
            self.writer = asyncio.get_running_loop().create_task(self.write())

        async def write(self) -> None:
            try:
                async for message in self:
                    await self.connection.send(message.cache["ws"], text=True)
            except ConnectionClosed:
                pass

    return TaskSubscriber


def ws_config(port: int, flows: str, settings: str = "") -> str:
    return f"""
    connector "mem" {{ type = "memory" }}
    connector "ws" {{
      type = "websocket"
      port = {port}
      max_connections = 20000
      {settings}
    }}
    {flows}
    """


async def broadcast_rate() -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    from mycel.testing import free_port, running
    from mycel_ws._frames import message_frame

    clients = Clients()
    # The JSON text plus the 2-byte header of an unmasked server frame.
    frame_size = len(message_frame(None, payload(0))) + 2
    expected = CLIENTS * MESSAGES * frame_size

    async def idle(connection: ServerConnection) -> None:
        await connection.wait_closed()

    bare = await serve(
        idle, "127.0.0.1", 0, ping_interval=None, compression=None, backlog=1024
    )
    bare_port = bare.sockets[0].getsockname()[1]
    port = free_port()
    flows = """
    flow "price" {
      from { connector = "mem"  operation = "price" }
      to   { connector = "ws"   operation = "broadcast" }
    }
    """
    # Rates per CPU-second of this (the server) process: the machine may be
    # shared, and CPU time is what the server spends; wall rates in notes.
    # "paced": the loop runs between events; "burst": events queue up first.
    runs = [("paced", "bare"), ("paced", "mycel"), ("paced", "task")]
    runs += [("burst", "mycel"), ("burst", "task")]
    results: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    wall: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    import mycel_ws._connector as module

    direct, task = module.WsSubscriber, writer_task_subscriber()
    async with running(ws_config(port, flows, "ping_interval = null")) as app:
        hub = app.connector("ws").services.hub
        for _ in range(ROUNDS):
            for shape, kind in runs:
                target_port = bare_port if kind == "bare" else port
                module.WsSubscriber = task if kind == "task" else direct  # type: ignore[misc]
                await clients.call("connect", target_port, ["/ws"] * CLIENTS)
                if kind == "bare":
                    await wait_for(lambda: len(bare.connections) == CLIENTS)
                else:
                    await wait_for(lambda: hub.topic_size(None) == CLIENTS)
                await clients.call("expect", expected)

                started = time.perf_counter()
                cpu_started = time.process_time()
                if kind == "bare":
                    for seq in range(MESSAGES):
                        data = message_frame(None, payload(seq))
                        broadcast(bare.connections, data, text=True)
                        await asyncio.sleep(0)
                else:
                    for seq in range(MESSAGES):
                        await app.publish("mem", "price", payload(seq))
                        if shape == "paced":
                            await asyncio.sleep(0)
                _, received = await clients.reply()
                elapsed = time.perf_counter() - started
                cpu = time.process_time() - cpu_started
                assert received == expected, (kind, received, expected)
                results[shape, kind].append(CLIENTS * MESSAGES / cpu)
                wall[shape, kind].append(CLIENTS * MESSAGES / elapsed)

                await clients.call("close")
                if kind == "bare":
                    await wait_for(lambda: not bare.connections)
                else:
                    await wait_for(lambda: hub.topic_size(None) == 0)
    bare.close()
    await bare.wait_closed()
    clients.stop()

    best = {run: max(rates) for run, rates in results.items()}
    best_wall = {run: max(rates) for run, rates in wall.items()}
    value, baseline = best["paced", "mycel"], best["paced", "bare"]
    emit(
        figure="memory -> ws broadcast, 1,000 clients",
        unit="deliveries/CPU-s",
        value=value,
        baseline_name="bare websockets.broadcast",
        baseline=baseline,
        ratio=value / baseline,
        higher_is_better=True,
        aim=">= 0.8 of bare",
        notes=(
            f"{MESSAGES:,} messages of {frame_size} bytes, one per loop "
            f"iteration; best of {ROUNDS} rounds, per CPU-second of the server "
            f"process; wall clock {best_wall['paced', 'mycel']:,.0f}/s vs "
            f"{best_wall['paced', 'bare']:,.0f}/s; the whole flow (memory "
            "source, engine, hub) on the mycel side"
        ),
    )
    for shape in ("paced", "burst"):
        value, baseline = best[shape, "mycel"], best[shape, "task"]
        emit(
            figure=f"direct writes vs a writer task per connection, {shape}",
            unit="deliveries/CPU-s",
            value=value,
            baseline_name="mycel with a writer task per connection",
            baseline=baseline,
            ratio=value / baseline,
            higher_is_better=True,
            aim="> 1: keep direct writes",
            notes=(
                "events "
                + (
                    "one per loop iteration"
                    if shape == "paced"
                    else f"queued {MESSAGES} at once"
                )
                + "; wall clock "
                f"{best_wall[shape, 'mycel']:,.0f}/s vs "
                f"{best_wall[shape, 'task']:,.0f}/s"
            ),
        )


# Figures 2 and 3: 10,000 idle clients, memory and filter cost


async def idle_mycel() -> None:
    from mycel import Delivery, Filter
    from mycel.testing import free_port, running

    port = free_port()
    flows = """
    flow "notify" {
      from { connector = "mem"  operation = "notify" }
      to {
        connector = "ws"
        operation = "room:feed"
        filter    = "input.user_id == context.params.user_id"
      }
    }
    """
    clients = Clients()
    async with running(ws_config(port, flows)) as app:
        connector = app.connector("ws")
        hub = connector.services.hub
        paths = [f"/ws?rooms=feed&user_id={i % USERS}" for i in range(IDLE)]
        gc.collect()
        before = rss_bytes()
        await clients.call("connect", port, paths)
        await wait_for(lambda: hub.topic_size("feed") == IDLE)
        await asyncio.sleep(1.0)  # let the joined frames go out
        gc.collect()
        per_connection = (rss_bytes() - before) / IDLE

        # The same filter, looked up in the index and evaluated per client.
        to = app.runtime.config.flows["notify"].to[0]
        assert to.filter is not None and to.filter.indexed is not None
        evaluated = Filter(to.filter.expression, None)

        async def cost(filter_: Filter, events: int) -> float:
            deliveries = [
                Delivery(
                    flow="notify",
                    operation="room:feed",
                    target=None,
                    input={"user_id": seq % USERS, "text": "hello"},
                    payload={"user_id": seq % USERS, "text": "hello"},
                    context={},
                    filter=filter_,
                )
                for seq in range(events)
            ]
            started = time.process_time()
            for delivery in deliveries:
                await connector.deliver(delivery)
            await asyncio.sleep(0)  # the socket writes happen here, batched
            return (time.process_time() - started) / events * 1e6

        await cost(to.filter, 50)  # warm up
        indexed_us = min([await cost(to.filter, 500) for _ in range(3)])
        evaluated_us = await cost(evaluated, 10)
    clients.stop()

    matching = IDLE // USERS
    emit(
        figure="room of 10,000 with a per-user filter: cost per event",
        unit="µs/event",
        value=indexed_us,
        baseline_name="evaluate the filter for every client",
        baseline=evaluated_us,
        ratio=evaluated_us / indexed_us,
        higher_is_better=False,
        aim="close to the matching count, not the room size",
        notes=(
            f"{matching} clients match each event: "
            f"{indexed_us / matching:.1f} µs per matching client, encoding "
            "and socket writes included; CPU time of the server process"
        ),
    )
    print(json.dumps({"per_connection": per_connection}), file=sys.stderr)
    _idle_results["mycel"] = per_connection


async def idle_bare() -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def idle(connection: ServerConnection) -> None:
        await connection.wait_closed()

    clients = Clients()
    server = await serve(idle, "127.0.0.1", 0, compression=None, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    gc.collect()
    before = rss_bytes()
    await clients.call(
        "connect", port, [f"/ws?user_id={i % USERS}" for i in range(IDLE)]
    )
    await wait_for(lambda: len(server.connections) == IDLE)
    await asyncio.sleep(1.0)
    gc.collect()
    _idle_results["bare"] = (rss_bytes() - before) / IDLE
    clients.stop()
    server.close()
    await server.wait_closed()


_idle_results: dict[str, float] = {}


def emit(**row: Any) -> None:
    row = {"bench": "ws", **row}
    for key in ("value", "baseline", "ratio"):
        row[key] = round(row[key], 3)
    print(json.dumps(row, ensure_ascii=False), flush=True)


def run_in_fresh_process(name: str) -> str:
    """Run one scenario in a new interpreter; its stdout and stderr."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, __file__, name], capture_output=True, text=True, check=True
    )
    sys.stdout.write(proc.stdout)
    sys.stdout.flush()
    return proc.stderr


def main() -> None:
    raise_fd_limit()
    if len(sys.argv) > 1:
        scenario = {"broadcast": broadcast_rate, "idle-mycel": idle_mycel}.get(
            sys.argv[1]
        )
        if sys.argv[1] == "idle-bare":
            asyncio.run(idle_bare())
            print(
                json.dumps({"per_connection": _idle_results["bare"]}), file=sys.stderr
            )
            return
        assert scenario is not None, sys.argv[1]
        asyncio.run(scenario())
        return

    # Each scenario in a fresh process: memory figures start clean.
    run_in_fresh_process("broadcast")
    per = {}
    for kind in ("mycel", "bare"):
        stderr = run_in_fresh_process(f"idle-{kind}")
        line = [ln for ln in stderr.splitlines() if ln.startswith('{"per_connection"')]
        per[kind] = json.loads(line[-1])["per_connection"]
    emit(
        figure="memory per idle connection, 10,000 connections",
        unit="KB/connection",
        value=per["mycel"] / 1024,
        baseline_name="bare websockets server",
        baseline=per["bare"] / 1024,
        ratio=per["bare"] / per["mycel"],
        higher_is_better=False,
        aim="<= 20 KB",
        notes=(
            "RSS growth of a fresh server process / connections; mycel's "
            "clients are in a room and indexed by user_id; pings on (20s)"
        ),
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
