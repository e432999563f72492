"""What the connector needs from a database driver, and row batching.

A driver (:mod:`._postgres`, :mod:`._sqlite`) learns a table's columns and
writes a batch of rows in one transaction. :class:`Batcher` gathers the
rows that concurrent deliveries write with the same statement and hands
them to the driver together: under load one round trip commits many rows,
while a lone row is written at once, never held back waiting for company.

Each delivery awaits its own row: it returns only once the transaction
holding the row committed. Rows that arrive together (the connector's
``deliver_many``) are handed over as one unit and awaited with one future.
When a batch fails for a reason tied to its data (a constraint, a value
the column refuses), its rows are written again one by one, so that the
error lands on the event that caused it and the other events of the batch
still get in.

"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mycel import DeliveryError

from ._statement import Statement, TableName

__all__ = ["Backend", "Batcher", "Column", "Converter", "TableInfo"]

logger = logging.getLogger("mycel.database")


@dataclass(frozen=True)
class Column:
    """One column of a table: its name and the driver's type name."""

    name: str
    type: str


@dataclass(frozen=True)
class TableInfo:
    """The columns of a table, in table order, and its primary key."""

    table: TableName
    columns: dict[str, Column]
    primary_key: tuple[str, ...] = ()


@dataclass(frozen=True)
class Converter:
    """How payload values are bound to one column.

    ``convert`` raises ValueError with a message saying what is wrong.
    A value whose type is one of ``exact`` (compared exactly, not with
    isinstance) is bound as it is without calling ``convert``: for those
    types ``convert`` would return the value unchanged.

    """

    convert: Callable[[Any], Any]
    exact: frozenset[type]


class Backend(Protocol):
    """A database driver, as the connector uses it."""

    placeholder: str
    max_batches: int
    """Batches of one statement that may be in flight at once."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def run_script(self, sql: str) -> None:
        """Run statements (``init_sql``) in one go."""

    async def table_info(self, table: TableName) -> TableInfo | None:
        """The table's columns, or None when there is no such table."""

    def converter(self, column: Column) -> Converter | None:
        """How a payload value is bound to ``column``; None: as it is."""

    async def write(
        self, statement: Statement, rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """Write all ``rows`` in one transaction, or none of them.

        Raises DeliveryError: ``permanent`` when the rows themselves are at
        fault (retrying them cannot help), otherwise transient.

        """


class _Unit:
    """Rows handed over together: they share one future and one batch."""

    __slots__ = ("future", "rows")

    def __init__(
        self,
        rows: Sequence[tuple[Any, ...]],
        future: asyncio.Future[list[BaseException | None]],
    ) -> None:
        self.rows = rows
        self.future = future


@dataclass
class _Queue:
    units: deque[_Unit] = field(default_factory=deque)
    running: int = 0


class Batcher:
    """Groups concurrent rows of one statement into shared transactions.

    Rows come in units (:meth:`write_many`): the rows of one unit go into
    the same transaction and the caller awaits one future for all of them,
    so a unit of 500 rows costs the event loop one wakeup, not 500.

    A caller that finds the backend with room for another batch writes it
    in its own task, until its own rows are written, and then leaves what
    queued up meanwhile to a drain task: the round trip starts at once
    rather than after every task already waiting to run (when many sources
    hand over batches at the same moment, that is the difference between
    the database working while the next batches are made and idling until
    all are). If that caller is cancelled mid-write, the rows of the batch
    it was writing fail with a transient error (whether they committed is
    unknown, so their flows retry them) and the rows behind go on.

    """

    def __init__(self, backend: Backend, batch_size: int) -> None:
        self._backend = backend
        self._batch_size = batch_size
        self._queues: dict[Statement, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_batch: Callable[[int], None] | None = None
        """Called with the row count of every committed transaction."""

    async def write(self, statement: Statement, row: tuple[Any, ...]) -> None:
        """Write one row; return once it is committed."""
        error = (await self.write_many(statement, (row,)))[0]
        if error is not None:
            raise error

    async def write_many(
        self, statement: Statement, rows: Sequence[tuple[Any, ...]]
    ) -> list[BaseException | None]:
        """Write ``rows``; return once each is committed or has failed.

        One outcome per row, in order: None where the row was committed,
        else the exception that kept it out (a DeliveryError as a rule).
        More rows than ``batch_size`` are split into several units.

        """
        # Queue the rows as units of at most batch_size rows.
        loop = asyncio.get_running_loop()
        queue = self._queues.get(statement)
        if queue is None:
            queue = self._queues[statement] = _Queue()
        size = self._batch_size
        units = [
            _Unit(rows[start : start + size], loop.create_future())
            for start in range(0, len(rows), size)
        ]
        queue.units.extend(units)

        # Start writers while the backend has room for more batches: this
        # task first, so that the round trip begins now rather than after
        # every task that is already waiting to run; then further tasks.
        lead = queue.running < self._backend.max_batches
        if lead:
            queue.running += 1
        for _ in units[1:]:
            if queue.running >= self._backend.max_batches:
                break
            self._start_drain(statement, queue)
        if lead:
            await self._lead(statement, queue, units[-1].future)

        if len(units) == 1:
            return await units[0].future
        outcomes: list[BaseException | None] = []
        for unit in units:
            outcomes.extend(await unit.future)
        return outcomes

    def _start_drain(self, statement: Statement, queue: _Queue) -> None:
        queue.running += 1
        task = asyncio.create_task(self._drain(statement, queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lead(
        self, statement: Statement, queue: _Queue, last: asyncio.Future[Any]
    ) -> None:
        # Write batches in the caller's task until its own rows are written,
        # then leave what is still queued to a drain task.
        units = queue.units
        try:
            while units and not last.done():
                batch = self._take(units)
                try:
                    await self._write_batch(statement, batch)
                except asyncio.CancelledError:
                    # Whether it committed is unknown: a transient failure,
                    # which the flows of those rows retry.
                    _settle(
                        batch,
                        DeliveryError(
                            f"table {str(statement.table)!r}: the write was cancelled"
                        ),
                    )
                    raise
        finally:
            queue.running -= 1
            if units:
                self._start_drain(statement, queue)
            elif queue.running == 0:
                self._queues.pop(statement, None)

    def _take(self, units: deque[_Unit]) -> list[_Unit]:
        # The next batch: whole units, up to batch_size rows.
        batch = [units.popleft()]
        rows = len(batch[0].rows)
        while units and rows + len(units[0].rows) <= self._batch_size:
            rows += len(units[0].rows)
            batch.append(units.popleft())
        return batch

    async def _drain(self, statement: Statement, queue: _Queue) -> None:
        # Keep writing while rows are waiting: what queued up during one
        # round trip goes out together in the next.
        units = queue.units
        try:
            while units:
                await self._write_batch(statement, self._take(units))
        finally:
            queue.running -= 1
            if not units and queue.running == 0:
                self._queues.pop(statement, None)

    async def _write_batch(self, statement: Statement, batch: list[_Unit]) -> None:
        rows = (
            batch[0].rows
            if len(batch) == 1
            else [row for unit in batch for row in unit.rows]
        )
        try:
            await self._backend.write(statement, rows)
        except DeliveryError as exc:
            if not exc.permanent or len(rows) == 1:
                _settle(batch, exc)
                return
            logger.debug(
                "batch of %d rows into %s failed (%s); writing them one by one",
                len(rows),
                statement.table,
                exc,
            )
        except Exception as exc:  # a driver bug must not leave callers hanging
            _settle(batch, exc)
            return
        else:
            self._committed(len(rows))
            _settle(batch, None)
            return

        # Pin the error on its row: write each row in its own transaction.
        for unit in batch:
            outcomes: list[BaseException | None] = []
            for row in unit.rows:
                try:
                    await self._backend.write(statement, [row])
                except Exception as exc:  # handed to the waiting delivery
                    outcomes.append(exc)
                else:
                    self._committed(1)
                    outcomes.append(None)
            if not unit.future.done():
                unit.future.set_result(outcomes)

    def _committed(self, rows: int) -> None:
        if self.on_batch is not None:
            self.on_batch(rows)

    async def close(self) -> None:
        """Wait for the batches in flight (deliveries have drained)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _settle(batch: Sequence[_Unit], error: BaseException | None) -> None:
    # Every row of the batch had the same outcome.
    for unit in batch:
        if not unit.future.done():
            unit.future.set_result([error] * len(unit.rows))
