"""WebSocket fan-out with ``mycel run --workers 2`` vs one process.

The same configuration (http -> flow -> ws broadcast) runs once as a single
process without a cluster, and once as two workers sharing the port and a
Redis backplane. 400 clients in this benchmark's own process receive K
events each; the figure is deliveries per second from the first publish to
the last receipt. Everything shares this machine's 2 cores (the clients
too), so the ratio understates what two cores give a server on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core" / "src"))
from mycel.testing import free_port

CLIENTS = 400
EVENTS = 200

CONFIG = """
%(cluster)s
connector "api" {
  type = "http"
  port = %(http)d
}
connector "ws" {
  type = "websocket"
  port = %(ws)d
  max_connections = 100000
}
flow "fan" {
  from { connector = "api"  operation = "POST /fan" }
  to   { connector = "ws"   operation = "broadcast" }
}
"""


def start(workers: int, namespace: str) -> tuple[subprocess.Popen[str], int, int]:
    http, ws = free_port(), free_port()
    cluster = (
        f'cluster {{\n  backplane = "redis://127.0.0.1:6379/0"\n'
        f'  namespace = "{namespace}"\n}}'
        if workers > 1
        else ""
    )
    folder = Path(tempfile.mkdtemp(prefix="mycel-bench-"))
    (folder / "main.mycel").write_text(
        CONFIG % {"cluster": cluster, "http": http, "ws": ws}
    )
    command = [sys.executable, "-m", "mycel", "run", str(folder)]
    if workers > 1:
        command[4:4] = ["--workers", str(workers)]
    log = folder / "mycel.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, stderr=out, text=True)
    deadline = time.monotonic() + 60
    while log.read_text().count(" started: ") < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("mycel did not start:\n" + log.read_text())
        time.sleep(0.1)
    return proc, http, ws


async def measure(http: int, ws: int) -> float:
    url = f"ws://127.0.0.1:{ws}/ws"
    clients = [await websockets.connect(url, max_queue=None) for _ in range(CLIENTS)]
    done = 0
    finished = asyncio.Event()

    async def read(connection: websockets.ClientConnection) -> None:
        # Counting frames only: the clients' CPU is part of the same 2 cores.
        nonlocal done
        count = 0
        while count < EVENTS:
            await connection.recv(decode=False)
            count += 1
        done += 1
        if done == CLIENTS:
            finished.set()

    readers = [asyncio.create_task(read(c)) for c in clients]
    started = time.perf_counter()

    async def post(client: httpx.AsyncClient, numbers: range) -> None:
        for n in numbers:
            await client.post(f"http://127.0.0.1:{http}/fan", json={"n": n})

    # Eight publishers at once, so that the servers, not one HTTP round
    # trip after another, set the pace.
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(post(client, range(i, EVENTS, 8)) for i in range(8)))
    await asyncio.wait_for(finished.wait(), 300)
    elapsed = time.perf_counter() - started
    for task in readers:
        task.cancel()
    for connection in clients:
        await connection.close()
    return CLIENTS * EVENTS / elapsed


def run(workers: int) -> float:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    proc, http, ws = start(workers, namespace)
    try:
        return asyncio.run(measure(http, ws))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        client = redis.Redis()
        keys = client.keys(f"{namespace}:*")
        if keys:
            client.delete(*keys)


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    single = run(1)
    two = run(2)
    print(
        json.dumps(
            {
                "bench": "cluster_workers",
                "figure": f"ws broadcast to {CLIENTS} clients, {EVENTS} events",
                "unit": "deliveries/s",
                "value": round(two),
                "baseline_name": "one process, no cluster",
                "baseline": round(single),
                "ratio": round(two / single, 2),
                "higher_is_better": True,
                "aim": ">= 1.6x",
                "notes": "--workers 2, Redis backplane; the clients share the 2 cores",
            }
        )
    )


if __name__ == "__main__":
    main()
