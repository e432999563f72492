"""Helpers of the end-to-end tests: ``mycel run`` as a child process, clients.

``MycelProcess`` writes a configuration to a folder, starts
``python -m mycel run DIR`` and waits for its ``started:`` log line; its
stderr keeps being read (and kept in ``log``) so the pipe never fills.
``kill()`` is a SIGKILL, ``stop()`` a SIGTERM that must exit 0.

The clients are the real ones: ``websockets`` for the WebSocket and
graphql-transport-ws servers, ``httpx`` streaming for SSE (through
``testsupport.sse``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from mycel.testing import eventually

TIMEOUT = 15.0


class MycelProcess:
    """One ``mycel run DIR`` child process."""

    def __init__(
        self,
        folder: Path,
        config: str,
        environ: Mapping[str, str] | None = None,
        *,
        admin_port: int | None = None,
    ) -> None:
        self.folder = folder
        self.config = config
        self.environ = dict(environ or {})
        self.admin_port = admin_port
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    async def start(self, timeout: float = 60.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "main.mycel").write_text(self.config)
        self._started = asyncio.Event()
        env = {**os.environ, **self.environ, "PYTHONUNBUFFERED": "1"}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mycel",
            "run",
            str(self.folder),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            limit=1 << 20,
        )
        self._reader = asyncio.create_task(self._read(self.process))
        waiter = asyncio.create_task(self._started.wait())
        exited = asyncio.create_task(self.process.wait())
        done, _ = await asyncio.wait(
            {waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        exited.cancel()
        if waiter not in done:
            await self.kill()
            raise AssertionError("mycel run did not start:\n" + self.text)

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            text = line.decode(errors="replace")
            self.log.append(text)
            if " started: " in text:
                self._started.set()

    @property
    def text(self) -> str:
        return "".join(self.log)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no drain, no acknowledgement, nothing."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                await self.kill()
                raise AssertionError(
                    "mycel run did not stop on SIGTERM:\n" + self.text
                ) from None
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        return self.process.returncode or 0

    async def metric(self, name: str, **labels: str) -> float:
        """A value from the admin port's /metrics (0 when absent)."""
        assert self.admin_port is not None
        async with httpx.AsyncClient(timeout=5) as client:
            text = (
                await client.get(f"http://127.0.0.1:{self.admin_port}/metrics")
            ).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def wait_metric(
        self, name: str, value: float, timeout: float = TIMEOUT, **labels: str
    ) -> None:
        async def reached() -> bool:
            return await self.metric(name, **labels) >= value

        await eventually(reached, timeout=timeout, interval=0.05)


async def ws_connect(url: str, **kwargs: Any) -> ClientConnection:
    return await websockets.connect(url, open_timeout=TIMEOUT, **kwargs)


async def ws_join(url: str, room: str, **kwargs: Any) -> ClientConnection:
    """Connect with ``?rooms=ROOM`` and wait for the ``joined`` frame."""
    sep = "&" if "?" in url else "?"
    client = await ws_connect(f"{url}{sep}rooms={room}", **kwargs)
    frame = json.loads(await asyncio.wait_for(client.recv(), TIMEOUT))
    assert frame == {"type": "joined", "room": room}, frame
    return client


async def ws_frame(client: ClientConnection, timeout: float = TIMEOUT) -> Any:
    return json.loads(await asyncio.wait_for(client.recv(), timeout))


class GqlClient:
    """A graphql-transport-ws client written against the protocol text."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.next_id = 0

    @classmethod
    async def open(cls, url: str, params: dict[str, Any]) -> GqlClient:
        connection = await ws_connect(url, subprotocols=["graphql-transport-ws"])  # type: ignore[list-item]
        client = cls(connection)
        await client.send({"type": "connection_init", "payload": params})
        ack = await client.recv()
        assert ack["type"] == "connection_ack", ack
        return client

    async def send(self, message: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(message))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        while True:
            message = json.loads(
                await asyncio.wait_for(self.connection.recv(), timeout)
            )
            if message.get("type") == "ping":
                await self.send({"type": "pong"})
                continue
            return message  # type: ignore[no-any-return]

    async def subscribe(self, query: str) -> str:
        self.next_id += 1
        ident = str(self.next_id)
        await self.send({"id": ident, "type": "subscribe", "payload": {"query": query}})
        return ident

    async def close(self) -> None:
        await self.connection.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
