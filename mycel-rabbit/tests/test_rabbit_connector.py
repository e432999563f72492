"""The rabbitmq connector against the real broker on 127.0.0.1:5672.

Every test works in its own namespace (exchange, queues, dead-letter names)
from the ``rabbit`` fixture. A ``gate`` target connector, defined here,
holds deliveries until the test opens it, so that messages can be caught
in flight deterministically; it stands in for a slow target, not for
RabbitMQ.

"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

import aio_pika
import pytest

from mycel import (
    Connector,
    ConnectorError,
    Delivery,
    Operation,
    Runtime,
    hookimpl,
)
from mycel.testing import eventually, free_port, load_test_config, running
from mycel_rabbit import RabbitConnector
from testsupport.rabbit import AmqpProxy, RabbitNamespace, broker_stopped

TIMEOUT = 10.0


class GateConnector(Connector):
    """A test target: records deliveries and holds them until opened."""

    type_name = "test_gate"
    target_operations = (Operation("pass", "hold until the test opens the gate"),)
    default_operation = "pass"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened = asyncio.Event()
        self.opened.set()
        self.arrived: asyncio.Queue[Delivery] = asyncio.Queue()
        self.passed: list[Delivery] = []
        self.waiting = 0

    async def deliver(self, delivery: Delivery) -> None:
        self.arrived.put_nowait(delivery)
        self.waiting += 1
        try:
            await self.opened.wait()
        finally:
            self.waiting -= 1
        self.passed.append(delivery)


@hookimpl
def mycel_connector_types() -> Sequence[type[Connector]]:
    return [GateConnector]


PLUGINS = [sys.modules[__name__]]


def gate(app_or_runtime: Any, name: str = "gate") -> GateConnector:
    runtime = getattr(app_or_runtime, "runtime", app_or_runtime)
    connector = runtime.connectors[name]
    assert isinstance(connector, GateConnector)
    return connector


async def next_of(queue: asyncio.Queue[Any]) -> Any:
    return await asyncio.wait_for(queue.get(), TIMEOUT)


def ids(deliveries: list[Delivery]) -> list[int]:
    return sorted(d.payload["n"] for d in deliveries)


# -- source ----------------------------------------------------------------


async def test_pattern_routing_and_envelope(rabbit: RabbitNamespace) -> None:
    config = (
        rabbit.connector()
        + """
    connector "mem" { type = "memory" }
    flow "orders" {
      from { connector = "rabbit"  operation = "order.*" }
      transform {
        id          = "input.order_id"
        key         = "context.message.routing_key"
        tenant      = "context.message.headers.tenant"
        redelivered = "context.message.redelivered"
        queue       = "context.message.queue"
      }
      to { connector = "mem"  target = "out" }
    }
    """
    )
    async with running(config) as app:
        out = app.listen("mem", "out")
        await rabbit.publish("order.created.eu", {"order_id": 0})
        await rabbit.publish("invoice.paid", {"order_id": 0})
        await rabbit.publish(
            "order.created",
            {"order_id": 42},
            headers={"tenant": "acme"},
            message_id="m-1",
        )
        topic, payload = await next_of(out)
        assert topic == "out"
        assert payload == {
            "id": 42,
            "key": "order.created",
            "tenant": "acme",
            "redelivered": False,
            "queue": rabbit.queue("orders"),
        }
        # The messages that do not match never reached the flow's queue.
        await eventually(lambda: app.runtime.in_flight.count == 0)
        assert out.empty()
        assert await rabbit.depth(rabbit.queue("orders")) == 0


async def test_input_is_the_body_and_context_is_separate(
    rabbit: RabbitNamespace,
) -> None:
    config = (
        rabbit.connector()
        + """
    connector "gate" { type = "test_gate" }
    flow "room" {
      from { connector = "rabbit"  operation = "messages" }
      to   { connector = "gate" }
    }
    """
    )
    async with running(config, plugins=PLUGINS) as app:
        await rabbit.publish(
            "messages",
            {"channel_id": 7, "text": "hi"},
            message_id="abc",
            correlation_id="c-9",
            content_type="application/json",
        )
        delivery = await next_of(gate(app).arrived)
    assert delivery.input == {"channel_id": 7, "text": "hi"}
    message = dict(delivery.context["message"])
    assert message.pop("timestamp") is None
    assert message == {
        "routing_key": "messages",
        "exchange": rabbit.exchange,
        "queue": rabbit.queue("room"),
        "headers": {},
        "message_id": "abc",
        "correlation_id": "c-9",
        "content_type": "application/json",
        "redelivered": False,
    }


async def test_two_flows_with_overlapping_patterns_both_get_it(
    rabbit: RabbitNamespace,
) -> None:
    config = (
        rabbit.connector()
        + """
    connector "mem" { type = "memory" }
    flow "one" {
      from { connector = "rabbit"  operation = "order.*" }
      transform { flow = "'one'"  n = "input.n" }
      to { connector = "mem"  target = "out" }
    }
    flow "all" {
      from { connector = "rabbit"  operation = "order.#" }
      transform { flow = "'all'"  n = "input.n" }
      to { connector = "mem"  target = "out" }
    }
    """
    )
    async with running(config) as app:
        out = app.listen("mem", "out")
        await rabbit.publish("order.created", {"n": 1})
        await rabbit.publish("order.created.eu", {"n": 2})
        got = sorted([(await next_of(out))[1] for _ in range(3)], key=repr)
        assert got == [
            {"flow": "all", "n": 1},
            {"flow": "all", "n": 2},
            {"flow": "one", "n": 1},
        ]


async def test_ack_only_after_the_flow_finished(rabbit: RabbitNamespace) -> None:
    config = (
        rabbit.connector()
        + """
    connector "gate" { type = "test_gate" }
    flow "slow" {
      from { connector = "rabbit"  operation = "work" }
      to   { connector = "gate" }
    }
    """
    )
    queue = rabbit.queue("slow")

    # Held in the flow, then the process stops: the message is not acked
    # and goes back to the queue.
    runtime = Runtime(load_test_config(config, plugins=PLUGINS))
    await runtime.start()
    try:
        gate(runtime).opened.clear()
        await rabbit.publish("work", {"n": 1})
        await next_of(gate(runtime).arrived)
        assert await rabbit.depth(queue) == 0
    finally:
        drained = await runtime.stop(timeout=0.1)
    assert drained is False
    assert gate(runtime).passed == []
    await eventually(lambda: _depth_is(rabbit, queue, 1), timeout=TIMEOUT)

    # The next run gets it again, flagged redelivered, and acks it on success.
    async with running(config, plugins=PLUGINS) as app:
        delivery = await next_of(gate(app).arrived)
        assert delivery.input == {"n": 1}
        assert delivery.context["message"]["redelivered"] is True
        await eventually(lambda: len(gate(app).passed) == 1)
        await eventually(lambda: app.runtime.in_flight.count == 0)
    assert await rabbit.depth(queue) == 0


async def _depth_is(rabbit: RabbitNamespace, queue: str, expected: int) -> bool:
    return await rabbit.depth(queue) == expected


async def test_concurrency_bounds_messages_in_flight(rabbit: RabbitNamespace) -> None:
    config = (
        rabbit.connector()
        + """
    connector "gate" { type = "test_gate" }
    flow "bounded" {
      concurrency = 3
      from { connector = "rabbit"  operation = "job" }
      to   { connector = "gate" }
    }
    """
    )
    async with running(config, plugins=PLUGINS) as app:
        g = gate(app)
        g.opened.clear()
        for n in range(5):
            await rabbit.publish("job", {"n": n})
        for _ in range(3):
            await next_of(g.arrived)
        # Prefetch follows concurrency: the other two wait in the broker.
        await eventually(lambda: _depth_is(rabbit, rabbit.queue("bounded"), 2))
        assert g.waiting == 3
        g.opened.set()
        for _ in range(2):
            await next_of(g.arrived)
        await eventually(lambda: len(g.passed) == 5)
        assert ids(g.passed) == [0, 1, 2, 3, 4]


async def test_existing_queue_is_consumed_as_it_is(rabbit: RabbitNamespace) -> None:
    # A queue its owner declared with arguments we would not give it.
    name = f"{rabbit.prefix}owned"
    channel = await rabbit.channel()
    owned = await channel.declare_queue(
        name, durable=True, arguments={"x-max-length": 100}
    )
    await owned.bind(rabbit.exchange, "fed.elsewhere")
    await rabbit.publish("fed.elsewhere", {"n": 1})
    config = (
        rabbit.connector()
        + f"""
    connector "gate" {{ type = "test_gate" }}
    flow "reader" {{
      from {{
        connector = "rabbit"
        operation = "ignored"
        queue     = "{name}"
        bind      = false
      }}
      to   {{ connector = "gate" }}
    }}
    """
    )
    async with running(config, plugins=PLUGINS) as app:
        delivery = await next_of(gate(app).arrived)
        assert delivery.input == {"n": 1}
        assert delivery.context["message"]["queue"] == name
        await rabbit.publish("ignored", {"n": 2})
        await rabbit.publish("fed.elsewhere", {"n": 3})
        assert (await next_of(gate(app).arrived)).input == {"n": 3}


# -- failures and dead letters --------------------------------------------


async def test_retry_then_dead_letter_with_the_error(
    rabbit: RabbitNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    # The target is RabbitMQ itself, refusing a key that no queue is bound to.
    config = (
        rabbit.connector(mandatory=True)
        + """
    flow "relay" {
      from  { connector = "rabbit"  operation = "in.*" }
      retry {
        attempts = 3
        delay    = "10ms"
      }
      to    { connector = "rabbit"  target = "nowhere" }
    }
    """
    )
    dead = await rabbit.listen(rabbit.dead_queue)
    caplog.set_level(logging.WARNING, logger="mycel")
    async with running(config) as app:
        await rabbit.publish(
            "in.one", {"n": 1}, message_id="m-7", headers={"trace": "t-1"}
        )
        message = await next_of(dead)
        retries = app.runtime.metrics.retries.labels("relay", "rabbit")._value.get()
        failed = app.runtime.metrics.events_failed.labels("relay")._value.get()
        await eventually(lambda: _depth_is(rabbit, rabbit.queue("relay"), 0))
    error = (
        "flow 'relay': to 'rabbit' failed after 3 tries: no queue is bound to "
        f"exchange '{rabbit.exchange}' for routing key 'nowhere'"
    )
    assert json.loads(message.body) == {"n": 1}
    assert message.message_id == "m-7"
    assert message.routing_key == "in.one"
    assert message.headers == {
        "trace": "t-1",
        "x-mycel-error": error,
        "x-mycel-flow": "relay",
        "x-mycel-queue": rabbit.queue("relay"),
        "x-mycel-exchange": rabbit.exchange,
        "x-mycel-routing-key": "in.one",
    }
    assert retries == 2
    assert failed == 1
    gave_up = [
        r
        for r in caplog.records
        if r.name == "mycel.rabbitmq"
        and r.getMessage().startswith("flow 'relay' gave up")
    ]
    assert [(r.levelname, r.getMessage()) for r in gave_up] == [
        (
            "WARNING",
            f"flow 'relay' gave up on message m-7 from '{rabbit.queue('relay')}': "
            + error.removeprefix("flow 'relay': "),
        )
    ]


async def test_poison_message_is_dead_lettered_at_once(
    rabbit: RabbitNamespace,
) -> None:
    config = (
        rabbit.connector()
        + """
    connector "gate" { type = "test_gate" }
    flow "eat" {
      from  { connector = "rabbit"  operation = "food" }
      to    { connector = "gate" }
    }
    """
    )
    dead = await rabbit.listen(rabbit.dead_queue)
    async with running(config, plugins=PLUGINS) as app:
        await rabbit.publish("food", b"{not json", message_id="bad-1")
        await rabbit.publish("food", b"\xff\xfe", message_id="bad-2")
        await rabbit.publish("food", {"n": 3})
        first, second = await next_of(dead), await next_of(dead)
        delivery = await next_of(gate(app).arrived)
        assert delivery.input == {"n": 3}
        registry = app.runtime.metrics.registry
        labels = {"connector": "rabbit", "flow": "eat"}
        # The copy reaches the queue before its confirmation reaches us.
        await eventually(
            lambda: (
                registry.get_sample_value("mycel_rabbitmq_dead_lettered_total", labels)
                == 2.0
            )
        )
    assert (first.message_id, first.body) == ("bad-1", b"{not json")
    assert first.headers["x-mycel-error"] == (
        "body is not JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)"
    )
    assert (second.message_id, second.body) == ("bad-2", b"\xff\xfe")
    assert second.headers["x-mycel-error"] == (
        "body is not UTF-8 text: 'utf-8' codec can't decode byte 0xff in "
        "position 0: invalid start byte"
    )


async def test_dead_letter_keeps_binary_headers(rabbit: RabbitNamespace) -> None:
    config = (
        rabbit.connector()
        + """
    connector "gate" { type = "test_gate" }
    flow "bin" {
      from  { connector = "rabbit"  operation = "bin" }
      transform { id = "input.missing" }
      to    { connector = "gate" }
    }
    """
    )
    dead = await rabbit.listen(rabbit.dead_queue)
    async with running(config, plugins=PLUGINS):
        await rabbit.publish(
            "bin", {"n": 1}, headers={"raw": bytearray(b"\xff\x00"), "n": 5}
        )
        message = await next_of(dead)
    assert message.headers["raw"] == bytearray(b"\xff\x00")
    assert message.headers["n"] == 5
    assert message.headers["x-mycel-flow"] == "bin"


async def test_permanent_failure_skips_retries(rabbit: RabbitNamespace) -> None:
    config = (
        rabbit.connector()
        + """
    connector "gate" { type = "test_gate" }
    flow "shape" {
      from  { connector = "rabbit"  operation = "shape" }
      transform { id = "input.missing" }
      to    { connector = "gate" }
    }
    """
    )
    dead = await rabbit.listen(rabbit.dead_queue)
    async with running(config, plugins=PLUGINS) as app:
        await rabbit.publish("shape", {"n": 1})
        message = await next_of(dead)
        assert gate(app).arrived.empty()
    assert message.headers["x-mycel-error"].startswith(
        "flow 'shape': transform field 'id' failed: "
    )


# -- target ----------------------------------------------------------------


async def test_publish_with_confirms(rabbit: RabbitNamespace) -> None:
    config = (
        rabbit.connector()
        + """
    connector "mem" { type = "memory" }
    flow "notify_on_insert" {
      from { connector = "mem"     operation = "orders.INSERT" }
      to   { connector = "rabbit"  target = "order.${input.kind}" }
    }
    """
    )
    received = await rabbit.listen(f"{rabbit.prefix}created", "order.created")
    async with running(config) as app:
        await app.publish("mem", "orders.INSERT", {"kind": "created", "total": 9.5})
        message = await next_of(received)
        await app.publish("mem", "orders.INSERT", {"kind": "created", "total": 1})
        second = await next_of(received)
        registry = app.runtime.metrics.registry
        labels = {"flow": "notify_on_insert", "connector": "rabbit"}
        await eventually(
            lambda: registry.get_sample_value("mycel_events_out_total", labels) == 2
        )
    assert json.loads(message.body) == {"kind": "created", "total": 9.5}
    assert message.routing_key == "order.created"
    assert message.exchange == rabbit.exchange
    assert message.content_type == "application/json"
    assert message.content_encoding == "utf-8"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.app_id == "mycel"
    assert message.headers == {"x-mycel-flow": "notify_on_insert"}
    assert re.fullmatch(r"[0-9a-f]{32}", message.message_id or "")
    assert second.message_id != message.message_id


async def test_rabbit_to_rabbit_meets_on_the_default_exchange(
    rabbit: RabbitNamespace,
) -> None:
    config = (
        rabbit.connector()
        + """
    connector "mem" { type = "memory" }
    flow "produce" {
      from { connector = "mem"     operation = "in" }
      to   { connector = "rabbit"  target = "order.created" }
    }
    flow "consume" {
      from { connector = "rabbit"  operation = "order.*" }
      to   { connector = "mem"     target = "out" }
    }
    """
    )
    async with running(config) as app:
        out = app.listen("mem", "out")
        await app.publish("mem", "in", {"order_id": 5})
        assert await next_of(out) == ("out", {"order_id": 5})


async def test_unroutable_is_fine_without_mandatory(rabbit: RabbitNamespace) -> None:
    connector = RabbitConnector  # the default: the broker discards it
    assert connector.target_required is True
    config = (
        rabbit.connector()
        + """
    connector "mem" { type = "memory" }
    flow "out" {
      from { connector = "mem"     operation = "in" }
      to   { connector = "rabbit"  target = "nobody.listens" }
    }
    """
    )
    async with running(config) as app:
        await app.publish("mem", "in", {"n": 1})
        registry = app.runtime.metrics.registry
        labels = {"flow": "out", "connector": "rabbit"}
        await eventually(
            lambda: registry.get_sample_value("mycel_events_out_total", labels) == 1
        )
        assert list(app.memory("mem").dead_letters) == []


# -- connection ------------------------------------------------------------


async def test_start_fails_clearly_without_a_broker(rabbit: RabbitNamespace) -> None:
    port = free_port()
    config = rabbit.connector(url=f"amqp://guest:s3cret@127.0.0.1:{port}/")
    with pytest.raises(ConnectorError) as caught:
        async with running(config):
            pass
    text = str(caught.value)
    assert text.startswith(
        f"cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:{port}/: "
    )
    assert "s3cret" not in text


async def test_wrong_password_is_reported_without_it(rabbit: RabbitNamespace) -> None:
    config = rabbit.connector(url="amqp://guest:wrong-s3cret@127.0.0.1:5672/")
    with pytest.raises(ConnectorError) as caught:
        async with running(config):
            pass
    text = str(caught.value)
    assert text.startswith(
        "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:5672/: "
    )
    assert "wrong-s3cret" not in text


async def test_exchange_of_another_type_is_reported(rabbit: RabbitNamespace) -> None:
    channel = await rabbit.channel()
    await channel.declare_exchange(
        f"{rabbit.prefix}fan", aio_pika.ExchangeType.FANOUT, durable=True
    )
    config = rabbit.connector(exchange=f"{rabbit.prefix}fan").replace(
        f'exchange = "{rabbit.exchange}"\n', ""
    )
    with pytest.raises(ConnectorError) as caught:
        async with running(config):
            pass
    assert str(caught.value).startswith(
        "cannot declare the exchanges and queues of connector 'rabbit' on "
        "amqp://guest:***@127.0.0.1:5672/: "
    )
    assert "PRECONDITION_FAILED" in str(caught.value)


async def test_connection_loss_redelivers_and_resumes(
    rabbit: RabbitNamespace, amqp_proxy: AmqpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    config = (
        rabbit.connector(
            url=amqp_proxy.url, reconnect_delay="50ms", reconnect_max_delay="200ms"
        )
        + """
    connector "gate" { type = "test_gate" }
    flow "steady" {
      concurrency = 4
      from { connector = "rabbit"  operation = "tick" }
      to   { connector = "gate" }
    }
    """
    )
    caplog.set_level(logging.INFO, logger="mycel.rabbitmq")
    async with running(config, plugins=PLUGINS) as app:
        g = gate(app)
        g.opened.clear()
        for n in range(10):
            await rabbit.publish("tick", {"n": n})
        held = [await next_of(g.arrived) for _ in range(4)]

        # Cut the link while four are in flight: their flows are cancelled
        # with the channel, and the broker hands them out again.
        await amqp_proxy.cut()
        await eventually(lambda: g.waiting == 0)
        assert g.passed == []
        g.opened.set()
        await amqp_proxy.restore()
        await eventually(lambda: len(g.passed) == 10, TIMEOUT)
        await eventually(lambda: _depth_is(rabbit, rabbit.queue("steady"), 0))
    again = [d.input["n"] for d in g.passed if d.context["message"]["redelivered"]]
    assert sorted(again) == sorted(d.input["n"] for d in held)
    assert sorted(d.input["n"] for d in g.passed) == list(range(10))
    reconnected = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if "reconnected" in r.getMessage()
    ]
    assert len(reconnected) == 1
    assert reconnected[0][0] == "WARNING"
    assert re.fullmatch(
        rf"connector 'rabbit' reconnected to amqp://guest:\*\*\*@127\.0\.0\.1:"
        rf"{amqp_proxy.port}/ \(attempt \d+\)",
        reconnected[0][1],
    )


async def test_target_fails_during_outage_and_retry_succeeds(
    rabbit: RabbitNamespace, amqp_proxy: AmqpProxy
) -> None:
    config = (
        rabbit.connector(
            url=amqp_proxy.url,
            publish_timeout="200ms",
            reconnect_delay="50ms",
            reconnect_max_delay="100ms",
        )
        + """
    connector "mem" { type = "memory" }
    flow "out" {
      from  { connector = "mem"     operation = "in" }
      retry {
        attempts  = 100
        delay     = "50ms"
        max_delay = "100ms"
      }
      to    { connector = "rabbit"  target = "out.sent" }
    }
    """
    )
    received = await rabbit.listen(f"{rabbit.prefix}sent", "out.sent")
    async with running(config) as app:
        retries = app.runtime.metrics.retries.labels("out", "rabbit")
        await amqp_proxy.cut()
        await app.publish("mem", "in", {"n": 1})
        await eventually(lambda: retries._value.get() >= 2, TIMEOUT)
        assert received.empty()
        await amqp_proxy.restore()
        message = await next_of(received)
    assert json.loads(message.body) == {"n": 1}


@pytest.mark.slow
async def test_broker_restart_mid_stream_loses_nothing(
    rabbit: RabbitNamespace, rabbitmq_ctl: None
) -> None:
    config = (
        rabbit.connector(reconnect_delay="200ms", reconnect_max_delay="1s")
        + """
    connector "gate" { type = "test_gate" }
    flow "stream" {
      concurrency = 8
      from { connector = "rabbit"  operation = "s.#" }
      to   { connector = "gate" }
    }
    """
    )
    async with running(config, plugins=PLUGINS) as app:
        g = gate(app)
        g.opened.clear()
        for n in range(100):
            await rabbit.publish("s.x", {"n": n})
        for _ in range(8):
            await next_of(g.arrived)

        # A real restart while eight messages are in flight.
        async with broker_stopped():
            g.opened.set()
            await eventually(lambda: g.waiting == 0)

        for n in range(100, 150):
            await rabbit.publish("s.x", {"n": n})
        await eventually(lambda: len({d.input["n"] for d in g.passed}) == 150, 60.0)
        await eventually(lambda: _depth_is(rabbit, rabbit.queue("stream"), 0), 30.0)
    seen = sorted({d.input["n"] for d in g.passed})
    assert seen == list(range(150))
    redelivered = [d for d in g.passed if d.context["message"]["redelivered"]]
    assert len(redelivered) >= 8


async def test_deleted_queue_is_declared_again(
    rabbit: RabbitNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    config = (
        rabbit.connector(reconnect_delay="50ms")
        + """
    connector "gate" { type = "test_gate" }
    flow "kept" {
      from { connector = "rabbit"  operation = "kept" }
      to   { connector = "gate" }
    }
    """
    )
    caplog.set_level(logging.WARNING, logger="mycel.rabbitmq")
    async with running(config, plugins=PLUGINS) as app:
        channel = await rabbit.channel()
        await channel.queue_delete(rabbit.queue("kept"))
        await eventually(
            lambda: any("reconnected" in r.getMessage() for r in caplog.records),
            TIMEOUT,
        )
        await rabbit.publish("kept", {"n": 1})
        assert (await next_of(gate(app).arrived)).input == {"n": 1}
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and r.name == "mycel.rabbitmq"
    ]
    assert warnings[0] == (
        f"connector 'rabbit': the broker cancelled the consumer of "
        f"'{rabbit.queue('kept')}' (queue deleted?); declaring it again"
    )
    assert warnings[1] == (
        "connector 'rabbit' lost its connection to amqp://guest:***@127.0.0.1:5672/ "
        "(consumer cancelled by the broker); reconnecting"
    )


async def test_shutdown_acks_what_finished_and_returns_the_rest(
    rabbit: RabbitNamespace,
) -> None:
    config = (
        rabbit.connector(prefetch=5)
        + """
    connector "gate" { type = "test_gate" }
    flow "drain" {
      concurrency = 1
      from { connector = "rabbit"  operation = "drain" }
      to   { connector = "gate" }
    }
    """
    )
    runtime = Runtime(load_test_config(config, plugins=PLUGINS))
    await runtime.start()
    g = gate(runtime)
    g.opened.clear()
    for n in range(3):
        await rabbit.publish("drain", {"n": n})
    await next_of(g.arrived)
    # Two more are prefetched, waiting for the flow's only slot.
    await eventually(lambda: _depth_is(rabbit, rabbit.queue("drain"), 0))

    connector = runtime.connectors["rabbit"]
    assert isinstance(connector, RabbitConnector)
    stopping = asyncio.create_task(runtime.stop(timeout=TIMEOUT))
    await eventually(lambda: not connector._consuming)
    g.opened.set()
    assert await stopping is True
    assert ids(g.passed) == [0]
    assert await rabbit.depth(rabbit.queue("drain")) == 2


async def test_deleted_exchange_is_declared_again(rabbit: RabbitNamespace) -> None:
    config = (
        rabbit.connector(reconnect_delay="50ms")
        + """
    connector "mem" { type = "memory" }
    flow "produce" {
      from  { connector = "mem"     operation = "in" }
      retry {
        attempts = 20
        delay    = "50ms"
      }
      to    { connector = "rabbit"  target = "loop.x" }
    }
    flow "consume" {
      from { connector = "rabbit"  operation = "loop.*" }
      to   { connector = "mem"     target = "out" }
    }
    """
    )
    async with running(config) as app:
        out = app.listen("mem", "out")
        channel = await rabbit.channel()
        await channel.exchange_delete(rabbit.exchange)
        # The publish fails on the missing exchange, which closes the channel;
        # the connector reconnects, declares and binds again, the retry works.
        await app.publish("mem", "in", {"n": 1})
        assert await next_of(out) == ("out", {"n": 1})
        retries = app.runtime.metrics.retries.labels("produce", "rabbit")._value.get()
    assert retries >= 1


async def test_named_queue_is_declared_when_missing(rabbit: RabbitNamespace) -> None:
    name = f"{rabbit.prefix}fresh"
    config = (
        rabbit.connector()
        + f"""
    connector "gate" {{ type = "test_gate" }}
    flow "fresh" {{
      from {{
        connector = "rabbit"
        operation = "fresh.*"
        queue     = "{name}"
      }}
      to   {{ connector = "gate" }}
    }}
    """
    )
    async with running(config, plugins=PLUGINS) as app:
        await rabbit.publish("fresh.one", {"n": 1})
        delivery = await next_of(gate(app).arrived)
    assert delivery.context["message"]["queue"] == name
    assert await rabbit.depth(name) == 0


async def test_publish_without_confirms(rabbit: RabbitNamespace) -> None:
    config = (
        rabbit.connector(publisher_confirms=False)
        + """
    connector "mem" { type = "memory" }
    flow "fire" {
      from { connector = "mem"     operation = "in" }
      to   { connector = "rabbit"  target = "fire.x" }
    }
    """
    )
    received = await rabbit.listen(f"{rabbit.prefix}fired", "fire.*")
    async with running(config) as app:
        await app.publish("mem", "in", {"n": 1})
        message = await next_of(received)
    assert json.loads(message.body) == {"n": 1}
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
