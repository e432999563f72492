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


class _Route:
    """Where events on one topic go, worked out once per topic."""

    __slots__ = ("context", "inboxes", "listeners")

    def __init__(
        self,
        inboxes: list[_Inbox],
        listeners: list[asyncio.Queue[Any]],
        topic: str,
    ) -> None:
        self.inboxes = inboxes
        self.listeners = listeners
        self.context = {"topic": topic}
        """Every event on the topic shares it: a context is not written to."""


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


class _Inbox:
    """A reading flow's queue: bounded, and taken from in batches.

    What :class:`asyncio.Queue` does, minus its calls per event on the way
    out: a worker takes every ready event it may (up to ``batch``) at once
    and marks them processed at once. An idle worker is woken for each
    ``batch`` events queued, not for each event: one wake-up per event
    would wake hundreds of workers to find the queue already emptied by the
    first.

    """

    __slots__ = (
        "_getters",
        "_idle",
        "_putters",
        "_unfinished",
        "batch",
        "events",
        "limit",
        "woken",
    )

    def __init__(self, limit: int, batch: int) -> None:
        self.events: deque[Event] = deque()
        self.limit = limit
        self.batch = batch
        self.woken = 0
        """Workers woken for events that they have not yet taken."""
        self._getters: deque[asyncio.Future[None]] = deque()
        """Idle workers, waiting for an event."""
        self._putters: deque[asyncio.Future[None]] = deque()
        """Publishers waiting for room."""
        self._unfinished = 0
        self._idle: asyncio.Future[None] | None = None

    def put_nowait(self, event: Event) -> None:
        """Queue ``event``; the caller made sure that there is room."""
        self.events.append(event)
        self._unfinished += 1
        if self._getters and len(self.events) > self.woken * self.batch:
            self._wake_worker()

    def _wake_worker(self) -> None:
        if _wake(self._getters):
            self.woken += 1

    async def put(self, event: Event) -> None:
        """Queue ``event`` once there is room for it."""
        while len(self.events) >= self.limit:
            waiter = _waiter(self._putters)
            try:
                await waiter
            except asyncio.CancelledError:
                # Woken, then cancelled: pass the room on to the next one.
                if not waiter.cancelled() and len(self.events) < self.limit:
                    _wake(self._putters)
                raise
        self.put_nowait(event)

    async def take(self) -> list[Event]:
        """Wait for an event, then take it and what else is ready, up to ``batch``."""
        events = self.events
        while not events:
            waiter = _waiter(self._getters)
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled():
                    # Woken, then cancelled: pass the events on.
                    self.woken -= 1
                    if events and self._getters:
                        self._wake_worker()
                raise
            self.woken -= 1
        if self.batch == 1 or len(events) == 1:
            batch = [events.popleft()]
        else:
            batch = [events.popleft() for _ in range(min(self.batch, len(events)))]
        if self._getters and len(events) > self.woken * self.batch:
            self._wake_worker()  # more are waiting than the woken will take
        putters = self._putters
        for _ in batch:
            if not putters or not _wake(putters):
                break
        return batch

    def done(self, count: int) -> None:
        """``count`` events that were taken have been processed."""
        self._unfinished -= count
        idle = self._idle
        if self._unfinished == 0 and idle is not None:
            self._idle = None
            if not idle.done():
                idle.set_result(None)

    async def join(self) -> None:
        """Wait until every queued event has been processed."""
        if self._unfinished:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)


def _waiter(waiters: deque[asyncio.Future[None]]) -> asyncio.Future[None]:
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    return waiter


def _wake(waiters: deque[asyncio.Future[None]]) -> bool:
    # Wake the first one still waiting; False if none was.
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return True
    return False


@dataclass
class _Reader:
    binding: SourceBinding
    pattern: TopicPattern
    inbox: _Inbox


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
        self._unyielded = 0
        """Publishes since a publisher last gave the event loop a turn."""
        self.dead_letters: deque[tuple[str, Any, str]] = deque(
            maxlen=self._settings.dead_letter_size
        )

    def bind_source(self, binding: SourceBinding) -> None:
        super().bind_source(binding)
        handle = binding.handle
        batch = _BATCH if handle.concurrency > 1 and handle.batches else 1
        self._readers.append(
            _Reader(
                binding,
                TopicPattern(binding.operation),
                _Inbox(self._settings.buffer, batch),
            )
        )
        self._routes.clear()

    async def start_sources(self) -> None:
        self._accepting = True
        for reader in self._readers:
            for _ in range(reader.binding.handle.concurrency):
                self._workers.append(asyncio.create_task(self._work(reader)))

    async def _work(self, reader: _Reader) -> None:
        inbox = reader.inbox
        handle = reader.binding.handle
        while True:
            events = await inbox.take()
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
                inbox.done(len(events))

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

        Waits while a reading flow's buffer is full. A publisher that never
        has to wait still yields to the event loop once every 512 events, so
        that the flows (and the rest of the process) work while it publishes
        rather than after it is done.

        """
        route = self._route(topic)
        for inbox in route.inboxes:
            event = Event(payload, route.context)
            if len(inbox.events) >= inbox.limit:
                await inbox.put(event)
                self._unyielded = 0
            else:
                inbox.put_nowait(event)
        for listener in route.listeners:
            listener.put_nowait((topic, payload))
        self._unyielded += 1
        if self._unyielded >= _BATCH:
            self._unyielded = 0
            await asyncio.sleep(0)
        return len(route.inboxes)

    def _route(self, topic: str) -> _Route:
        # Which queues a topic reaches, matched once per topic.
        route = self._routes.get(topic)
        if route is None:
            route = _Route(
                [r.inbox for r in self._readers if r.pattern.matches(topic)],
                [q for pattern, q in self._listeners if pattern.matches(topic)],
                topic,
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
            await reader.inbox.join()
