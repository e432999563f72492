"""What the connector needs from a database driver, and row batching.

A driver (:mod:`._postgres`, :mod:`._sqlite`) learns a table's columns and
writes a batch of rows in one transaction. :class:`Batcher` gathers the
rows that concurrent deliveries write with the same statement and hands
them to the driver together: under load one round trip commits many rows,
while a lone row is written at once, never held back waiting for company.

Each delivery awaits its own row: it returns only once the transaction
holding the row committed. When a batch fails for a reason tied to its
data (a constraint, a value the column refuses), its rows are written again
one by one, so that the error lands on the event that caused it and the
other events of the batch still get in.

"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mycel import DeliveryError

from ._statement import Statement, TableName

__all__ = ["Backend", "Batcher", "Column", "TableInfo"]

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

    def converter(self, column: Column) -> Callable[[Any], Any] | None:
        """How a payload value is bound to ``column``; None: as it is.

        The function raises ValueError with a message saying what is wrong.

        """

    async def write(
        self, statement: Statement, rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """Write all ``rows`` in one transaction, or none of them.

        Raises DeliveryError: ``permanent`` when the rows themselves are at
        fault (retrying them cannot help), otherwise transient.

        """


@dataclass
class _Queue:
    rows: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = field(
        default_factory=list
    )
    running: int = 0


class Batcher:
    """Groups concurrent rows of one statement into shared transactions."""

    def __init__(self, backend: Backend, batch_size: int) -> None:
        self._backend = backend
        self._batch_size = batch_size
        self._queues: dict[Statement, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_batch: Callable[[int], None] | None = None
        """Called with the row count of every committed transaction."""

    async def write(self, statement: Statement, row: tuple[Any, ...]) -> None:
        """Write one row; return once it is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(statement, _Queue())
        queue.rows.append((row, future))
        if queue.running < self._backend.max_batches:
            queue.running += 1
            task = asyncio.create_task(self._drain(statement, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await future

    async def _drain(self, statement: Statement, queue: _Queue) -> None:
        # Keep writing while rows are waiting: what queued up during one
        # round trip goes out together in the next.
        try:
            while queue.rows:
                batch = queue.rows[: self._batch_size]
                del queue.rows[: self._batch_size]
                await self._write_batch(statement, batch)
        finally:
            queue.running -= 1
            if not queue.rows and queue.running == 0:
                self._queues.pop(statement, None)

    async def _write_batch(
        self,
        statement: Statement,
        batch: list[tuple[tuple[Any, ...], asyncio.Future[None]]],
    ) -> None:
        try:
            await self._backend.write(statement, [row for row, _ in batch])
        except DeliveryError as exc:
            if not exc.permanent or len(batch) == 1:
                _settle(batch, exc)
                return
            logger.debug(
                "batch of %d rows into %s failed (%s); writing them one by one",
                len(batch),
                statement.table,
                exc,
            )
        except Exception as exc:  # a driver bug must not leave callers hanging
            _settle(batch, exc)
            return
        else:
            self._committed(len(batch))
            _settle(batch, None)
            return

        # Pin the error on its row: write each row in its own transaction.
        for row, future in batch:
            try:
                await self._backend.write(statement, [row])
            except Exception as exc:  # handed to the waiting delivery
                _settle([(row, future)], exc)
            else:
                self._committed(1)
                _settle([(row, future)], None)

    def _committed(self, rows: int) -> None:
        if self.on_batch is not None:
            self.on_batch(rows)

    async def close(self) -> None:
        """Wait for the batches in flight (deliveries have drained)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _settle(
    batch: Sequence[tuple[tuple[Any, ...], asyncio.Future[None]]],
    error: BaseException | None,
) -> None:
    for _, future in batch:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
