"""What the server must offer before streaming, checked and prepared.

Run once at start on an ordinary connection: the server's ``wal_level``,
the role's REPLICATION privilege, the publication (created for the listed
tables when missing) and the slot (created, permanent, when missing). Each
problem is a :class:`mycel.ConnectorError` that says what to do.

"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from mycel import ConnectorError

from ._pgoutput import parse_lsn
from ._settings import qualified
from ._stream import SESSION_SETTINGS
from ._types import ARRAY_ELEMENTS, Converter, array_converter, scalar_converter

__all__ = ["SlotState", "TypeResolver", "prepare", "slot_in_use_message"]

logger = logging.getLogger("mycel.cdc")

SLOT_RELEASE_WAIT = 10.0
"""How long start waits for a slot held by a consumer that is going away
(the previous process, killed a moment ago, whose WAL sender has not yet
noticed)."""

_TEXT_TYPES = {17, 18, 19, 25, 142, 650, 790, 829, 869, 1042, 1043, 1082, 1083,
               1186, 1560, 1562, 2950}  # fmt: skip
"""Built-in types whose text is their event value."""


@dataclass
class SlotState:
    """The slot as start found or made it."""

    confirmed: int
    created: bool


def slot_in_use_message(slot: str, pid: object) -> str:
    return (
        f"replication slot {slot!r} is in use by another consumer (PID {pid}); "
        "stop that consumer, or give this connector its own slot_name"
    )


async def prepare(
    conn: psycopg.AsyncConnection[Any],
    *,
    tables: Sequence[str],
    publication: str,
    slot: str,
    status_interval: float,
) -> SlotState:
    """Check the server and role, create publication and slot if missing."""
    await _check_server(conn, status_interval)
    await _ensure_publication(conn, tables, publication)
    return await _ensure_slot(conn, slot)


async def _one(conn: psycopg.AsyncConnection[Any], query: Any, *args: Any) -> Any:
    cursor = await conn.execute(query, args or None)
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def _check_server(
    conn: psycopg.AsyncConnection[Any], status_interval: float
) -> None:
    # Logical decoding needs wal_level = logical, set at server start.
    wal_level = await _one(conn, "SHOW wal_level")
    if wal_level != "logical":
        raise ConnectorError(
            f"PostgreSQL has wal_level = {wal_level!r}, and change data capture "
            "needs 'logical': run ALTER SYSTEM SET wal_level = logical (or set "
            "it in postgresql.conf) and restart PostgreSQL"
        )

    # The walsender connection needs REPLICATION (or superuser).
    role = await _one(conn, "SELECT current_user")
    allowed = await _one(
        conn,
        "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
    )
    if not allowed:
        raise ConnectorError(
            f"role {role!r} may not start logical replication: run "
            f'ALTER ROLE "{role}" REPLICATION as a superuser, or connect as '
            "a role that has it"
        )

    # Status updates must come well within the server's patience.
    timeout_ms = await _one(
        conn, "SELECT setting::int FROM pg_settings WHERE name = 'wal_sender_timeout'"
    )
    if timeout_ms and status_interval * 1000 >= timeout_ms / 2:
        logger.warning(
            "status_interval %.1fs is not well below the server's "
            "wal_sender_timeout of %dms; the server may drop the connection",
            status_interval,
            timeout_ms,
        )


async def _ensure_publication(
    conn: psycopg.AsyncConnection[Any], tables: Sequence[str], publication: str
) -> None:
    wanted = [qualified(table) for table in tables]
    exists = await _one(
        conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s", publication
    )
    if not exists:
        names = sql.SQL(", ").join(sql.Identifier(s, n) for s, n in wanted)
        try:
            await conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    sql.Identifier(publication), names
                )
            )
        except psycopg.errors.UniqueViolation:
            pass  # created concurrently by another process: check it below
        except psycopg.Error as exc:
            raise ConnectorError(
                f"cannot create publication {publication!r}: {_pg_message(exc)}"
            ) from exc
        else:
            logger.info("created publication %r for %s", publication, ", ".join(tables))
            return

    # An existing publication must publish every listed table.
    cursor = await conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
        (publication,),
    )
    published = {(row[0], row[1]) for row in await cursor.fetchall()}
    missing = [f"{s}.{n}" for s, n in wanted if (s, n) not in published]
    if missing:
        raise ConnectorError(
            f"publication {publication!r} exists but does not publish "
            f"{', '.join(missing)}: run ALTER PUBLICATION {publication} ADD TABLE "
            f"{', '.join(missing)}, or set another publication name"
        )


async def _ensure_slot(conn: psycopg.AsyncConnection[Any], slot: str) -> SlotState:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SLOT_RELEASE_WAIT
    while True:
        cursor = await conn.execute(
            "SELECT plugin, slot_type, database = current_database(), active_pid, "
            "confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        row = await cursor.fetchone()
        if row is None:
            return await _create_slot(conn, slot)
        plugin, kind, same_database, pid, confirmed = row
        if kind != "logical" or plugin != "pgoutput" or not same_database:
            raise ConnectorError(
                f"replication slot {slot!r} exists but is not a pgoutput slot of "
                "this database: drop it, or set another slot_name"
            )
        if pid is None:
            return SlotState(parse_lsn(confirmed), created=False)
        if loop.time() >= deadline:
            raise ConnectorError(slot_in_use_message(slot, pid))
        # A killed predecessor's WAL sender lets go within moments.
        await asyncio.sleep(0.2)


async def _create_slot(conn: psycopg.AsyncConnection[Any], slot: str) -> SlotState:
    try:
        confirmed = await _one(
            conn,
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
            slot,
        )
    except psycopg.errors.DuplicateObject:
        return await _ensure_slot(conn, slot)
    except psycopg.Error as exc:
        raise ConnectorError(
            f"cannot create replication slot {slot!r}: {_pg_message(exc)}"
        ) from exc
    logger.info("created replication slot %r at %s", slot, confirmed)
    return SlotState(parse_lsn(confirmed), created=True)


def _pg_message(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = diag.message_primary or str(exc).strip()
    if diag.message_hint:
        text += f" ({diag.message_hint})"
    return text


class TypeResolver:
    """Converters by type OID; unknown OIDs are looked up in ``pg_type``.

    Built-in types are known without a query. Domains convert like their
    base type, arrays element by element, and enums, composites, ranges and
    extension types stay text.

    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._converters: dict[int, Converter | None] = {}

    def converter(self, oid: int) -> Converter | None:
        if oid in self._converters:
            return self._converters[oid]
        if oid in ARRAY_ELEMENTS:
            return array_converter(scalar_converter(ARRAY_ELEMENTS[oid]))
        return scalar_converter(oid)

    def unknown(self, oids: Sequence[int]) -> list[int]:
        return [
            oid
            for oid in oids
            if oid not in self._converters
            and oid not in ARRAY_ELEMENTS
            and oid not in _TEXT_TYPES
            and scalar_converter(oid) is None
        ]

    async def resolve(self, oids: Sequence[int]) -> None:
        """Look the ``unknown`` OIDs up (one connection for all of them)."""
        pending = self.unknown(oids)
        if not pending:
            return
        found: dict[int, tuple[str, str, int, int]] = {}
        options = " ".join(f"-c {k}={v}" for k, v in SESSION_SETTINGS.items())
        async with await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, options=options
        ) as conn:
            while pending:
                cursor = await conn.execute(
                    "SELECT oid::int8, typtype, typcategory, typelem::int8, "
                    "typbasetype::int8 FROM pg_type WHERE oid = ANY(%s)",
                    ([*pending],),
                )
                for oid, kind, category, element, base in await cursor.fetchall():
                    found[oid] = (kind, category, element, base)
                # Domains and arrays refer to further types: look those up too.
                pending = []
                for kind, category, element, base in found.values():
                    refs = (
                        base if kind == "d" else 0,
                        element if category == "A" else 0,
                    )
                    pending += [
                        ref
                        for ref in refs
                        if ref and ref not in found and self.unknown([ref])
                    ]
        for oid in found:
            self._converters[oid] = self._from_catalog(oid, found, 0)

    def _from_catalog(
        self, oid: int, found: dict[int, tuple[str, str, int, int]], depth: int
    ) -> Converter | None:
        if oid not in found or depth > 8:
            return self.converter(oid)
        kind, category, element, base = found[oid]
        if kind == "d":
            return self._from_catalog(base, found, depth + 1)
        if category == "A" and element:
            return array_converter(self._from_catalog(element, found, depth + 1))
        return None
