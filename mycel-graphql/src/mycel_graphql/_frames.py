"""Subscription events written straight into the WebSocket connection.

Through ASGI, every ``next`` message to every client cost the wake of the
subscription's writer task, a ``websocket.send`` call and a system call of
its own. Here the hub's :meth:`FrameSubscriber.offer` encodes the message
(once per event, document and operation id, shared by every subscription
that has the same) and puts the frame into the connection's websockets
protocol object while the event is being published: no task, no queue. The
bytes of every connection that got frames reach the socket at the end of
the event loop iteration (:class:`mycel.WriteBatch`), one write per connection,
or as soon as they pass :data:`FLUSH_BYTES`.

This needs a way into the connection below ASGI: :class:`FrameProtocol`,
uvicorn's sans-I/O WebSocket protocol that hands itself to the application
in the scope's ``extensions`` under :data:`FRAMES_EXTENSION`. Everything
else (handshake, control frames, the close handshake, what the application
sends through ASGI) stays uvicorn's; a frame sent through ASGI writes the
frames buffered before it first, so the order on the wire is the order of
the calls. :class:`FrameProtocol` relies on attributes of uvicorn's
``WebSocketsSansIOProtocol`` that are not public API (``conn``,
``transport``, ``writable``, ``close_sent``, ``disconnected``), which is why
the distribution bounds its uvicorn version; the tests cover each of them.

While the transport's buffer is above its high-water mark (a client that
reads slower than we write), a subscription's frames wait in a queue of at
most ``queue_size`` frames that a short-lived task drains in order; a
subscription whose queue overflows is closed as a slow consumer, so that it
cannot hold up the others.

"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import (
    WebSocketsSansIOProtocol,
)
from websockets.http11 import Request
from websockets.protocol import State

import mycel

from ._schema import Plan

__all__ = ["FRAMES_EXTENSION", "FrameProtocol", "FrameSubscriber", "write_batch"]

logger = logging.getLogger("mycel.graphql")

FRAMES_EXTENSION = "mycel.graphql.frames"
"""Key in the ASGI scope's ``extensions``; its ``"writer"`` is the protocol."""

FLUSH_BYTES = 65536
"""Bytes of frames a connection buffers before they are written at once."""

SLOW_CONSUMER = "slow consumer: send queue full"
"""Start of the close reason of a subscription that could not keep up."""


class FrameProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, taking frames without ASGI."""

    queued = False
    """Whether the connection waits in the server's :class:`mycel.WriteBatch`."""

    buffered = 0
    """Bytes of frames in the connection's buffer, not yet written."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:
            # The application's task was created, not yet run.
            extensions = self.scope.setdefault("extensions", {})
            extensions[FRAMES_EXTENSION] = {"writer": self}

    @property
    def open(self) -> bool:
        """Whether a frame may be written: open, no close frame sent."""
        return (
            not self.close_sent
            and not self.disconnected
            and self.conn.state is State.OPEN
        )

    @property
    def paused(self) -> bool:
        """Whether the transport's buffer is above its high-water mark."""
        return not self.writable.is_set()

    def buffer_text(self, data: bytes) -> None:
        """Put a text frame in the connection's buffer; see :meth:`write_out`."""
        self.conn.send_text(data)
        self.buffered += len(data)

    def write_soon(self, batch: mycel.WriteBatch[FrameProtocol]) -> None:
        """Have ``batch`` write the buffer out at the end of this iteration."""
        if not self.queued:
            self.queued = True
            batch.add(self)

    def write_out(self) -> None:
        """Write what the connection's buffer holds, in one system call."""
        self.queued = False
        self.buffered = 0
        chunks = self.conn.data_to_send()
        if chunks and not self.transport.is_closing():
            self.transport.write(b"".join(chunks))


def _write_failed(writer: FrameProtocol, exc: Exception) -> None:
    """A :class:`mycel.WriteBatch` write that raised: that connection ends."""
    logger.error("writing to the connection of %s failed", writer.client, exc_info=exc)
    writer.transport.abort()


def write_batch() -> mycel.WriteBatch[FrameProtocol]:
    """The batch of one server: connections written once per iteration."""
    return mycel.WriteBatch(_write_failed)


class FrameSubscriber(mycel.Subscriber):
    """One subscription in the hub, writing its frames itself.

    ``op_id`` is the operation's id; ``prefix`` the start of its ``next``
    (or legacy ``data``) message, up to the payload.

    """

    __slots__ = ("_batch", "_flusher", "_key", "_pending", "op_id", "plan", "writer")

    def __init__(
        self,
        hub: mycel.Hub,
        id: int,
        context: Mapping[str, Any],
        limit: int,
        on_close: Callable[[mycel.Subscriber, str], None] | None,
        *,
        writer: FrameProtocol,
        batch: mycel.WriteBatch[FrameProtocol],
        op_id: str,
        plan: Plan,
        prefix: str,
    ) -> None:
        super().__init__(hub, id, context, limit, on_close)
        self.writer = writer
        self.op_id = op_id
        self.plan = plan
        self._batch = batch
        # The frame's key in the message cache: equal for every subscription
        # with the same document and operation id.
        self._key = (plan, prefix)
        # Created on first need: most clients never fall behind.
        self._pending: deque[bytes] | None = None
        self._flusher: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self._pending) if self._pending is not None else 0

    def offer(self, message: mycel.Message) -> bool:
        """Write the message's frame now, or queue it; see the module."""
        if self.closed:
            return False
        writer = self.writer
        if not writer.open:
            return False
        cache: dict[Any, Any] = message.cache
        data: bytes | None = cache.get(self._key)
        if data is None:
            payload = self.plan.payload_json(message.payload, cache)
            data = cache[self._key] = (self._key[1] + payload + "}").encode()

        # Fast path: nothing queued and room in the transport's buffer.
        if self._flusher is None and not writer.paused:
            writer.buffer_text(data)
            if writer.buffered < FLUSH_BYTES:
                writer.write_soon(self._batch)
            else:
                # A long burst within one loop iteration: write now, so that
                # the transport can pause us before memory runs away.
                writer.write_out()
            return True

        # Slow path: keep the order behind what is queued, up to the limit.
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        if len(pending) >= self.limit:
            self.close(f"{SLOW_CONSUMER} ({self.limit} messages)")
            return False
        pending.append(data)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return True

    async def _flush(self) -> None:
        writer = self.writer
        try:
            # close() drops the queue (None), possibly before this task ran.
            while (pending := self._pending) and not self.closed:
                await writer.writable.wait()
                if not writer.open:
                    return
                writer.buffer_text(pending.popleft())
                # Written at once, so that the transport pauses us in time.
                writer.write_out()
        finally:
            self._flusher = None

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self._pending = None
        super().close(reason)
