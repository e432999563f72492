"""What the end-to-end benchmarks share: clients, relays, ``mycel run``, report.

``bench_e2e.py`` (RabbitMQ sources) and ``bench_e2e_cdc.py`` (CDC sources)
run the same subscribers against a ``mycel run`` process and against a bare
relay, and report both the same way; this module holds those parts.

The clients are raw sockets driven by ``asyncio.Protocol`` objects, in one
process per ``CLIENTS_PER_PROCESS`` connections (``BENCH_E2E_CLIENT_PROCS``
overrides the count): each does the handshake (WebSocket, SSE or
graphql-transport-ws), answers pings and scans whatever a read brings for
event timestamps in one regular-expression pass, noting one receipt time
per read. Each phase reports the CPU seconds the client processes and the
server process used, so a figure whose clients were the bottleneck shows
it. User ``i % USERS`` for client ``i``.

The relays' fan-out side (``serve_clients``) indexes connections by the
``user_id`` of their handshake (a dict, as Mycel's hub has) and writes each
event to that user's connections: ``websockets.broadcast``, raw SSE writes,
or graphql-transport-ws ``next`` frames, in the same bytes Mycel sends.
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
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import uvloop

RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
USERS = 100
STEADY_RATE, STEADY_SECONDS = 200, 5
SATURATION = 1_000
SIZES = tuple(
    int(n) for n in os.environ.get("BENCH_E2E_SIZES", "1000,10000").split(",")
)
CLIENTS_PER_PROCESS = 5_000
PHASE_TIMEOUT, IDLE_TIMEOUT = 90.0, 10.0


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


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- clients (own processes) -------------------------------------------------

# The send time of an event: ``"sent": 1733.25`` (seconds since the epoch,
# RabbitMQ scenarios) or ``"updated_at": "2024-...+00:00"`` (a row's clock,
# CDC scenarios).
STAMP = re.compile(rb'"(?:sent|updated_at)":\s*"?([^",}]+)')


def _seconds(raw: bytes) -> float:
    if raw[4:5] == b"-":
        return datetime.fromisoformat(raw.decode()).timestamp()
    return float(raw)


def _masked(text: str) -> bytes:
    """A client text frame (mask key 0, so the payload is sent as is)."""
    data = text.encode()
    if len(data) < 126:
        return bytes([0x81, 0x80 | len(data)]) + b"\0\0\0\0" + data
    size = len(data).to_bytes(2, "big")
    return bytes([0x81, 0x80 | 126]) + size + b"\0\0\0\0" + data


GQL_PONG = _masked('{"type":"pong"}')


def ws_frames(buffer: bytes | bytearray) -> Iterator[tuple[int, int, int]]:
    """``(opcode, start, end)`` of each whole frame a server sent, in order.

    ``buffer[start:end]`` is the payload (server frames are not masked);
    the last ``end`` is where the next, incomplete frame begins.

    """
    pos, total = 0, len(buffer)
    while total - pos >= 2:
        opcode, size, head = buffer[pos] & 0x0F, buffer[pos + 1] & 0x7F, 2
        if size == 126:
            size, head = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
        end = pos + head + size
        if end > total:
            return
        yield opcode, pos + head, end
        pos = end


def pong(payload: bytes) -> bytes:
    """The client's (masked) answer to a ping carrying ``payload``."""
    return bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


@dataclass
class _Shard:
    """What the connections of one client process share."""

    latencies: list[float] = field(default_factory=list)
    last: float = 0.0
    ready: int = 0
    refused: list[bytes] = field(default_factory=list)

    def take(self, chunk: bytes, now: float) -> None:
        for found in STAMP.finditer(chunk):
            self.latencies.append(now - _seconds(found.group(1)))
            self.last = now


class _Client(asyncio.Protocol):
    """One subscriber: handshake, then timestamps out of whatever arrives."""

    def __init__(self, kind: str, request: bytes, hello: bytes, shard: _Shard):
        self.kind = kind
        self.request = request
        self.hello = hello
        self.shard = shard
        self.buffer = b""
        self.open = False
        self.acked = kind != "gql"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer + data if self.buffer else data
        assert self.transport is not None

        # The HTTP response head: 101 for WebSocket, 200 for SSE.
        if not self.open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            if buffer[9:12] not in (b"101", b"200"):
                self.shard.refused.append(buffer[:end])
                self.transport.close()
                return
            self.open = True
            buffer = buffer[end + 4 :]
            self.transport.write(self.hello)
            if self.acked:
                self.shard.ready += 1

        # SSE: events end with a blank line; scan the complete ones.
        if self.kind == "sse":
            cut = buffer.rfind(b"\n\n")
            if cut < 0:
                self.buffer = buffer
                return
            self.shard.take(buffer[:cut], now)
            self.buffer = buffer[cut + 2 :]
            return

        # WebSocket: walk the frame headers, answer control frames, then
        # scan the complete text frames in one pass.
        pos, texts = 0, []
        for opcode, start, pos in ws_frames(buffer):
            if opcode == 0x1:
                texts.append(buffer[start:pos])
            elif opcode == 0x9:
                self.transport.write(pong(buffer[start:pos]))
            elif opcode == 0x8:
                self.transport.close()
                return
        self.buffer = buffer[pos:]
        if not texts:
            return
        chunk = b"\n".join(texts)
        if self.kind == "gql":
            if not self.acked and b"connection_ack" in chunk:
                self.acked = True
                self.shard.ready += 1
            if b'"type":"ping"' in chunk:
                self.transport.write(GQL_PONG)
        self.shard.take(chunk, now)


def _handshake(kind: str, port: int, path: str) -> bytes:
    if kind == "sse":
        return (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
    protocol = (
        "Sec-WebSocket-Protocol: graphql-transport-ws\r\n" if kind == "gql" else ""
    )
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"{protocol}Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _hello(kind: str, user: int, query: str) -> bytes:
    if kind != "gql":
        return b""
    init = {"type": "connection_init", "payload": {"userId": str(user)}}
    subscribe = {"id": "1", "type": "subscribe", "payload": {"query": query}}
    return _masked(json.dumps(init)) + _masked(json.dumps(subscribe))


def client_process(
    port: int, kind: str, path: str, query: str, users: list[int], pipe: Connection
) -> None:
    """Hold one connection per entry of ``users``; answer the parent's phases.

    ``path`` is formatted with ``user``. The parent sends
    ``(expected, timeout)`` after each phase's publishing and gets back
    ``(latencies, last receipt, CPU seconds so far)``; ``"close"`` ends it.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        shard = _Shard()

        # Connect in batches, each waited for, so the server's accept queue
        # never overflows.
        transports = []
        for start in range(0, len(users), 500):
            for user in users[start : start + 500]:
                request = _handshake(kind, port, path.format(user=user))
                hello = _hello(kind, user, query)
                transport, _ = await loop.create_connection(
                    lambda r=request, h=hello: _Client(kind, r, h, shard),  # type: ignore[misc]
                    "127.0.0.1",
                    port,
                )
                transports.append(transport)
            deadline = time.monotonic() + 60
            while shard.ready < len(transports) and not shard.refused:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
        if shard.refused or shard.ready < len(users):
            refused = [r[:200] for r in shard.refused[:3]]
            pipe.send(("failed", shard.ready, refused, time.process_time()))
            return
        if kind == "gql":
            await asyncio.sleep(1)  # no answer to subscribe: let them settle
        pipe.send(("ready", shard.ready, [], time.process_time()))

        # One reply per phase: wait for the expected count, or until nothing
        # arrived for IDLE_TIMEOUT seconds.
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command == "close":
                break
            expected, timeout = command
            deadline = time.monotonic() + timeout
            seen, quiet_since = -1, time.monotonic()
            while len(shard.latencies) < expected and time.monotonic() < deadline:
                if len(shard.latencies) != seen:
                    seen, quiet_since = len(shard.latencies), time.monotonic()
                elif time.monotonic() - quiet_since > IDLE_TIMEOUT:
                    break
                await asyncio.sleep(0.01)
            pipe.send((shard.latencies, shard.last, time.process_time()))
            shard.latencies, shard.last = [], 0.0
        for transport in transports:
            transport.abort()

    raise_fd_limit()
    asyncio.run(main())


@dataclass
class Phase:
    """What the clients saw of one phase."""

    latencies: list[float]
    expected: int
    started: float  # wall clock, just before the first event was produced
    last: float  # wall clock of the last receipt
    client_cpu: float  # CPU seconds of all client processes in this phase
    server_cpu: float = float("nan")  # CPU seconds of the server process

    @property
    def received(self) -> int:
        return len(self.latencies)

    @property
    def seconds(self) -> float:
        return max(self.last - self.started, 1e-9)


class Clients:
    """``count`` subscribers, user ``i % USERS`` each, in client processes."""

    def __init__(
        self, port: int, kind: str, path: str, count: int, query: str = ""
    ) -> None:
        procs = int(os.environ.get("BENCH_E2E_CLIENT_PROCS", "0")) or -(
            -count // CLIENTS_PER_PROCESS
        )
        users = [i % USERS for i in range(count)]
        step = -(-count // procs)
        self.shares = [users[i : i + step] for i in range(0, count, step)]
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.Process] = []
        for share in self.shares:
            parent, child = multiprocessing.Pipe()
            proc = multiprocessing.Process(
                target=client_process, args=(port, kind, path, query, share, child)
            )
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
        self.cpu: list[float] = []
        for pipe in self.pipes:
            if not pipe.poll(180):
                raise RuntimeError("clients did not connect in 180 s")
            state, ready, refused, cpu = pipe.recv()
            if state != "ready":
                raise RuntimeError(f"only {ready} clients connected; {refused}")
            self.cpu.append(cpu)

    def collect(self, per_user: dict[int, int], started: float) -> Phase:
        """Wait for the events of a phase (``per_user``: events per user)."""
        expected = [sum(per_user.get(u, 0) for u in share) for share in self.shares]
        for pipe, count in zip(self.pipes, expected, strict=True):
            pipe.send((count, PHASE_TIMEOUT))
        latencies: list[float] = []
        last, cpu = 0.0, 0.0
        for n, pipe in enumerate(self.pipes):
            got, got_last, cpu_total = pipe.recv()
            latencies += got
            last = max(last, got_last)
            cpu += cpu_total - self.cpu[n]
            self.cpu[n] = cpu_total
        return Phase(latencies, sum(expected), started, last, cpu)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("close")
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


# A phase: produce events, return (events per user, wall clock at the start).
Producer = Callable[[bool], tuple[dict[int, int], float]]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    server: int,
    port: int,
    kind: str,
    path: str,
    count: int,
    produce: Producer,
    query: str = "",
) -> dict[str, Phase]:
    """Steady, then saturation, with the same connected clients.

    ``server`` is the PID of the process under test, whose CPU time each
    phase notes.
    """
    clients = Clients(port, kind, path, count, query)
    try:
        results = {}
        for steady in (True, False):
            before = cpu_seconds(server)
            per_user, started = produce(steady)
            phase = clients.collect(per_user, started)
            phase.server_cpu = cpu_seconds(server) - before
            results["steady" if steady else "saturation"] = phase
        return results
    finally:
        clients.close()


# --- bare relays (own process) -----------------------------------------------

Deliver = Callable[[str, str], None]


async def serve_clients(
    kind: str, port: int, feed: Callable[[Deliver], Any], pipe: Connection
) -> None:
    """A bare fan-out server: clients indexed by user, until the pipe speaks.

    ``feed`` is called with ``deliver(user, json_text)`` and returns an
    awaitable that starts the relay's source; ``deliver`` writes the event
    to that user's connections in the protocol of ``kind``.
    """
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
        user = head.split(b"user_id=")[1].split(b" ")[0].split(b"&")[0].decode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-store\r\n\r\n"
        )
        by_user.setdefault(user, set()).add(writer)
        try:
            await reader.read()
        finally:
            by_user[user].discard(writer)

    def deliver(user: str, frame: str) -> None:
        targets = by_user.get(user)
        if not targets:
            return
        if kind == "sse":
            chunk = f"data: {frame}\n\n".encode()
            for writer in targets:
                writer.write(chunk)
        else:
            broadcast(targets, frame)

    await feed(deliver)
    loop = asyncio.get_running_loop()
    if kind == "sse":
        server = await asyncio.start_server(
            sse_handler, "127.0.0.1", port, backlog=4096
        )
        async with server:
            pipe.send("ready")
            await loop.run_in_executor(None, pipe.recv)
        return
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


def frame_for(kind: str, room: str, text: str) -> str:
    """The frame Mycel sends for a payload, so relays send the same bytes."""
    if kind == "gql":
        head = '{"id":"1","type":"next","payload":{"data":{"notification":'
        return head + text + "}}}"
    if kind == "ws":
        return f'{{"type":"message","room":"{room}","data":{text}}}'
    return text


def run_relay(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a relay's ``main`` on uvloop, the loop ``mycel run`` uses too."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def start_relay(target: Callable[..., None], *args: Any) -> tuple[Any, Connection]:
    """Start a relay process ``target(*args, pipe)``; wait until it serves."""
    parent, child = multiprocessing.Pipe()
    relay = multiprocessing.Process(target=target, args=(*args, child))
    relay.start()
    if not parent.poll(60):
        relay.kill()
        raise RuntimeError("the relay did not start")
    parent.recv()
    return relay, parent


def stop_relay(relay: Any, pipe: Connection) -> None:
    with contextlib.suppress(OSError):
        pipe.send("stop")
    relay.join(30)
    if relay.is_alive():
        relay.kill()


# --- mycel run ---------------------------------------------------------------


def start_mycel(folder: Path, config: str, admin: int) -> Any:
    """``mycel run`` on ``config``; returns the process once /ready says so.

    ``BENCH_MYCEL_ARGS`` adds options to ``run`` (``--loop asyncio``, say).

    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.mycel").write_text(config)
    log = (folder / "mycel.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mycel",
            "--log-level",
            "WARNING",
            "run",
            *os.environ.get("BENCH_MYCEL_ARGS", "").split(),
            str(folder),
        ],
        stderr=log,
        stdout=subprocess.DEVNULL,
    )
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if (
                httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1).status_code
                == 200
            ):
                return proc
        if proc.poll() is not None:
            raise RuntimeError(
                "mycel run exited: " + (folder / "mycel.log").read_text()
            )
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mycel run did not become ready")


def stop_mycel(proc: Any, folder: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    sys.stderr.write((folder / "mycel.log").read_text()[-3000:])


# --- report ------------------------------------------------------------------


def emit(bench: str, **row: Any) -> None:
    row = {"bench": bench, **row}
    for key in ("value", "baseline", "ratio"):
        row[key] = round(row[key], 3)
    print(json.dumps(row, ensure_ascii=False), flush=True)


def report(
    bench: str,
    label: str,
    clients: int,
    ours: dict[str, Phase],
    theirs: dict[str, Phase],
    *,
    scenario: str,
    relay: str,
    rates: dict[str, str],
) -> None:
    """Latency p50/p95/p99 per phase and the saturation throughput."""
    for phase in ("steady", "saturation"):
        mine, base = ours[phase], theirs[phase]
        for q in (50, 95, 99):
            value = percentile(mine.latencies, q) * 1000
            baseline = percentile(base.latencies, q) * 1000
            emit(
                bench,
                figure=f"{label} latency p{q}, {phase}, {clients:,} clients",
                unit="ms",
                value=value,
                baseline_name=relay,
                baseline=baseline,
                ratio=baseline / value if value else float("nan"),
                higher_is_better=False,
                aim="p99 within 2x of the bare relay",
                notes=(
                    f"{scenario}; {rates[phase]}; {clients // USERS} clients per "
                    f"event; received {mine.received}/{mine.expected} (relay "
                    f"{base.received}/{base.expected}); CPU server/clients "
                    f"{mine.server_cpu:.1f}/{mine.client_cpu:.1f} s in "
                    f"{mine.seconds:.1f} s (relay run {base.server_cpu:.1f}/"
                    f"{base.client_cpu:.1f} s in {base.seconds:.1f} s)"
                ),
            )
    mine, base = ours["saturation"], theirs["saturation"]
    ours_rate, base_rate = mine.received / mine.seconds, base.received / base.seconds
    emit(
        bench,
        figure=f"{label} deliveries/s at saturation, {clients:,} clients",
        unit="deliveries/s",
        value=ours_rate,
        baseline_name=relay,
        baseline=base_rate,
        ratio=ours_rate / base_rate,
        higher_is_better=True,
        aim=">= 0.5x the bare relay",
        notes=(
            "client receipts from the first event produced to the last receipt; "
            "Mycel acknowledges (or confirms its slot) after delivery, the relay "
            "does not wait for it"
        ),
    )


async def cleanup(exchange: str, queues: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(RABBIT)
    async with connection:
        for queue in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for name in (exchange, f"{exchange}.dlx"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
