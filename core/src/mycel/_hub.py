"""The fan-out hub shared by WebSocket, SSE and GraphQL subscriptions.

A hub owns the subscribers of one fan-out connector: their topics (rooms,
streams, subscription fields), their ``context`` (handshake parameters,
``connection_init`` payload, verified claims) and a bounded send queue each.
Publishing an event puts it on the queue of every subscriber of the topic
whose filter holds, and never waits: a subscriber whose queue is full is
closed with a reason ("slow consumer") so that it cannot slow the others.

Filters of the form ``input.X == context.params.Y`` (or with a literal in
place of ``input.X``) are answered from an index keyed by the text of
``context.params.Y``, so the cost of an event
follows the number of matching subscribers, not the size of the topic.
Other filters are evaluated for each subscriber of the topic. A filter whose
evaluation fails counts as false for that subscriber and is counted.

Everything here runs on the event loop thread and is not thread-safe.

"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ._expr import IndexedEquality
from .errors import ExpressionError, MycelError

if TYPE_CHECKING:
    from ._connector import Filter
    from ._metrics import Metrics

__all__ = ["Hub", "Message", "Subscriber", "SubscriberClosed", "WriteBatch"]

logger = logging.getLogger("mycel.hub")

SLOW_CONSUMER = "slow consumer: send queue full"


class SubscriberClosed(MycelError):
    """The subscriber was closed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Message:
    """One published event, shared by every subscriber it reaches.

    ``cache`` lets a connector encode the message once for all its
    subscribers: ``message.cache.get("ws")`` before encoding, then store.

    """

    __slots__ = ("cache", "flow", "input", "options", "payload", "topic")

    def __init__(
        self,
        topic: str | None,
        input: Any,
        payload: Any,
        *,
        flow: str = "",
        options: Any = None,
    ) -> None:
        self.topic = topic
        self.input = input
        self.payload = payload
        self.flow = flow
        self.options = options
        self.cache: dict[str, Any] = {}


class Subscriber:
    """One client of a fan-out connector, with its bounded send queue.

    The hub calls :meth:`offer`; the connector's writer takes messages with
    ``await subscriber.get()`` (or ``async for``) and sends them. A connector
    that can write without waiting may subclass and override :meth:`offer`.

    """

    __slots__ = (
        "_hub",
        "_queue",
        "_waiter",
        "close_reason",
        "closed",
        "context",
        "id",
        "limit",
        "on_close",
        "topics",
    )

    def __init__(
        self,
        hub: Hub,
        id: int,
        context: Mapping[str, Any],
        limit: int,
        on_close: Callable[[Subscriber, str], None] | None,
    ) -> None:
        self.id = id
        self.context = context
        self.topics: set[str] = set()
        self.limit = limit
        self.closed = False
        self.close_reason = ""
        self.on_close = on_close
        # Created on first use: subscribers that write directly never need it.
        self._queue: deque[Message] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._hub = hub

    @property
    def depth(self) -> int:
        """Messages waiting to be sent."""
        return len(self._queue) if self._queue is not None else 0

    def offer(self, message: Message) -> bool:
        """Queue a message; close the subscriber when its queue is full."""
        if self.closed:
            return False
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        elif len(queue) >= self.limit:
            self.close(f"{SLOW_CONSUMER} ({self.limit} messages)")
            return False
        queue.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def get_nowait(self) -> Message | None:
        return self._queue.popleft() if self._queue else None

    async def get(self) -> Message:
        """The next message; raise :class:`SubscriberClosed` once closed."""
        while not self._queue:
            if self.closed:
                raise SubscriberClosed(self.close_reason)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except SubscriberClosed:
            raise StopAsyncIteration from None

    def close(self, reason: str = "closed") -> None:
        """Leave the hub and wake the writer; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._queue = None
        self._hub._remove(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_close is not None:
            self.on_close(self, reason)


class Hub:
    """Subscribers of one fan-out connector; see the module docstring.

    ``name`` is the connector's name, used in metrics and logs.

    """

    def __init__(self, name: str, metrics: Metrics | None = None) -> None:
        self.name = name
        self.metrics = metrics
        self._ids = itertools.count(1)
        self._all: dict[int, Subscriber] = {}
        self._topics: dict[str, dict[int, Subscriber]] = {}
        # context path -> text value -> subscribers with that value
        self._indexes: dict[tuple[str, ...], dict[str, dict[int, Subscriber]]] = {}

    # Subscribers

    def subscribe(
        self,
        context: Mapping[str, Any],
        topics: Iterable[str] = (),
        *,
        queue_size: int = 1000,
        on_close: Callable[[Subscriber, str], None] | None = None,
        factory: Callable[..., Subscriber] = Subscriber,
    ) -> Subscriber:
        """Add a subscriber; it receives broadcasts and its topics' events."""
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size!r}")
        sub = factory(self, next(self._ids), context, queue_size, on_close)
        self._all[sub.id] = sub
        for path, index in self._indexes.items():
            self._index_add(path, index, sub)
        for topic in topics:
            self.join(sub, topic)
        self._count_subscribers()
        return sub

    def join(self, sub: Subscriber, topic: str) -> None:
        if sub.closed:
            return
        sub.topics.add(topic)
        self._topics.setdefault(topic, {})[sub.id] = sub

    def leave(self, sub: Subscriber, topic: str) -> None:
        sub.topics.discard(topic)
        members = self._topics.get(topic)
        if members is not None:
            members.pop(sub.id, None)
            if not members:
                del self._topics[topic]

    def _remove(self, sub: Subscriber) -> None:
        if self._all.pop(sub.id, None) is None:
            return
        for topic in list(sub.topics):
            self.leave(sub, topic)
        for path, index in self._indexes.items():
            value = IndexedEquality("input", (), path).context_value(sub.context)
            if value is not None:
                bucket = index.get(value)
                if bucket is not None:
                    bucket.pop(sub.id, None)
                    if not bucket:
                        del index[value]
        self._count_subscribers()

    @property
    def subscribers(self) -> list[Subscriber]:
        return list(self._all.values())

    def topic_size(self, topic: str | None) -> int:
        if topic is None:
            return len(self._all)
        return len(self._topics.get(topic, ()))

    def close_all(self, reason: str) -> None:
        """Close every subscriber (at shutdown)."""
        for sub in list(self._all.values()):
            sub.close(reason)

    # Publishing

    def publish(
        self, topic: str | None, message: Message, filter: Filter | None = None
    ) -> int:
        """Offer ``message`` to the subscribers of ``topic`` that pass.

        ``topic=None`` is a broadcast to every subscriber. Returns how many
        subscribers the message was queued for. Never blocks. In a cluster
        (see :class:`mycel.ClusterSettings`) the message goes through the
        backplane to every process, this one included, and this returns 0.

        """
        return self.deliver(topic, message, filter)

    def deliver(
        self, topic: str | None, message: Message, filter: Filter | None = None
    ) -> int:
        """Like :meth:`publish`, to this process's subscribers only."""
        members = self._all if topic is None else self._topics.get(topic)
        if not members:
            return 0
        if filter is None:
            delivered = 0
            for sub in list(members.values()):
                delivered += sub.offer(message)
            self._count(message.flow, delivered=delivered)
            return delivered
        if filter.indexed is not None:
            return self._publish_indexed(members, message, filter.indexed)
        return self._publish_evaluated(members, message, filter)

    def _publish_indexed(
        self,
        members: dict[int, Subscriber],
        message: Message,
        indexed: IndexedEquality,
    ) -> int:
        index = self._indexes.get(indexed.context_path)
        if index is None:
            index = self._build_index(indexed.context_path)
        value = indexed.event_value(message.input, message.payload)
        if value is None:
            # The event lacks the field: the filter fails for everyone.
            self._count(message.flow, errors=len(members))
            return 0
        bucket = index.get(value)
        delivered = 0
        if bucket:
            for sub_id, sub in list(bucket.items()):
                if sub_id in members:
                    delivered += sub.offer(message)
        self._count(
            message.flow, delivered=delivered, filtered=len(members) - delivered
        )
        return delivered

    def _publish_evaluated(
        self, members: dict[int, Subscriber], message: Message, filter: Filter
    ) -> int:
        expression = filter.expression
        variables = expression.context(
            {"input": message.input, "output": message.payload}
        )
        delivered = filtered = errors = 0
        for sub in list(members.values()):
            variables.add_variable("context", sub.context)
            try:
                passed = expression.evaluate(variables) is True
            except ExpressionError as exc:
                errors += 1
                logger.debug("filter failed for subscriber %d: %s", sub.id, exc)
                continue
            if passed:
                delivered += sub.offer(message)
            else:
                filtered += 1
        self._count(message.flow, delivered=delivered, filtered=filtered, errors=errors)
        return delivered

    # Index upkeep

    def _build_index(self, path: tuple[str, ...]) -> dict[str, dict[int, Subscriber]]:
        index: dict[str, dict[int, Subscriber]] = {}
        for sub in self._all.values():
            self._index_add(path, index, sub)
        self._indexes[path] = index
        return index

    def add_index(self, path: tuple[str, ...]) -> None:
        """Maintain an index on a context path from now on."""
        if path not in self._indexes:
            self._build_index(path)

    @staticmethod
    def _index_add(
        path: tuple[str, ...],
        index: dict[str, dict[int, Subscriber]],
        sub: Subscriber,
    ) -> None:
        value = IndexedEquality("input", (), path).context_value(sub.context)
        if value is not None:
            index.setdefault(value, {})[sub.id] = sub

    # Metrics

    def _count(
        self, flow: str, *, delivered: int = 0, filtered: int = 0, errors: int = 0
    ) -> None:
        if self.metrics is not None:
            self.metrics.fan_out(flow, self.name, delivered, filtered, errors)

    def _count_subscribers(self) -> None:
        if self.metrics is not None:
            self.metrics.subscribers(self.name, len(self._all))

    def queue_depth(self) -> int:
        """Messages waiting in all send queues (for the metrics endpoint)."""
        return sum(sub.depth for sub in self._all.values())


class _Writer(Protocol):
    def write_out(self) -> None: ...


_W = TypeVar("_W", bound=_Writer)


class WriteBatch(Generic[_W]):
    """Subscribers with bytes to write out at the end of this loop iteration.

    One per fan-out connector. A subscriber that is offered a message puts
    its encoded bytes in its own buffer and :meth:`add`\\ s itself, once
    per iteration; when the iteration ends, each one's ``write_out()``
    runs. A burst of messages handled in one go then costs one write per
    client rather than one per message and client (and, on Linux, fewer
    TCP segments). ``on_error(subscriber, exc)`` deals with a
    ``write_out`` that raised; the others are written regardless.

    """

    __slots__ = ("_dirty", "_on_error", "_scheduled")

    def __init__(self, on_error: Callable[[_W, Exception], None]) -> None:
        self._dirty: list[_W] = []
        self._on_error = on_error
        self._scheduled = False

    def add(self, subscriber: _W) -> None:
        """Have ``subscriber.write_out()`` run at the end of this iteration."""
        self._dirty.append(subscriber)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write out every subscriber added since the last flush."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for subscriber in dirty:
            try:
                subscriber.write_out()
            except Exception as exc:  # one broken client must not stall the rest
                self._on_error(subscriber, exc)
