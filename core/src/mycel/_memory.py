"""The built-in ``memory`` connector: in-process topics.

As a source, ``operation`` is a topic pattern in the style of AMQP topic
exchanges (``orders.*`` matches one word, ``audit.#`` any number of words);
as a target, ``target`` is the topic. It is the embedded default for demos
and tests: nothing to install, nothing to run.

Each reading flow has ``concurrency`` workers. When the flow's target
writes many events at once (such as a database; see
:attr:`mycel.FlowHandle.batches`), a worker that takes an event also takes
whatever else is already queued for its flow, up to 512 events, and runs
them together (:meth:`~mycel.FlowHandle.process_many`); otherwise each
worker takes one event at a time. Events are taken in publish order but, as with any
concurrency, may complete in any order; a failed event is retried on its
own while the rest of its batch goes on. A flow with ``concurrency = 1``
is the exception: its one worker runs one event at a time, so events are
delivered in publish order, a retried one before those behind it.

Known limitations: events live only in memory, so events still queued when
the process stops are lost, and an event whose flow fails after its last
try is logged, counted and kept in :attr:`MemoryConnector.dead_letters`
rather than redelivered. Use RabbitMQ where that matters.

"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from ._connector import Connector, Delivery, Event, Operation, SourceBinding
from ._settings import Settings
from .errors import FlowError

__all__ = ["MemoryConnector", "MemorySettings", "TopicPattern"]

logger = logging.getLogger("mycel.memory")

_BATCH = 512
"""Most events a worker takes from its queue at once."""

_MAX_ROUTES = 10_000
"""Topics whose matching queues are remembered."""

_Route = tuple[list["asyncio.Queue[Event]"], list["asyncio.Queue[Any]"]]


class TopicPattern:
    """An AMQP-style topic pattern: ``*`` is one word, ``#`` any number.

    >>> TopicPattern("audit.#").matches("audit")
    True
    >>> TopicPattern("order.*").matches("order.created.eu")
    False

    """

    __slots__ = ("_regex", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        parts = []
        for word in pattern.split("."):
            if word == "#":
                parts.append(r"(?:\.[^.]+)*")
            elif word == "*":
                parts.append(r"\.[^.]+")
            else:
                parts.append(r"\." + re.escape(word))
        self._regex = re.compile("".join(parts))

    def matches(self, topic: str) -> bool:
        return self._regex.fullmatch("." + topic) is not None


class MemorySettings(Settings):
    """Settings of ``type = "memory"``."""

    buffer: int = Field(default=10_000, ge=1)
    """Events queued per flow before publishers wait (backpressure)."""

    dead_letter_size: int = Field(default=1000, ge=0)
    """Failed events kept for inspection, per connector."""


@dataclass
class _Reader:
    binding: SourceBinding
    pattern: TopicPattern
    queue: asyncio.Queue[Event]


class MemoryConnector(Connector):
    """In-process publish/subscribe; see the module docstring."""

    type_name = "memory"
    settings_model = MemorySettings
    source_operations = (
        Operation("TOPIC_PATTERN", "events published to matching topics", r"[^\s]+"),
    )
    target_operations = (Operation("publish", "publish the payload to `target`"),)
    default_operation = "publish"
    target_required = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.settings, MemorySettings)
        self._settings: MemorySettings = self.settings
        self._readers: list[_Reader] = []
        self._listeners: list[tuple[TopicPattern, asyncio.Queue[Any]]] = []
        self._routes: dict[str, _Route] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._accepting = False
        self.dead_letters: deque[tuple[str, Any, str]] = deque(
            maxlen=self._settings.dead_letter_size
        )

    def bind_source(self, binding: SourceBinding) -> None:
        super().bind_source(binding)
        self._readers.append(
            _Reader(
                binding,
                TopicPattern(binding.operation),
                asyncio.Queue(self._settings.buffer),
            )
        )
        self._routes.clear()

    async def start_sources(self) -> None:
        self._accepting = True
        for reader in self._readers:
            for _ in range(reader.binding.handle.concurrency):
                self._workers.append(asyncio.create_task(self._work(reader)))

    async def _work(self, reader: _Reader) -> None:
        queue = reader.queue
        handle = reader.binding.handle
        batch = _BATCH if handle.concurrency > 1 and handle.batches else 1
        while True:
            # Wait for one event, then take what else is ready with it.
            events = [await queue.get()]
            while len(events) < batch and not queue.empty():
                events.append(queue.get_nowait())

            try:
                if len(events) == 1:
                    try:
                        await handle.process(events[0])
                    except FlowError as exc:
                        self._dead_letter(events[0], exc)
                else:
                    outcomes = await handle.process_many(events)
                    for event, outcome in zip(events, outcomes, strict=True):
                        if outcome is not None:
                            self._dead_letter(event, outcome)
            finally:
                for _ in events:
                    queue.task_done()

    def _dead_letter(self, event: Event, error: FlowError) -> None:
        topic = event.context.get("topic", "")
        logger.error("dropped event on %r: %s", topic, error)
        self.dead_letters.append((topic, event.input, str(error)))

    async def stop_sources(self) -> None:
        self._accepting = False
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    async def publish(self, topic: str, payload: Any) -> int:
        """Publish ``payload`` on ``topic``; returns the readers reached.

        Waits while a reading flow's buffer is full.

        """
        readers, listeners = self._route(topic)
        for queue in readers:
            event = Event(payload, {"topic": topic})
            if queue.full():
                await queue.put(event)
            else:
                queue.put_nowait(event)
        for listener in listeners:
            listener.put_nowait((topic, payload))
        return len(readers)

    def _route(self, topic: str) -> _Route:
        # Which queues a topic reaches, matched once per topic.
        route = self._routes.get(topic)
        if route is None:
            route = (
                [r.queue for r in self._readers if r.pattern.matches(topic)],
                [q for pattern, q in self._listeners if pattern.matches(topic)],
            )
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()
            self._routes[topic] = route
        return route

    def listen(self, pattern: str) -> asyncio.Queue[tuple[str, Any]]:
        """A queue of ``(topic, payload)`` for every publish that matches.

        For tests and embedding; unbounded, so read it.

        """
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._listeners.append((TopicPattern(pattern), queue))
        self._routes.clear()
        return queue

    async def deliver(self, delivery: Delivery) -> None:
        assert delivery.target is not None
        await self.publish(delivery.target, delivery.payload)

    async def drain(self) -> None:
        """Wait until every queued event has been processed (for tests)."""
        for reader in self._readers:
            await reader.queue.join()
