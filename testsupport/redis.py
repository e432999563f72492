"""Fixtures for tests against the real Redis on 127.0.0.1:6379.

``redis_url`` checks that Redis answers (skip locally, fail under CI);
``redis_client`` is a redis-py asyncio client for the test's own commands;
``redis_prefix`` is a key prefix unique to the test, and every key that
starts with it is deleted afterwards, so that tests running at the same
time, or other helpers' tests, never see each other's keys.

"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from testsupport.base import port_open, service_unavailable

REDIS_HOST = "127.0.0.1"
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))


@pytest.fixture
def redis_url() -> str:
    if not port_open(REDIS_HOST, REDIS_PORT):
        service_unavailable(f"Redis on {REDIS_HOST}:{REDIS_PORT}")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix(redis_client: Any) -> AsyncIterator[str]:
    prefix = f"mycel-test-{uuid.uuid4().hex[:12]}-"
    try:
        yield prefix
    finally:
        keys = [key async for key in redis_client.scan_iter(match=prefix + "*")]
        if keys:
            await redis_client.delete(*keys)
