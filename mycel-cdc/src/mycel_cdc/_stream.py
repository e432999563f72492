"""One logical replication session over libpq, driven by asyncio.

asyncpg cannot speak the replication protocol, and psycopg's high-level
API has no replication support; its low-level ``pq`` layer has everything
needed: a connection opened with ``replication=database`` accepts
``START_REPLICATION`` through the simple query protocol and then speaks
CopyBoth, read with ``get_copy_data`` (non-blocking) and written with
``put_copy_data``. Socket readiness comes from the event loop.

"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mycel import ConnectorError

from ._pgoutput import format_lsn

__all__ = ["ReplicationStream", "StreamClosed", "replication_conninfo"]

_STATUS = struct.Struct(">cQQQqB")
_POSTGRES_EPOCH_UNIX = 946_684_800

SESSION_SETTINGS = {
    "DateStyle": "ISO",
    "TimeZone": "UTC",
    "IntervalStyle": "iso_8601",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}
"""What shapes the text of column values; see ``_types``."""


class StreamClosed(ConnectorError):
    """The replication session ended (server shutdown, network, error)."""


def replication_conninfo(conninfo: str) -> str:
    """``conninfo`` for a walsender in database mode, with fixed settings."""
    params = conninfo_to_dict(conninfo)
    options = " ".join(f"-c {key}={value}" for key, value in SESSION_SETTINGS.items())
    if params.get("options"):
        options = f"{params['options']} {options}"
    return make_conninfo(
        conninfo,
        replication="database",
        options=options,
        client_encoding="UTF8",
        application_name=params.get("application_name") or "mycel-cdc",
    )


def _now_micros() -> int:
    """Microseconds since 2000-01-01 UTC, the protocol's clock."""
    return int((time.time() - _POSTGRES_EPOCH_UNIX) * 1_000_000)


class ReplicationStream:
    """A walsender connection; :meth:`start` it, then :meth:`poll` it."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        self._pgconn.nonblocking = 1
        self._fd = self._pgconn.socket
        self._loop = asyncio.get_running_loop()
        self._readable = asyncio.Event()
        self._loop.add_reader(self._fd, self._readable.set)
        self.closed = False

    @classmethod
    async def open(cls, conninfo: str) -> ReplicationStream:
        """Connect as a walsender; raises psycopg.OperationalError."""
        conn = await psycopg.AsyncConnection.connect(
            replication_conninfo(conninfo), autocommit=True
        )
        return cls(conn)

    async def start(self, slot: str, publication: str, lsn: int) -> None:
        """Send START_REPLICATION; return once the server streams."""
        command = (
            f'START_REPLICATION SLOT "{slot}" LOGICAL {format_lsn(lsn)} '
            f"(proto_version '1', publication_names '\"{publication}\"')"
        )
        self._pgconn.send_query(command.encode())
        await self._flush()
        while self._pgconn.is_busy():
            await self._wait_readable()
            self._consume()
        result = self._pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = (
                result.error_message.decode(errors="replace").strip()
                if result is not None
                else "no result"
            )
            raise StreamClosed(message or "START_REPLICATION failed")

    def poll(self) -> memoryview | None:
        """The next CopyData message if one has arrived, else None.

        The view is valid until the next call.

        Raises :class:`StreamClosed` when the session has ended.

        """
        try:
            size, data = self._pgconn.get_copy_data(1)
            if size == 0:
                self._consume()
                size, data = self._pgconn.get_copy_data(1)
                if size == 0:
                    return None
        except psycopg.Error as exc:
            # libpq reports a broken session as an error of get_copy_data.
            self.closed = True
            raise StreamClosed(str(exc).strip() or "connection lost") from exc
        if size > 0:
            return data
        self.closed = True
        reason = self._pgconn.get_error_message().strip()
        result = self._pgconn.get_result()
        if result is not None and result.error_message:
            reason = result.error_message.decode(errors="replace").strip()
        raise StreamClosed(reason or "the server ended the replication stream")

    async def wait(self) -> None:
        """Wait until the socket has data for :meth:`poll`."""
        await self._wait_readable()

    async def send_status(self, write: int, flush: int, *, reply: bool = False) -> None:
        """Standby status update: received up to ``write``, done up to ``flush``.

        ``flush`` is what the server may forget: the slot's confirmed
        position becomes it.

        """
        message = _STATUS.pack(b"r", write, flush, flush, _now_micros(), int(reply))
        try:
            sent = self._pgconn.put_copy_data(message)
        except psycopg.Error as exc:
            self.closed = True
            raise StreamClosed(str(exc).strip() or "cannot send") from exc
        if sent != 1:
            raise StreamClosed(
                self._pgconn.get_error_message().strip() or "cannot send"
            )
        await self._flush()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
        self._loop.remove_reader(self._fd)
        await self._conn.close()

    def _consume(self) -> None:
        try:
            self._pgconn.consume_input()
        except psycopg.Error as exc:
            self.closed = True
            raise StreamClosed(str(exc).strip() or "connection lost") from exc

    async def _wait_readable(self) -> None:
        self._readable.clear()
        await self._readable.wait()

    async def _flush(self) -> None:
        while True:
            try:
                pending = self._pgconn.flush()
            except psycopg.Error as exc:
                self.closed = True
                raise StreamClosed(str(exc).strip() or "connection lost") from exc
            if pending == 0:
                return
            writable = self._loop.create_future()
            self._loop.add_writer(self._fd, writable.set_result, None)
            try:
                await writable
            finally:
                self._loop.remove_writer(self._fd)
