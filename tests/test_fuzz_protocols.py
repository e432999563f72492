"""Bad input on the wire, against one ``mycel run`` process (hypothesis).

WebSocket frames, graphql-transport-ws messages, SSE request paths, queries
and headers, RabbitMQ bodies and headers. Every input gets a clear answer:
an ``error`` frame, a close code with a reason, an HTTP status with a JSON
error, or a dead letter. Throughout, three witness clients (WebSocket, SSE,
GraphQL) stay connected; at the end of each test they all still receive a
marker event, and the process is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from mycel.testing import free_port
from testsupport.base import port_open
from testsupport.rabbit import RABBIT_URL, delete_prefixed

pytestmark = pytest.mark.slow

T = TypeVar("T")
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

CONFIG = """
service {{
  name       = "fuzz"
  admin_port = {admin}
}}
connector "rabbit" {{
  type         = "rabbitmq"
  url          = "{url}"
  exchange     = "{prefix}x"
  queue_prefix = "{prefix}q."
  dead_letter {{
    exchange = "{prefix}dlx"
    queue    = "{prefix}dead"
  }}
}}
connector "ws" {{
  type             = "websocket"
  port             = {ws}
  max_message_size = 4096
  room_rate        = 1000
}}
connector "sse" {{
  type = "sse"
  port = {sse}
}}
connector "gql" {{
  type = "graphql"
  port = {gql}
  subscriptions {{
    enabled = true
    path    = "/graphql/ws"
  }}
}}
flow "echo" {{
  from {{ connector = "ws"  operation = "message" }}
  to   {{ connector = "ws"  operation = "room:echo" }}
}}
flow "fan" {{
  from {{ connector = "rabbit"  operation = "fuzz.in" }}
  to   {{ connector = "ws"   operation = "broadcast" }}
  to   {{ connector = "sse"  operation = "stream:fuzz" }}
  to   {{ connector = "gql"  operation = "Subscription.fuzzed" }}
}}
"""


class Server:
    """``mycel run`` in a child process, and an event loop thread for clients."""

    def __init__(self, folder: Path) -> None:
        self.prefix = f"mycel-test-fuzz-{uuid.uuid4().hex[:8]}."
        self.ports = {n: free_port() for n in ("ws", "sse", "gql", "admin")}
        folder.mkdir()
        (folder / "main.mycel").write_text(
            CONFIG.format(url=RABBIT_URL, prefix=self.prefix, **self.ports)
        )
        self.log: list[str] = []
        started = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mycel", "run", str(folder)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                if " started: " in line:
                    started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(60):
            self.process.kill()
            raise AssertionError("mycel run did not start:\n" + "".join(self.log))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.ws_seen: list[Any] = []
        self.sse_seen: list[Any] = []
        self.gql_seen: list[Any] = []
        self.run(self._witnesses())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    async def _witnesses(self) -> None:
        self.ws_witness = await websockets.connect(
            f"ws://127.0.0.1:{self.ports['ws']}/ws"
        )
        self.gql_witness = await websockets.connect(
            f"ws://127.0.0.1:{self.ports['gql']}/graphql/ws",
            subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
        )
        await self.gql_witness.send(json.dumps({"type": "connection_init"}))
        assert json.loads(await self.gql_witness.recv())["type"] == "connection_ack"
        await self.gql_witness.send(
            json.dumps({
                "id": "w", "type": "subscribe",
                "payload": {"query": "subscription { fuzzed }"},
            })
        )  # fmt: skip
        self.sse_client = httpx.AsyncClient(timeout=None)
        ready = asyncio.Event()
        self.tasks = [
            asyncio.create_task(self._read_ws()),
            asyncio.create_task(self._read_gql()),
            asyncio.create_task(self._read_sse(ready)),
        ]
        await asyncio.wait_for(ready.wait(), 10)
        await self._wait_subscribed()

    async def _wait_subscribed(self) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(500):
                text = (
                    await client.get(f"http://127.0.0.1:{self.ports['admin']}/metrics")
                ).text
                if 'mycel_subscribers{connector="gql"} 1.0' in text:
                    return
                await asyncio.sleep(0.01)  # bounded polling of another process
        raise AssertionError("the GraphQL witness never subscribed")

    async def _read_ws(self) -> None:
        async for frame in self.ws_witness:
            self.ws_seen.append(json.loads(frame)["data"])

    async def _read_gql(self) -> None:
        async for frame in self.gql_witness:
            message = json.loads(frame)
            if message["type"] == "next":
                self.gql_seen.append(message["payload"]["data"]["fuzzed"])

    async def _read_sse(self, ready: asyncio.Event) -> None:
        url = f"http://127.0.0.1:{self.ports['sse']}/events/fuzz"
        async with self.sse_client.stream("GET", url) as response:
            assert response.status_code == 200
            ready.set()
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    self.sse_seen.append(json.loads(line[6:]))

    def assert_witnesses_live(self) -> None:
        """A marker published now reaches all three witnesses."""
        marker = {"marker": uuid.uuid4().hex}

        async def check() -> None:
            await publish(self, b"fuzz.in", json.dumps(marker).encode(), {})
            for _ in range(1000):
                if all(
                    marker in seen
                    for seen in (self.ws_seen, self.sse_seen, self.gql_seen)
                ):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(
                f"marker missing: ws {marker in self.ws_seen}, "
                f"sse {marker in self.sse_seen}, gql {marker in self.gql_seen}"
            )

        self.run(check())
        assert self.alive, "".join(self.log)

    def close(self) -> None:
        for task in getattr(self, "tasks", []):
            self.loop.call_soon_threadsafe(task.cancel)
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = -9
        self.loop.call_soon_threadsafe(self.loop.stop)
        asyncio.run(delete_prefixed(RABBIT_URL, self.prefix))
        assert code == 0, "".join(self.log)


_publisher: dict[str, Any] = {}


async def publish(
    server: Server, key: bytes, body: bytes, headers: dict[str, Any]
) -> None:
    import aio_pika

    channel = _publisher.get("channel")
    if channel is None or channel.is_closed:
        connection = await aio_pika.connect(RABBIT_URL)
        channel = await connection.channel(publisher_confirms=True)
        _publisher.update(connection=connection, channel=channel)
    exchange = await channel.get_exchange(f"{server.prefix}x", ensure=False)
    await exchange.publish(aio_pika.Message(body, headers=headers), key.decode())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not port_open("127.0.0.1", 5672):
        from testsupport.base import service_unavailable

        service_unavailable("RabbitMQ on 127.0.0.1:5672")
    running = Server(tmp_path_factory.mktemp("fuzz") / "run")
    try:
        yield running
    finally:
        with contextlib.suppress(Exception):
            if "connection" in _publisher:
                running.run(_publisher.pop("connection").close())
                _publisher.clear()
        running.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)  # fmt: skip

WS_TYPES = ["join_room", "leave_room", "message", "", "JOIN_ROOM", "ping", "error"]
ws_frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"type": st.sampled_from(WS_TYPES) | st.text(max_size=10)},
        optional={"room": json_values, "data": json_values, "extra": json_values},
    ).map(json.dumps),
    st.integers(4097, 9000).map(lambda n: "x" * n),
)


async def ws_case(server: Server, frame: str | bytes) -> str:
    url = f"ws://127.0.0.1:{server.ports['ws']}/ws"
    async with websockets.connect(url, max_size=None) as client:
        await client.send(frame)
        await client.send(json.dumps({"type": "join_room", "room": "probe"}))
        try:
            while True:
                message = json.loads(await asyncio.wait_for(client.recv(), 10))
                assert message["type"] in {"error", "joined", "left", "message"}, (
                    message
                )
                if message["type"] == "error":
                    assert isinstance(message["message"], str) and message["message"]
                if message == {"type": "joined", "room": "probe"}:
                    return "answered"
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            assert exc.rcvd.code in {1002, 1007, 1008, 1009}, exc.rcvd
            assert exc.rcvd.reason, exc.rcvd
            return f"closed {exc.rcvd.code}"


@FUZZ
@given(frame=ws_frames)
def test_websocket_frames(server: Server, frame: str | bytes) -> None:
    server.run(ws_case(server, frame))
    assert server.alive


def test_websocket_witnesses_after_fuzz(server: Server) -> None:
    server.assert_witnesses_live()


GQL_TYPES = [
    "connection_init", "subscribe", "complete", "ping", "pong", "next", "error",
    "start", "stop", "connection_terminate", "",
]  # fmt: skip
gql_messages = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=100),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"type": st.sampled_from(GQL_TYPES) | st.text(max_size=10)},
        optional={
            "id": json_values,
            "payload": json_values
            | st.fixed_dictionaries(
                {"query": st.sampled_from([
                    "subscription { fuzzed }", "subscription { nope }", "{ _mycel }",
                    "subscription {", "query { __typename }",
                    "subscription { fuzzed } subscription { fuzzed }",
                ]) | st.text(max_size=30)},
                optional={"variables": json_values, "operationName": json_values},
            ),
        },
    ).map(json.dumps),
)  # fmt: skip


async def gql_case(server: Server, message: str | bytes) -> str:
    url = f"ws://127.0.0.1:{server.ports['gql']}/graphql/ws"
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as client:  # type: ignore[list-item]
        await client.send(json.dumps({"type": "connection_init", "payload": {}}))
        assert json.loads(await client.recv())["type"] == "connection_ack"
        await client.send(message)
        probe = f"probe-{uuid.uuid4().hex}"
        await client.send(
            json.dumps(
                {"id": probe, "type": "subscribe", "payload": {"query": "{ _mycel }"}}
            )
        )
        try:
            while True:
                answer = json.loads(await asyncio.wait_for(client.recv(), 10))
                assert answer["type"] in {"next", "error", "complete", "ping", "pong"}
                if answer["type"] == "ping":
                    await client.send(json.dumps({"type": "pong"}))
                if answer == {"id": probe, "type": "complete"}:
                    return "answered"
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            assert 4400 <= exc.rcvd.code < 4500 or exc.rcvd.code == 1000, exc.rcvd
            assert exc.rcvd.reason or exc.rcvd.code == 1000, exc.rcvd
            return f"closed {exc.rcvd.code}"


@FUZZ
@given(message=gql_messages)
def test_graphql_ws_messages(server: Server, message: str | bytes) -> None:
    server.run(gql_case(server, message))
    assert server.alive


def test_graphql_witnesses_after_fuzz(server: Server) -> None:
    server.assert_witnesses_live()


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


async def sse_case(server: Server, segment: str, query: str, last_id: str) -> int:
    url = f"http://127.0.0.1:{server.ports['sse']}/events/{quote(segment, safe='/')}"
    if query:
        url += "?" + query
    headers = {"accept": "text/event-stream", "last-event-id": last_id}
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("text/event-stream")
        elif not response.url.path.startswith("/events"):
            # httpx resolved "..": outside the connector's path, a plain 404.
            assert response.status_code == 404
        else:
            body = json.loads(await response.aread())
            assert response.status_code in {400, 404, 414}, (response.status_code, body)
            assert isinstance(body["error"], str) and body["error"]
        return response.status_code


@FUZZ
@given(
    segment=st.text(max_size=40) | st.sampled_from(["fuzz", "fuzz/x", "..", "%00"]),
    query=printable | st.integers(2000, 3000).map(lambda n: "a=" + "b" * n),
    last_id=printable,
)
def test_sse_paths_queries_and_headers(
    server: Server, segment: str, query: str, last_id: str
) -> None:
    # httpx itself refuses header values with surrounding whitespace.
    assume(last_id == last_id.strip())
    server.run(sse_case(server, segment, query, last_id))
    assert server.alive


def test_sse_newline_in_stream_name_is_an_invalid_name(server: Server) -> None:
    async def get(path: str) -> tuple[int, Any]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"http://127.0.0.1:{server.ports['sse']}{path}")
        if response.headers["content-type"] != "application/json":
            return response.status_code, response.text
        return response.status_code, response.json()

    rule = "use 1 to 128 letters, digits, '_', '-' or '.'"
    assert server.run(get("/events/a%0Ab")) == (
        400,
        {"error": f"invalid stream name {'a' + chr(10) + 'b'!r}; {rule}"},
    )


def test_sse_witnesses_after_fuzz(server: Server) -> None:
    server.assert_witnesses_live()


header_values = (
    st.text(max_size=20) | st.integers(-(2**63), 2**63 - 1) | st.booleans()
    | st.lists(st.text(max_size=5), max_size=3)
)  # fmt: skip
rabbit_bodies = st.binary(max_size=100) | json_values.map(
    lambda v: json.dumps(v).encode()
)


def strict_json(body: bytes) -> bool:
    """Whether the body is UTF-8 JSON (NaN and Infinity are left out)."""

    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        json.loads(body.decode("utf-8"), parse_constant=refuse)
    except (UnicodeDecodeError, ValueError):
        return False
    return True


async def dead_letters(server: Server) -> int:
    channel = _publisher["channel"]
    queue = await channel.declare_queue(f"{server.prefix}dead", passive=True)
    count: int = queue.declaration_result.message_count
    return count


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    batch=st.lists(
        st.tuples(
            rabbit_bodies,
            st.dictionaries(st.text(max_size=8), header_values, max_size=3),
        ),
        min_size=25,
        max_size=25,
    )
)
def test_rabbitmq_bodies_and_headers(
    server: Server, batch: list[tuple[bytes, dict[str, Any]]]
) -> None:
    for body, _ in batch:
        with contextlib.suppress(UnicodeDecodeError, ValueError):
            text = body.decode()
            assume("NaN" not in text and "Infinity" not in text)

    async def case() -> None:
        await publish(server, b"fuzz.in", b"{}", {})
        dead_before = await dead_letters(server)
        seen_before = len(server.ws_seen)
        for body, headers in batch:
            await publish(server, b"fuzz.in", body, headers)
        valid = sum(strict_json(body) for body, _ in batch)
        invalid = len(batch) - valid
        for _ in range(1500):
            if (
                await dead_letters(server) - dead_before == invalid
                and len(server.ws_seen) - seen_before >= valid
            ):
                break
            await asyncio.sleep(0.01)
        dead = await dead_letters(server) - dead_before
        got = len(server.ws_seen) - seen_before
        assert (dead, got >= valid) == (invalid, True), (dead, invalid, got, valid)

    server.run(case())
    assert server.alive


def test_rabbitmq_witnesses_after_fuzz(server: Server) -> None:
    server.assert_witnesses_live()
