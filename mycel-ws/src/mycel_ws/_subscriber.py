"""A hub subscriber that writes straight to its WebSocket connection.

The hub calls :meth:`WsSubscriber.offer` for every message that reaches a
client. While the connection's transport buffer is below websockets'
``write_limit``, the message's frame goes straight into the connection, as
:func:`websockets.asyncio.server.broadcast` does: no task, no queue. The
frame's bytes, header included, are built once per message and shared by
every client without compression (with it, each client's own deflate
context encodes it, through websockets). The bytes reach the socket at the
end of the current event loop iteration (:class:`mycel.WriteBatch`), so
that a burst of events costs one write per client rather than one per event
and client. Once the buffer is full (the client reads slower than we
write), messages wait in a queue of at most ``send_queue`` messages that a
short-lived task drains in order; a client whose queue overflows is closed
as a slow consumer, so it never holds up the others.

"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from mycel import Hub, Message, Subscriber, WriteBatch

from ._frames import message_frame, text_frame

__all__ = [
    "FRAME_CACHE_KEY",
    "SLOW_CONSUMER",
    "WIRE_CACHE_KEY",
    "WsSubscriber",
    "write_failed",
]

logger = logging.getLogger("mycel.ws")

FRAME_CACHE_KEY = "ws"
"""Key of the encoded frame (its JSON) in :attr:`mycel.Message.cache`."""

WIRE_CACHE_KEY = "ws-wire"
"""Key of the same frame as a WebSocket text frame, header included."""

SLOW_CONSUMER = "slow consumer"
"""Start of the close reason of a client that could not keep up."""


def write_failed(subscriber: WsSubscriber, error: Exception) -> None:
    """What the connector's :class:`mycel.WriteBatch` does when a write fails."""
    logger.error(
        "writing to connection %s failed",
        subscriber.connection.id,
        exc_info=error,
    )
    subscriber.connection.transport.abort()


class WsSubscriber(Subscriber):
    """One WebSocket client in the hub; see the module docstring."""

    __slots__ = ("_batch", "_batched", "_flusher", "_pending", "_wire", "connection")

    def __init__(
        self,
        hub: Hub,
        id: int,
        context: Mapping[str, Any],
        limit: int,
        on_close: Callable[[Subscriber, str], None] | None,
        *,
        connection: ServerConnection,
        batch: WriteBatch[WsSubscriber],
    ) -> None:
        super().__init__(hub, id, context, limit, on_close)
        self.connection = connection
        self._batch = batch
        self._batched = False
        # Created on first need: most clients never fall behind.
        self._pending: deque[bytes] | None = None
        self._flusher: asyncio.Task[None] | None = None
        # Shared frames written at the end of this iteration; None when an
        # extension (compression) makes each client's frames its own.
        self._wire: list[bytes] | None = None if connection.protocol.extensions else []

    @property
    def depth(self) -> int:
        return len(self._pending) if self._pending is not None else 0

    def offer(self, message: Message) -> bool:
        """Write the message's frame now, or queue it; see the module."""
        if self.closed:
            return False
        connection = self.connection
        if connection.protocol.state is not State.OPEN:
            return False
        data: bytes | None = message.cache.get(FRAME_CACHE_KEY)
        if data is None:
            # From another process, through the cluster's backplane: the
            # first subscriber here encodes it for all the others.
            data = message.cache[FRAME_CACHE_KEY] = message_frame(
                message.topic, message.payload
            )

        # Fast path: nothing queued and room in the transport buffer.
        if self._flusher is None and not connection.paused:
            wire = self._wire
            if wire is None:
                connection.protocol.send_text(data)
            else:
                frame: bytes | None = message.cache.get(WIRE_CACHE_KEY)
                if frame is None:
                    frame = message.cache[WIRE_CACHE_KEY] = text_frame(data)
                wire.append(frame)
            if not self._batched:
                self._batched = True
                self._batch.add(self)
            return True

        # Slow path: keep order behind what is queued, up to the limit.
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        if len(pending) >= self.limit:
            self.close(f"{SLOW_CONSUMER}: more than {self.limit} messages waiting")
            return False
        pending.append(data)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return True

    def write_out(self) -> None:
        """Write the frames :meth:`offer` left, in one go.

        Shared frames offered in the loop iteration in which the connection
        began to close are dropped: no data frame may follow a close frame.
        """
        self._batched = False
        connection = self.connection
        chunks = connection.protocol.data_to_send()
        wire = self._wire
        if wire:
            # Not once a close frame went out: no data frame may follow it.
            if connection.protocol.state is State.OPEN:
                chunks += wire
            wire.clear()
        if not chunks:
            return  # websockets wrote them already, with a frame of its own
        if all(chunks):
            connection.transport.write(b"".join(chunks))
            return
        # An empty chunk means "end of stream" (the connection is closing):
        # write chunk by chunk the way websockets does.
        for chunk in chunks:
            if chunk:
                connection.transport.write(chunk)
            elif connection.transport.can_write_eof():
                connection.transport.write_eof()
            else:
                connection.transport.close()

    async def _flush(self) -> None:
        connection = self.connection
        try:
            # close() drops the queue (None), possibly before this task ran.
            while (pending := self._pending) and not self.closed:
                # send() waits while the transport buffer is above write_limit.
                await connection.send(pending.popleft(), text=True)
        except ConnectionClosed:
            pass
        finally:
            self._flusher = None

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self._pending = None
        super().close(reason)
