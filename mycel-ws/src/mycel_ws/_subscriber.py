"""A hub subscriber that writes straight to its WebSocket connection.

The hub calls :meth:`WsSubscriber.offer` for every message that reaches a
client. While the connection's transport buffer is below websockets'
``write_limit``, the already encoded frame is written at once, as
:func:`websockets.asyncio.server.broadcast` does: no task, no queue. Once
the buffer is full (the client reads slower than we write), messages wait in
a queue of at most ``send_queue`` messages that a short-lived task drains in
order; a client whose queue overflows is closed as a slow consumer, so it
never holds up the others.

"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from mycel import Hub, Message, Subscriber
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

__all__ = ["FRAME_CACHE_KEY", "SLOW_CONSUMER", "WsSubscriber"]

logger = logging.getLogger("mycel.ws")

FRAME_CACHE_KEY = "ws"
"""Key of the encoded frame in :attr:`mycel.Message.cache`."""

SLOW_CONSUMER = "slow consumer"
"""Start of the close reason of a client that could not keep up."""


class WsSubscriber(Subscriber):
    """One WebSocket client in the hub; see the module docstring."""

    __slots__ = ("_flusher", "_pending", "connection")

    def __init__(
        self,
        hub: Hub,
        id: int,
        context: Mapping[str, Any],
        limit: int,
        on_close: Callable[[Subscriber, str], None] | None,
        *,
        connection: ServerConnection,
    ) -> None:
        super().__init__(hub, id, context, limit, on_close)
        self.connection = connection
        self._pending: deque[bytes] = deque()
        self._flusher: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self._pending)

    def offer(self, message: Message) -> bool:
        """Write the message's frame now, or queue it; see the module."""
        if self.closed:
            return False
        connection = self.connection
        if connection.protocol.state is not State.OPEN:
            return False
        data: bytes = message.cache[FRAME_CACHE_KEY]

        # Fast path: nothing queued and room in the transport buffer.
        if self._flusher is None and not connection.paused:
            connection.protocol.send_text(data)
            connection.send_data()
            return True

        # Slow path: keep order behind what is queued, up to the limit.
        if len(self._pending) >= self.limit:
            self.close(f"{SLOW_CONSUMER}: more than {self.limit} messages waiting")
            return False
        self._pending.append(data)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return True

    async def _flush(self) -> None:
        connection = self.connection
        try:
            while self._pending and not self.closed:
                # send() waits while the transport buffer is above write_limit.
                await connection.send(self._pending.popleft(), text=True)
        except ConnectionClosed:
            pass
        finally:
            self._flusher = None

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self._pending.clear()
        super().close(reason)
