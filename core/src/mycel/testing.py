"""Helpers for testing connectors and flows.

A plugin author tests a connector inside a real flow::

    from mycel.testing import running

    async def test_orders_reach_my_target():
        config = '''
        connector "in"  { type = "memory" }
        connector "out" { type = "foo"  url = "..." }
        flow "f" {
          from { connector = "in"  operation = "orders" }
          to   { connector = "out" target = "x" }
        }
        '''
        async with running(config, plugins=[my_plugin]) as app:
            await app.publish("in", "orders", {"id": 1})
            ...

The installed plugins (entry points) are loaded as well, so a test of an
installed distribution needs no ``plugins`` argument.

"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ._config import Config, load_config, load_config_text
from ._connector import Connector
from ._memory import MemoryConnector
from ._plugins import PluginRegistry, load_plugins
from ._runtime import Runtime

__all__ = [
    "App",
    "eventually",
    "free_port",
    "load_test_config",
    "registry",
    "running",
]


def registry(
    plugins: Iterable[object] = (), *, entry_points: bool = True
) -> PluginRegistry:
    """Plugins for a test: the installed ones plus ``plugins``."""
    extra = [(getattr(p, "__name__", repr(p)), p) for p in plugins]
    return load_plugins(extra, entry_point_group="mycel" if entry_points else None)


def load_test_config(
    config: str | Path,
    *,
    plugins: Iterable[object] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load configuration text, or a directory, with the test's plugins."""
    reg = registry(plugins)
    if isinstance(config, Path):
        return load_config(config, reg, environ)
    return load_config_text(config, reg, environ, file="test.mycel")


class App:
    """A started runtime, with shortcuts for tests."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def connector(self, name: str) -> Connector:
        return self.runtime.connectors[name]

    def memory(self, name: str) -> MemoryConnector:
        connector = self.runtime.connectors[name]
        assert isinstance(connector, MemoryConnector), f"{name!r} is not memory"
        return connector

    async def publish(self, connector: str, topic: str, payload: Any) -> None:
        """Publish on a memory connector, as a source event."""
        await self.memory(connector).publish(topic, payload)

    def listen(
        self, connector: str, pattern: str = "#"
    ) -> asyncio.Queue[tuple[str, Any]]:
        """Everything published on a memory connector's matching topics."""
        return self.memory(connector).listen(pattern)


@asynccontextmanager
async def running(
    config: str | Path | Config,
    *,
    plugins: Iterable[object] = (),
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[App]:
    """Start a runtime for the test's duration; stop it afterwards."""
    if not isinstance(config, Config):
        config = load_test_config(config, plugins=plugins, environ=environ)
    runtime = Runtime(config)
    await runtime.start()
    try:
        yield App(runtime)
    finally:
        await runtime.stop(timeout=5.0)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    interval: float = 0.01,
) -> None:
    """Wait until ``check()`` is true; AssertionError after ``timeout``.

    For conditions that no event announces (a row in a database, a count in
    another process). Prefer waiting on a queue or an event where one exists.

    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def write_config(text: str, directory: Path | None = None) -> Path:
    """Write ``text`` as main.mycel in a new temporary folder; return it."""
    folder = Path(directory or tempfile.mkdtemp(prefix="mycel-"))
    (folder / "main.mycel").write_text(text, encoding="utf-8")
    return folder
