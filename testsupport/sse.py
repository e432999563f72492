"""Reading Server-Sent Events streams in tests, with httpx.

``open_stream(url)`` connects and yields an :class:`SseStream` once the
response headers arrived (for Mycel's ``sse`` connector, the client is
subscribed by then). ``await stream.event()`` returns the next event and
keeps the comments seen on the way in ``stream.comments``.

"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

__all__ = ["SseEvent", "SseStream", "open_stream"]


@dataclass
class SseEvent:
    """One dispatched event, parsed as a browser would."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


@dataclass
class SseStream:
    """The events of one open response; see the module docstring."""

    response: httpx.Response
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    ended: bool = False

    def __post_init__(self) -> None:
        self._lines = self.response.aiter_lines()

    async def item(self, timeout: float = 5.0) -> SseEvent | str | None:
        """The next event or comment (a str), None at the end of the stream."""
        return await asyncio.wait_for(self._item(), timeout)

    async def event(self, timeout: float = 5.0) -> SseEvent:
        """The next event, skipping comments; AssertionError at the end."""
        while True:
            item = await self.item(timeout)
            if item is None:
                raise AssertionError("the stream ended")
            if isinstance(item, SseEvent):
                return item

    async def comment(self, timeout: float = 5.0) -> str:
        """The next comment, failing if an event comes first."""
        item = await self.item(timeout)
        if not isinstance(item, str):
            raise AssertionError(f"expected a comment, got {item!r}")
        return item

    async def rest(self, timeout: float = 5.0) -> list[SseEvent | str]:
        """Everything up to the end of the stream."""
        items: list[SseEvent | str] = []
        while (item := await self.item(timeout)) is not None:
            items.append(item)
        return items

    async def _item(self) -> SseEvent | str | None:
        data: list[str] = []
        event = "message"
        event_id: str | None = None
        retry: int | None = None
        seen = False
        async for line in self._lines:
            if line == "":
                if data:
                    if retry is not None:
                        self.retry = retry
                    return SseEvent("\n".join(data), event, event_id, retry)
                if retry is not None:
                    self.retry = retry
                    retry = None
                event, seen = "message", False
                continue
            if line.startswith(":"):
                if not seen:
                    comment = line[1:].removeprefix(" ")
                    self.comments.append(comment)
                    await self._skip_blank()
                    return comment
                continue
            seen = True
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id":
                event_id = value
            elif name == "retry" and value.isdigit():
                retry = int(value)
        self.ended = True
        return None

    async def _skip_blank(self) -> None:
        # A comment the server sends alone is followed by a blank line.
        async for line in self._lines:
            if line != "":
                raise AssertionError(f"unexpected line after a comment: {line!r}")
            return


@asynccontextmanager
async def open_stream(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    expect_status: int = 200,
) -> AsyncIterator[SseStream]:
    """GET ``url`` as an event stream; yield it once the headers arrived."""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client,
        client.stream(
            "GET", url, headers={"accept": "text/event-stream", **(headers or {})}
        ) as response,
    ):
        if response.status_code != expect_status:
            body = await response.aread()
            raise AssertionError(
                f"GET {url}: status {response.status_code}, body {body!r}"
            )
        yield SseStream(response)
