"""The redis connector as a target, its configuration checks, its start-up."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import mycel
import mycel_redis
from mycel.testing import free_port, load_test_config, running


def _config(url: str, body: str, settings: str = "") -> str:
    return f"""
    connector "bus" {{ type = "memory" }}
    connector "r" {{
      type = "redis"
      url  = "{url}"
      {settings}
    }}
    {body}
    """


async def test_publish_sends_the_payload_as_json(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    channel = redis_prefix + "prices"
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          from {{ connector = "bus"  operation = "price.*" }}
          to   {{ connector = "r"    target = "{channel}" }}
        }}
        """,
    )
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(channel)
    try:
        confirmation = await pubsub.get_message(timeout=5)
        assert confirmation is not None
        assert confirmation["type"] == "subscribe"
        async with running(config) as app:
            await app.publish("bus", "price.updated", {"sku": "A1", "price": 9.5})
            message = await pubsub.get_message(timeout=5)
    finally:
        await pubsub.aclose()
    assert message is not None
    assert (message["channel"], message["data"]) == (
        channel.encode(),
        b'{"sku":"A1","price":9.5}',
    )


async def test_xadd_appends_entries_trimmed_to_maxlen(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    stream = redis_prefix + "audit"
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          concurrency = 1
          from {{ connector = "bus"  operation = "audit" }}
          to {{
            connector   = "r"
            operation   = "xadd"
            target      = "{stream}"
            maxlen      = 2
            approximate = false
          }}
        }}
        """,
        settings='field = "body"',
    )
    async with running(config) as app:
        for n in (1, 2, 3):
            await app.publish("bus", "audit", {"n": n})
        await app.memory("bus").drain()
        assert list(app.memory("bus").dead_letters) == []

    entries = await redis_client.xrange(stream)
    assert [fields for _, fields in entries] == [
        {b"body": b'{"n":2}'},
        {b"body": b'{"n":3}'},
    ]


async def test_target_template_picks_the_stream_per_event(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          from {{ connector = "bus"  operation = "orders" }}
          to {{
            connector = "r"
            operation = "xadd"
            target    = "{redis_prefix}orders.${{input.region}}"
          }}
        }}
        """,
    )
    async with running(config) as app:
        await app.publish("bus", "orders", {"id": 7, "region": "eu"})
        await app.memory("bus").drain()

    entries = await redis_client.xrange(redis_prefix + "orders.eu")
    assert [fields for _, fields in entries] == [{b"data": b'{"id":7,"region":"eu"}'}]


async def test_wrong_key_type_fails_permanently(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    key = redis_prefix + "plain"
    await redis_client.set(key, "a string, not a stream")
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          from  {{ connector = "bus"  operation = "x" }}
          to    {{ connector = "r"  operation = "xadd"  target = "{key}" }}
          retry {{ attempts = 5 }}
        }}
        """,
    )
    async with running(config) as app:
        await app.publish("bus", "x", {"id": 1})
        await app.memory("bus").drain()
        dead = list(app.memory("bus").dead_letters)
    assert dead == [
        (
            "x",
            {"id": 1},
            f"flow 'f': to 'r' failed after 1 try: redis refused xadd to {key!r}: "
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        )
    ]


async def test_payload_that_is_not_json_fails_permanently(
    redis_url: str, redis_prefix: str
) -> None:
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          from      {{ connector = "bus"  operation = "x" }}
          transform {{ raw = "b'abc'" }}
          to        {{ connector = "r"  target = "{redis_prefix}ch" }}
        }}
        """,
    )
    async with running(config) as app:
        await app.publish("bus", "x", {"id": 1})
        await app.memory("bus").drain()
        dead = list(app.memory("bus").dead_letters)
    assert dead == [
        (
            "x",
            {"id": 1},
            "flow 'f': to 'r' failed after 1 try: payload is not JSON: "
            "Object of type bytes is not JSON serializable",
        )
    ]


def test_options_in_the_wrong_place_are_configuration_errors() -> None:
    config = """
    connector "bus" { type = "memory" }
    connector "r"   { type = "redis" }
    flow "a" {
      from { connector = "r"  operation = "channel:news"  group = "g" }
      to   { connector = "bus"  target = "x" }
    }
    flow "b" {
      from { connector = "bus"  operation = "x" }
      to   { connector = "r"  target = "news"  maxlen = 10 }
    }
    flow "c" {
      from { connector = "r"  operation = "list:jobs" }
      to   { connector = "r"  operation = "lpush"  target = "jobs" }
    }
    """
    with pytest.raises(mycel.ConfigError) as caught:
        load_test_config(config)
    assert [str(p) for p in caught.value.problems] == [
        "test.mycel:5: flow 'a': group apply to stream: operations only, "
        "not 'channel:news'.",
        "test.mycel:10: flow 'b': maxlen apply to operation 'xadd' only, "
        "not 'publish'.",
        "test.mycel:13: flow 'c': connector 'r' (redis) has no source operation "
        "'list:jobs'. It offers: channel:NAME, pattern:GLOB, stream:NAME.",
        "test.mycel:14: flow 'c': connector 'r' (redis) has no target operation "
        "'lpush'. It offers: publish, xadd.",
    ]


async def test_unreachable_redis_stops_the_start_without_showing_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    config = _config(f"redis://app:s3cret@127.0.0.1:{port}/0", "")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(mycel.ConnectorError) as caught:
        async with running(config):
            pass
    message = str(caught.value)
    assert message.startswith(
        "connector 'r': cannot connect to Redis at "
        f"redis://app:***@127.0.0.1:{port}/0: Error 111 connecting to 127.0.0.1:{port}."
    )
    assert "s3cret" not in message
    assert not [r for r in caplog.records if "s3cret" in r.getMessage()]


async def test_describe_and_logs_mask_the_password(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis here has no password; the default user accepts any.
    url = redis_url.replace("redis://", "redis://default:s3cret@")
    caplog.set_level(logging.DEBUG)
    async with running(_config(url, "")) as app:
        shown = app.connector("r").describe()["url"]
    assert shown == redis_url.replace("redis://", "redis://default:***@")
    assert ("mycel.redis", logging.INFO, f"connector 'r' connected to {shown}") in (
        caplog.record_tuples
    )
    assert not [r for r in caplog.records if "s3cret" in r.getMessage()]


def test_public_names() -> None:
    assert mycel_redis.__all__ == sorted(mycel_redis.__all__)
    assert mycel_redis.__all__ == [
        "DEAD_SUFFIX",
        "RedisConnector",
        "RedisFromOptions",
        "RedisSettings",
        "RedisToOptions",
    ]


async def test_stopping_closes_the_connection(redis_url: str) -> None:
    config = _config(redis_url, "")
    async with running(config) as app:
        connector = app.connector("r")
        assert isinstance(connector, mycel_redis.RedisConnector)
        assert await connector.client.ping() is True
    with pytest.raises(mycel.ConnectorError, match="connector 'r' is not started"):
        connector.client  # noqa: B018


async def test_connections_are_named_after_the_connector(
    redis_url: str, redis_client: Any
) -> None:
    config = f"""
    connector "cache-1" {{ type = "redis"  url = "{redis_url}" }}
    """
    async with running(config) as app:
        connector = app.connector("cache-1")
        assert isinstance(connector, mycel_redis.RedisConnector)
        info = await connector.client.client_info()
    assert info["name"] == "mycel:cache-1"


def test_client_name_with_spaces_is_a_configuration_error() -> None:
    config = """
    connector "r" {
      type        = "redis"
      client_name = "my app"
    }
    """
    with pytest.raises(mycel.ConfigError) as caught:
        load_test_config(config)
    assert [str(p) for p in caught.value.problems] == [
        "test.mycel:4: connector 'r': setting 'client_name' = 'my app': 'my app' has "
        "spaces, which Redis refuses in client names; write it without.",
    ]
