"""Reading a Redis stream through a consumer group, at least once.

One :class:`StreamReader` serves one flow whose ``from`` names
``stream:NAME``. It reads with ``XREADGROUP`` as the connector's consumer
in the flow's group and acknowledges an entry with ``XACK`` only after
``handle.process`` returned for it, so an entry read by a process that
then dies stays in the group's pending list. The reader gets such entries
back in two ways:

- its own: at start-up, and after a lost connection, it first reads its
  consumer's pending entries (``XREADGROUP ... 0``), which is what a
  restart under the same consumer name finds;
- other consumers': every ``claim_idle`` it claims entries that have been
  pending longer than that (``XAUTOCLAIM``), which is what a crashed
  process on another host leaves behind.

An entry that cannot become an event (no payload field, not UTF-8, not
JSON) and an entry whose flow gave up are written to the dead-letter
stream ``NAME.dead`` with the reason, then acknowledged: nothing is
dropped silently, and one bad entry does not block the stream. If even
that write fails, the entry is left pending and comes back later.

A lost connection, a deleted stream or group (created again) and a read
Redis refuses (retried with backoff, logged at ERROR) never end the reader.

Known limitations: entries of one stream are processed concurrently (up to
the flow's ``concurrency``), so a flow may see them out of order; set
``concurrency = 1`` on the flow for stream order. A flow that keeps
failing transiently still dead-letters each entry after its retries.

"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

import mycel

from ._settings import RedisSettings

__all__ = ["DEAD_SUFFIX", "StreamReader"]

logger = logging.getLogger("mycel.redis")

DEAD_SUFFIX = ".dead"
"""The dead-letter stream of ``NAME`` is ``NAME`` + this suffix."""

_MAX_RECONNECT_DELAY = 30.0

Entry = tuple[bytes, dict[bytes, bytes] | None]


class _Acks:
    """Acknowledges entries in as few ``XACK`` calls as the load allows.

    While one ``XACK`` is on its way, the entries finished meanwhile wait
    and go together in the next one; each caller still returns only once
    its own entry was acknowledged (or raises what Redis answered).

    """

    def __init__(self, client: aioredis.Redis, stream: str, group: str) -> None:
        self._client = client
        self._stream = stream
        self._group = group
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def ack(self, entry_id: bytes) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((entry_id, done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        await done

    async def _send(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self._client.xack(
                    self._stream, self._group, *(entry_id for entry_id, _ in batch)
                )
            except RedisError as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)


class StreamReader:
    """Feeds one flow from one stream; see the module docstring."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: RedisSettings,
        binding: mycel.SourceBinding,
        stream: str,
        *,
        group: str,
        start: str,
    ) -> None:
        self.stream = stream
        self.group = group
        self._client = client
        self._settings = settings
        self._binding = binding
        self._start_id = "0" if start == "beginning" else "$"
        self._slots = asyncio.Semaphore(binding.handle.concurrency)
        self._in_flight: set[bytes] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.dead_stream = stream + DEAD_SUFFIX
        self._acks = _Acks(client, stream, group)
        self._delay = settings.reconnect_delay

    async def create_group(self) -> None:
        """Create the consumer group (and the stream) unless it exists."""
        try:
            await self._client.xgroup_create(
                self.stream, self.group, id=self._start_id, mkstream=True
            )
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        else:
            logger.info(
                "created consumer group %r on stream %r", self.group, self.stream
            )

    async def run(self) -> None:
        """Read until cancelled; survive lost connections and a lost group."""
        while True:
            try:
                await self._read_pending()
                await self._read_new()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning(
                    "stream %r: connection lost, reading again in %.2fs: %s",
                    self.stream,
                    self._delay,
                    exc,
                )
            except ResponseError as exc:
                if str(exc).startswith("NOGROUP"):
                    # Someone deleted the stream or the group: create it
                    # again where the settings say, rather than stop.
                    logger.warning(
                        "stream %r: group %r is gone, creating it again",
                        self.stream,
                        self.group,
                    )
                    await self._recreate_group()
                    continue
                # WRONGTYPE and the like: an operator has to act; keep
                # trying so that reading resumes once they have.
                logger.error(
                    "stream %r: redis refused to read, trying again in %.2fs: %s",
                    self.stream,
                    self._delay,
                    exc,
                )
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, _MAX_RECONNECT_DELAY)

    async def _recreate_group(self) -> None:
        try:
            await self.create_group()
        except RedisError as exc:
            logger.warning("stream %r: cannot create group: %s", self.stream, exc)
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, _MAX_RECONNECT_DELAY)

    async def finish(self, timeout: float) -> None:
        """At close: let entries whose flow returned be acknowledged.

        The runtime has waited for the flows already; what is left is the
        ``XACK`` (or dead letter) after them. Entries still running after
        ``timeout`` are abandoned and stay pending, to come back later.

        """
        if not self._tasks:
            return
        _, running = await asyncio.wait(self._tasks, timeout=timeout)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def _read_pending(self) -> None:
        # Our own pending entries first: read after an id cursor, because
        # reading "0" again would return the same first page forever.
        cursor = "0"
        while True:
            entries = await self._xreadgroup(cursor, block=None)
            if not entries:
                return
            for entry in entries:
                await self._dispatch(entry)
            cursor = entries[-1][0].decode()

    async def _read_new(self) -> None:
        # Then new entries, claiming other consumers' stale ones at every
        # claim_idle; both loops raise on a lost connection.
        loop = asyncio.get_running_loop()
        claim_at = loop.time()
        # Block for less than the socket timeout, or redis-py gives up on
        # the read as if the connection were lost.
        block = min(self._settings.timeout / 2, self._settings.claim_idle)
        while True:
            if loop.time() >= claim_at:
                await self._claim_stale()
                claim_at = loop.time() + self._settings.claim_idle
            for entry in await self._xreadgroup(">", block=block):
                await self._dispatch(entry)

    async def _xreadgroup(self, last_id: str, block: float | None) -> list[Entry]:
        response: Any = await self._client.xreadgroup(
            self.group,
            self._settings.consumer,
            {self.stream: last_id},
            count=self._settings.batch,
            block=None if block is None else int(block * 1000),
        )
        self._delay = self._settings.reconnect_delay
        if not response:
            return []
        entries: list[Entry] = response[0][1]
        return entries

    async def _claim_stale(self) -> None:
        cursor = "0-0"
        while True:
            response: Any = await self._client.xautoclaim(
                self.stream,
                self.group,
                self._settings.consumer,
                min_idle_time=int(self._settings.claim_idle * 1000),
                start_id=cursor,
                count=self._settings.batch,
            )
            next_cursor, entries = response[0], response[1]
            if entries:
                logger.warning(
                    "stream %r: claimed %d entries another consumer of group %r "
                    "left unacknowledged",
                    self.stream,
                    len(entries),
                    self.group,
                )
            for entry in entries:
                await self._dispatch(entry)
            cursor = next_cursor.decode()
            if cursor == "0-0":
                return

    async def _dispatch(self, entry: Entry) -> None:
        entry_id, fields = entry
        if entry_id in self._in_flight:
            return
        await self._slots.acquire()
        self._in_flight.add(entry_id)
        task = asyncio.create_task(self._handle(entry_id, fields))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> None:
        try:
            await self._process(entry_id, fields)
        except RedisError as exc:
            # The entry stays pending and comes back after a reconnect or
            # a restart; at-least-once allows the repeat.
            logger.warning(
                "stream %r: entry %s stays pending: %s",
                self.stream,
                entry_id.decode(),
                exc,
            )
        finally:
            self._in_flight.discard(entry_id)
            self._slots.release()

    async def _process(
        self, entry_id: bytes, fields: dict[bytes, bytes] | None
    ) -> None:
        # An entry trimmed away while pending has no fields: nothing to do.
        if not fields:
            await self._ack(entry_id)
            return

        event, reason = self._event(entry_id, fields)
        if event is not None:
            try:
                await self._binding.handle.process(event)
            except mycel.FlowError as exc:
                reason = str(exc)
        if reason is not None:
            await self._dead_letter(entry_id, fields, reason)
        await self._ack(entry_id)

    def _event(
        self, entry_id: bytes, fields: dict[bytes, bytes]
    ) -> tuple[mycel.Event | None, str | None]:
        """The event of an entry, or why there is none."""
        name = self._settings.field
        raw = fields.get(name.encode())
        if raw is None:
            return None, f"entry has no field {name!r}"
        # Decode first: json.loads would guess UTF-16 from a byte order mark.
        try:
            payload = json.loads(raw.decode())
        except UnicodeDecodeError:
            return None, f"field {name!r} is not UTF-8 text"
        except ValueError as exc:
            return None, f"field {name!r} is not JSON: {exc}"
        others = {
            key.decode(errors="replace"): value.decode(errors="replace")
            for key, value in fields.items()
            if key != name.encode()
        }
        context: dict[str, Any] = {
            "stream": self.stream,
            "id": entry_id.decode(),
            "group": self.group,
            "fields": others,
        }
        return mycel.Event(payload, context), None

    async def _dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], reason: str
    ) -> None:
        dead: dict[Any, Any] = dict(fields)
        dead.update(
            {
                "mycel.reason": reason,
                "mycel.stream": self.stream,
                "mycel.id": entry_id.decode(),
                "mycel.group": self.group,
                "mycel.flow": self._binding.flow,
            }
        )
        await self._client.xadd(self.dead_stream, dead)
        logger.error(
            "stream %r: entry %s moved to %r: %s",
            self.stream,
            entry_id.decode(),
            self.dead_stream,
            reason,
        )

    async def _ack(self, entry_id: bytes) -> None:
        await self._acks.ack(entry_id)
