"""The Redis backplane: pub/sub for fan-out, streams for shared history.

Why Redis is the recommended backplane: fan-out needs every process to hear
every message once, with the lowest latency, and nothing kept; that is
Redis pub/sub. Replay history needs a bounded, ordered, shared log that can
be read from an id; that is a Redis stream (``XADD ... MAXLEN``,
``XRANGE``). One small server does both, and most deployments that need
several Mycel processes already run one. RabbitMQ could carry the fan-out
(a fanout exchange with one exclusive queue per process) but has no cheap
"read the log from id X" for replay.

Keys and channels: ``<namespace>:hub:<connector>`` (pub/sub) and
``<namespace>:history:<stream>`` (streams). History ids are Redis stream
ids (``<milliseconds>-<sequence>``).

Known limitations: pub/sub does not keep messages for a process that is
disconnected from Redis at that moment; that process's clients miss them
(SSE clients get them back through replay). Redis Cluster mode is not
supported; use a single primary (with a replica for failover).

"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mycel import Backoff, Backplane, ConnectorError, redact_url

__all__ = ["RedisBackplane"]

logger = logging.getLogger("mycel.cluster")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_id(value: str) -> tuple[int, int] | None:
    """``"1700000000000-3"`` -> (1700000000000, 3); None if not an id."""
    ms, _, seq = value.partition("-")
    if not ms.isdigit() or (seq and not seq.isdigit()):
        return None
    return int(ms), int(seq or 0)


class RedisBackplane(Backplane):
    """A :class:`mycel.Backplane` on one Redis server; see the module."""

    schemes = ("redis", "rediss")

    def __init__(self, url: str, namespace: str) -> None:
        super().__init__(url, namespace)
        self._redis: aioredis.Redis | None = None
        self._callbacks: dict[str, Callable[[bytes], None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def _key(self, kind: str, name: str) -> str:
        return f"{self.namespace}:{kind}:{name}"

    @property
    def client(self) -> aioredis.Redis:
        if self._redis is None:
            raise ConnectorError("the Redis backplane is not connected")
        return self._redis

    async def connect(self) -> None:
        self._redis = aioredis.Redis.from_url(self.url, health_check_interval=10)
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            await self._redis.aclose()  # type: ignore[no-untyped-call]
            self._redis = None
            raise ConnectorError(
                f"cannot connect to Redis at {redact_url(self.url)}: {exc}"
            ) from exc

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._redis is not None:
            await self._redis.aclose()  # type: ignore[no-untyped-call]
            self._redis = None

    async def publish(self, channel: str, data: bytes) -> None:
        await self.client.publish(self._key("hub", channel), data)

    async def publish_many(self, channel: str, items: Sequence[bytes]) -> None:
        # One pipeline: one round trip, and Redis hands the messages to each
        # subscribed process in as few writes.
        key = self._key("hub", channel)
        async with self.client.pipeline(transaction=False) as pipe:
            for data in items:
                pipe.publish(key, data)
            await pipe.execute()

    async def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> None:
        self._callbacks[self._key("hub", channel)] = callback
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._subscribed.clear()
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._subscribed.wait(), 10)

    async def _read(self) -> None:
        backoff = Backoff()
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self._callbacks)
                self._subscribed.set()
                if backoff.retrying:
                    logger.warning("Redis backplane: subscribed again")
                backoff.reset()
                async for message in pubsub.listen():
                    channel = message["channel"].decode()
                    callback = self._callbacks.get(channel)
                    if callback is not None and message["type"] == "message":
                        callback(message["data"])
            except (RedisError, OSError) as exc:
                logger.warning(
                    "Redis backplane: subscription lost, retrying in %.1fs: %s",
                    backoff.delay,
                    exc,
                )
                await backoff.wait()
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def history_append(
        self, stream: str, data: bytes, maxlen: int, ttl: float | None
    ) -> str:
        key = self._key("history", stream)
        async with self.client.pipeline(transaction=True) as pipe:
            # One entry more than asked: the oldest only marks where the
            # history starts, so that a gap can be told from no gap.
            pipe.xadd(key, {"d": data}, maxlen=maxlen + 1, approximate=False)
            if ttl is not None:
                pipe.pexpire(key, int(ttl * 1000))
            results: list[Any] = await pipe.execute()
        return _text(results[0])

    async def history_follow(
        self, stream: str, after_id: str
    ) -> AsyncIterator[list[tuple[str, bytes]]]:
        key = self._key("history", stream)
        last = after_id
        backoff = Backoff()
        while True:
            try:
                found: Any = await self.client.xread({key: last}, count=500, block=5000)
            except (RedisError, OSError) as exc:
                logger.warning(
                    "Redis backplane: reading %r failed, retrying in %.1fs: %s",
                    stream,
                    backoff.delay,
                    exc,
                )
                await backoff.wait()
                continue
            backoff.reset()
            for _key, entries in found or ():
                batch = [(_text(i), fields[b"d"]) for i, fields in entries]
                if batch:
                    last = batch[-1][0]
                    yield batch

    async def history_since(
        self, stream: str, last_id: str
    ) -> list[tuple[str, bytes]] | None:
        key = self._key("history", stream)
        after = _stream_id(last_id)
        if after is None:
            return None

        # A gap: entries after last_id were trimmed away, or the whole log
        # expired. The oldest entry kept is a marker (see history_append):
        # whoever saw it or anything later missed nothing.
        first: list[Any] = await self.client.xrange(key, count=1) or []  # type: ignore[assignment]
        if not first:
            return [] if after == (0, 0) else None
        first_id = _stream_id(_text(first[0][0]))
        if first_id is not None and after < first_id:
            added = await self.client.xinfo_stream(key)
            if added["entries-added"] > added["length"]:
                return None
        entries: list[Any] = await self.client.xrange(  # type: ignore[assignment]
            key, min=f"({after[0]}-{after[1]}"
        )
        return [(_text(entry_id), fields[b"d"]) for entry_id, fields in entries]
