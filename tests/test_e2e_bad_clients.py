"""1,000 WebSocket clients, of which 100 never read and 100 vanish (and SSE).

RabbitMQ -> WebSocket broadcast through ``mycel run``. The 100 readers that
never read are raw TCP sockets (a tiny receive buffer) that completed the
handshake and then read nothing; the 100 that vanish are aborted mid-stream
without a close frame. The 800 others must receive every message, in order,
and stay connected; the bad ones are closed and counted (the subscriber
gauge goes down to exactly 800, the slow-consumer counter up to 100). The
stalled clients alone also get 6 MB of "bulk" messages: a server cannot tell
a reader that stopped until the kernel's buffers are full.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from _e2e import MycelProcess, percentile, ws_connect

from mycel.testing import eventually, free_port

pytestmark = pytest.mark.slow

GOOD, STALLED, VANISHING = 800, 100, 100
MESSAGES = 150
PAD = "x" * 2048
BULK = "y" * 65536

FLOW = """
flow "ticks" {
  from { connector = "rabbit"  operation = "ticks" }
  to   { connector = "ws"      operation = "broadcast" }
}
flow "bulk" {
  from { connector = "rabbit"  operation = "bulk" }
  to {
    connector = "ws"
    operation = "broadcast"
    filter    = "context.params.kind == 'stalled'"
  }
}
"""


async def raw_handshake(port: int) -> socket.socket:
    """A WebSocket handshake over a socket that will never read again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = (
        "GET /ws?kind=stalled HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_stalled_and_vanished_clients_do_not_hurt_the_rest(
    tmp_path: Path, rabbit: Any
) -> None:
    port, admin = free_port(), free_port()
    config = (
        f'service {{\n  name = "e2e"\n  admin_port = {admin}\n}}\n'
        + rabbit.connector("rabbit", prefetch=100)
        + f"""
connector "ws" {{
  type          = "websocket"
  port          = {port}
  send_queue    = 20
  close_timeout = "1s"
  ping_interval = "20s"
  ping_timeout  = "20s"
}}
"""
        + FLOW
    )
    mycel = MycelProcess(tmp_path / "run", config, admin_port=admin)
    await mycel.start()
    stalled: list[socket.socket] = []
    readers: list[asyncio.Task[list[int]]] = []
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        good = []
        for _ in range(GOOD // 100):
            good += await asyncio.gather(*(ws_connect(url) for _ in range(100)))
        vanishing = await asyncio.gather(*(ws_connect(url) for _ in range(VANISHING)))
        stalled = list(
            await asyncio.gather(*(raw_handshake(port) for _ in range(STALLED)))
        )
        await mycel.wait_metric("mycel_subscribers", 1000, connector="ws")

        latencies: list[float] = []

        async def read(client: Any) -> list[int]:
            seen = []
            for _ in range(MESSAGES):
                frame = json.loads(await asyncio.wait_for(client.recv(), 60))
                latencies.append(time.time() - frame["data"]["sent"])
                seen.append(frame["data"]["n"])
            return seen

        readers[:] = [asyncio.create_task(read(c)) for c in good]
        for n in range(MESSAGES):
            if n == MESSAGES // 3:
                for client in vanishing:
                    client.transport.abort()  # no close frame, no FIN handshake
            await rabbit.publish("ticks", {"n": n, "sent": time.time(), "pad": PAD})
            if n < 100:
                # Only the stalled clients get these: enough to fill the
                # kernel's share (unsent_limit) and then their send queue.
                await rabbit.publish("bulk", {"bulk": BULK})
        results = await asyncio.gather(*readers)
        assert all(seen == list(range(MESSAGES)) for seen in results)
        assert all(c.close_code is None for c in good)

        # Every bad client was closed: only the 800 good ones are left.
        async def only_good_left() -> bool:
            return await mycel.metric("mycel_subscribers", connector="ws") == GOOD

        await eventually(only_good_left, timeout=30, interval=0.1)
        dropped = await mycel.metric(
            "mycel_slow_consumers_dropped_total", connector="ws"
        )
        print(
            f"\n[1,000 clients] good {GOOD} got {MESSAGES} messages each; "
            f"slow consumers dropped {dropped:.0f} of {STALLED} stalled; "
            f"vanished {VANISHING} closed; latency p50 "
            f"{percentile(latencies, 50) * 1000:.1f} ms, p95 "
            f"{percentile(latencies, 95) * 1000:.1f} ms, p99 "
            f"{percentile(latencies, 99) * 1000:.1f} ms"
        )
        assert dropped == STALLED
        assert mycel.alive
        for client in good:
            await client.close()
    finally:
        for task in readers:
            task.cancel()
        for sock in stalled:
            sock.close()
        assert await mycel.stop() == 0, mycel.text


SSE_GOOD, SSE_STALLED, SSE_VANISHING = 300, 50, 50

SSE_FLOW = """
flow "ticks" {
  from { connector = "rabbit"  operation = "ticks" }
  to   { connector = "sse"     operation = "stream:ticks" }
}
flow "bulk" {
  from { connector = "rabbit"  operation = "bulk" }
  to {
    connector = "sse"
    operation = "broadcast"
    filter    = "context.params.kind == 'stalled'"
  }
}
"""
# An SSE server cannot tell a client that stopped reading until the
# kernel's buffers (up to 4 MB here) are full: the stalled clients alone
# also get 6 MB of "bulk" events, so that they overflow for sure.


async def raw_sse(
    port: int, *, rcvbuf: int | None = None, query: str = ""
) -> socket.socket:
    """A GET of the stream over a raw socket, up to the response headers."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(
        sock,
        f"GET /events/ticks{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(),
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
        assert chunk, "closed before the headers"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


async def test_stalled_and_vanished_sse_clients_do_not_hurt_the_rest(
    tmp_path: Path, rabbit: Any
) -> None:
    """The same for SSE, at 400 clients: 50 stalled, 50 vanished."""
    port, admin = free_port(), free_port()
    config = (
        f'service {{\n  name = "e2e"\n  admin_port = {admin}\n}}\n'
        + rabbit.connector("rabbit", prefetch=100)
        + f"""
connector "sse" {{
  type         = "sse"
  port         = {port}
  send_queue   = 20
  send_timeout = "2s"
}}
"""
        + SSE_FLOW
    )
    mycel = MycelProcess(tmp_path / "run", config, admin_port=admin)
    await mycel.start()
    sockets: list[socket.socket] = []
    readers: list[asyncio.Task[list[int]]] = []
    try:
        loop = asyncio.get_running_loop()
        good = [await raw_sse(port) for _ in range(SSE_GOOD)]
        stalled = [
            await raw_sse(port, rcvbuf=2048, query="?kind=stalled")
            for _ in range(SSE_STALLED)
        ]
        vanishing = [await raw_sse(port) for _ in range(SSE_VANISHING)]
        sockets = good + stalled + vanishing
        await mycel.wait_metric("mycel_subscribers", 400, connector="sse")

        async def read(sock: socket.socket) -> list[int]:
            seen: list[int] = []
            buffer = b""
            while len(seen) < MESSAGES:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 60)
                assert chunk, "the stream ended"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"data: "):
                        seen.append(json.loads(line[6:])["n"])
            return seen

        readers[:] = [asyncio.create_task(read(s)) for s in good]
        for n in range(MESSAGES):
            if n == MESSAGES // 3:
                for sock in vanishing:
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    sock.close()  # a reset, no orderly end
            await rabbit.publish("ticks", {"n": n, "pad": PAD})
            if n < 100:
                await rabbit.publish("bulk", {"bulk": BULK})
        results = await asyncio.gather(*readers)
        assert all(seen == list(range(MESSAGES)) for seen in results)

        async def only_good_left() -> bool:
            return await mycel.metric("mycel_subscribers", connector="sse") == SSE_GOOD

        try:
            await eventually(only_good_left, timeout=30, interval=0.1)
        finally:
            left = await mycel.metric("mycel_subscribers", connector="sse")
            slow = await mycel.metric(
                "mycel_slow_consumers_dropped_total", connector="sse"
            )
            print(f"\nSSE subscribers left: {left:.0f}, slow dropped {slow:.0f}")
        dropped = await mycel.metric(
            "mycel_slow_consumers_dropped_total", connector="sse"
        )
        print(
            f"\n[400 SSE clients] good {SSE_GOOD} got {MESSAGES} events each; "
            f"slow consumers dropped {dropped:.0f} of {SSE_STALLED} stalled; "
            f"vanished {SSE_VANISHING} closed"
        )
        assert dropped == SSE_STALLED
        assert mycel.alive
    finally:
        for task in readers:
            task.cancel()
        for sock in sockets:
            sock.close()
        assert await mycel.stop() == 0, mycel.text
