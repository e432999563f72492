"""Handshakes, bad frames, slow and dead clients, shutdown."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from mycel import ConfigError
from mycel.testing import eventually, free_port, load_test_config, running
from testsupport.ws import next_item, receive, ws_config

BROADCAST = """
flow "out" {
  from { connector = "mem"  operation = "in" }
  to   { connector = "ws"   operation = "broadcast" }
}
"""


async def refusal(url: str, **options: object) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **options):  # type: ignore[arg-type]
            pass
    response = info.value.response
    return response.status_code, response.body.decode()


async def closed_with(client: object) -> tuple[int | None, str | None]:
    """Read until the server closes; the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await receive(client)
    rcvd = info.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, None)


# Handshakes


async def test_wrong_path_is_refused_with_404() -> None:
    port = free_port()
    async with running(ws_config(port)):
        assert await refusal(f"ws://127.0.0.1:{port}/nope?a=1") == (
            404,
            "no WebSocket endpoint at /nope; connect to /ws\n",
        )


async def test_origin_outside_allowed_origins_is_refused_with_403() -> None:
    port = free_port()
    settings = 'allowed_origins = ["http://good.example"]'
    async with running(ws_config(port, settings)):
        url = f"ws://127.0.0.1:{port}/ws"
        assert await refusal(url, origin="http://evil.example") == (
            403,
            "origin 'http://evil.example' is not allowed\n",
        )
        async with connect(url, origin="http://good.example") as client:  # type: ignore[arg-type]
            await client.ping()
        async with connect(url) as client:  # no Origin: not a browser
            await client.ping()


async def test_max_connections_refuses_with_503_until_one_leaves() -> None:
    port = free_port()
    async with running(ws_config(port, "max_connections = 2")) as app:
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url) as one, connect(url):
            assert await refusal(url) == (
                503,
                "too many connections: this server takes at most 2\n",
            )
            await one.close()
            connector = app.connector("ws")
            await eventually(lambda: connector.connection_count == 1)  # type: ignore[attr-defined]
            async with connect(url) as again:
                await again.ping()


async def test_too_many_rooms_at_connect_is_refused_with_400() -> None:
    port = free_port()
    async with running(ws_config(port, "max_rooms = 2")):
        url = f"ws://127.0.0.1:{port}/ws?rooms=a,b,c"
        assert await refusal(url) == (
            400,
            "rooms: at most 2 rooms (max_rooms), not 3\n",
        )
        assert await refusal(f"ws://127.0.0.1:{port}/ws?rooms=a,,b") == (
            400,
            'rooms: a room is a non-empty string of at most 200 characters, not ""\n',
        )


async def test_compression_is_off_unless_configured() -> None:
    port = free_port()
    async with running(ws_config(port)), connect(f"ws://127.0.0.1:{port}/ws") as client:
        assert client.protocol.extensions == []
    port = free_port()
    async with (
        running(ws_config(port, "compression = true", BROADCAST)) as app,
        connect(f"ws://127.0.0.1:{port}/ws") as client,
    ):
        names = [e.name for e in client.protocol.extensions]
        assert names == ["permessage-deflate"]
        await app.publish("mem", "in", {"x": "y" * 1000})
        assert await receive(client) == {
            "type": "message",
            "data": {"x": "y" * 1000},
        }


# Bad input


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (
            "not json",
            "the frame is not valid JSON: Expecting value: line 1 column 1 (char 0)",
        ),
        (b"\x00\x01", "binary frames are not accepted; send JSON as text"),
        ("[1, 2]", 'a frame must be a JSON object with a "type"'),
        ('{"room": "a"}', 'a frame must be a JSON object with a "type"'),
        (
            '{"type": "subscribe"}',
            'unknown frame type "subscribe"; '
            "use join_room, leave_room, message or auth",
        ),
        ('{"type": "join_room"}', 'a join_room frame needs "room"'),
        ('{"type": "leave_room"}', 'a leave_room frame needs "room"'),
        (
            '{"type": "join_room", "room": ""}',
            'a room is a non-empty string of at most 200 characters, not ""',
        ),
        (
            '{"type": "join_room", "room": 5}',
            "a room is a non-empty string of at most 200 characters, not 5",
        ),
        ('{"type": "message"}', 'a message frame needs "data"'),
    ],
)
async def test_bad_frame_gets_an_error_frame_and_the_server_carries_on(
    frame: str | bytes, error: str
) -> None:
    port = free_port()
    async with running(ws_config(port, flows=BROADCAST)) as app:
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url) as bad, connect(url) as good:
            await bad.send(frame)
            assert await receive(bad) == {"type": "error", "message": error}
            # Both connections still work.
            await app.publish("mem", "in", {"n": 1})
            assert await receive(bad) == {"type": "message", "data": {"n": 1}}
            assert await receive(good) == {"type": "message", "data": {"n": 1}}


async def test_oversized_frame_closes_with_1009_and_others_carry_on() -> None:
    port = free_port()
    async with running(ws_config(port, "max_message_size = 1024", BROADCAST)) as app:
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url) as big, connect(url) as good:
            data = json.dumps({"type": "message", "data": "x" * 2000})
            await big.send(data)
            assert await closed_with(big) == (
                1009,
                "frame with 2031 bytes exceeds limit of 1024 bytes",
            )
            await app.publish("mem", "in", {"n": 1})
            assert await receive(good) == {"type": "message", "data": {"n": 1}}


async def test_join_flood_closes_with_1008() -> None:
    port = free_port()
    async with (
        running(ws_config(port, "room_rate = 5")),
        connect(f"ws://127.0.0.1:{port}/ws") as client,
    ):
        for i in range(30):
            await client.send(json.dumps({"type": "join_room", "room": f"r{i}"}))
        # The burst allowance (twice room_rate) is confirmed, then closed.
        for i in range(10):
            assert await receive(client) == {"type": "joined", "room": f"r{i}"}
        assert await closed_with(client) == (
            1008,
            "too many join_room/leave_room frames (at most 5 per second)",
        )


async def test_max_rooms_refuses_one_more_room_with_an_error_frame() -> None:
    port = free_port()
    async with (
        running(ws_config(port, "max_rooms = 2")),
        connect(f"ws://127.0.0.1:{port}/ws?rooms=a") as client,
    ):
        assert await receive(client) == {"type": "joined", "room": "a"}
        for room in ("b", "a", "c"):
            await client.send(json.dumps({"type": "join_room", "room": room}))
        assert await receive(client) == {"type": "joined", "room": "b"}
        assert await receive(client) == {"type": "joined", "room": "a"}
        assert await receive(client) == {
            "type": "error",
            "message": "cannot join 'c': already in 2 rooms (max_rooms)",
        }


async def test_message_without_message_flow_gets_an_error_frame() -> None:
    port = free_port()
    async with running(ws_config(port)), connect(f"ws://127.0.0.1:{port}/ws") as client:
        await client.send('{"type": "message", "data": 1}')
        assert await receive(client) == {
            "type": "error",
            "message": "this server takes no message frames",
        }


async def test_message_whose_flow_fails_gets_an_error_frame() -> None:
    port = free_port()
    flows = """
    flow "store" {
      from { connector = "ws"  operation = "message" }
      transform { text = "input.text" }
      to { connector = "mem"  target = "stored" }
    }
    """
    async with running(ws_config(port, flows=flows)) as app:
        stored = app.listen("mem", "stored")
        async with connect(f"ws://127.0.0.1:{port}/ws") as client:
            await client.send('{"type": "message", "data": {"other": 1}}')
            assert await receive(client) == {
                "type": "error",
                "message": "the message could not be processed",
            }
            await client.send('{"type": "message", "data": {"text": "ok"}}')
            assert await next_item(stored) == ("stored", {"text": "ok"})


# Slow and dead clients, shutdown


async def test_slow_client_is_closed_and_the_others_get_everything() -> None:
    port = free_port()
    settings = 'send_queue = 5\n close_timeout = "10s"'
    count, size = 300, 65_536
    async with running(ws_config(port, settings, BROADCAST)) as app:
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url) as slow, connect(url) as fast:
            # slow never reads until the server gave up on it.
            received: list[int] = []
            for n in range(count):
                await app.publish("mem", "in", {"n": n, "pad": "x" * size})
                if n % 10 == 9:
                    while len(received) < n + 1:
                        received.append((await receive(fast))["data"]["n"])
            while len(received) < count:
                received.append((await receive(fast))["data"]["n"])
            assert received == list(range(count))

            dropped = app.runtime.metrics.slow_dropped.labels("ws")
            assert dropped._value.get() == 1
            code, reason = await closed_with(slow)
            assert (code, reason) == (
                1008,
                "slow consumer: more than 5 messages waiting",
            )


async def stalled_reader(port: int) -> socket.socket:
    """A handshake over a raw socket that will never read again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(
        sock,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
    )
    assert (await loop.sock_recv(sock, 4096)).startswith(b"HTTP/1.1 101")
    return sock


@pytest.mark.parametrize(
    ("settings", "most"),
    [("", 400_000), ("unsent_limit = null", 1_500_000)],
)
async def test_a_stalled_reader_is_found_once_the_kernel_holds_its_share(
    settings: str, most: int
) -> None:
    # unsent_limit (64 KB by default) caps what the kernel takes for a
    # client that does not read; without it, all of send_buffer (256 KB,
    # which Linux doubles), and with autotuning up to tcp_wmem's 4 MB,
    # which the server would have to copy before it could tell. Then come
    # websockets' 32 KB write limit and send_queue (5 messages of 16 KB).
    port = free_port()
    config = ws_config(port, f"send_queue = 5\n {settings}", BROADCAST)
    async with running(config) as app:
        sock = await stalled_reader(port)
        try:
            connector = app.runtime.connectors["ws"]
            await eventually(lambda: connector.connection_count == 1)  # type: ignore[attr-defined]
            dropped = app.runtime.metrics.slow_dropped.labels("ws")
            size, sent = 16_384, 0
            while dropped._value.get() == 0:
                await app.publish("mem", "in", {"pad": "x" * size})
                await asyncio.sleep(0.005)
                sent += size
                assert sent < most, "the stalled reader was not found"
        finally:
            sock.close()


@pytest.mark.skipif(
    not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="no TCP_NOTSENT_LOWAT here"
)
@pytest.mark.parametrize(
    ("settings", "value"),
    [("", 65_536), ("unsent_limit = 16384", 16_384), ("unsent_limit = null", 0)],
)
async def test_unsent_limit_is_set_on_every_connection(
    settings: str, value: int
) -> None:
    port = free_port()
    async with (
        running(ws_config(port, settings)) as app,
        connect(f"ws://127.0.0.1:{port}/ws"),
    ):
        connector = app.runtime.connectors["ws"]
        await eventually(lambda: connector.connection_count == 1)  # type: ignore[attr-defined]
        (connection,) = connector._open  # type: ignore[attr-defined]
        sock = connection.transport.get_extra_info("socket")
        option = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        assert option == value


async def test_dead_client_is_found_by_ping_and_closed() -> None:
    port = free_port()
    settings = (
        'ping_interval = "100ms"\n ping_timeout = "200ms"\n close_timeout = "300ms"'
    )
    flows = """
    flow "gone" {
      from { connector = "ws"  operation = "disconnect" }
      to   { connector = "mem" target = "gone" }
    }
    """
    async with running(ws_config(port, settings, flows)) as app:
        gone = app.listen("mem", "gone")
        client = await connect(f"ws://127.0.0.1:{port}/ws?who=dead", ping_interval=None)
        try:
            client.transport.pause_reading()  # answers no ping from now on
            _, event = await next_item(gone)
            assert event["params"] == {"who": "dead"}
            assert event["code"] == 1011
            assert event["reason"] == "keepalive ping timeout"
        finally:
            client.transport.abort()


async def test_shutdown_closes_clients_with_1001() -> None:
    port = free_port()
    async with running(ws_config(port)) as app:
        client = await connect(f"ws://127.0.0.1:{port}/ws")
        await app.runtime.stop(timeout=1.0)
        assert await closed_with(client) == (1001, "server shutting down")
        with pytest.raises(OSError):
            await connect(f"ws://127.0.0.1:{port}/ws", open_timeout=2)


# Configuration


def test_bad_settings_are_reported_at_load() -> None:
    config = """
    connector "ws" {
      type = "websocket"
      path = "ws"
      send_queue = 0
      colour = "blue"
    }
    """
    with pytest.raises(ConfigError) as info:
        load_test_config(config)
    lines = str(info.value).splitlines()
    assert lines[:3] == [
        "the configuration has 3 problems:",
        "  test.mycel:4: connector 'ws': setting 'path' = 'ws': "
        "path must start with '/' and hold no '?', not 'ws'.",
        "  test.mycel:5: connector 'ws': setting 'send_queue' = 0: "
        "Input should be greater than or equal to 1.",
    ]
    assert lines[3].startswith(
        "  test.mycel:6: connector 'ws': unknown setting 'colour'."
    )


def test_unknown_operations_are_reported_at_load() -> None:
    config = """
    connector "ws" { type = "websocket" }
    flow "f" {
      from { connector = "ws"  operation = "messages" }
      to   { connector = "ws"  operation = "rooms:a" }
    }
    """
    with pytest.raises(ConfigError) as info:
        load_test_config(config)
    assert str(info.value).splitlines() == [
        "the configuration has 2 problems:",
        "  test.mycel:4: flow 'f': connector 'ws' (websocket) has no source "
        "operation 'messages'. It offers: message, connect, disconnect.",
        "  test.mycel:5: flow 'f': connector 'ws' (websocket) has no target "
        "operation 'rooms:a'. It offers: broadcast, room:NAME.",
    ]


async def test_a_port_in_use_fails_start_with_a_clear_error() -> None:
    import socket

    from mycel import ConnectorError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConnectorError) as info:
            async with running(ws_config(port)):
                pass
    assert str(info.value) == (
        f"connector 'ws': cannot listen on 127.0.0.1:{port}: Address already in use"
    )


async def test_handshakes_are_refused_with_503_once_sources_stopped() -> None:
    port = free_port()
    async with running(ws_config(port)) as app:
        await app.connector("ws").stop_sources()
        assert await refusal(f"ws://127.0.0.1:{port}/ws") == (
            503,
            "the server is not accepting connections (starting or shutting down)\n",
        )
