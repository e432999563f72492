"""Fixtures and helpers for the mycel-graphql tests.

``graphql_js_client`` runs the Node.js scripts in ``mycel-graphql/tests/js`` (the
reference ``graphql-ws`` client, and a raw ``ws`` script speaking the older
``graphql-ws`` subprotocol) and hands their JSON lines to the test.
``RawSocket`` speaks either subprotocol by hand, for the close codes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from testsupport.base import ROOT, service_unavailable

JS_DIR = ROOT / "mycel-graphql" / "tests" / "js"


class NodeProcess:
    """A running Node.js script; ``await line()`` gives its next JSON line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not raw:
            stderr = b""
            if self.process.stderr is not None:
                stderr = await self.process.stderr.read()
            raise AssertionError(f"node exited: {stderr.decode(errors='replace')}")
        return json.loads(raw)  # type: ignore[no-any-return]

    async def wait(self, timeout: float = 10.0) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)


@pytest.fixture
def graphql_js_client() -> Callable[..., Any]:
    """``async with graphql_js_client("subscribe.mjs", {...}) as proc:``."""
    node = shutil.which("node")
    if node is None:
        service_unavailable("Node.js")
    if not (JS_DIR / "node_modules" / "graphql-ws").is_dir():
        service_unavailable(f"the npm packages of {JS_DIR} (run npm install there)")

    @asynccontextmanager
    async def start(script: str, args: dict[str, Any]) -> AsyncIterator[NodeProcess]:
        process = await asyncio.create_subprocess_exec(
            str(node),
            str(JS_DIR / script),
            json.dumps(args),
            cwd=JS_DIR,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            yield NodeProcess(process)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    return start


class RawSocket:
    """A WebSocket speaking a GraphQL subprotocol by hand, for protocol tests."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    async def send(self, message: Any) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        await self.connection.send(text)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        text = await asyncio.wait_for(self.connection.recv(), timeout)
        return json.loads(text)  # type: ignore[no-any-return]

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """Wait for the server to close; return its close code and reason."""
        await asyncio.wait_for(self.connection.wait_closed(), timeout)
        received = self.connection.protocol.close_rcvd
        if received is None:
            return None, ""
        return received.code, received.reason

    async def init(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        await self.send({"type": "connection_init", "payload": params or {}})
        return await self.recv()


@asynccontextmanager
async def raw_socket(
    url: str, protocol: str | None = "graphql-transport-ws"
) -> AsyncIterator[RawSocket]:
    import websockets

    subprotocols = [protocol] if protocol else None
    async with websockets.connect(url, subprotocols=subprotocols) as connection:  # type: ignore[arg-type]
        yield RawSocket(connection)


def js_dir() -> Path:
    return JS_DIR
