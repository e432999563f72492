"""Pub/sub sources: channel:NAME and pattern:GLOB, at most once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from mycel.testing import eventually, running


def _config(url: str, body: str) -> str:
    return f"""
    connector "bus" {{ type = "memory" }}
    connector "r"   {{ type = "redis"  url = "{url}" }}
    {body}
    """


async def test_channel_messages_reach_the_flow(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    channel = redis_prefix + "news"
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          from      {{ connector = "r"  operation = "channel:{channel}" }}
          transform {{
            title   = "input.title"
            channel = "context.channel"
          }}
          to        {{ connector = "bus"  target = "out" }}
        }}
        """,
    )
    async with running(config) as app:
        out = app.listen("bus", "out")
        receivers = await redis_client.publish(channel, '{"title": "hello"}')
        got = await asyncio.wait_for(out.get(), 5)
    assert receivers == 1
    assert got == ("out", {"title": "hello", "channel": channel})


async def test_pattern_messages_carry_channel_and_pattern(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    pattern = redis_prefix + "orders.*"
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          from      {{ connector = "r"  operation = "pattern:{pattern}" }}
          transform {{
            id      = "input.id"
            channel = "context.channel"
            pattern = "context.pattern"
          }}
          to        {{ connector = "bus"  target = "out" }}
        }}
        """,
    )
    async with running(config) as app:
        out = app.listen("bus", "out")
        await redis_client.publish(redis_prefix + "orders.eu", '{"id": 1}')
        await redis_client.publish(redis_prefix + "invoices.eu", '{"id": 2}')
        await redis_client.publish(redis_prefix + "orders.us", '{"id": 3}')
        got = [await asyncio.wait_for(out.get(), 5) for _ in range(2)]
    assert sorted(payload["id"] for _, payload in got) == [1, 3]
    assert {
        (payload["id"], payload["channel"], payload["pattern"]) for _, payload in got
    } == {
        (1, redis_prefix + "orders.eu", pattern),
        (3, redis_prefix + "orders.us", pattern),
    }


async def test_every_flow_gets_every_message(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    channel = redis_prefix + "ch"
    config = _config(
        redis_url,
        f"""
        flow "one" {{
          from {{ connector = "r"  operation = "channel:{channel}" }}
          to   {{ connector = "bus"  target = "one" }}
        }}
        flow "two" {{
          from {{ connector = "r"  operation = "pattern:{redis_prefix}*" }}
          to   {{ connector = "bus"  target = "two" }}
        }}
        """,
    )
    async with running(config) as app:
        one, two = app.listen("bus", "one"), app.listen("bus", "two")
        await redis_client.publish(channel, "[1, 2]")
        assert await asyncio.wait_for(one.get(), 5) == ("one", [1, 2])
        assert await asyncio.wait_for(two.get(), 5) == ("two", [1, 2])


async def test_message_that_is_not_json_is_logged_and_not_handed_on(
    redis_url: str,
    redis_client: Any,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = redis_prefix + "ch"
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          concurrency = 1
          from {{ connector = "r"  operation = "channel:{channel}" }}
          to   {{ connector = "bus"  target = "out" }}
        }}
        """,
    )
    caplog.set_level(logging.WARNING, logger="mycel.redis")
    async with running(config) as app:
        out = app.listen("bus", "out")
        await redis_client.publish(channel, "not json")
        await redis_client.publish(channel, '{"ok": true}')
        assert await asyncio.wait_for(out.get(), 5) == ("out", {"ok": True})
    assert caplog.record_tuples == [
        (
            "mycel.redis",
            logging.WARNING,
            f"message on channel {channel!r} is not JSON, not handed to flows: "
            "Expecting value: line 1 column 1 (char 0)",
        )
    ]
    assert out.empty()


async def test_connection_lost_is_survived(
    redis_url: str,
    redis_client: Any,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = redis_prefix + "ch"
    config = f"""
    connector "bus" {{ type = "memory" }}
    connector "r" {{
      type            = "redis"
      url             = "{redis_url}"
      reconnect_delay = "10ms"
      client_name     = "{redis_prefix}client"
    }}
    flow "f" {{
      from {{ connector = "r"  operation = "channel:{channel}" }}
      to   {{ connector = "bus"  target = "out" }}
    }}
    """
    caplog.set_level(logging.WARNING, logger="mycel.redis")
    async with running(config) as app:
        out = app.listen("bus", "out")

        # Kill the subscription connection from the server side, as a Redis
        # restart or a network cut would.
        clients = await redis_client.client_list(_type="pubsub")
        ours = [c["id"] for c in clients if c["name"] == redis_prefix + "client"]
        assert len(ours) == 1
        assert await redis_client.client_kill_filter(_id=ours[0]) == 1

        # Once subscribed again, publishing reaches the flow again.
        async def resubscribed() -> bool:
            numsub = await redis_client.pubsub_numsub(channel)
            return bool(numsub[0][1] == 1)

        await eventually(resubscribed, timeout=10)
        await redis_client.publish(channel, '{"n": 2}')
        assert await asyncio.wait_for(out.get(), 5) == ("out", {"n": 2})
    assert [
        r.getMessage().split(":")[0]
        for r in caplog.records
        if r.levelno == logging.WARNING
    ] == ["pub/sub connection lost, subscribing again in 0.01s"]
