"""The built-in http connector and the admin endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from mycel import _builtin
from mycel.testing import free_port, running

CONFIG = """
service {{
  admin_port = {admin}
}}
connector "api" {{
  type = "http"
  port = {port}
  max_body_size = 64
  static_dir = "{static}"
  static_path = "/app"
}}
connector "bus" {{ type = "memory" }}
flow "accept" {{
  from {{ connector = "api" operation = "POST /orders" }}
  to {{ connector = "bus" target = "orders.${{input.region}}" }}
  retry {{ attempts = 1 }}
}}
"""


def make_config(tmp_path: Path) -> tuple[str, int, int]:
    (tmp_path / "index.html").write_text("<h1>hello</h1>")
    port, admin = free_port(), free_port()
    return CONFIG.format(port=port, admin=admin, static=tmp_path), port, admin


async def test_post_json_is_accepted_and_reaches_the_flow(tmp_path: Path) -> None:
    text, port, _ = make_config(tmp_path)
    async with running(text, plugins=[_builtin]) as app:
        queue = app.listen("bus", "orders.*")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = await client.post(
                "/orders?src=web", json={"region": "eu", "id": 1}
            )
        assert (response.status_code, response.json()) == (202, {"status": "accepted"})
        assert await asyncio.wait_for(queue.get(), 1) == (
            "orders.eu",
            {"region": "eu", "id": 1},
        )


async def test_bad_json_gets_400_with_the_reason(tmp_path: Path) -> None:
    text, port, _ = make_config(tmp_path)
    async with running(text, plugins=[_builtin]):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = await client.post("/orders", content=b"{nope")
        assert response.status_code == 400
        assert response.json() == {
            "error": "the body is not valid JSON: Expecting property name enclosed "
            "in double quotes: line 1 column 2 (char 1)"
        }


async def test_oversized_body_gets_413(tmp_path: Path) -> None:
    text, port, _ = make_config(tmp_path)
    async with running(text, plugins=[_builtin]):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = await client.post("/orders", json={"pad": "x" * 100})

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(3):
                    yield b"x" * 40

            chunked = await client.post("/orders", content=chunks())
        assert response.status_code == 413
        assert response.json() == {"error": "the body is larger than 64 bytes"}
        assert chunked.status_code == 413


async def test_flow_failure_gets_502(tmp_path: Path) -> None:
    text, port, _ = make_config(tmp_path)
    async with running(text, plugins=[_builtin]):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = await client.post("/orders", json={"id": 1})
        assert response.status_code == 502
        assert response.json() == {
            "error": "flow 'accept': to 'bus': 'input.region': no such key 'region'"
        }


async def test_static_folder_and_wrong_method(tmp_path: Path) -> None:
    text, port, _ = make_config(tmp_path)
    async with running(text, plugins=[_builtin]):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            page = await client.get("/app/")
            wrong = await client.get("/orders")
        assert (page.status_code, page.text) == (200, "<h1>hello</h1>")
        assert wrong.status_code == 405


async def test_admin_endpoint_health_ready_metrics(tmp_path: Path) -> None:
    text, port, admin = make_config(tmp_path)
    async with running(text, plugins=[_builtin]):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin}") as client:
            await client.post(f"http://127.0.0.1:{port}/orders", json={"region": "eu"})
            health = await client.get("/health")
            ready = await client.get("/ready")
            metrics = await client.get("/metrics")
        assert health.json() == {"status": "ok", "service": "mycel"}
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        assert 'mycel_events_in_total{flow="accept"} 1.0' in metrics.text
        assert (
            'mycel_events_out_total{connector="bus",flow="accept"} 1.0' in metrics.text
        )


def test_listening_sockets_disable_nagle() -> None:
    # Accepted connections inherit TCP_NODELAY; without it a kept-alive
    # client waited for a delayed ACK (about 40 ms) on every response.
    import socket

    from mycel import AsgiServer

    sock = AsgiServer(object(), "127.0.0.1", 0)._bind()
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


def test_send_buffer_is_set_on_the_listening_socket() -> None:
    # Linux copies it to every accepted connection (and doubles the value).
    import socket

    from mycel import AsgiServer

    capped = AsgiServer(
        object(), "127.0.0.1", 0, send_buffer=65536, unsent_limit=16384
    )._bind()
    default = AsgiServer(object(), "127.0.0.1", 0)._bind()
    try:
        assert capped.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536
        assert default.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) != 2 * 65536
        lowat = socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT
        assert capped.getsockopt(*lowat) == 16384
        assert default.getsockopt(*lowat) == 0
    finally:
        capped.close()
        default.close()


async def test_accepted_connections_inherit_the_send_limits() -> None:
    # What limit_sending documents: Linux copies both from the listener.
    import socket

    from mycel import limit_sending

    accepted: asyncio.Queue[socket.socket] = asyncio.Queue()

    def keep(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(writer.get_extra_info("socket"))

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    limit_sending(listener, 65536, 16384)
    server = await asyncio.start_server(keep, sock=listener)
    port = listener.getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        sock = await asyncio.wait_for(accepted.get(), 5)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 16384
    finally:
        writer.close()
        server.close()
