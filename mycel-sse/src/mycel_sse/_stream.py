"""The response of one SSE client, written to straight from the hub.

Delivery path
    The hub calls :meth:`SseClient.offer` for every event that reaches a
    client. The event's bytes (encoded once, ``message.cache["sse"]``) are
    appended to the client's buffer and the client is put on the
    connector's list of clients to write (:class:`Streams`); at the end of
    the current event loop iteration one callback hands each of them what
    piled up, joined, in one ``http.response.body`` message. No task wakes
    per client and event; a burst costs one write per client.

    That ``send`` is the ASGI server's own (captured by :class:`CaptureSend`
    ahead of Starlette's middleware, which only needs to see the response
    head) and is driven from the callback: while the server's transport
    takes data it completes without waiting. When the server holds the
    write back (the client reads slower than we write: flow control), the
    rest of that write and what piles up behind it go to a task of that
    client until its buffer is empty again.

Ends of a stream
    The client's ASGI task waits for the stream to end; a small task per
    client waits on ``receive()`` for ``http.disconnect``. A client that
    falls ``send_queue`` events behind is closed as a slow consumer; one
    whose write has waited over ``send_timeout`` is dropped by one
    connector-wide watchdog that only looks at clients with a write held
    back. When the connection can still take it, the stream ends with a
    ``: closed: REASON`` comment (``token_expired`` event for an expired
    token); a client stuck mid-write is cut instead (see :class:`QuietCut`).

Heartbeats
    One connector-wide timer writes ``: heartbeat`` to every client with
    nothing waiting to be written, every ``heartbeat_interval``.

"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Generator, Mapping
from contextvars import ContextVar
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mycel import (
    SSE_EXPIRED_EVENT,
    ExpiryTimer,
    Hub,
    Message,
    Subscriber,
    WriteBatch,
)

from ._history import encode_comment

__all__ = [
    "DISCONNECTED",
    "EXPIRED",
    "RAW_SEND",
    "SLOW_CONSUMER",
    "CaptureSend",
    "EventStream",
    "QuietCut",
    "SseClient",
    "Streams",
]

logger = logging.getLogger("mycel.sse")

RAW_SEND = "mycel_sse.send"
"""Scope key of the ASGI server's ``send``, set by :class:`CaptureSend`."""

SLOW_CONSUMER = "slow consumer: send queue full"
"""Start of the close reason of a client that fell ``send_queue`` behind."""

DISCONNECTED = "client disconnected"

EXPIRED = "token expired"
"""The reason a client is closed with when its token runs out."""

_EXPIRED_EVENT = (
    f"event: {SSE_EXPIRED_EVENT}\ndata: " + json.dumps({"message": EXPIRED}) + "\n\n"
).encode()

HEARTBEAT = encode_comment("heartbeat")

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]

_UVICORN_INCOMPLETE = "ASGI callable returned without completing response."

_cut_on_purpose: ContextVar[bool] = ContextVar("mycel_sse_cut", default=False)


class QuietCut(logging.Filter):
    """Drops uvicorn's error line for a stream this connector cut on purpose.

    A client that stopped reading cannot be sent the end of its response,
    so the stream is abandoned and uvicorn closes the socket, logging an
    error meant for application bugs. The connector has already logged the
    drop at WARNING; this filter removes only that one line, and only in
    the task of a stream that was cut. It can go if ASGI gains a way for an
    application to abort a response.

    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_cut_on_purpose.get() and record.msg == _UVICORN_INCOMPLETE)


class CaptureSend:
    """Puts the ASGI server's ``send`` in the scope, under :data:`RAW_SEND`.

    Starlette's middleware wraps ``send`` in a coroutine per layer, to see
    the response head (CORS headers, error pages). Event streams send their
    head through that chain and every body chunk after it straight to the
    server, which saves several coroutines per write.

    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await self.app(scope, receive, send)


class Streams:
    """The live clients of one connector: write batching, watchdog, beats."""

    __slots__ = (
        "_batch",
        "connector",
        "count_drop",
        "live",
        "send_timeout",
        "stalled",
    )

    def __init__(
        self, connector: str, send_timeout: float, count_drop: Callable[[], None]
    ) -> None:
        self.connector = connector
        self.send_timeout = send_timeout
        self.count_drop = count_drop
        self.live: set[SseClient] = set()
        self.stalled: set[SseClient] = set()
        """Clients with a write held back by the server's flow control."""
        self._batch: WriteBatch[SseClient] = WriteBatch(self._write_failed)

    def mark(self, client: SseClient) -> None:
        """Have ``client``'s buffer written at the end of this iteration."""
        self._batch.add(client)

    def _write_failed(self, client: SseClient, error: Exception) -> None:
        logger.error(
            "connector %r: writing to client %d failed",
            self.connector,
            client.id,
            exc_info=error,
        )
        client.close("write failed")

    async def watch_stalls(self) -> None:
        """Drop clients whose current write has waited over ``send_timeout``.

        One task for all clients, rather than a timer around every write;
        each round looks only at the clients with a write held back.

        """
        timeout = self.send_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            cutoff = time.monotonic() - timeout
            for client in [c for c in self.stalled if c.since < cutoff]:
                client.drop(f"no data accepted for {timeout:g}s")

    async def beat(self, interval: float) -> None:
        """Send ``: heartbeat`` to every client every ``interval``."""
        while True:
            await asyncio.sleep(interval)
            for client in self.live:
                client.heartbeat()


class SseClient(Subscriber):
    """One SSE client in the hub; see the module docstring."""

    __slots__ = (
        "_out",
        "_send",
        "_streams",
        "_writer",
        "cut",
        "disconnected",
        "ended",
        "expiry",
        "final",
        "since",
        "stream",
    )

    def __init__(
        self,
        hub: Hub,
        id: int,
        context: Mapping[str, Any],
        limit: int,
        on_close: Callable[[Subscriber, str], None] | None,
        *,
        streams: Streams,
        stream: str | None,
    ) -> None:
        super().__init__(hub, id, context, limit, on_close)
        self.stream = stream
        self._streams = streams
        self._out: list[bytes] = []
        """Encoded events (and comments) not yet handed to the server."""
        self._send: Send | None = None
        """The server's ``send``, once the response head went out."""
        self._writer: asyncio.Task[None] | None = None
        """Set while the server holds a write back; it writes the rest."""
        self.since = 0.0
        """When the write held back now was started or last progressed."""
        self.cut = False
        self.disconnected = False
        self.expiry: ExpiryTimer | None = None
        """Closes the client when its token runs out, with ``auth``."""
        self.final = b""
        """What the stream ends with, when the server ends it."""
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def depth(self) -> int:
        return len(self._out)

    # The hub's side

    def offer(self, message: Message) -> bool:
        """Buffer the event's bytes; write them at the end of the iteration."""
        if self.closed:
            return False
        out = self._out
        if len(out) >= self.limit:
            self.close(f"{SLOW_CONSUMER} ({self.limit} messages)")
            return False
        out.append(message.cache["sse"])
        if len(out) == 1 and self._writer is None and self._send is not None:
            self._streams.mark(self)
        return True

    def heartbeat(self) -> None:
        """Send a heartbeat comment, unless something is waiting anyway."""
        if self._out or self._writer is not None or self.closed:
            return
        self._out.append(HEARTBEAT)
        self._streams.mark(self)

    async def get(self) -> Message:
        raise TypeError("an SSE client is written to by the hub, not read")

    def get_nowait(self) -> Message | None:
        raise TypeError("an SSE client is written to by the hub, not read")

    # Writing

    def start(self, send: Send, head: list[bytes]) -> None:
        """Write ``head`` and what arrived since subscribing; go live."""
        self._send = send
        self._out[:0] = head
        self._streams.live.add(self)
        if self._out:
            self.write_out()

    def write_out(self) -> None:
        """Hand the buffer to the server in one write, without waiting."""
        if self._writer is not None or not self._out or self.closed:
            return
        assert self._send is not None
        write = self._write(self._take())
        try:
            pending = write.send(None)
        except StopIteration:
            return
        # The server holds the write back: a task finishes it.
        self.since = time.monotonic()
        self._streams.stalled.add(self)
        self._writer = asyncio.get_running_loop().create_task(
            self._write_rest(_Resume(write, pending))
        )

    def _take(self) -> bytes:
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def _write(self, data: bytes) -> Generator[Any, Any, None]:
        assert self._send is not None
        return self._send(_body(data)).__await__()

    async def _write_rest(self, held: _Resume) -> None:
        try:
            await held
            while self._out and not self.closed:
                assert self._send is not None
                self.since = time.monotonic()
                await self._send(_body(self._take()))
        except Exception:  # the top of this task: log, end the stream
            logger.error(
                "connector %r: writing to client %d failed",
                self._streams.connector,
                self.id,
                exc_info=True,
            )
            self.close("write failed")
        finally:
            self._writer = None
            self._streams.stalled.discard(self)

    # Ends

    async def listen(self, receive: Receive) -> None:
        """Wait for the client to go away; then close."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        self.close(DISCONNECTED)

    def drop(self, reason: str) -> None:
        """Log and count why the client goes, and close it.

        A client stuck in a write is then cut by :meth:`finish`; the others
        get ``: closed: REASON`` as the end of their stream.

        """
        streams = self._streams
        streams.count_drop()
        logger.warning(
            "connector %r: dropped client %d of %s: %s",
            streams.connector,
            self.id,
            self.stream or "broadcasts",
            reason,
        )
        self.close(reason)

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self._out.clear()
        if self.expiry is not None:
            self.expiry.cancel()
        super().close(reason)
        if reason.startswith(SLOW_CONSUMER):
            self.drop(reason)
        if reason == EXPIRED:
            self.final = _EXPIRED_EVENT
        else:
            self.final = encode_comment(f"closed: {reason}")
        if not self.ended.done():
            self.ended.set_result(None)

    async def finish(self) -> None:
        """End the response in-band when the connection can take it."""
        self._streams.live.discard(self)
        self._streams.stalled.discard(self)
        writer = self._writer
        if writer is not None:
            # Stuck in a write: the stream cannot be ended in-band.
            self.cut = True
            writer.cancel()
        if self.cut:
            _cut_on_purpose.set(True)
            return
        if self.disconnected or self._send is None:
            return
        end = {"type": "http.response.body", "body": self.final, "more_body": False}
        try:
            async with asyncio.timeout(self._streams.send_timeout):
                await self._send(end)
        except TimeoutError:
            self.cut = True
            _cut_on_purpose.set(True)


class EventStream(Response):
    """The ASGI response of one client: head, replay, then live events."""

    def __init__(self, client: SseClient, head: list[bytes]) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(HEADERS)
        self._client = client
        self._head = head

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self._client
        listener: asyncio.Task[None] | None = None
        try:
            # The head through Starlette's middleware (CORS headers).
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": self.raw_headers,
                }
            )
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return

            # Then the stream, until the hub, the watchdog or the client
            # ends it.
            listener = asyncio.create_task(client.listen(receive))
            client.start(scope.get(RAW_SEND, send), self._head)
            await client.ended
            await client.finish()
        finally:
            if listener is not None:
                listener.cancel()
            client.close(DISCONNECTED)
        logger.debug(
            "connector %r: client %d left", client._streams.connector, client.id
        )


class _Resume:
    """Go on driving ``write``, which yielded ``pending`` to its caller.

    :meth:`SseClient.write_out` starts the server's ``send`` outside a task,
    so that a write that does not wait costs no task. When it does wait,
    the future it waits on came back from ``write.send(None)``; awaiting
    this hands that future, and whatever ``write`` waits on after it, to
    the awaiting task.

    """

    __slots__ = ("_pending", "_write")

    def __init__(self, write: Generator[Any, Any, None], pending: Any) -> None:
        self._write = write
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, None]:
        write, pending = self._write, self._pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # cancellation included: pass it on
                try:
                    pending = write.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = write.send(sent)
                except StopIteration:
                    return


def _body(data: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": True}
