"""SSE in a cluster: two runtimes sharing the real Redis as backplane.

Each runtime is what one ``mycel run`` process would be; they share
nothing but Redis, so a client of one and a client of the other see the
same events with the same ids, and a client that reconnects to the other
one is replayed what it missed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from mycel import Runtime
from mycel.testing import load_test_config
from mycel_sse import SseConnector
from testsupport.base import port_open, service_unavailable
from testsupport.sse import open_stream

CONFIG = """
cluster {
  backplane = "redis://127.0.0.1:6379/0"
  namespace = "%s"
}
connector "mem" { type = "memory" }
connector "sse" {
  type = "sse"
  port = 0
  history_size = 5
}
flow "orders" {
  from { connector = "mem"  operation = "orders" }
  to {
    connector = "sse"
    operation = "stream:orders"
    filter    = "input.user_id == context.params.user_id"
  }
}
"""


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Runtime, Runtime]]:
    if not port_open("127.0.0.1", 6379):
        service_unavailable("Redis on 127.0.0.1:6379")
    namespace = f"test-sse-{uuid.uuid4().hex[:8]}"
    pair = [Runtime(load_test_config(CONFIG % namespace)) for _ in range(2)]
    for node in pair:
        await node.start()
    try:
        yield pair[0], pair[1]
    finally:
        for node in pair:
            await node.stop(timeout=5)
        client = redis.Redis()
        keys = await client.keys(f"{namespace}:*")
        if keys:
            await client.delete(*keys)
        await client.aclose()


def url(node: Runtime, user: int) -> str:
    sse = node.connectors["sse"]
    assert isinstance(sse, SseConnector)
    return f"http://127.0.0.1:{sse.port}/events/orders?user_id={user}"


async def publish(node: Runtime, n: int, user: int = 1) -> None:
    await node.connectors["mem"].publish(  # type: ignore[attr-defined]
        "orders", {"n": n, "user_id": user}
    )


async def test_clients_of_both_processes_get_each_event_once_with_the_same_id(
    nodes: tuple[Runtime, Runtime],
) -> None:
    a, b = nodes
    async with open_stream(url(a, 1)) as on_a, open_stream(url(b, 1)) as on_b:
        await publish(b, 1)
        got_a = [await on_a.event()]
        await publish(a, 2, user=2)  # filtered out for user 1 on both
        await publish(a, 3)
        got_a.append(await on_a.event())
        got_b = [await on_b.event(), await on_b.event()]
    assert [json.loads(e.data)["n"] for e in got_a] == [1, 3]
    assert [(e.id, e.data) for e in got_a] == [(e.id, e.data) for e in got_b]


async def test_reconnecting_to_the_other_process_replays_what_was_missed(
    nodes: tuple[Runtime, Runtime],
) -> None:
    a, b = nodes
    async with open_stream(url(a, 1)) as probe:
        async with open_stream(url(a, 1)) as on_a:
            await publish(a, 1)
            first = await on_a.event()
            assert json.loads((await probe.event()).data)["n"] == 1
        # The client is away while these are published, one process each;
        # the probe tells when each one is in the shared log.
        for node, n in ((b, 2), (a, 3)):
            await publish(node, n)
            assert json.loads((await probe.event()).data)["n"] == n
    async with open_stream(url(b, 1), {"Last-Event-ID": first.id or ""}) as on_b:
        replayed = [json.loads((await on_b.event()).data)["n"] for _ in range(2)]
        await publish(a, 4)
        live = json.loads((await on_b.event()).data)["n"]
    assert (replayed, live) == ([2, 3], 4)


async def test_an_id_older_than_the_shared_log_gets_the_gap_signal(
    nodes: tuple[Runtime, Runtime],
) -> None:
    a, b = nodes
    async with open_stream(url(a, 1)) as on_a:
        await publish(a, 0)
        first = await on_a.event()
        for n in range(1, 120):  # history_size 5: the log keeps 80
            await publish(a, n)
            assert json.loads((await on_a.event()).data)["n"] == n
    async with open_stream(url(b, 1), {"Last-Event-ID": first.id or ""}) as on_b:
        gap = await on_b.event()
        kept = [json.loads((await on_b.event()).data)["n"] for _ in range(5)]
    assert gap.event == "gap"
    assert json.loads(gap.data) == {"last_event_id": first.id, "reason": "expired"}
    assert kept == [115, 116, 117, 118, 119]
