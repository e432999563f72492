"""Fixtures and helpers for the WebSocket connector's tests (mycel-ws)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mycel.testing import free_port

TIMEOUT = 5.0


def ws_config(port: int, settings: str = "", flows: str = "") -> str:
    """A configuration with a memory connector "mem" and a websocket "ws"."""
    return f"""
    connector "mem" {{ type = "memory" }}
    connector "ws" {{
      type = "websocket"
      port = {port}
      {settings}
    }}
    {flows}
    """


async def receive(client: Any, timeout: float = TIMEOUT) -> Any:
    """The next frame a websockets client receives, decoded from JSON."""
    async with asyncio.timeout(timeout):
        return json.loads(await client.recv())


async def next_item(queue: asyncio.Queue[Any], timeout: float = TIMEOUT) -> Any:
    """The next item of an asyncio queue, or TimeoutError."""
    async with asyncio.timeout(timeout):
        return await queue.get()


__all__ = ["TIMEOUT", "free_port", "next_item", "receive", "ws_config"]
