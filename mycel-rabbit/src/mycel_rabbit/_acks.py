"""Acknowledging delivered messages, several per frame where it can."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import aiormq
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.abc import DeliveredMessage

__all__ = ["BROKER_ERRORS", "Acker", "delivery_tag", "settle"]

logger = logging.getLogger("mycel.rabbitmq")

BROKER_ERRORS = (*CONNECTION_EXCEPTIONS, TimeoutError)
"""What a broker operation raises when the broker or the connection fails."""


class Acker:
    """Acknowledges the messages of one channel, several per frame if it can.

    A success is not acknowledged at once but at the end of the event loop's
    current pass: all successes below the oldest message still in progress
    go in one ``basic.ack`` with ``multiple``, the others one by one. Under
    load that saves most of the frames (and system calls) a per-message
    acknowledgement costs. Nothing is acknowledged before its flow finished.

    """

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self.unsettled: set[int] = set()
        self.succeeded: set[int] = set()
        self.sending: set[asyncio.Task[None]] = set()
        self._scheduled = False

    def received(self, tag: int) -> None:
        self.unsettled.add(tag)

    def ack(self, tag: int) -> None:
        self.succeeded.add(tag)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    async def nack(self, tag: int) -> None:
        """Return one message to its queue, at once."""
        await settle(self.channel.basic_nack(tag, requeue=True))
        self.unsettled.discard(tag)

    def flush(self) -> None:
        self._scheduled = False
        if not self.succeeded:
            return
        waiting = self.unsettled - self.succeeded
        oldest = min(waiting) if waiting else None
        below = [t for t in self.succeeded if oldest is None or t < oldest]
        frames = [(max(below), True)] if below else []
        frames += [
            (t, False) for t in self.succeeded if oldest is not None and t > oldest
        ]
        self.unsettled -= self.succeeded
        self.succeeded.clear()
        for tag, multiple in frames:
            task = asyncio.ensure_future(
                settle(self.channel.basic_ack(tag, multiple=multiple, wait=False))
            )
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)


def delivery_tag(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None
    return tag


async def settle(action: Awaitable[None]) -> None:
    """Await an ack or nack; a lost channel means the broker redelivers."""
    try:
        await action
    except BROKER_ERRORS as exc:
        logger.debug("acknowledgement not sent (%s); the broker redelivers", exc)
