"""SSE fan-out: Mycel's memory -> sse flow against a bare sse-starlette endpoint.

Both servers run in this process on uvicorn (through ``mycel.AsgiServer``),
one after the other, and stream the same events to the same number of
clients. The clients run in a child process (raw asyncio sockets that count
``data:`` lines, so that client parsing costs little and the same for both)
and print ``all K`` once every client has received K events.

Two figures, each measured for both servers in the same run:

- burst: EVENTS events published back to back; deliveries per second
  (events x clients / seconds until every client has them all), best of
  ROUNDS. Mycel's writer sends what has piled up for a client in one write;
  the bare endpoint writes each event on its own.
- paced: PACED events, each published once every client has the previous
  one; the median time for one event to reach all clients. No batching is
  possible here, so this is the per-event cost of each path.

The baseline is what one would write by hand with sse-starlette: one
``asyncio.Queue`` per client, the JSON encoded once per event by the
publisher, and an ``EventSourceResponse`` per client yielding
``ServerSentEvent(data, id)``. Mycel adds the memory connector and the flow
engine, per-event ids, a replay history and the hub's bookkeeping.

Run: ``python bench/bench_sse.py`` (``--clients``/``--events`` to change).

"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

CLIENTS = 1000
EVENTS = 100
PACED = 20
ROUNDS = 2


def payload(i: int) -> dict[str, Any]:
    return {"seq": i, "symbol": "ACME", "price": 100.0 + i / 100, "venue": "XNAS"}


# The client process


async def client_main(port: int, path: str, clients: int, events: int) -> None:
    """Connect ``clients`` streams; print ready, then ``all K`` per event."""
    reached = [0] * (events + 1)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
            "\r\n".encode()
        )
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        return reader, writer

    async def count(index: int, reader: asyncio.StreamReader) -> None:
        tail = b""
        seen = 0
        while seen < events:
            chunk = await reader.read(65536)
            if not chunk:
                raise SystemExit(f"client {index} was disconnected")
            buffer = tail + chunk
            now = min(events, seen + buffer.count(b"data:"))
            tail = buffer[-4:]
            for k in range(seen + 1, now + 1):
                reached[k] += 1
                if reached[k] == clients:
                    print(f"all {k}", flush=True)
            seen = now

    connections = []
    for start in range(0, clients, 100):
        batch = range(start, min(start + 100, clients))
        connections += await asyncio.gather(*(one() for _ in batch))
    tasks = [
        asyncio.create_task(count(i, reader))
        for i, (reader, _) in enumerate(connections)
    ]
    print("ready", flush=True)
    await asyncio.gather(*tasks)
    for _, writer in connections:
        writer.close()


# The servers


class Clients:
    """The client process of one round."""

    def __init__(self, port: int, path: str, clients: int, events: int) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                str(port),
                path,
                str(clients),
                str(events),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

    async def line(self) -> str:
        assert self.proc.stdout is not None
        text = await asyncio.to_thread(self.proc.stdout.readline)
        if not text:
            raise SystemExit(f"client process ended: {self.proc.wait()}")
        return text.strip()

    def close(self) -> None:
        self.proc.wait(timeout=30)


Publish = Callable[[int], Awaitable[None]]
Server = Callable[[int], Any]


@asynccontextmanager
async def mycel_server(events: int) -> AsyncIterator[tuple[int, str, Publish]]:
    from mycel.testing import running

    config = f"""
connector "mem" {{ type = "memory" }}
connector "sse" {{
  type               = "sse"
  port               = 0
  send_queue         = {events + 10}
  heartbeat_interval = "10m"
  history_size       = 100
}}
flow "ticks" {{
  from {{ connector = "mem"  operation = "ticks" }}
  to   {{ connector = "sse"  operation = "stream:ticks" }}
}}
"""
    async with running(config) as app:
        memory = app.memory("mem")

        async def publish(i: int) -> None:
            await memory.publish("ticks", payload(i))

        yield app.connector("sse").port, "/events/ticks", publish  # type: ignore[attr-defined]


@asynccontextmanager
async def bare_server(events: int) -> AsyncIterator[tuple[int, str, Publish]]:
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route

    from mycel import AsgiServer

    queues: set[asyncio.Queue[tuple[int, str]]] = set()

    async def stream(queue: asyncio.Queue[tuple[int, str]]) -> AsyncIterator[Any]:
        try:
            while True:
                number, data = await queue.get()
                yield ServerSentEvent(data=data, id=str(number))
        finally:
            queues.discard(queue)

    async def endpoint(request: Request) -> EventSourceResponse:
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        queues.add(queue)
        return EventSourceResponse(stream(queue), ping=600)

    async def publish(i: int) -> None:
        item = (i + 1, json.dumps(payload(i)))
        for queue in list(queues):
            queue.put_nowait(item)

    server = AsgiServer(Starlette(routes=[Route("/events", endpoint)]), "127.0.0.1", 0)
    await server.start()
    try:
        yield server.port, "/events", publish
    finally:
        await server.stop()


async def burst(server: Server, clients: int, events: int) -> float:
    """Seconds from the first publish until every client has every event."""
    async with server(events) as (port, path, publish):
        proc = Clients(port, path, clients, events)
        assert await proc.line() == "ready"
        started = time.perf_counter()
        for i in range(events):
            await publish(i)
        while await proc.line() != f"all {events}":
            pass
        elapsed = time.perf_counter() - started
        proc.close()
    return elapsed


async def paced(server: Server, clients: int, events: int) -> tuple[list[float], float]:
    """Seconds from each publish until every client has the event, and the
    server's CPU seconds per event (this process: the server side only)."""
    times = []
    async with server(events) as (port, path, publish):
        proc = Clients(port, path, clients, events)
        assert await proc.line() == "ready"
        cpu = time.process_time()
        for i in range(events):
            started = time.perf_counter()
            await publish(i)
            assert await proc.line() == f"all {i + 1}"
            times.append(time.perf_counter() - started)
        cpu = (time.process_time() - cpu) / events
        proc.close()
    return times, cpu


async def bench(clients: int, events: int, paced_events: int, rounds: int) -> None:
    # Burst: best round of each, alternating so that drift hits both.
    mycel_times, bare_times = [], []
    for _ in range(rounds):
        bare_times.append(await burst(bare_server, clients, events))
        mycel_times.append(await burst(mycel_server, clients, events))
    deliveries = clients * events
    value, baseline = deliveries / min(mycel_times), deliveries / min(bare_times)
    print(
        json.dumps(
            {
                "bench": "sse",
                "figure": f"burst fan-out to {clients:,} clients",
                "unit": "events/s",
                "value": round(value),
                "baseline_name": "bare sse-starlette endpoint",
                "baseline": round(baseline),
                "ratio": round(value / baseline, 2),
                "higher_is_better": True,
                "aim": ">= 0.8x of bare",
                "notes": (
                    f"{events} events back to back x {clients} clients, best of "
                    f"{rounds}; seconds mycel {[round(t, 2) for t in mycel_times]}, "
                    f"bare {[round(t, 2) for t in bare_times]}; Mycel writes what "
                    "piled up for a client at once, bare writes each event"
                ),
            }
        ),
        flush=True,
    )

    # Paced: one event at a time, the median time to reach every client.
    bare_each, bare_cpu = await paced(bare_server, clients, paced_events)
    mycel_each, mycel_cpu = await paced(mycel_server, clients, paced_events)
    value, baseline = statistics.median(mycel_each), statistics.median(bare_each)
    print(
        json.dumps(
            {
                "bench": "sse",
                "figure": f"one event to all {clients:,} clients",
                "unit": "ms",
                "value": round(value * 1000, 1),
                "baseline_name": "bare sse-starlette endpoint",
                "baseline": round(baseline * 1000, 1),
                "ratio": round(baseline / value, 2),
                "higher_is_better": False,
                "aim": ">= 0.8x of bare",
                "notes": (
                    f"median of {paced_events} events, each published once every "
                    "client had the previous one (no batching possible); wall "
                    "clock, so load from other processes shows here"
                ),
            }
        ),
        flush=True,
    )
    print(
        json.dumps(
            {
                "bench": "sse",
                "figure": f"server CPU per event to {clients:,} clients",
                "unit": "ms",
                "value": round(mycel_cpu * 1000, 1),
                "baseline_name": "bare sse-starlette endpoint",
                "baseline": round(bare_cpu * 1000, 1),
                "ratio": round(bare_cpu / mycel_cpu, 2),
                "higher_is_better": False,
                "aim": ">= 0.8x of bare",
                "notes": (
                    "the paced run's process CPU time (user+system) per event, "
                    "server side only; steadier than wall clock on a shared machine"
                ),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--paced", type=int, default=PACED)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--client", nargs=4, metavar=("PORT", "PATH", "N", "EVENTS"))
    args = parser.parse_args()
    if args.client:
        port, path, n, events = args.client
        asyncio.run(client_main(int(port), path, int(n), int(events)))
        return
    asyncio.run(bench(args.clients, args.events, args.paced, args.rounds))


if __name__ == "__main__":
    main()
