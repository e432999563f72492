"""The ``example`` connector: a timer source and a JSON-lines file target.

It is small on purpose, but it follows every rule a real connector follows,
so that a plugin started from this template starts right:

- As a source, ``operation = "tick"`` hands ``{"tick": N}`` to its flows
  every ``interval``. A tick counts as done (the counter moves on) only
  after ``handle.process`` returned: that is the at-least-once rule, where a
  broker connector would acknowledge a message instead. When the flow gives
  up on a tick, a permanent failure skips it (logged at ERROR) and any other
  failure sends the same tick again at the next interval.
- As a target, ``operation = "append"`` writes each payload as one JSON line
  to the file named by ``target``, inside ``directory``. Returning from
  :meth:`ExampleConnector.deliver` means the line was written; a payload
  that is not JSON, or a target outside ``directory``, raises a permanent
  :class:`mycel.DeliveryError`.

Known limitations: the tick counter lives in memory and starts again from 1
when the process restarts; the file target does not rotate or ``fsync``.

"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

import mycel

__all__ = ["ExampleConnector", "ExampleSettings"]

logger = logging.getLogger("mycel.example")


class ExampleSettings(mycel.Settings):
    """Settings of ``type = "example"``."""

    interval: mycel.Duration = Field(default=1.0, gt=0)
    """Time between two ticks, such as ``"500ms"`` or ``"5s"``."""

    limit: int | None = Field(default=None, ge=1)
    """Stop ticking after this many ticks; unset: tick until shutdown."""

    directory: str = "."
    """Folder the ``append`` targets are written in, relative to the
    configuration directory; a target outside it is refused."""


class ExampleConnector(mycel.Connector):
    """A timer source and a JSON-lines file target; see the module docstring."""

    type_name = "example"
    settings_model = ExampleSettings
    source_operations = (mycel.Operation("tick", '{"tick": N} every interval'),)
    target_operations = (
        mycel.Operation("append", "write the payload as a JSON line to `target`"),
    )
    default_operation = "append"
    target_required = True
    ordered = True  # each flow gets its ticks one at a time, in order

    def __init__(
        self, name: str, settings: mycel.Settings, services: mycel.Services
    ) -> None:
        # No I/O here: `mycel validate` creates connectors too.
        super().__init__(name, settings, services)
        assert isinstance(settings, ExampleSettings)
        self._settings = settings
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._locks: dict[Path, asyncio.Lock] = {}
        self._directory = (services.base_dir / settings.directory).resolve()

    async def start(self) -> None:
        # A real connector connects here, and raises mycel.ConnectorError
        # with a clear message when it cannot.
        if not self._directory.is_dir():
            raise mycel.ConnectorError(
                f"connector {self.name!r}: directory {str(self._directory)!r} "
                "does not exist"
            )

    async def start_sources(self) -> None:
        for binding in self.bindings:
            self._tasks.append(asyncio.create_task(self._tick(binding)))

    async def stop_sources(self) -> None:
        # Take no new events, but let a tick whose flow is running finish:
        # the runtime waits for in-flight events after this returns.
        self._stopping.set()

    async def close(self) -> None:
        # In-flight events have drained (or the shutdown timeout ran out).
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _tick(self, binding: mycel.SourceBinding) -> None:
        number = 1
        limit = self._settings.limit
        while limit is None or number <= limit:
            if await self._stopped_within(self._settings.interval):
                return
            event = mycel.Event({"tick": number}, {"at": time.time()})
            try:
                await binding.handle.process(event)
            except mycel.FlowError as exc:
                if not exc.permanent:
                    # Not done: the same tick goes out again next time.
                    logger.warning("tick %d will be sent again: %s", number, exc)
                    continue
                logger.error("tick %d skipped: %s", number, exc)
            number += 1

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True if the sources were stopped meanwhile."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def deliver(self, delivery: mycel.Delivery) -> None:
        # Check what a retry cannot fix first, and say so: permanent=True.
        assert delivery.target is not None
        path = (self._directory / delivery.target).resolve()
        if not path.is_relative_to(self._directory):
            raise mycel.DeliveryError(
                f"target {delivery.target!r} is outside {str(self._directory)!r}",
                permanent=True,
            )
        try:
            line = json.dumps(delivery.payload, separators=(",", ":")) + "\n"
        except (TypeError, ValueError) as exc:
            raise mycel.DeliveryError(
                f"payload is not JSON: {exc}", permanent=True
            ) from exc

        # File writes block, so they run in a thread; one lock per file
        # keeps concurrent lines whole.
        lock = self._locks.setdefault(path, asyncio.Lock())
        async with lock:
            try:
                await asyncio.to_thread(_append, path, line)
            except OSError as exc:
                raise mycel.DeliveryError(f"cannot write {str(path)!r}: {exc}") from exc
        logger.debug("appended to %s for flow %r", path, delivery.flow)


def _append(path: Path, line: str) -> Any:
    with path.open("a", encoding="utf-8") as file:
        return file.write(line)
