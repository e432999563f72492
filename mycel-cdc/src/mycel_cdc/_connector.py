"""The ``cdc`` connector: PostgreSQL changes into flows, in commit order.

Three tasks share one replication session:

- the reader polls the walsender socket, decodes pgoutput into events
  and queues them in batches, with a confirm mark (an LSN) after each
  commit and after each server keepalive received between transactions;
- the processor hands each event, in order, to every flow bound to its
  table and operation, and advances the confirmed position when it reaches
  a mark: only once everything before the mark has finished. Consecutive
  events for the same one flow into a target that takes batches (a
  database, RabbitMQ) are handed to it together, in order
  (``process_many(ordered=True)``), and the marks among them count once
  all of them are done;
- the status sender reports the confirmed position to the server soon
  after it moves (at most every 20 ms) and at least every
  ``status_interval`` (and the reader does so whenever the server asks),
  so that the connection stays up, the server can recycle WAL, also on a
  quiet database, and a restart after a crash repeats little.

When the session breaks (PostgreSQL restarts, the network drops), the
reader reconnects with capped exponential backoff and resumes from the
last confirmed position; events queued from the broken session are
dropped and arrive again. Delivery is therefore at-least-once.

A flow that gives up on an event: if the failure is permanent (a transform
that fails on this row, a target that rejects it), the event is logged at
ERROR, counted and kept in :attr:`CdcConnector.dead_letters`, and the
stream moves on. Any other failure is retried after a backoff (1s, doubling
to 30s) for as long as it takes, because skipping it would lose the change:
the slot does not advance meanwhile, so WAL accumulates on the server and
the replication lag metric grows.

In a cluster (a ``cluster`` block), several processes run this connector
with the same slot, and PostgreSQL lets one of them stream: the others
stand by, asking for the slot every second, and the first to get it after
the streaming process dies takes over from the confirmed position.

"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
from collections import deque
from typing import Any, ClassVar, Literal

import psycopg

from mycel import (
    Backoff,
    Connector,
    ConnectorError,
    Event,
    FlowError,
    Operation,
    Services,
    Settings,
    SourceBinding,
)

from ._pgoutput import Change, DecodeError, Decoder, format_lsn, relation_type_oids
from ._settings import (
    SOURCE_OPERATIONS,
    CdcSettings,
    qualified,
    split_operation,
    table_key,
)
from ._setup import TypeResolver, prepare, slot_in_use_message
from ._stream import ReplicationStream, StreamClosed

__all__ = ["CdcConnector"]

logger = logging.getLogger("mycel.cdc")

_XLOG_HEAD = struct.Struct(">Q")
_KEEPALIVE = struct.Struct(">QqB")
_BATCH = 512
_QUEUE_BATCHES = 64
_TAKE = 4 * _BATCH
"""Most changes the processor takes from the queue in one go: what is
queued when it gets there, so that under load a database gets longer runs."""
_RETRY_FIRST = 1.0
_RETRY_MAX = 30.0
_RECONNECT_FIRST = 0.5
_RECONNECT_MAX = 30.0
_ROW_OPERATIONS = ("INSERT", "UPDATE", "DELETE")
_FEEDBACK_GAP = 0.02
"""Least time between two status updates: a moving position is reported
about this often, so that a restart after a crash repeats little."""


def _default_name(connector: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in connector.lower())
    return f"mycel_{cleaned}"[:63]


class CdcConnector(Connector):
    """PostgreSQL change data capture; see the module docstring."""

    type_name = "cdc"
    settings_model = CdcSettings
    source_operations: ClassVar[tuple[Operation, ...]] = SOURCE_OPERATIONS
    ordered = True

    def __init__(self, name: str, settings: Settings, services: Services) -> None:
        super().__init__(name, settings, services)
        assert isinstance(settings, CdcSettings)
        self._settings: CdcSettings = settings
        self.slot = settings.slot_name or _default_name(name)
        """The replication slot this connector reads."""
        self.publication = settings.publication or _default_name(name)
        """The publication that selects the tables."""
        self.dead_letters: deque[tuple[str, dict[str, Any], str]] = deque(maxlen=1000)
        """(flow, event, error) of changes skipped after a permanent failure."""
        self.confirmed = 0
        """The LSN up to which every change has been handled."""
        self._received = 0
        self._server_end = 0
        self._types = TypeResolver(settings.connection_string)
        self._decoder = Decoder(self._route, self._types.converter)
        self._routes: dict[str, dict[str, list[SourceBinding]]] = {}
        self._context = {"connector": name, "slot": self.slot}
        self._stream: ReplicationStream | None = None
        self._queue: asyncio.Queue[tuple[int, list[Change | int]]] = asyncio.Queue(
            _QUEUE_BATCHES
        )
        self._generation = 0
        self._stopping = asyncio.Event()
        self._stop_requested = False
        self._advanced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._standby: asyncio.Task[None] | None = None
        """In a cluster: waits for the slot, then starts the tasks."""
        self._sources_started = asyncio.Event()
        self._lag = services.metrics.replication_lag.labels(name)

    @classmethod
    def check_binding(
        cls,
        settings: Settings,
        role: Literal["source", "target"],
        operation: str,
        options: Settings | None,
    ) -> list[str]:
        assert isinstance(settings, CdcSettings)
        if role != "source":
            return []
        table, _ = split_operation(operation)
        listed = {table_key(*qualified(t)) for t in settings.tables}
        if table_key(*qualified(table)) not in listed:
            return [
                f"table {table!r} is not in the connector's tables "
                f"({', '.join(settings.tables)}); add it to tables"
            ]
        return []

    def describe(self) -> dict[str, Any]:
        shown = dict(super().describe())
        shown["connection_string"] = _redacted(self._settings.connection_string)
        return shown

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Check the server, create publication and slot, open the stream.

        In a cluster, the slot may be held by another process: this one
        then stands by (see :meth:`_stand_by`) instead of failing.

        """
        if self.services.backplane is not None:
            self._standby = asyncio.create_task(
                self._stand_by(), name=f"cdc-standby-{self.name}"
            )
            return
        await self._acquire()

    async def _acquire(self) -> None:
        """Prepare the server and open the stream from the slot."""
        settings = self._settings
        try:
            async with await psycopg.AsyncConnection.connect(
                settings.connection_string, autocommit=True
            ) as conn:
                state = await prepare(
                    conn,
                    tables=settings.tables,
                    publication=self.publication,
                    slot=self.slot,
                    status_interval=settings.status_interval,
                )
        except psycopg.OperationalError as exc:
            raise ConnectorError(
                f"connector {self.name!r}: cannot connect to PostgreSQL: "
                f"{str(exc).strip()}"
            ) from exc
        except ConnectorError as exc:
            raise ConnectorError(f"connector {self.name!r}: {exc}") from exc
        self.confirmed = state.confirmed
        try:
            self._stream = await self._open_stream(first=True)
        except StreamClosed as exc:
            raise ConnectorError(
                f"connector {self.name!r}: cannot start replication: {exc}"
            ) from exc
        logger.info(
            "connector %r: streaming %s through slot %r from %s",
            self.name,
            ", ".join(settings.tables),
            self.slot,
            format_lsn(self.confirmed),
        )

    async def _stand_by(self) -> None:
        """Wait for the slot, then stream; a cluster's other processes wait too.

        PostgreSQL lets one consumer use a slot at a time, so it elects the
        process that streams: when that one dies, its WAL sender lets go and
        the first standby to ask takes over, from the confirmed position.

        """
        backoff = Backoff(first=1.0)
        announced = False
        while True:
            try:
                await self._acquire()
                break
            except ConnectorError as exc:
                if "is in use by another consumer" in str(exc):
                    if not announced:
                        logger.info(
                            "connector %r: slot %r is held by another process; "
                            "standing by",
                            self.name,
                            self.slot,
                        )
                        announced = True
                    await asyncio.sleep(1.0)
                    continue
                logger.warning(
                    "connector %r: cannot stream yet, retrying in %.0fs: %s",
                    self.name,
                    backoff.delay,
                    exc,
                )
                await backoff.wait()
        if announced:
            logger.warning(
                "connector %r: took over slot %r from %s",
                self.name,
                self.slot,
                format_lsn(self.confirmed),
            )
        await self._sources_started.wait()
        self._start_tasks()

    async def start_sources(self) -> None:
        if self._standby is not None:
            self._sources_started.set()  # the standby task starts them
            return
        self._start_tasks()

    def _start_tasks(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"cdc-read-{self.name}"),
            asyncio.create_task(self._process_loop(), name=f"cdc-process-{self.name}"),
            asyncio.create_task(self._status_loop(), name=f"cdc-status-{self.name}"),
        ]

    async def stop_sources(self) -> None:
        """Stop reading; the change being processed still finishes."""
        if self._standby is not None and not self._standby.done():
            self._standby.cancel()
            await asyncio.gather(self._standby, return_exceptions=True)
        self._stopping.set()
        self._stop_requested = True
        if self._tasks:
            reader = self._tasks[0]
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def close(self) -> None:
        """Report the confirmed position one last time and disconnect."""
        self._stopping.set()
        self._stop_requested = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        stream, self._stream = self._stream, None
        if stream is not None:
            if not stream.closed:
                try:
                    await stream.send_status(self._received, self.confirmed)
                except StreamClosed as exc:
                    logger.warning(
                        "connector %r: could not report the final position: %s",
                        self.name,
                        exc,
                    )
            await stream.close()

    # -- routing --------------------------------------------------------------

    def bind_source(self, binding: SourceBinding) -> None:
        super().bind_source(binding)
        table, kind = split_operation(binding.operation)
        per_table = self._routes.setdefault(table_key(*qualified(table)), {})
        kinds = _ROW_OPERATIONS if kind == "*" else (kind,)
        for each in kinds:
            per_table.setdefault(each, []).append(binding)

    def _route(self, schema: str, name: str) -> dict[str, list[SourceBinding]]:
        return self._routes.get(table_key(schema, name), {})

    # -- the stream -----------------------------------------------------------

    async def _open_stream(self, *, first: bool = False) -> ReplicationStream:
        """Connect and START_REPLICATION from the confirmed position."""
        try:
            stream = await ReplicationStream.open(self._settings.connection_string)
        except psycopg.OperationalError as exc:
            raise StreamClosed(str(exc).strip()) from exc
        try:
            await stream.start(self.slot, self.publication, self.confirmed)
        except StreamClosed as exc:
            await stream.close()
            if first and "is active for PID" in str(exc):
                pid = str(exc).rsplit(" ", 1)[-1]
                raise ConnectorError(
                    f"connector {self.name!r}: {slot_in_use_message(self.slot, pid)}"
                ) from exc
            raise
        self._generation += 1
        self._decoder.reset()
        return stream

    async def _read_loop(self) -> None:
        delay = _RECONNECT_FIRST
        while True:
            # Connect again after a broken session, backing off while it fails.
            if self._stream is None:
                try:
                    self._stream = await self._open_stream()
                except StreamClosed as exc:
                    wait = delay * random.uniform(0.8, 1.0)
                    logger.warning(
                        "connector %r: cannot resume replication (%s); "
                        "retrying in %.1fs",
                        self.name,
                        exc,
                        wait,
                    )
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, _RECONNECT_MAX)
                    continue
                logger.info(
                    "connector %r: replication resumed from %s",
                    self.name,
                    format_lsn(self.confirmed),
                )
                delay = _RECONNECT_FIRST

            # Read until the session breaks; pause before reconnecting only
            # when the cause was not the connection (it would recur at once).
            stream = self._stream
            pause = 0.0
            try:
                await self._pump(stream)
            except StreamClosed as exc:
                logger.warning(
                    "connector %r: replication stream lost: %s", self.name, exc
                )
            except DecodeError as exc:
                logger.error(
                    "connector %r: cannot decode the replication stream: %s",
                    self.name, exc,
                )  # fmt: skip
                pause = delay
            except Exception as exc:  # top of the task loop: never die silently
                logger.error(
                    "connector %r: replication failed", self.name, exc_info=exc
                )
                pause = delay
            self._stream = None
            await stream.close()
            if pause:
                await asyncio.sleep(pause)
                delay = min(delay * 2, _RECONNECT_MAX)

    async def _pump(self, stream: ReplicationStream) -> None:
        decoder = self._decoder
        generation = self._generation
        queue = self._queue
        batch: list[Change | int] = []
        while True:
            data = stream.poll()
            if data is None:
                if batch:
                    await queue.put((generation, batch))
                    batch = []
                await stream.wait()
                continue
            tag = data[0]
            if tag == 119:  # "w": XLogData
                (lsn,) = _XLOG_HEAD.unpack_from(data, 1)
                self._received = max(self._received, lsn)
                body = bytes(data[25:])
                if body[0] == 82:  # "R": resolve its column types first
                    await self._types.resolve(relation_type_oids(body))
                decoder.decode(body, lsn, batch)
                if len(batch) >= _BATCH:
                    await queue.put((generation, batch))
                    batch = []
                    # A backlog never makes the socket wait: let the other
                    # tasks (and connectors) run between batches.
                    await asyncio.sleep(0)
            elif tag == 107:  # "k": keepalive
                wal_end, _, reply = _KEEPALIVE.unpack_from(data, 1)
                self._server_end = max(self._server_end, wal_end)
                self._received = max(self._received, wal_end)
                if not decoder.in_transaction:
                    # Everything up to wal_end has been sent: once what is
                    # queued before this mark is done, it is all done.
                    batch.append(wal_end)
                if reply:
                    await self._send_status(stream)

    async def _process_loop(self) -> None:
        queue = self._queue
        held: tuple[int, list[Change | int]] | None = None
        while True:
            generation, batch = held or await queue.get()
            held = None
            # Flows that finish without waiting would never let the loop
            # run otherwise: yield once per batch.
            await asyncio.sleep(0)

            # Take along what else is queued from the same session.
            while len(batch) < _TAKE and not queue.empty():
                more = queue.get_nowait()
                if more[0] != generation:
                    held = more
                    break
                batch += more[1]
            if not await self._process(generation, batch):
                return

    async def _process(self, generation: int, batch: list[Change | int]) -> bool:
        """Run the flows of the changes in ``batch``; False once stopping.

        Consecutive changes for the same one flow into a target that takes
        batches (a database, RabbitMQ) go to it together, as a run; a mark
        met inside a run counts once the run is done.
        """
        run: list[Event] = []
        runner: SourceBinding | None = None
        mark = 0
        for item in batch:
            if generation != self._generation:
                return True  # from a broken session: it is being sent again
            if isinstance(item, int):
                if run:
                    mark = item
                else:
                    self._confirm(item)
                continue
            if self._stop_requested:
                return False
            payload, targets = item
            event = Event(payload, self._context)
            if run:
                if len(targets) == 1 and targets[0] is runner:
                    run.append(event)
                    continue
                assert runner is not None
                await self._run_many(runner, run, mark)
                run, runner, mark = [], None, 0
            if len(targets) == 1:
                binding = targets[0]
                if binding.handle.batches:
                    run, runner = [event], binding
                    continue
                # The common case, inline: one flow that succeeds.
                try:
                    await binding.handle.process(event)
                except FlowError as exc:
                    await self._failed(binding, event, exc)
                except Exception as exc:  # a bug below: never die silently
                    await self._failed(binding, event, _as_flow_error(binding, exc))
            else:
                await asyncio.gather(*(self._run(b, event) for b in targets))
        if run and generation == self._generation and not self._stop_requested:
            assert runner is not None
            await self._run_many(runner, run, mark)
        return True

    def _confirm(self, mark: int) -> None:
        """Everything up to ``mark`` is done: let the status sender say so."""
        if mark > self.confirmed:
            self.confirmed = mark
            if not self._advanced.is_set():
                self._advanced.set()

    async def _run_many(
        self, binding: SourceBinding, events: list[Event], mark: int
    ) -> None:
        """Run one flow for a run of changes, in order; then confirm ``mark``."""
        try:
            outcomes = await binding.handle.process_many(events, ordered=True)
        except Exception as exc:  # a bug below: never die silently
            outcomes = [_as_flow_error(binding, exc)] * len(events)
        for event, outcome in zip(events, outcomes, strict=True):
            if outcome is not None:
                await self._failed(binding, event, outcome)
        self._confirm(mark)

    async def _run(self, binding: SourceBinding, event: Event) -> None:
        """Run one flow for one change until it succeeds or fails for good."""
        try:
            await binding.handle.process(event)
        except FlowError as exc:
            await self._failed(binding, event, exc)
        except Exception as exc:  # a bug below: never die silently
            await self._failed(binding, event, _as_flow_error(binding, exc))

    async def _failed(
        self, binding: SourceBinding, event: Event, error: FlowError
    ) -> None:
        """Apply the failure policy (see the module docstring) to a change."""
        delay = _RETRY_FIRST
        while True:
            where = _where(event.input)
            if error.permanent:
                logger.error(
                    "connector %r: flow %r failed permanently on %s; skipped it: %s",
                    self.name, binding.flow, where, error.reason,
                )  # fmt: skip
                self.dead_letters.append((binding.flow, event.input, str(error)))
                return
            logger.error(
                "connector %r: flow %r failed on %s; trying again in %.0fs "
                "(the slot waits meanwhile): %s",
                self.name, binding.flow, where, delay, error.reason,
            )  # fmt: skip

            # Wait, unless shutting down: then the change is left unconfirmed
            # and comes again on the next start.
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                pass
            else:
                raise asyncio.CancelledError
            delay = min(delay * 2, _RETRY_MAX)
            try:
                await binding.handle.process(event)
                return
            except FlowError as exc:
                error = exc
            except Exception as exc:  # a bug below: never die silently
                error = _as_flow_error(binding, exc)

    async def _status_loop(self) -> None:
        # Report soon after the position moves, and every status_interval
        # regardless, so that the server never waits too long for word.
        interval = self._settings.status_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), interval)
            self._advanced.clear()
            stream = self._stream
            if stream is not None and not stream.closed:
                try:
                    await self._send_status(stream)
                except StreamClosed as exc:
                    logger.debug("connector %r: status not sent: %s", self.name, exc)
            await asyncio.sleep(min(_FEEDBACK_GAP, interval))

    async def _send_status(self, stream: ReplicationStream) -> None:
        await stream.send_status(max(self._received, self.confirmed), self.confirmed)
        self._lag.set(max(0, self._server_end - self.confirmed))


def _as_flow_error(binding: SourceBinding, exc: Exception) -> FlowError:
    logger.error("flow %r raised unexpectedly", binding.flow, exc_info=exc)
    return FlowError(binding.flow, f"{type(exc).__name__}: {exc}")


def _where(payload: dict[str, Any]) -> str:
    return (
        f"{payload.get('_operation')} of {payload.get('_table')!r} "
        f"at {payload.get('_lsn')}"
    )


def _redacted(conninfo: str) -> str:
    from mycel import redact_url

    if "://" in conninfo:
        return redact_url(conninfo)
    return " ".join(
        "password=***" if part.startswith("password=") else part
        for part in conninfo.split()
    )
