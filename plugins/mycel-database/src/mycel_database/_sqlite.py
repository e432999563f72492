"""The ``sqlite`` driver: the standard library's sqlite3 in one thread.

One connection lives in one worker thread, so the event loop never waits
on the disk and SQLite sees a single writer. A batch is one
``executemany`` inside ``BEGIN IMMEDIATE ... COMMIT``. SQLite has no JSON
type: nested objects and lists are stored as JSON text; timestamps, dates
and times as ISO 8601 text; decimals and UUIDs as text.

"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mycel import ConnectorError, DeliveryError

from ._backend import Column, Converter, TableInfo
from ._statement import Statement, TableName, quote

__all__ = ["SqliteBackend"]

_T = TypeVar("_T")

# OperationalError texts that name the statement's fault, not the moment's.
_PERMANENT_TEXTS = ("no such table", "has no column", "no such column", "syntax error")


class SqliteBackend:
    """Rows into an SQLite file through one connection in one thread."""

    placeholder = "qmark"
    max_batches = 1

    def __init__(self, path: str, base_dir: Path, timeout: float) -> None:
        self._path = path if path == ":memory:" else str(base_dir / path)
        self._timeout = timeout
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        assert self._executor is not None, "the database connector is not started"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mycel-sqlite")
        await self._run(self._open)

    def _open(self) -> None:
        if self._path != ":memory:" and not Path(self._path).parent.is_dir():
            raise ConnectorError(
                f"the folder of {self._path!r} does not exist; create it first"
            )
        conn = sqlite3.connect(
            self._path,
            timeout=self._timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        if self._path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
        self._executor = None

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "the database connector is not started"
        return self._conn

    async def run_script(self, sql: str) -> None:
        await self._run(self.conn.executescript, sql)

    async def table_info(self, table: TableName) -> TableInfo | None:
        def read() -> list[Any]:
            schema = f"{quote(table.schema)}." if table.schema else ""
            pragma = f"PRAGMA {schema}table_info({quote(table.name)})"
            return self.conn.execute(pragma).fetchall()

        try:
            rows = await self._run(read)
        except sqlite3.Error as exc:
            raise DeliveryError(
                f"cannot read the columns of table {str(table)!r}: {exc}"
            ) from exc
        if not rows:
            return None
        columns = {r[1]: Column(r[1], (r[2] or "").lower()) for r in rows}
        key = tuple(r[1] for r in sorted(rows, key=lambda r: r[5]) if r[5] > 0)
        return TableInfo(table, columns, key)

    def converter(self, column: Column) -> Converter | None:
        return _CONVERTER

    async def write(
        self, statement: Statement, rows: Sequence[tuple[Any, ...]]
    ) -> None:
        sql = statement.sql("qmark")

        def write() -> None:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        try:
            await self._run(write)
        except (
            sqlite3.IntegrityError,
            sqlite3.InterfaceError,
            sqlite3.DataError,
            sqlite3.ProgrammingError,
            OverflowError,
        ) as exc:
            raise DeliveryError(
                f"table {str(statement.table)!r}: {exc}", permanent=True
            ) from exc
        except sqlite3.Error as exc:
            text = str(exc)
            raise DeliveryError(
                f"table {str(statement.table)!r}: {text}",
                permanent=any(part in text for part in _PERMANENT_TEXTS),
            ) from exc


def _convert(value: Any) -> Any:
    """A payload value as SQLite stores it (see the module docstring)."""
    if isinstance(value, dict | list):
        return json.dumps(value, default=str, separators=(",", ":"))
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    return value


# Every column takes SQLite's own types as they are.
_CONVERTER = Converter(_convert, frozenset({str, int, float, bool, bytes, type(None)}))
