"""Capped exponential waits between tries, for reconnect loops."""

from __future__ import annotations

import asyncio

__all__ = ["Backoff"]


class Backoff:
    """Waits of ``first`` seconds, doubling each time, never over ``cap``.

    ``delay`` is the next wait (log it before :meth:`wait`); :meth:`reset`
    after a success starts over; ``retrying`` tells whether the last try
    failed, e.g. to log that a connection is back.

    """

    __slots__ = ("cap", "delay", "first")

    def __init__(self, first: float = 0.1, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    @property
    def retrying(self) -> bool:
        return self.delay > self.first

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)

    def reset(self) -> None:
        self.delay = self.first
