"""The Redis backplane against the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from mycel import (
    Connector,
    ConnectorError,
    Delivery,
    Message,
    Operation,
    Runtime,
    Subscriber,
    _builtin,
    hookimpl,
)
from mycel.testing import load_test_config
from mycel_cluster import RedisBackplane
from testsupport.base import port_open, service_unavailable

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def redis_running() -> None:
    if not port_open("127.0.0.1", 6379):
        service_unavailable("Redis on 127.0.0.1:6379")


class Fan(Connector):
    """A minimal fan-out target: publishes to its hub, like WebSocket does."""

    type_name = "fan"
    target_operations = (Operation("topic:NAME", "a topic", r"topic:\S+"),)
    fan_out = True

    async def deliver(self, delivery: Delivery) -> None:
        topic = delivery.operation.removeprefix("topic:")
        message = Message(
            topic,
            delivery.input,
            delivery.payload,
            flow=delivery.flow,
            options=delivery.options,
        )
        self.services.hub.publish(topic, message, delivery.filter)


class FanPlugin:
    @hookimpl
    def mycel_connector_types(self) -> list[type[Connector]]:
        return [Fan]


def config(namespace: str, url: str = REDIS) -> str:
    return f"""
    cluster {{
      backplane = "{url}"
      namespace = "{namespace}"
    }}
    connector "bus" {{ type = "memory" }}
    connector "fan" {{ type = "fan" }}
    flow "notify" {{
      from {{ connector = "bus" operation = "n" }}
      to {{
        connector = "fan"
        operation = "topic:${{input.room}}"
        filter = "input.user_id == context.params.user_id"
      }}
    }}
    """


@pytest.fixture
async def two_nodes() -> AsyncIterator[tuple[Runtime, Runtime]]:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    nodes = [
        Runtime(load_test_config(config(namespace), plugins=[_builtin, FanPlugin()]))
        for _ in range(2)
    ]
    for node in nodes:
        await node.start()
    try:
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            await node.stop(timeout=5)


def subscribe(node: Runtime, user: str, room: str = "r") -> Subscriber:
    return node.connectors["fan"].services.hub.subscribe(
        {"params": {"user_id": user}}, [room]
    )


async def receive(sub: Subscriber) -> Any:
    message = await asyncio.wait_for(sub.get(), 5)
    return message.payload


async def test_each_node_delivers_to_its_own_subscribers_once(
    two_nodes: tuple[Runtime, Runtime],
) -> None:
    a, b = two_nodes
    on_a, on_b, other_user = subscribe(a, "7"), subscribe(b, "7"), subscribe(b, "8")
    bus = a.connectors["bus"]
    await bus.publish("n", {"room": "r", "user_id": 7, "n": 1})  # type: ignore[attr-defined]
    await bus.publish("n", {"room": "r", "user_id": 7, "n": 2})  # type: ignore[attr-defined]
    assert [await receive(on_a), await receive(on_a)] == [
        {"room": "r", "user_id": 7, "n": 1},
        {"room": "r", "user_id": 7, "n": 2},
    ]
    assert [(await receive(on_b))["n"], (await receive(on_b))["n"]] == [1, 2]
    # Nothing more arrives: each message came exactly once, and the filter
    # was applied on node b too.
    await bus.publish("n", {"room": "r", "user_id": 8, "n": 3})  # type: ignore[attr-defined]
    assert (await receive(other_user))["n"] == 3
    assert on_a.depth == 0 and on_b.depth == 0


async def test_exact_decimals_cross_the_backplane(
    two_nodes: tuple[Runtime, Runtime],
) -> None:
    a, b = two_nodes
    sub = subscribe(b, "1")
    await a.connectors["bus"].publish(  # type: ignore[attr-defined]
        "n", {"room": "r", "user_id": 1, "price": Decimal("10.10")}
    )
    payload = await receive(sub)
    assert payload["price"] == Decimal("10.10")
    assert isinstance(payload["price"], Decimal)


async def test_history_reads_after_an_id_and_signals_a_gap() -> None:
    backplane = RedisBackplane(REDIS, f"test-{uuid.uuid4().hex[:8]}")
    await backplane.connect()
    try:
        ids = [
            await backplane.history_append("s", f"e{i}".encode(), 3, 60)
            for i in range(5)
        ]
        assert await backplane.history_since("s", ids[2]) == [
            (ids[3], b"e3"),
            (ids[4], b"e4"),
        ]
        assert await backplane.history_since("s", ids[4]) == []
        # Three are kept: a client that saw e1 missed nothing, one that saw
        # e0 missed e1, which is gone.
        assert await backplane.history_since("s", ids[1]) == [
            (ids[2], b"e2"),
            (ids[3], b"e3"),
            (ids[4], b"e4"),
        ]
        assert await backplane.history_since("s", ids[0]) is None
        assert await backplane.history_since("never-written", "0-0") == []
        assert await backplane.history_since("never-written", ids[0]) is None
        assert await backplane.history_since("s", "not-an-id") is None
    finally:
        await backplane.client.delete(backplane._key("history", "s"))
        await backplane.close()


async def test_unreachable_backplane_stops_start_up_with_a_clear_error() -> None:
    text = config("x", url="redis://127.0.0.1:1/0")
    runtime = Runtime(load_test_config(text, plugins=[_builtin, FanPlugin()]))
    with pytest.raises(ConnectorError) as info:
        await runtime.start()
    assert str(info.value).startswith(
        "cannot reach the cluster backplane redis://127.0.0.1:1/0: "
        "cannot connect to Redis at redis://127.0.0.1:1/0: "
    )


async def test_a_to_without_filter_reaches_every_node() -> None:
    # Nothing touches the hub before start here (no filter to index): the
    # runtime must still attach it to the backplane.
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    text = f"""
    cluster {{
      backplane = "{REDIS}"
      namespace = "{namespace}"
    }}
    connector "bus" {{ type = "memory" }}
    connector "fan" {{ type = "fan" }}
    flow "plain" {{
      from {{ connector = "bus" operation = "p" }}
      to {{ connector = "fan" operation = "topic:all" }}
    }}
    """
    a, b = (
        Runtime(load_test_config(text, plugins=[_builtin, FanPlugin()]))
        for _ in range(2)
    )
    await a.start()
    await b.start()
    try:
        subs = [
            node.connectors["fan"].services.hub.subscribe({}, ["all"])
            for node in (a, b)
        ]
        await a.connectors["bus"].publish("p", {"n": 1})  # type: ignore[attr-defined]
        assert [await receive(sub) for sub in subs] == [{"n": 1}, {"n": 1}]
    finally:
        await a.stop(timeout=5)
        await b.stop(timeout=5)


async def test_a_burst_crosses_in_order_in_few_round_trips(
    two_nodes: tuple[Runtime, Runtime],
) -> None:
    a, b = two_nodes
    sub = subscribe(b, "5")
    backplane = a.connectors["fan"].services.backplane
    assert isinstance(backplane, RedisBackplane)
    sends: list[int] = []
    publish_many = backplane.publish_many

    async def counting(channel: str, items: Any) -> None:
        sends.append(len(items))
        await publish_many(channel, items)

    backplane.publish_many = counting  # type: ignore[method-assign]
    bus = a.connectors["bus"]
    for n in range(500):
        await bus.publish("n", {"room": "r", "user_id": 5, "n": n})  # type: ignore[attr-defined]
    assert [(await receive(sub))["n"] for _ in range(500)] == list(range(500))
    # What queued up during one round trip went out in the next.
    assert sum(sends) == 500
    assert len(sends) < 250
    await asyncio.sleep(0.2)
    assert sub.depth == 0
