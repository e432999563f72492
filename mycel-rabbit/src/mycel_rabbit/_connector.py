"""The ``rabbitmq`` connector: RabbitMQ as a source and as a target.

As a source, each flow consumes its own durable queue (``<queue_prefix><flow
name>``, or the ``queue`` its ``from`` block names), bound to the connector's
exchange with the flow's operation as the binding key, so two flows whose
patterns both match a message each get a copy. The JSON body is the event's
``input``; the envelope is ``context.message``. A message is acknowledged
only after its flow finished. When the flow gives up (after the retries of
its ``retry`` block), or when the body is not JSON, the message is published
to the dead-letter exchange with the reason in the ``x-mycel-error`` header,
and acknowledged only once the broker confirmed that copy. Nothing is
dropped: if even the dead-letter copy cannot be published, the message is
returned to its queue.

Messages of one flow are processed concurrently, up to the flow's
``concurrency``; their order is not kept.

As a target, ``target`` is the routing key. The payload is published as a
persistent JSON message with a fresh message id; with publisher confirms
(the default) the ``to`` block returns only after the broker confirmed it,
so a broker outage fails the flow (and its source retries) rather than
losing the event.

When the connection drops, the connector reconnects with capped exponential
backoff, declares its exchanges, queues and bindings again, and resumes
consuming. Flows still running on the lost connection are cancelled;
their messages come back from the broker (flagged ``redelivered``) and are
processed again: delivery is at least once, never at most once.

Known limitations: a message whose processing crashes the whole process
every time is redelivered forever (there is no delivery limit); a flow
that runs longer than the broker's ``consumer_timeout`` (30 minutes by
default) gets its channel closed and the message redelivered.

"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import uuid
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractQueue,
)
from aiormq.abc import DeliveredMessage
from prometheus_client import Counter

from mycel import (
    Connector,
    ConnectorError,
    Delivery,
    DeliveryError,
    Event,
    FlowError,
    Operation,
    Settings,
    SourceBinding,
    redact_url,
)

from ._acks import BROKER_ERRORS, Acker, delivery_tag
from ._codec import decode_body, encodable, encode_payload, envelope
from ._settings import RabbitFromOptions, RabbitSettings, check_pattern

__all__ = ["RabbitConnector"]

logger = logging.getLogger("mycel.rabbitmq")


_ERROR_HEADER_LIMIT = 4000
"""Longest error text put in the ``x-mycel-error`` header."""

_dead_letter_counters: weakref.WeakKeyDictionary[Any, Counter] = (
    weakref.WeakKeyDictionary()
)


def _dead_letter_counter(metrics: Any) -> Counter:
    """``mycel_rabbitmq_dead_lettered``, once per runtime registry."""
    counter = _dead_letter_counters.get(metrics)
    if counter is None:
        counter = Counter(
            "mycel_rabbitmq_dead_lettered",
            "Messages a RabbitMQ source published to its dead-letter exchange.",
            ["connector", "flow"],
            registry=metrics.registry,
        )
        _dead_letter_counters[metrics] = counter
    return counter


@dataclass(eq=False)
class _Consumer:
    """One flow reading one queue."""

    binding: SourceBinding
    queue_name: str
    explicit: bool
    bind: bool
    prefetch: int
    semaphore: asyncio.Semaphore
    queue: AbstractQueue | None = None
    channel: aiormq.abc.AbstractChannel | None = None
    acker: Acker | None = None
    tag: str | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    settling: set[asyncio.Task[Any]] = field(default_factory=set)
    """Tasks whose flow has finished and that are acking or dead-lettering."""


@dataclass(eq=False)
class _Session:
    """One connection and what was declared on it."""

    connection: AbstractConnection
    publisher: aiormq.abc.AbstractChannel
    """Channel targets publish on (confirmed when ``publisher_confirms``)."""
    dead_letter_publisher: aiormq.abc.AbstractChannel
    """Channel dead letters are published on, always confirmed."""
    channels: list[AbstractChannel]


class RabbitConnector(Connector):
    """RabbitMQ source and target; see the module docstring."""

    type_name = "rabbitmq"
    settings_model = RabbitSettings
    source_operations = (
        Operation(
            "ROUTING_KEY_PATTERN",
            "messages whose routing key matches, e.g. order.* or audit.#",
            r"[^\s]+",
        ),
    )
    target_operations = (
        Operation("publish", "publish the payload as JSON with routing key `target`"),
    )
    default_operation = "publish"
    target_required = True
    from_options = RabbitFromOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.settings, RabbitSettings)
        self._settings: RabbitSettings = self.settings
        self._where = redact_url(self._settings.url)
        self._consumers: list[_Consumer] = []
        self._session: _Session | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._consuming = False
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._dead_lettered = _dead_letter_counter(self.services.metrics)

    @classmethod
    def check_binding(
        cls,
        settings: Settings,
        role: Literal["source", "target"],
        operation: str,
        options: Settings | None,
    ) -> list[str]:
        assert isinstance(settings, RabbitSettings)
        if role != "source":
            return []
        if options is not None:
            assert isinstance(options, RabbitFromOptions)
            if not options.bind:
                return []
        return check_pattern(operation, settings.exchange_type)

    def bind_source(self, binding: SourceBinding) -> None:
        super().bind_source(binding)
        options = binding.options
        assert options is None or isinstance(options, RabbitFromOptions)
        explicit = options is not None and options.queue is not None
        name = (
            options.queue
            if options is not None and options.queue is not None
            else f"{self._settings.queue_prefix}{binding.flow}"
        )
        concurrency = binding.handle.concurrency
        self._consumers.append(
            _Consumer(
                binding=binding,
                queue_name=name,
                explicit=explicit,
                bind=options.bind if options is not None else True,
                prefetch=self._settings.prefetch or concurrency,
                semaphore=asyncio.Semaphore(concurrency),
            )
        )

    def queue_names(self) -> dict[str, str]:
        """The queue each flow reads, by flow name."""
        return {c.binding.flow: c.queue_name for c in self._consumers}

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Connect and declare everything; fail if the broker cannot be reached.

        Later connection losses are handled by reconnecting; only the first
        connection must succeed, so that a wrong URL is reported at start.

        """
        self._session = await self._open()
        self._ready.set()
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"mycel-rabbit-{self.name}"
        )
        logger.info(
            "connector %r connected to %s (exchange %r)",
            self.name,
            self._where,
            self._settings.exchange,
        )

    async def start_sources(self) -> None:
        self._consuming = True
        if self._session is None:
            return  # reconnecting: consumers start once the link is back
        try:
            await self._consume_all(self._session)
        except BROKER_ERRORS as exc:
            raise ConnectorError(
                f"connector {self.name!r} cannot start consuming on {self._where}: "
                f"{_describe(exc)}"
            ) from exc

    async def stop_sources(self) -> None:
        """Cancel every consumer; messages in flight still finish and are acked."""
        self._consuming = False
        for consumer in self._consumers:
            channel, tag = consumer.channel, consumer.tag
            consumer.tag = None
            if channel is None or tag is None:
                continue
            try:
                await channel.basic_cancel(tag)
            except BROKER_ERRORS as exc:
                logger.debug(
                    "cancelling consumer of %r failed: %s", consumer.queue_name, exc
                )

    async def close(self) -> None:
        """Let acknowledgements finish, then close the connection.

        Messages still unacknowledged at that point go back to their queues.

        """
        self._closing = True
        settling = {task for c in self._consumers for task in c.settling}
        if settling:
            await asyncio.wait(settling, timeout=5.0)
        sending: set[asyncio.Task[None]] = set()
        for consumer in self._consumers:
            if consumer.acker is not None:
                consumer.acker.flush()
                sending |= consumer.acker.sending
        if sending:
            await asyncio.wait(sending, timeout=5.0)
        # What is still running was abandoned by the runtime's drain timeout.
        for task in {task for c in self._consumers for task in c.tasks}:
            task.cancel()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        session, self._session = self._session, None
        self._ready.clear()
        if session is not None:
            await self._close_quietly(session.connection)
        logger.info("connector %r closed its connection", self.name)

    # -- connection --------------------------------------------------------

    async def _open(self) -> _Session:
        """One connection with its exchanges, queues and bindings declared."""
        settings = self._settings
        try:
            connection = await aio_pika.connect(
                settings.url,
                timeout=settings.connect_timeout,
                heartbeat=round(settings.heartbeat),
                client_properties={"connection_name": f"mycel {self.name}"},
            )
        except BROKER_ERRORS as exc:
            raise ConnectorError(
                f"cannot connect to RabbitMQ at {self._where}: {_describe(exc)}"
            ) from exc
        try:
            session = await self._declare(connection)
        except BROKER_ERRORS as exc:
            await self._close_quietly(connection)
            raise ConnectorError(
                f"cannot declare the exchanges and queues of connector "
                f"{self.name!r} on {self._where}: {_describe(exc)}"
            ) from exc

        # From now on, losing the connection or any channel means reconnecting.
        def lost(_sender: Any, exc: BaseException | None = None) -> None:
            self._on_lost(session, exc)

        connection.close_callbacks.add(lost)
        for channel in session.channels:
            channel.close_callbacks.add(lost)

        # A queue deleted under us cancels its consumer: declare it again.
        for consumer in self._consumers:
            if consumer.channel is not None:
                consumer.channel.on_consumer_cancel_callbacks.add(
                    self._cancelled(session, consumer)
                )
        return session

    def _cancelled(
        self, session: _Session, consumer: _Consumer
    ) -> Callable[[Any], Coroutine[Any, Any, None]]:
        async def on_cancel(frame: Any) -> None:
            if not self._consuming or frame.consumer_tag != consumer.tag:
                return
            logger.warning(
                "connector %r: the broker cancelled the consumer of %r (queue "
                "deleted?); declaring it again",
                self.name,
                consumer.queue_name,
            )
            self._on_lost(session, None, reason="consumer cancelled by the broker")

        return on_cancel

    async def _declare(self, connection: AbstractConnection) -> _Session:
        settings = self._settings
        durable = settings.durable

        # Targets publish on a channel of their own, confirmed or not.
        publish_channel = await connection.channel(
            publisher_confirms=settings.publisher_confirms
        )
        await publish_channel.declare_exchange(
            settings.exchange,
            aio_pika.ExchangeType(settings.exchange_type),
            durable=durable,
        )

        # Dead letters are always confirmed before the original is acked.
        dead_channel = await connection.channel(publisher_confirms=True)
        dead_exchange = await dead_channel.declare_exchange(
            settings.dead_letter_exchange, aio_pika.ExchangeType.TOPIC, durable=durable
        )
        dead_queue = await dead_channel.declare_queue(
            settings.dead_letter_queue, durable=durable
        )
        await dead_queue.bind(dead_exchange, "#")

        # Each flow gets a channel, so that prefetch applies per flow.
        channels = [publish_channel, dead_channel]
        for consumer in self._consumers:
            channel, queue = await self._declare_queue(connection, consumer)
            if consumer.bind:
                await queue.bind(settings.exchange, consumer.binding.operation)
            consumer.queue = queue
            consumer.channel = await channel.get_underlay_channel()
            consumer.acker = Acker(consumer.channel)
            consumer.tag = None
            channels.append(channel)
        return _Session(
            connection,
            await publish_channel.get_underlay_channel(),
            await dead_channel.get_underlay_channel(),
            channels,
        )

    async def _declare_queue(
        self, connection: AbstractConnection, consumer: _Consumer
    ) -> tuple[AbstractChannel, AbstractQueue]:
        # A queue named in the from block is used as it is when it exists:
        # declaring it with other arguments than its owner's would fail.
        if consumer.explicit:
            probe = await connection.channel()
            try:
                queue = await probe.declare_queue(consumer.queue_name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass
            else:
                await probe.set_qos(prefetch_count=consumer.prefetch)
                return probe, queue
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=consumer.prefetch)
        queue = await channel.declare_queue(
            consumer.queue_name, durable=self._settings.durable
        )
        return channel, queue

    def _on_lost(
        self, session: _Session, exc: BaseException | None, reason: str = ""
    ) -> None:
        if self._closing or session is not self._session or self._lost.is_set():
            return
        self._ready.clear()
        self._lost.set()
        logger.warning(
            "connector %r lost its connection to %s (%s); reconnecting",
            self.name,
            self._where,
            reason or _describe(exc),
        )

    async def _supervise(self) -> None:
        """Reconnect with capped exponential backoff whenever the link drops."""
        settings = self._settings
        while True:
            await self._lost.wait()
            old, self._session = self._session, None
            if old is not None:
                await self._close_quietly(old.connection)

            # Try until it works; the runtime stops us by cancelling.
            attempt = 0
            while True:
                delay = min(
                    settings.reconnect_max_delay,
                    settings.reconnect_delay * 2**attempt,
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                attempt += 1
                try:
                    session = await self._open()
                except ConnectorError as exc:
                    logger.warning(
                        "connector %r: reconnection attempt %d failed: %s",
                        self.name,
                        attempt,
                        exc,
                    )
                    continue
                break
            self._session = session
            self._lost.clear()
            self._ready.set()
            if self._consuming:
                try:
                    await self._consume_all(session)
                except BROKER_ERRORS as exc:
                    # Lost again at once: the close callback set _lost.
                    logger.debug("resuming consumers failed: %s", exc)
            logger.warning(
                "connector %r reconnected to %s (attempt %d)",
                self.name,
                self._where,
                attempt,
            )

    async def _close_quietly(self, connection: AbstractConnection) -> None:
        try:
            await connection.close()
        except BROKER_ERRORS as exc:
            logger.debug("closing the connection failed: %s", exc)

    # -- source ------------------------------------------------------------

    async def _consume_all(self, session: _Session) -> None:
        for consumer in self._consumers:
            if consumer.channel is None or consumer.acker is None:
                continue
            if consumer.tag is not None:
                continue
            ok = await consumer.channel.basic_consume(
                consumer.queue_name, self._callback(consumer, consumer.acker)
            )
            consumer.tag = ok.consumer_tag
            logger.debug(
                "flow %r consumes %r", consumer.binding.flow, consumer.queue_name
            )

    def _callback(
        self, consumer: _Consumer, acker: Acker
    ) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
        # Messages come straight from aiormq (aio-pika's own protocol layer):
        # wrapping each in an aio-pika IncomingMessage costs more than the
        # rest of a simple flow. aiormq runs each callback in a task of its
        # own and cancels it when the channel closes; the message then comes
        # back from the broker, so a flow cut off that way is run again.
        async def on_message(message: DeliveredMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            consumer.tasks.add(task)
            acker.received(delivery_tag(message))
            try:
                async with consumer.semaphore:
                    if not self._consuming:
                        # Stopping: leave it to the broker for the next run.
                        await acker.nack(delivery_tag(message))
                        return
                    await self._handle(consumer, acker, message, task)
            finally:
                consumer.tasks.discard(task)
                consumer.settling.discard(task)

        return on_message

    async def _handle(
        self,
        consumer: _Consumer,
        acker: Acker,
        message: DeliveredMessage,
        task: asyncio.Task[Any],
    ) -> None:
        flow = consumer.binding.flow
        properties = message.header.properties

        # A body that is not JSON cannot get better by trying again.
        try:
            payload = decode_body(message.body)
        except ValueError as exc:
            logger.warning(
                "flow %r: message %s on %r cannot be read: %s",
                flow,
                properties.message_id,
                consumer.queue_name,
                exc,
            )
            consumer.settling.add(task)
            await self._dead_letter(consumer, acker, message, str(exc))
            return

        event = Event(payload, {"message": envelope(message, consumer.queue_name)})
        try:
            await consumer.binding.handle.process(event)
        except FlowError as exc:
            consumer.settling.add(task)
            logger.warning(
                "flow %r gave up on message %s from %r: %s",
                flow,
                properties.message_id,
                consumer.queue_name,
                exc.reason,
            )
            await self._dead_letter(consumer, acker, message, str(exc))
            return
        except Exception as exc:  # top of a per-message task: never lose it
            consumer.settling.add(task)
            logger.error(
                "flow %r failed unexpectedly on message %s",
                flow,
                properties.message_id,
                exc_info=exc,
            )
            await self._dead_letter(
                consumer, acker, message, f"unexpected error: {exc!r}"
            )
            return
        consumer.settling.add(task)
        acker.ack(delivery_tag(message))

    async def _dead_letter(
        self,
        consumer: _Consumer,
        acker: Acker,
        message: DeliveredMessage,
        reason: str,
    ) -> None:
        """Publish a copy with the reason, confirmed, then ack the original."""
        original = message.header.properties
        ours = {
            "x-mycel-error": reason[:_ERROR_HEADER_LIMIT],
            "x-mycel-flow": consumer.binding.flow,
            "x-mycel-queue": consumer.queue_name,
            "x-mycel-exchange": message.exchange or "",
            "x-mycel-routing-key": message.routing_key or "",
        }
        headers = {**encodable(dict(original.headers or {})), **ours}
        try:
            try:
                await self._publish_dead_letter(message, headers)
            except (TypeError, ValueError) as exc:
                # A header we could read but not write back: keep the message
                # and the reason, and say which headers were left out.
                logger.warning(
                    "flow %r: headers of message %s cannot be copied (%s); "
                    "dead-lettering it without them",
                    consumer.binding.flow,
                    original.message_id,
                    exc,
                )
                dropped = ", ".join(sorted(str(k) for k in original.headers or {}))
                await self._publish_dead_letter(
                    message, {**ours, "x-mycel-dropped-headers": dropped}
                )
        except (*BROKER_ERRORS, aio_pika.exceptions.DeliveryError) as exc:
            logger.error(
                "flow %r: cannot dead-letter message %s (%s); it goes back to %r",
                consumer.binding.flow,
                original.message_id,
                _describe(exc),
                consumer.queue_name,
            )
            await acker.nack(delivery_tag(message))
            return
        self._dead_lettered.labels(self.name, consumer.binding.flow).inc()
        acker.ack(delivery_tag(message))

    async def _publish_dead_letter(
        self, message: DeliveredMessage, headers: dict[str, Any]
    ) -> None:
        """Publish the copy, confirmed; raise if the broker does not take it."""
        original = message.header.properties

        # The copy drops expiration (it would expire the dead letter) and
        # user_id (the broker checks it against our login).
        properties = aiormq.spec.Basic.Properties(
            content_type=original.content_type,
            content_encoding=original.content_encoding,
            headers=headers,
            delivery_mode=2,
            priority=original.priority,
            correlation_id=original.correlation_id,
            reply_to=original.reply_to,
            message_id=original.message_id,
            timestamp=original.timestamp,
            message_type=original.message_type,
            app_id=original.app_id,
        )
        session = self._session
        if session is None:
            raise ConnectionError("not connected")
        await session.dead_letter_publisher.basic_publish(
            message.body,
            exchange=self._settings.dead_letter_exchange,
            routing_key=message.routing_key or "",
            properties=properties,
            timeout=self._settings.publish_timeout,
        )

    # -- target ------------------------------------------------------------

    async def deliver_many(
        self, deliveries: Sequence[Delivery]
    ) -> list[BaseException | None]:
        """Publish several payloads in the order given; await their confirms.

        The default does it: each :meth:`deliver` starts in its own task,
        in order, and takes the channel's lock (asyncio's, first come first
        served) before its frames are queued, so the broker gets the
        messages in the order of ``deliveries`` while their confirms are
        awaited together. Overriding it says so (``handle.batches``), which
        lets an ordered source (CDC) hand over runs of changes.
        """
        return await super().deliver_many(deliveries)

    async def deliver(self, delivery: Delivery) -> None:
        """Publish the payload; with confirms, return once the broker has it."""
        routing_key = delivery.target or ""
        if len(routing_key.encode()) > 255:
            raise DeliveryError(
                f"routing key {routing_key!r} is longer than 255 bytes", permanent=True
            )
        try:
            body = encode_payload(delivery.payload)
        except (TypeError, ValueError) as exc:
            raise DeliveryError(
                f"payload cannot be sent as JSON: {exc}", permanent=True
            ) from exc
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            content_encoding="utf-8",
            headers={"x-mycel-flow": delivery.flow},
            delivery_mode=2,
            message_id=uuid.uuid4().hex,
            timestamp=datetime.datetime.now(datetime.UTC),
            app_id="mycel",
        )
        settings = self._settings
        timeout = settings.publish_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
                session = self._session
                if session is None:
                    raise ConnectionError("not connected")
                # Straight to aiormq: an aio-pika Message per event costs more
                # than the rest of the publish.
                result = await session.publisher.basic_publish(
                    body,
                    exchange=settings.exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=settings.mandatory,
                )
        except TimeoutError as exc:
            raise DeliveryError(
                f"no connection to or confirmation from {self._where} within "
                f"{timeout:g}s for routing key {routing_key!r}"
            ) from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise DeliveryError(
                f"the broker refused the message for routing key {routing_key!r}"
            ) from exc
        except BROKER_ERRORS as exc:
            raise DeliveryError(
                f"publishing to {self._where} failed: {_describe(exc)}"
            ) from exc
        if settings.mandatory and not isinstance(result, aiormq.spec.Basic.Ack | None):
            raise DeliveryError(
                f"no queue is bound to exchange {settings.exchange!r} for routing "
                f"key {routing_key!r}"
            )


def _describe(exc: BaseException | None) -> str:
    """An exception as a short text without the password of a URL."""
    if exc is None:
        return "closed"
    text = str(exc) or type(exc).__name__
    return text if text != "None" else type(exc).__name__
