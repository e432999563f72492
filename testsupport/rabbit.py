"""RabbitMQ fixtures: the real broker on 127.0.0.1:5672, in a namespace per test.

``rabbit`` gives each test its own exchange, queue prefix and dead-letter
names (other test runs use the same broker at the same time) and a client to
publish and read with; what the tests left behind is deleted when the run
ends.
``amqp_proxy`` is a plain TCP relay in front of the broker that a test can
cut and restore, to lose connections without disturbing anyone else.
``broker_stopped()`` stops the RabbitMQ application itself for a real
restart; keep the outage short, other tests may be using the broker.

"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from testsupport.base import port_open, service_unavailable

RABBIT_HOST = "127.0.0.1"
RABBIT_PORT = 5672
RABBIT_URL = os.environ.get(
    "MYCEL_TEST_RABBIT_URL", f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/"
)


class RabbitNamespace:
    """Names for one test, and a client connection to publish and read with."""

    def __init__(self, session_prefix: str, url: str = RABBIT_URL) -> None:
        self.url = url
        self.prefix = f"{session_prefix}{uuid.uuid4().hex[:8]}."
        self.exchange = f"{self.prefix}x"
        self.queue_prefix = f"{self.prefix}q."
        self.dead_exchange = f"{self.prefix}dlx"
        self.dead_queue = f"{self.prefix}dead"
        self._connection: Any = None
        self._channel: Any = None

    def connector(
        self, name: str = "rabbit", *, url: str | None = None, **extra: Any
    ) -> str:
        """A ``connector`` block using this namespace's names."""
        lines = [
            f'connector "{name}" {{',
            '  type = "rabbitmq"',
            f"  url = {json.dumps(url or self.url)}",
            f"  exchange = {json.dumps(self.exchange)}",
            f"  queue_prefix = {json.dumps(self.queue_prefix)}",
        ]
        for key, value in extra.items():
            lines.append(f"  {key} = {json.dumps(value)}")
        lines += [
            "  dead_letter {",
            f"    exchange = {json.dumps(self.dead_exchange)}",
            f"    queue = {json.dumps(self.dead_queue)}",
            "  }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def queue(self, flow: str) -> str:
        """The queue a flow reads by default."""
        return f"{self.queue_prefix}{flow}"

    async def channel(self) -> Any:
        import aio_pika

        if self._channel is None or self._channel.is_closed:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await self._connection.close()
            self._connection = await aio_pika.connect(self.url)
            self._channel = await self._connection.channel(publisher_confirms=True)
            await self._channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        return self._channel

    async def publish(
        self,
        routing_key: str,
        body: Any,
        *,
        exchange: str | None = None,
        **properties: Any,
    ) -> None:
        """Publish (confirmed, persistent); ``body`` not bytes is sent as JSON."""
        import aio_pika

        channel = await self.channel()
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
        target = await channel.get_exchange(exchange or self.exchange, ensure=False)
        await target.publish(aio_pika.Message(raw, **properties), routing_key)

    async def listen(
        self, queue: str, pattern: str | None = None, *, exchange: str | None = None
    ) -> asyncio.Queue[Any]:
        """Messages of ``queue`` (declared, and bound when ``pattern`` is given).

        Each message is acknowledged as it arrives; read them from the queue.

        """
        channel = await self.channel()
        declared = await channel.declare_queue(queue, durable=True)
        if pattern is not None:
            await declared.bind(exchange or self.exchange, pattern)
        received: asyncio.Queue[Any] = asyncio.Queue()

        async def on_message(message: Any) -> None:
            await message.ack()
            received.put_nowait(message)

        await declared.consume(on_message)
        return received

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting unacknowledged ones)."""
        channel = await self.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count: int = declared.declaration_result.message_count
        return count

    async def close(self) -> None:
        """Close the client connection; names are deleted at the session's end."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = self._channel = None


async def delete_prefixed(url: str, prefix: str) -> None:
    """Delete every queue and exchange whose name starts with ``prefix``."""
    import aio_pika

    queues, exchanges = await asyncio.gather(
        _list("list_queues", prefix), _list("list_exchanges", prefix)
    )
    connection = await aio_pika.connect(url)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for name in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)


async def _list(command: str, prefix: str) -> list[str]:
    """Names from ``rabbitmqctl COMMAND name`` that start with ``prefix``."""
    if shutil.which("rabbitmqctl") is None:
        return []
    code, out = await rabbitmqctl(command, "-q", "--no-table-headers", "name")
    if code != 0:
        return []
    return [
        line.strip() for line in out.splitlines() if line.strip().startswith(prefix)
    ]


async def rabbitmqctl(*args: str, timeout: float = 60.0) -> tuple[int, str]:
    """Run rabbitmqctl; (exit code, output)."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode or 0, out.decode(errors="replace")


@contextlib.asynccontextmanager
async def broker_stopped() -> AsyncIterator[None]:
    """Stop the RabbitMQ application; start it again on the way out, always."""
    code, out = await rabbitmqctl("stop_app")
    try:
        assert code == 0, f"rabbitmqctl stop_app failed: {out}"
        yield
    finally:
        code, out = await rabbitmqctl("start_app")
        assert code == 0, f"rabbitmqctl start_app failed: {out}"
        await rabbitmqctl("await_startup")


class AmqpProxy:
    """A TCP relay to the broker that can drop every connection on demand."""

    def __init__(self, host: str = RABBIT_HOST, port: int = RABBIT_PORT) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        """Accept connections again, on the same port."""
        await self.start()

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)


@pytest.fixture(scope="session")
def rabbit_session_prefix() -> Iterator[str]:
    """A name prefix for the whole run; its queues and exchanges go at the end.

    One ``rabbitmqctl`` listing per run rather than per test: it takes a
    second or two on a busy machine.

    """
    prefix = f"mycel-test-{uuid.uuid4().hex[:8]}-"
    yield prefix
    if port_open(RABBIT_HOST, RABBIT_PORT):
        asyncio.run(delete_prefixed(RABBIT_URL, prefix))


@pytest.fixture
async def rabbit(rabbit_session_prefix: str) -> AsyncIterator[RabbitNamespace]:
    """A namespace on the real broker; deleted when the test run ends."""
    if not port_open(RABBIT_HOST, RABBIT_PORT):
        service_unavailable(f"RabbitMQ on {RABBIT_HOST}:{RABBIT_PORT}")
    namespace = RabbitNamespace(rabbit_session_prefix)
    try:
        yield namespace
    finally:
        await namespace.close()


@pytest.fixture
async def amqp_proxy() -> AsyncIterator[AmqpProxy]:
    """A relay to the broker; ``cut()`` drops and refuses connections."""
    proxy = AmqpProxy()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.cut()


@pytest.fixture
def rabbitmq_ctl() -> None:
    """Require rabbitmqctl (to stop and start the broker)."""
    if shutil.which("rabbitmqctl") is None:
        service_unavailable("rabbitmqctl")
