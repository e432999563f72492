"""The ``_bulk`` API: batching documents, resending, per-document results.

Deliveries hand :class:`Bulker` one bulk action each (an action line and,
for ``index`` and ``update``, a source line) and wait for that document's
own result. A background loop gathers the waiting actions into requests of
at most ``batch_size`` documents and ``batch_bytes`` bytes, with at most
``max_requests`` requests in flight: a lone document goes out at once, and
documents that arrive while requests are in flight go together in the next.

A request answered with 429 or a 5xx, or not answered at all, is sent
again after a pause that doubles each time; so are the documents that the
answer rejected with 429 or a 5xx. A document rejected for any other
reason (a mapping conflict, a missing document for ``update``) fails its
own delivery, permanently, with the server's reason; the others succeed.

"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from mycel import DeliveryError

from ._settings import ElasticsearchSettings

__all__ = ["Action", "BulkClient", "Bulker", "encode", "error_text"]

logger = logging.getLogger("mycel.elasticsearch")

_MAX_DELAY = 10.0


@dataclass
class Action:
    """One document's part of a bulk body, and who waits for it."""

    operation: str
    index: str
    id: str | None
    body: bytes
    future: asyncio.Future[None] = field(repr=False)

    def describe(self) -> str:
        if self.id is None:
            return f"index {self.index!r}"
        return f"index {self.index!r} document {self.id!r}"


class BulkClient:
    """HTTP to the cluster's nodes, in turn."""

    def __init__(
        self,
        settings: ElasticsearchSettings,
        client: httpx.AsyncClient,
        nodes: Sequence[str],
    ) -> None:
        self._client = client
        self._nodes = itertools.cycle([node.rstrip("/") for node in nodes])
        self._params = (
            {} if settings.refresh == "false" else {"refresh": settings.refresh}
        )

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self._client.request(method, next(self._nodes) + path, **kwargs)

    async def bulk(self, body: bytes) -> httpx.Response:
        return await self.request(
            "POST",
            "/_bulk",
            content=body,
            params=self._params,
            headers={"Content-Type": "application/x-ndjson"},
        )


class Bulker:
    """Gathers actions into bulk requests; see the module docstring."""

    def __init__(self, client: BulkClient, settings: ElasticsearchSettings) -> None:
        self._client = client
        self._settings = settings
        self._pending: deque[Action] = deque()
        self._pending_bytes = 0
        self._has_pending = asyncio.Event()
        self._full = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.max_requests)
        self._loop_task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[None]] = set()
        self.on_request: Callable[[], None] | None = None
        """Called for every bulk request sent, resends included."""

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="mycel-es-bulk")

    async def close(self) -> None:
        """Wait for the requests in flight, then stop (deliveries drained)."""
        if self._requests:
            await asyncio.gather(*self._requests, return_exceptions=True)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        _fail(self._pending, "the connector closed before sending it")
        self._pending.clear()

    async def submit(self, action: Action) -> None:
        """Queue one action; return once the cluster accepted the document."""
        if self._loop_task is None or self._loop_task.done():
            raise DeliveryError(f"{action.describe()}: the bulk sender is not running")
        self._pending.append(action)
        self._pending_bytes += len(action.body)
        self._has_pending.set()
        if (
            len(self._pending) >= self._settings.batch_size
            or self._pending_bytes >= self._settings.batch_bytes
        ):
            self._full.set()
        await action.future

    async def _run(self) -> None:
        settings = self._settings
        while True:
            await self._has_pending.wait()

            # With an interval, let a partial batch wait for company.
            if settings.flush_interval > 0 and not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), settings.flush_interval)

            # Take a batch once a request slot is free.
            await self._slots.acquire()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._send(batch))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    def _take(self) -> list[Action]:
        settings = self._settings
        batch: list[Action] = []
        size = 0
        while self._pending and len(batch) < settings.batch_size:
            action = self._pending[0]
            if batch and size + len(action.body) > settings.batch_bytes:
                break
            batch.append(self._pending.popleft())
            size += len(action.body)
        self._pending_bytes -= size
        if not self._pending:
            self._has_pending.clear()
        if (
            len(self._pending) < settings.batch_size
            and self._pending_bytes < settings.batch_bytes
        ):
            self._full.clear()
        return batch

    async def _send(self, batch: list[Action]) -> None:
        try:
            await self._send_with_retries(batch)
        except Exception as exc:  # top of a task: hand any bug to the waiters
            logger.error("bulk request failed unexpectedly", exc_info=exc)
            _fail(batch, f"bulk request failed: {exc!r}")
        finally:
            self._slots.release()

    async def _send_with_retries(self, batch: list[Action]) -> None:
        settings = self._settings
        delay = settings.retry_delay
        for attempt in range(settings.retries + 1):
            last = attempt == settings.retries
            batch = [a for a in batch if not a.future.done()]
            if not batch:
                return

            # One request; decide whether its answer can be read per item.
            reason = await self._send_once(batch)
            if reason is None:
                return
            again = [a for a in batch if not a.future.done()]
            if last:
                _fail(again, reason)
                return
            logger.warning(
                "bulk: %d of %d documents not accepted (%s); resending in %.2fs",
                len(again),
                len(batch),
                reason,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(_MAX_DELAY, delay * 2)
            batch = again

    async def _send_once(self, batch: list[Action]) -> str | None:
        """Send ``batch``; settle what is settled; the reason to resend, if any."""
        body = b"".join(action.body for action in batch)
        if self.on_request is not None:
            self.on_request()
        try:
            response = await self._client.bulk(body)
        except httpx.TransportError as exc:
            return f"no answer: {type(exc).__name__}: {exc}".rstrip(": ")
        status = response.status_code
        if status == 429 or status >= 500:
            return f"HTTP {status}: {error_text(response)}"
        if status >= 400:
            # The whole request was refused, not its documents (bad
            # credentials, say): a resend later may work, so not permanent.
            _fail(batch, f"HTTP {status}: {error_text(response)}")
            return None
        try:
            items = response.json()["items"]
        except (ValueError, KeyError, TypeError) as exc:
            _fail(batch, f"unreadable bulk answer: {exc}")
            return None
        if len(items) != len(batch):
            _fail(
                batch, f"bulk answer has {len(items)} items for {len(batch)} documents"
            )
            return None
        return _settle(batch, items)


def _settle(batch: list[Action], items: list[Any]) -> str | None:
    """Resolve each action from its item; the reason to resend some, if any."""
    resend: str | None = None
    for action, item in zip(batch, items, strict=True):
        result = next(iter(item.values())) if isinstance(item, dict) and item else {}
        status = result.get("status", 0) if isinstance(result, dict) else 0
        if 200 <= status < 300 or (action.operation == "delete" and status == 404):
            if not action.future.done():
                action.future.set_result(None)
            continue
        error = result.get("error") if isinstance(result, dict) else None
        text = _reason(error) or f"status {status}"
        if status == 429 or status >= 500:
            resend = f"status {status}: {text}"
            continue
        if not action.future.done():
            action.future.set_exception(
                DeliveryError(f"{action.describe()}: {text}", permanent=True)
            )
    return resend


def _reason(error: Any) -> str:
    if isinstance(error, dict):
        kind = error.get("type", "error")
        reason = error.get("reason", "")
        cause = error.get("caused_by")
        text = f"{kind}: {reason}" if reason else str(kind)
        if isinstance(cause, dict) and cause.get("reason"):
            text += f" ({cause.get('reason')})"
        return text
    return "" if error is None else str(error)


def error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return response.text[:200]
    return _reason(error) or response.text[:200]


def _fail(batch: Sequence[Action], reason: str) -> None:
    """Fail every unsettled action, transiently: a resend later may work."""
    for action in batch:
        if not action.future.done():
            action.future.set_exception(DeliveryError(f"{action.describe()}: {reason}"))


def encode(value: Any) -> bytes:
    """JSON for a bulk line: compact, with a newline."""
    text = json.dumps(value, separators=(",", ":"), default=_default, allow_nan=False)
    return text.encode() + b"\n"


def _default(value: Any) -> Any:
    # Types a CDC or database source hands over that JSON lacks.
    import datetime as dt
    import decimal
    import uuid

    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
