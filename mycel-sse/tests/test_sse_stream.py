"""How events reach the socket: writes from the hub, held-back writes, ends."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx

from mycel.testing import eventually, running
from mycel_sse import SseConnector
from testsupport.sse import SseEvent, open_stream

CONFIG = """
connector "mem" { type = "memory" }
connector "sse" {
  type = "sse"
  port = 0
  %s
}
flow "prices" {
  from { connector = "mem"  operation = "prices" }
  to   { connector = "sse"  operation = "stream:prices" }
}
"""


def connector_of(app: object) -> SseConnector:
    connector = app.connector("sse")  # type: ignore[attr-defined]
    assert isinstance(connector, SseConnector)
    return connector


async def publish(app: object, payload: object) -> None:
    await app.publish("mem", "prices", payload)  # type: ignore[attr-defined]
    await app.memory("mem").drain()  # type: ignore[attr-defined]


async def test_client_that_disconnects_leaves_the_hub() -> None:
    async with running(CONFIG % "") as app:
        connector = connector_of(app)
        hub = connector.services.hub
        url = f"http://127.0.0.1:{connector.port}/events/prices"
        async with open_stream(url) as stream, open_stream(url) as other:
            assert len(hub.subscribers) == 2
            async with open_stream(url):
                assert len(hub.subscribers) == 3
            await eventually(lambda: len(hub.subscribers) == 2)
            await publish(app, {"n": 1})
            got = [await stream.event(), await other.event()]
        await eventually(lambda: not hub.subscribers)
    assert [event.data for event in got] == ['{"n":1}', '{"n":1}']


async def test_heartbeats_reach_every_client_between_events() -> None:
    async with running(CONFIG % 'heartbeat_interval = "50ms"') as app:
        connector = connector_of(app)
        url = f"http://127.0.0.1:{connector.port}/events/prices"
        async with open_stream(url) as first, open_stream(url) as second:
            await publish(app, {"n": 1})
            items: list[SseEvent | str] = []
            for stream in (first, second):
                items.append(await stream.event())
                items.append(await stream.comment())
                items.append(await stream.comment())
    assert [item.data if isinstance(item, SseEvent) else item for item in items] == [
        '{"n":1}',
        "heartbeat",
        "heartbeat",
        '{"n":1}',
        "heartbeat",
        "heartbeat",
    ]


async def test_head_request_gets_the_headers_and_no_stream() -> None:
    async with running(CONFIG % "") as app:
        connector = connector_of(app)
        url = f"http://127.0.0.1:{connector.port}/events/prices"
        async with httpx.AsyncClient() as client:
            response = await client.head(url)
        await eventually(lambda: not connector.services.hub.subscribers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.content == b""


async def test_slow_reader_gets_every_event_in_order_once_it_reads() -> None:
    settings = 'send_queue = 10000\n send_timeout = "30s"'
    async with running(CONFIG % settings) as app:
        connector = connector_of(app)
        hub = connector.services.hub

        # A client with a small receive buffer that does not read yet.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(
            sock, ("127.0.0.1", connector.port)
        )
        # Its reader stops taking data off the socket past 8 KB unread.
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        writer.write(b"GET /events/prices HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        await eventually(lambda: len(hub.subscribers) == 1)

        # Publish until the server holds a write back, and some more.
        sent = 0
        pad = "x" * 20_000
        while not connector._live.stalled and sent < 2000:
            sent += 1
            await publish(app, {"n": sent, "pad": pad})
        for _ in range(20):
            sent += 1
            await publish(app, {"n": sent, "pad": pad})
        assert connector._live.stalled
        assert hub.subscribers[0].depth > 0

        # Reading lets every event through, in order.
        received: list[int] = []
        buffer = b""
        async with asyncio.timeout(20):
            while len(received) < sent:
                buffer += await reader.read(1 << 20)
                *lines, buffer = buffer.split(b"\n")
                received += [
                    json.loads(line[6:])["n"] for line in lines if line[:6] == b"data: "
                ]
        await eventually(lambda: not connector._live.stalled)
        writer.close()
    assert received == list(range(1, sent + 1))
    assert sent > 20
