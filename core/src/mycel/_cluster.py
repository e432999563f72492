"""Several Mycel processes sharing one delivery fabric.

With a ``cluster { backplane = "redis://..." }`` block, every fan-out
``to`` (WebSocket, SSE, GraphQL) is published once to the backplane, and
every process delivers it to its own subscribers, evaluating the filters
there. A client connected to any process receives each matching event
exactly once, because each process hears each message once and each client
is connected to one process.

The backplane is an existing distributed engine, never something of ours:
a plugin provides it for a URL scheme through the ``mycel_backplanes`` hook
(the ``mycel-cluster`` distribution provides Redis). It also keeps the
replay history of SSE streams, so that a client that reconnects to another
process still gets what it missed, and connectors may use it for anything
else that must be shared.

Messages cross the backplane as JSON; ``Decimal`` values keep their exact
value. Only the event, the payload, the topic and the name of the ``to``
block travel: each process finds the filter and the options of that block
in its own, identical, configuration.

Known limitations: a message published while the backplane is unreachable
is kept in a bounded queue (``buffer`` messages) and sent when it comes
back; past that, the oldest are dropped and counted. Fan-out to connected
clients is best-effort by nature; at-least-once sources are unaffected.

"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from ._backoff import Backoff
from ._hub import Hub, Message
from ._settings import Settings

if TYPE_CHECKING:
    from ._connector import Filter
    from ._metrics import Metrics

__all__ = [
    "Backplane",
    "ClusterSettings",
    "ClusteredHub",
    "ToBlock",
    "decode",
    "encode",
]

logger = logging.getLogger("mycel.cluster")

_PUBLISH_BATCH = 256
"""Most messages a hub hands to :meth:`Backplane.publish_many` at once."""


class ClusterSettings(Settings):
    """The optional top-level ``cluster { ... }`` block."""

    backplane: str
    """URL of the shared backplane, e.g. ``redis://127.0.0.1:6379/0``."""

    namespace: str = "mycel"
    """Prefix of every key and channel, so clusters can share a backplane."""

    buffer: int = Field(default=10_000, ge=1)
    """Messages kept while the backplane is unreachable."""


class Backplane(ABC):
    """What Mycel needs of a shared engine; implemented by plugins.

    Implementations are given the URL and the namespace, and must prefix
    every key and channel with the namespace. Each method may raise
    ``OSError`` or :class:`~mycel.errors.ConnectorError` when the engine is
    unreachable; the callers retry.

    """

    schemes: ClassVar[tuple[str, ...]] = ()
    """URL schemes this implementation serves, e.g. ``("redis", "rediss")``."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace

    @abstractmethod
    async def connect(self) -> None:
        """Connect; raise if the engine cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect and stop every subscription."""

    @abstractmethod
    async def publish(self, channel: str, data: bytes) -> None:
        """Send ``data`` to every process subscribed to ``channel``."""

    async def publish_many(self, channel: str, items: Sequence[bytes]) -> None:
        """Send each of ``items``, in order, as :meth:`publish` would.

        The hub hands over whatever queued up while its previous send was
        on the way, so that a burst costs one round trip rather than one
        per message, and arrives at the other processes together (where
        their clients then get it in fewer writes). This default publishes
        one by one; an engine that can do better (Redis pipelining) should
        override it. If it raises, a prefix of ``items`` may have gone out:
        the hub sends them all again.

        """
        for data in items:
            await self.publish(channel, data)

    @abstractmethod
    async def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> None:
        """Call ``callback`` (on the event loop) for every message on it.

        The subscription survives reconnects; messages published while a
        process was disconnected are not replayed to it.

        """

    @abstractmethod
    async def history_append(
        self, stream: str, data: bytes, maxlen: int, ttl: float | None
    ) -> str:
        """Append to a bounded shared log; return the new entry's id.

        Ids increase along the log, and compare as text when padded the
        way the implementation documents.

        """

    @abstractmethod
    def history_follow(
        self, stream: str, after_id: str
    ) -> AsyncIterator[list[tuple[str, bytes]]]:
        """Entries after ``after_id`` in batches, oldest first, then new ones.

        Waits for new entries when there are none; never ends on its own.
        ``after_id="0-0"`` starts with everything still retained.

        """

    @abstractmethod
    async def history_since(
        self, stream: str, last_id: str
    ) -> list[tuple[str, bytes]] | None:
        """Entries after ``last_id``, oldest first.

        ``None`` when ``last_id`` is older than the retained log (the
        caller cannot know what it missed).

        """


# JSON that keeps exact decimals and bytes.


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"cannot send {type(value).__name__} across the backplane")


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        if "$decimal" in obj:
            return Decimal(obj["$decimal"])
        if "$bytes" in obj:
            return base64.b64decode(obj["$bytes"])
    return obj


def encode(value: Any) -> bytes:
    return json.dumps(value, default=_default, separators=(",", ":")).encode()


def decode(data: bytes) -> Any:
    return json.loads(data, object_hook=_hook)


@dataclass(frozen=True)
class ToBlock:
    """What a process needs to deliver a fan-out message of one ``to``."""

    key: str
    flow: str
    filter: Filter | None
    options: Any


class ClusteredHub(Hub):
    """A hub whose publishes go through the backplane; see the module.

    :meth:`publish` returns 0: delivery happens when the message comes back
    from the backplane, on this process and every other one.

    """

    def __init__(
        self,
        name: str,
        metrics: Metrics | None,
        backplane: Backplane,
        blocks: Mapping[str, ToBlock],
        buffer: int = 10_000,
    ) -> None:
        super().__init__(name, metrics)
        self.backplane = backplane
        self._blocks = dict(blocks)
        self._by_identity = {
            (b.flow, id(b.filter), id(b.options)): b.key for b in blocks.values()
        }
        self._channel = f"hub:{name}"
        self._outbox: deque[bytes] = deque(maxlen=buffer)
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.dropped = 0

    async def attach(self) -> None:
        """Subscribe to the backplane and start sending; before sources run."""
        await self.backplane.subscribe(self._channel, self._receive)
        self._writer = asyncio.create_task(self._write())

    async def detach(self) -> None:
        """Send what is queued (briefly), then stop."""
        if self._writer is None:
            return
        self._wake.set()
        deadline = asyncio.get_running_loop().time() + 2.0
        while self._outbox and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        self._writer = None

    def key_for(self, flow: str, filter: Filter | None, options: Any) -> str | None:
        """The name of the ``to`` block with this filter and options."""
        return self._by_identity.get((flow, id(filter), id(options)))

    def block(self, key: str) -> ToBlock:
        """The ``to`` block named ``key`` (KeyError if there is none)."""
        return self._blocks[key]

    def publish(
        self, topic: str | None, message: Message, filter: Filter | None = None
    ) -> int:
        key = self.key_for(message.flow, filter, message.options)
        if key is None:
            # Not from a configured to block (a test, an embedding): local only.
            return self.deliver(topic, message, filter)
        if len(self._outbox) == self._outbox.maxlen:
            self.dropped += 1
            logger.warning(
                "hub %r: backplane queue full, dropped the oldest message", self.name
            )
        self._outbox.append(
            encode({"t": topic, "i": message.input, "p": message.payload, "k": key})
        )
        self._wake.set()
        return 0

    async def _write(self) -> None:
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                batch = list(itertools.islice(self._outbox, _PUBLISH_BATCH))
                try:
                    await self.backplane.publish_many(self._channel, batch)
                except Exception as exc:  # the engine's client raises assorted types
                    logger.warning(
                        "hub %r: backplane publish failed, retrying in %.1fs: %s",
                        self.name,
                        backoff.delay,
                        exc,
                    )
                    await backoff.wait()
                    continue
                backoff.reset()
                # Drop what went out, unless a full outbox dropped it already.
                for data in batch:
                    if self._outbox and self._outbox[0] is data:
                        self._outbox.popleft()

    def _receive(self, data: bytes) -> None:
        try:
            record = decode(data)
            block = self._blocks[record["k"]]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning(
                "hub %r: ignored a message it cannot read: %s", self.name, exc
            )
            return
        message = Message(
            record["t"],
            record["i"],
            record["p"],
            flow=block.flow,
            options=block.options,
        )
        self.deliver(record["t"], message, block.filter)
