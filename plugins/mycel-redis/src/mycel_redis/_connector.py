"""The ``redis`` connector: pub/sub and streams, as source and as target.

Sources: ``channel:NAME`` and ``pattern:GLOB`` read pub/sub, at most once
(see :mod:`mycel_redis._pubsub`); ``stream:NAME`` reads a stream through a
consumer group, at least once (see :mod:`mycel_redis._streams`). Targets:
``publish`` sends the payload as JSON to the channel ``target``; ``xadd``
appends it as JSON, in the field named by the ``field`` setting, to the
stream ``target``, trimmed to ``maxlen`` when the ``to`` block gives one.

Written as a third party writes a plugin: it uses only ``mycel``'s public
API, through the redis-py asyncio client.

Known limitations: no Redis Cluster or Sentinel; TLS only through a
``rediss://`` URL, without settings for client certificates.

"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

import mycel

from ._pubsub import PubSubReader
from ._settings import RedisFromOptions, RedisSettings, RedisToOptions
from ._streams import StreamReader

__all__ = ["RedisConnector"]

logger = logging.getLogger("mycel.redis")


class RedisConnector(mycel.Connector):
    """Redis pub/sub and streams; see the module docstring."""

    type_name = "redis"
    settings_model = RedisSettings
    source_operations = (
        mycel.Operation(
            "channel:NAME",
            "messages published to a channel (at most once)",
            r"channel:\S+",
        ),
        mycel.Operation(
            "pattern:GLOB",
            "messages published to matching channels (at most once)",
            r"pattern:\S+",
        ),
        mycel.Operation(
            "stream:NAME",
            "entries of a stream, via a consumer group (at least once)",
            r"stream:\S+",
        ),
    )
    target_operations = (
        mycel.Operation("publish", "PUBLISH the payload as JSON to channel `target`"),
        mycel.Operation("xadd", "XADD the payload as JSON to stream `target`"),
    )
    default_operation = "publish"
    target_required = True
    from_options = RedisFromOptions
    to_options = RedisToOptions

    def __init__(
        self, name: str, settings: mycel.Settings, services: mycel.Services
    ) -> None:
        super().__init__(name, settings, services)
        assert isinstance(settings, RedisSettings)
        self._settings = settings
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSubReader | None = None
        self._streams: list[StreamReader] = []
        self._readers: list[asyncio.Task[None]] = []

    @classmethod
    def check_binding(
        cls,
        settings: mycel.Settings,
        role: Literal["source", "target"],
        operation: str,
        options: mycel.Settings | None,
    ) -> list[str]:
        given = options.model_fields_set if options is not None else set()
        if role == "source" and not operation.startswith("stream:") and given:
            names = ", ".join(sorted(given))
            return [f"{names} apply to stream: operations only, not {operation!r}"]
        if role == "target" and operation != "xadd" and given:
            names = ", ".join(sorted(given))
            return [f"{names} apply to operation 'xadd' only, not {operation!r}"]
        return []

    @property
    def client(self) -> aioredis.Redis:
        """The redis-py client; only between start() and close()."""
        if self._client is None:
            raise mycel.ConnectorError(f"connector {self.name!r} is not started")
        return self._client

    async def start(self) -> None:
        # Connect now, so that a wrong URL stops the start with a clear
        # message rather than failing every event later.
        url = mycel.redact_url(self._settings.url)
        try:
            self._client = aioredis.Redis.from_url(
                self._settings.url,
                client_name=self._settings.client_name or f"mycel:{self.name}",
                socket_timeout=self._settings.timeout,
                socket_connect_timeout=self._settings.timeout,
            )
            await self._client.ping()
        except (RedisError, OSError, ValueError) as exc:
            await self._close_client()
            raise mycel.ConnectorError(
                f"connector {self.name!r}: cannot connect to Redis at {url}: {exc}"
            ) from exc
        logger.info("connector %r connected to %s", self.name, url)

    async def start_sources(self) -> None:
        client = self.client
        pubsub = PubSubReader(client, self._settings)
        for binding in self.bindings:
            kind, _, name = binding.operation.partition(":")
            if kind == "stream":
                options = binding.options
                assert isinstance(options, RedisFromOptions)
                self._streams.append(
                    StreamReader(
                        client,
                        self._settings,
                        binding,
                        name,
                        group=options.group or binding.flow,
                        start=options.start,
                    )
                )
            else:
                pubsub.add(binding)

        # Subscribe and create groups before reading, so that a failure
        # stops the start rather than a reader task.
        try:
            for reader in self._streams:
                await reader.create_group()
            if pubsub:
                await pubsub.subscribe()
                self._pubsub = pubsub
        except RedisError as exc:
            raise mycel.ConnectorError(
                f"connector {self.name!r}: cannot start reading: {exc}"
            ) from exc
        if self._pubsub is not None:
            self._readers.append(asyncio.create_task(self._pubsub.run()))
        for reader in self._streams:
            self._readers.append(asyncio.create_task(reader.run()))
        for task in self._readers:
            task.add_done_callback(self._reader_ended)

    def _reader_ended(self, task: asyncio.Task[None]) -> None:
        # Readers only end by cancellation; anything else is a bug to show.
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "connector %r stopped reading", self.name, exc_info=task.exception()
            )

    async def stop_sources(self) -> None:
        # Stop reading; entries already read finish (and are acknowledged)
        # while the runtime drains. Entries read but not yet handed to a
        # flow stay pending in their group and come back after a restart.
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers.clear()

    async def close(self) -> None:
        # The runtime has waited for in-flight flows (or given up); entries
        # whose flow returned still need their XACK, so give them `timeout`.
        # Whatever is still unfinished then stays pending and comes back.
        timeout = self._settings.timeout
        await asyncio.gather(*(reader.finish(timeout) for reader in self._streams))
        if self._pubsub is not None:
            await self._pubsub.close(timeout)
        await self._close_client()

    async def _close_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def deliver(self, delivery: mycel.Delivery) -> None:
        assert delivery.target is not None
        try:
            data = json.dumps(delivery.payload, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise mycel.DeliveryError(
                f"payload is not JSON: {exc}", permanent=True
            ) from exc

        try:
            if delivery.operation == "xadd":
                await self._xadd(delivery.target, data, delivery.options)
            else:
                receivers = await self.client.publish(delivery.target, data)
                logger.debug(
                    "published to %r (%d receivers)", delivery.target, receivers
                )
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise mycel.DeliveryError(f"redis unreachable: {exc}") from exc
        except RedisError as exc:
            # A command error (WRONGTYPE, say) will not go away by itself.
            raise mycel.DeliveryError(
                f"redis refused {delivery.operation} to {delivery.target!r}: {exc}",
                permanent=True,
            ) from exc

    async def _xadd(
        self, stream: str, data: str, options: mycel.Settings | None
    ) -> None:
        maxlen: int | None = None
        approximate = True
        if isinstance(options, RedisToOptions):
            maxlen, approximate = options.maxlen, options.approximate
        fields: dict[Any, Any] = {self._settings.field: data}
        entry_id = await self.client.xadd(
            stream, fields, maxlen=maxlen, approximate=approximate
        )
        logger.debug("added %s to stream %r", entry_id, stream)
