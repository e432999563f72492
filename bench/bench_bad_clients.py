"""Good clients' latency while 100 stalled and 100 vanished clients are dropped.

Run as ``python bench/bench_bad_clients.py`` (no external service needed).
Prints one JSON object per figure (bench/README.md).

One ``mycel run`` process: an ``http`` source (``POST /ticks``,
``POST /bulk``) -> a ``websocket`` broadcast (ticks) and room (bulk). 800
good clients read every frame, in a client process of their own, so that
the server is measured fairly; each tick carries the moment it was due
(a publisher held up by a busy server counts in the latency), and each good
client notes ``receipt - sent`` for the ticks it gets. Each tick
goes to one of ``GROUPS`` groups of clients (an indexed per-client filter,
``input.group == context.params.group``), so that one Python client process
can read every frame it is sent on 2 cores.

Three phases in the same run, at the same steady rate (``RATE`` ticks per
second for ``SECONDS`` seconds, after a warm-up that is not counted):

- baseline: the 800 good clients alone;
- control: the 800 good clients and 100 more, in this process, that read
  (and drop) the same bulk traffic as the stalled ones below get;
- with bad clients: 100 more that completed the handshake and never read
  (raw sockets with a 2 KB receive buffer) and 100 more whose sockets are
  reset (``SO_LINGER`` 0, no close frame, no orderly FIN) a third of the
  way into the phase. Like tests/test_e2e_bad_clients.py, the stalled ones
  alone also get 100 bulk messages of 64 KB (through a room ``stalled``
  they join, not a per-client filter, whose evaluation for all 1,000
  clients per bulk message would cost more than the writes) in the first
  second of the phase, on their own schedule so that they never hold up a
  tick: a server cannot tell a reader that stopped until the kernel holds
  what it will take for it (the connector's ``unsent_limit``, 64 KB by
  default, of bytes not yet sent), and then its ``send_queue`` (20)
  overflows. Pushing that is work the server does in its one event loop,
  and the good clients feel it while it lasts: the figures say how much,
  and the one "once the bad ones were closed" says whether it ends.

So that the phases differ only in their clients, each of them polls the
server's ``/metrics`` as the one with bad clients does (four times a
second), the server's keep-alive pings (``ping_interval``) fall in none of
them, and neither the good clients' process nor this one (the publisher)
runs Python's garbage collector: its pauses, tens of milliseconds once
the samples pile up, would count as the server's latency in whichever
phase they happened to fall.

The latency ratio is baseline / with (higher is better; 1.0 means the bad
clients cost the good ones nothing). After the phase, the server's
``/metrics`` tell how many bad clients were closed: ``mycel_subscribers``
must fall back to 800 and ``mycel_slow_consumers_dropped_total`` reach 100.

A real vanished peer (cable pulled) sends nothing at all; on loopback the
nearest is a reset. A silent one is indistinguishable from a stalled reader
until ``ping_timeout`` and is not measured here. The baseline carries no
bulk traffic: the ratio against it includes the cost of those bytes, not
only of the clients being bad; the ratio against the control phase is the
cost of their being bad alone.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _e2e import free_port, percentile, raise_fd_limit

GOOD, STALLED, VANISHING = 800, 100, 100
GROUPS = int(os.environ.get("BENCH_BAD_GROUPS", "10"))
RATE = int(os.environ.get("BENCH_BAD_RATE", "100"))
SECONDS = int(os.environ.get("BENCH_BAD_SECONDS", "5"))
WARMUP = RATE  # one second of ticks, not counted
BULK_MESSAGES, BULK = 100, "y" * 65536
PAD = "x" * 256


def _handshake(port: int, query: str) -> bytes:
    return (
        f"GET /ws?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


# --- good clients (own process) ----------------------------------------------

SENT = re.compile(rb'"sent":\s*([0-9.eE+-]+)')


class _Good:
    def __init__(self) -> None:
        self.sink: list[tuple[float, float]] = []  # (sent, latency)
        self.ready = 0
        self.ended = 0


async def _good_client(port: int, group: int, state: _Good) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(_handshake(port, f"kind=good&group={group}"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    state.ready += 1
    try:
        while True:
            first, second = await reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(size)
            opcode = first & 0x0F
            if opcode == 0x1:
                now = time.time()
                if found := SENT.search(payload):
                    sent = float(found.group(1))
                    state.sink.append((sent, now - sent))
            elif opcode == 0x9:  # ping: answer with a masked pong
                pong = bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
                writer.write(pong)
            elif opcode == 0x8:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    state.ended += 1


def good_process(port: int, pipe: Connection) -> None:
    async def main() -> None:
        state = _Good()
        tasks: list[asyncio.Task[None]] = []
        for start in range(0, GOOD, 200):
            tasks += [
                asyncio.create_task(_good_client(port, i % GROUPS, state))
                for i in range(start, start + 200)
            ]
            while state.ready < len(tasks):
                await asyncio.sleep(0.01)
        pipe.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command == "close":
                break
            expected, timeout = command
            deadline = time.monotonic() + timeout
            while len(state.sink) < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            pipe.send((list(state.sink), state.ended))
            state.sink.clear()
        for task in tasks:
            task.cancel()

    raise_fd_limit()
    # No collector pauses here (tens of milliseconds once the samples pile
    # up): they would be counted as the server's latency.
    gc.disable()
    asyncio.run(main())


# --- bad clients (this process; they cost nothing to keep) -------------------


async def raw_client(port: int, query: str, rcvbuf: int | None) -> socket.socket:
    """A WebSocket handshake over a raw socket that will never read again."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, _handshake(port, query))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def drain(sock: socket.socket) -> int:
    """Read and drop what the server sends until the control phase is over.

    The bytes received; the socket is closed after that.
    """
    loop = asyncio.get_running_loop()
    total = 0
    deadline = loop.time() + SECONDS + 3
    try:
        while (left := deadline - loop.time()) > 0:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), left)
            except TimeoutError:
                break
            if not chunk:
                break
            total += len(chunk)
    finally:
        sock.close()
    return total


def vanish(sock: socket.socket) -> None:
    """Reset the connection: no close frame, no orderly end."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- mycel run ---------------------------------------------------------------

CONFIG = """
service {{
  name       = "bench"
  admin_port = {admin}
}}
connector "in" {{
  type = "http"
  port = {http}
}}
connector "ws" {{
  type            = "websocket"
  port            = {port}
  send_queue      = 20
  close_timeout   = "1s"
  ping_interval   = "120s"
  ping_timeout    = "20s"
  max_connections = 2000
}}
flow "ticks" {{
  from {{ connector = "in"  operation = "POST /ticks" }}
  to {{
    connector = "ws"
    operation = "broadcast"
    filter    = "input.group == context.params.group"
  }}
}}
flow "bulk" {{
  from {{ connector = "in"  operation = "POST /bulk" }}
  to   {{ connector = "ws"  operation = "room:stalled" }}
}}
"""


class Mycel:
    def __init__(self, folder: Path) -> None:
        import httpx

        self.admin, self.http, self.port = free_port(), free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "main.mycel").write_text(
            CONFIG.format(admin=self.admin, http=self.http, port=self.port)
        )
        self.log_path = folder / "mycel.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mycel",
                "--log-level",
                "WARNING",
                "run",
                str(folder),
            ],
            stderr=self.log_path.open("w"),
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{self.admin}/ready"
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("mycel run exited:\n" + self.log_path.read_text())
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("mycel run did not become ready")

    async def metric(self, name: str) -> float:
        # A raw request: building an HTTP client library's client (its TLS
        # context) takes tens of milliseconds, which would hold up the
        # publisher in this process four times a second.
        reader, writer = await asyncio.open_connection("127.0.0.1", self.admin)
        try:
            writer.write(
                b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            response = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        text = response.partition(b"\r\n\r\n")[2].decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith((name + "{", name + " ")) and 'connector="ws"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def wait_metric(self, name: str, value: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.metric(name) == value:
                return True
            await asyncio.sleep(0.1)
        return False

    def cpu(self) -> float:
        """CPU seconds the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        sys.stderr.write(self.log_path.read_text()[-3000:])


# --- measuring ---------------------------------------------------------------


async def post(port: int, path: str, body: Any) -> None:
    """POST JSON over a fresh connection and expect 202."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + data
        )
        head = await reader.readuntil(b"\r\n\r\n")
        answer = await reader.read()
        assert head.startswith(b"HTTP/1.1 202"), head + answer
    finally:
        writer.close()


async def publish(
    mycel: Mycel,
    count: int,
    *,
    bulk: int = 0,
    vanishing: list[socket.socket] | None = None,
) -> float:
    """``count`` ticks at ``RATE``, ``bulk`` bulk messages among the first.

    Each tick's ``sent`` is the moment it was due, so that a publisher held
    up by the server counts in the latency. The largest such delay, in
    seconds, is returned.
    """
    loop = asyncio.get_running_loop()
    late = 0.0
    start, wall = loop.time(), time.time()

    async def bulk_messages() -> None:
        # Their own schedule, so that a slow bulk POST never holds up a tick.
        for n in range(bulk):
            delay = start + n / RATE - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await post(mycel.http, "/bulk", {"bulk": BULK})

    bulk_task = asyncio.create_task(bulk_messages())
    for n in range(count):
        delay = start + n / RATE - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late = max(late, -delay)
        if vanishing and n == count // 3:
            MARKS["reset"] = loop.time() - start
            for sock in vanishing:
                vanish(sock)
        due = wall + n / RATE
        body = {"group": n % GROUPS, "n": n, "sent": due, "pad": PAD}
        await post(mycel.http, "/ticks", body)
    await bulk_task
    return late


MARKS: dict[str, float] = {}
"""Seconds from the start of the phase with bad clients to each milestone."""


async def watch(mycel: Mycel, started: float, marks: dict[str, float]) -> None:
    """Note when the server's gauges pass the milestones of ``marks``.

    It runs in every phase (into a dict nobody reads but in the phase with
    bad clients), so that all of them pay the same for the server's
    ``/metrics``.
    """
    while True:
        subscribers = await mycel.metric("mycel_subscribers")
        dropped = await mycel.metric("mycel_slow_consumers_dropped_total")
        now = time.monotonic() - started
        if subscribers <= GOOD + STALLED:
            marks.setdefault("subscribers <= 900", now)
        if subscribers <= GOOD:
            marks.setdefault("subscribers = 800", now)
        if dropped >= 1:
            marks.setdefault("first slow consumer dropped", now)
        if dropped >= STALLED:
            marks.setdefault("100th slow consumer dropped", now)
        await asyncio.sleep(0.25)


def collect(pipe: Connection, expected: int) -> tuple[list[tuple[float, float]], int]:
    pipe.send((expected, 60))
    latencies, ended = pipe.recv()
    return latencies, ended


async def scenario(mycel: Mycel, pipe: Connection) -> dict[str, Any]:
    per_tick = GOOD // GROUPS
    ticks = RATE * SECONDS
    await mycel.wait_metric("mycel_subscribers", GOOD, 30)
    await publish(mycel, WARMUP)
    collect(pipe, WARMUP * per_tick)

    cpu = mycel.cpu()
    timeline = asyncio.create_task(watch(mycel, time.monotonic(), {}))
    late_before = await publish(mycel, ticks)
    cpu_before = mycel.cpu() - cpu
    timeline.cancel()
    baseline, ended_before = collect(pipe, ticks * per_tick)

    # The control: the same bulk traffic to 100 clients that do read it.
    loop = asyncio.get_running_loop()
    readers = list(
        await asyncio.gather(
            *(
                raw_client(
                    mycel.port, f"kind=reader&group={i % GROUPS}&rooms=stalled", None
                )
                for i in range(STALLED)
            )
        )
    )
    drains = [asyncio.create_task(drain(sock)) for sock in readers]
    await mycel.wait_metric("mycel_subscribers", GOOD + STALLED, 30)
    cpu = mycel.cpu()
    timeline = asyncio.create_task(watch(mycel, time.monotonic(), {}))
    late_control = await publish(mycel, ticks, bulk=BULK_MESSAGES)
    cpu_control = mycel.cpu() - cpu
    timeline.cancel()
    control, _ = await loop.run_in_executor(None, collect, pipe, ticks * per_tick)
    drained = sum(await asyncio.gather(*drains))
    await mycel.wait_metric("mycel_subscribers", GOOD, 30)

    stalled = list(
        await asyncio.gather(
            *(
                raw_client(
                    mycel.port, f"kind=stalled&group={i % GROUPS}&rooms=stalled", 2048
                )
                for i in range(STALLED)
            )
        )
    )
    vanishing = list(
        await asyncio.gather(
            *(
                raw_client(mycel.port, f"kind=vanishing&group={i % GROUPS}", None)
                for i in range(VANISHING)
            )
        )
    )
    total = GOOD + STALLED + VANISHING
    all_in = await mycel.wait_metric("mycel_subscribers", total, 30)
    started, cpu = time.monotonic(), mycel.cpu()
    wall = time.time()
    timeline = asyncio.create_task(watch(mycel, started, MARKS))
    late_after = await publish(mycel, ticks, bulk=BULK_MESSAGES, vanishing=vanishing)
    cpu_after = mycel.cpu() - cpu
    with_bad, ended_after = await loop.run_in_executor(
        None, collect, pipe, ticks * per_tick
    )
    closed_all = await mycel.wait_metric("mycel_subscribers", GOOD, 60)
    timeline.cancel()
    left = await mycel.metric("mycel_subscribers")
    dropped = await mycel.metric("mycel_slow_consumers_dropped_total")
    for sock in stalled:
        sock.close()
    return {
        "baseline": [latency for _, latency in baseline],
        "with": [latency for _, latency in with_bad],
        "control": [latency for _, latency in control],
        "drained": drained,
        "after": [
            latency
            for sent, latency in with_bad
            if sent > wall + MARKS.get("subscribers = 800", SECONDS)
        ],
        "expected": ticks * per_tick,
        "good_closed": ended_after,
        "good_closed_before": ended_before,
        "all_connected": all_in,
        "closed_all": closed_all,
        "late": (late_before, late_after, late_control),
        "cpu": (cpu_before, cpu_after, cpu_control),
        "marks": MARKS,
        "left": left,
        "dropped": dropped,
    }


def emit(**row: Any) -> None:
    row = {"bench": "bad_clients", **row}
    for key in ("value", "baseline", "ratio"):
        row[key] = round(row[key], 3)
    print(json.dumps(row, ensure_ascii=False), flush=True)


def report(result: dict[str, Any]) -> None:
    base, ours = result["baseline"], result["with"]
    expected = result["expected"]
    load = (
        f"http -> ws broadcast, {RATE} ticks/s for {SECONDS} s, each to "
        f"{GOOD // GROUPS} of {GOOD} good clients (indexed filter); received "
        f"{len(ours)}/{expected} with bad clients, {len(base)}/{expected} "
        f"without; good clients closed: {result['good_closed']}; publisher "
        f"at most {result['late'][1] * 1000:.0f} ms behind schedule with bad "
        f"clients, {result['late'][0] * 1000:.0f} ms without; server CPU "
        f"while publishing {result['cpu'][1]:.1f} s with bad clients, "
        f"{result['cpu'][0]:.1f} s without"
    )
    for q in (50, 95, 99):
        value = percentile(ours, q) * 1000
        baseline = percentile(base, q) * 1000
        emit(
            figure=f"good clients' latency p{q} with 200 bad clients",
            unit="ms",
            value=value,
            baseline_name="the same 800 clients without bad ones",
            baseline=baseline,
            ratio=baseline / value if value else float("nan"),
            higher_is_better=False,
            aim=">= 0.8",
            notes=(
                f"{load}; plus {STALLED} stalled (never read, 2 KB SO_RCVBUF, "
                f"{BULK_MESSAGES} x 64 KB bulk each) and {VANISHING} reset"
            ),
        )
    control = result["control"]
    for q in (50, 95, 99):
        value = percentile(ours, q) * 1000
        baseline = percentile(control, q) * 1000
        emit(
            figure=f"good clients' latency p{q}, bad clients vs the same bytes read",
            unit="ms",
            value=value,
            baseline_name="800 good + 100 readers getting the same bulk",
            baseline=baseline,
            ratio=baseline / value if value else float("nan"),
            higher_is_better=False,
            aim=">= 0.8",
            notes=(
                "control phase: the bulk goes to 100 clients that read it "
                f"({result['drained'] / 1e6:.0f} MB read), nobody is bad; "
                f"received {len(control)}/{expected}; publisher at most "
                f"{result['late'][2] * 1000:.0f} ms behind; server CPU "
                f"{result['cpu'][2]:.1f} s: this ratio is the cost of the "
                "clients being bad, without the cost of the bytes"
            ),
        )
    after = result["after"]
    value = percentile(after, 99) * 1000
    baseline = percentile(base, 99) * 1000
    emit(
        figure="good clients' latency p99 once the bad ones were closed",
        unit="ms",
        value=value,
        baseline_name="the same 800 clients without bad ones",
        baseline=baseline,
        ratio=baseline / value if value else float("nan"),
        higher_is_better=False,
        aim=">= 0.8",
        notes=(
            f"the {len(after)} deliveries of ticks due after mycel_subscribers "
            f"was back to {GOOD}, in the same phase: does the server recover"
        ),
    )
    bad = STALLED + VANISHING
    marks = ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(result["marks"].items(), key=lambda kv: kv[1])
    )
    closed = GOOD + bad - result["left"]
    emit(
        figure="bad clients closed",
        unit="clients",
        value=closed,
        baseline_name="bad clients connected",
        baseline=bad,
        ratio=closed / bad,
        higher_is_better=True,
        aim="= 1.0 (all of them, no good one)",
        notes=(
            f"mycel_subscribers {result['left']:.0f} after the phase (from "
            f"{GOOD + bad}; all connected: {result['all_connected']}); "
            f"mycel_slow_consumers_dropped_total {result['dropped']:.0f} of "
            f"{STALLED} stalled; all closed within 60 s: {result['closed_all']}; "
            f"good clients closed: {result['good_closed']}; seconds from the "
            f"phase's start: {marks}"
        ),
    )


def main() -> None:
    raise_fd_limit()
    folder = Path(tempfile.mkdtemp(prefix="mycel-bench-bad-clients-"))
    mycel = Mycel(folder)
    parent, child = multiprocessing.Pipe()
    clients = multiprocessing.Process(target=good_process, args=(mycel.port, child))
    try:
        clients.start()
        assert parent.poll(120), "the good clients did not connect"
        parent.recv()
        gc.disable()  # nor in the publisher, whose delays count too
        result = asyncio.run(scenario(mycel, parent))
        gc.enable()
        parent.send("close")
        clients.join(30)
    finally:
        if clients.is_alive():
            clients.kill()
        mycel.stop()
    report(result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
