"""Reading Redis pub/sub channels: at most once, by the nature of pub/sub.

One :class:`PubSubReader` per connector holds one subscription connection
for every flow that reads ``channel:NAME`` (``SUBSCRIBE``) or
``pattern:GLOB`` (``PSUBSCRIBE``). Redis keeps nothing for a subscriber:
a message published while the process is down, or while the connection is
being re-established, is never seen, and a message whose flow gives up is
logged at ERROR and is gone. Use a ``stream:`` where that matters.

A message that is not JSON is not handed to flows; it is logged at
WARNING with its channel and the parse error.

"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

import mycel

from ._settings import RedisSettings

__all__ = ["PubSubReader"]

logger = logging.getLogger("mycel.redis")

_MAX_RECONNECT_DELAY = 30.0


class _Flow:
    """A bound flow with its own concurrency limit."""

    __slots__ = ("binding", "slots")

    def __init__(self, binding: mycel.SourceBinding) -> None:
        self.binding = binding
        self.slots = asyncio.Semaphore(binding.handle.concurrency)


class PubSubReader:
    """Feeds the connector's pub/sub flows; see the module docstring."""

    def __init__(self, client: aioredis.Redis, settings: RedisSettings) -> None:
        self._client = client
        self._settings = settings
        self._channels: dict[str, list[_Flow]] = defaultdict(list)
        self._patterns: dict[str, list[_Flow]] = defaultdict(list)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pubsub: PubSub | None = None
        self._early: list[dict[str, Any]] = []

    def add(self, binding: mycel.SourceBinding) -> None:
        kind, _, name = binding.operation.partition(":")
        table = self._channels if kind == "channel" else self._patterns
        table[name].append(_Flow(binding))

    def __bool__(self) -> bool:
        return bool(self._channels or self._patterns)

    async def subscribe(self, timeout: float = 10.0) -> None:
        """Subscribe to every channel and pattern, and wait until Redis
        confirmed them all, so that nothing published after this returns is
        missed. Raises if Redis does not answer."""
        pubsub = self._pubsub = self._client.pubsub()
        if self._channels:
            await pubsub.subscribe(*self._channels)
        if self._patterns:
            await pubsub.psubscribe(*self._patterns)

        # Messages may arrive between two confirmations: keep them.
        waiting = len(self._channels) + len(self._patterns)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while waiting:
            left = deadline - loop.time()
            message = await pubsub.get_message(timeout=max(left, 0.0))
            if message is None:
                if left <= 0:
                    raise RedisTimeoutError(
                        f"no subscription confirmation within {timeout}s"
                    )
            elif message["type"] in ("subscribe", "psubscribe"):
                waiting -= 1
            else:
                self._early.append(message)

    async def run(self) -> None:
        """Hand messages to flows until cancelled; survive lost connections.

        After a lost connection, redis-py subscribes again to the same
        channels and patterns when it reconnects.

        """
        assert self._pubsub is not None
        for message in self._early:
            await self._dispatch(message)
        self._early.clear()
        delay = self._settings.reconnect_delay
        while True:
            try:
                # Wait for less than the socket timeout: older redis-py
                # versions apply it to an unbounded wait as well.
                message = await self._pubsub.get_message(
                    timeout=self._settings.timeout / 2
                )
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning(
                    "pub/sub connection lost, subscribing again in %.2fs: %s",
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RECONNECT_DELAY)
                continue
            delay = self._settings.reconnect_delay
            if message is not None:
                await self._dispatch(message)

    async def close(self, timeout: float) -> None:
        """Give messages still being processed ``timeout``, then unsubscribe."""
        if self._tasks:
            _, running = await asyncio.wait(self._tasks, timeout=timeout)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        if self._pubsub is not None:
            # redis-py leaves PubSub.aclose unannotated (redis 5 to 8).
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None

    async def _dispatch(self, message: dict[str, Any]) -> None:
        # A pmessage comes once per matching pattern, a message once per
        # channel, so each binding sees each publish once. Confirmations of
        # (re)subscriptions are not messages.
        if message["type"] not in ("message", "pmessage"):
            return
        channel = message["channel"].decode(errors="replace")
        if message["type"] == "pmessage":
            pattern: str | None = message["pattern"].decode(errors="replace")
            flows = self._patterns.get(pattern or "", [])
        else:
            pattern = None
            flows = self._channels.get(channel, [])
        if not flows:
            return
        try:
            payload = json.loads(message["data"].decode())
        except ValueError as exc:  # UnicodeDecodeError included
            logger.warning(
                "message on channel %r is not JSON, not handed to flows: %s",
                channel,
                exc,
            )
            return
        context = {"channel": channel, "pattern": pattern}
        for flow in flows:
            await flow.slots.acquire()
            task = asyncio.create_task(
                self._process(flow, mycel.Event(payload, context), channel)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _process(self, flow: _Flow, event: mycel.Event, channel: str) -> None:
        try:
            await flow.binding.handle.process(event)
        except mycel.FlowError as exc:
            logger.error("message on channel %r lost: %s", channel, exc)
        finally:
            flow.slots.release()
