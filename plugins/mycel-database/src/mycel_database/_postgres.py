"""The ``postgres`` driver: an asyncpg pool.

A batch is one ``executemany``: asyncpg sends all its rows in one pipelined
round trip, in one implicit transaction that commits them together or not
at all.
``json`` and ``jsonb`` columns take nested objects and lists as they are
(the pool's connections encode them as JSON). Text that a typed column
needs as a value (an ISO timestamp for ``timestamptz``, a number in a
string for ``numeric``) is converted first, as PostgreSQL itself would read
a literal.

"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import json
import json.encoder
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import asyncpg

from mycel import DeliveryError

from ._backend import Column, Converter, TableInfo
from ._settings import DatabaseSettings
from ._statement import Statement, TableName

__all__ = ["PostgresBackend"]

_COLUMNS = """
SELECT a.attname, t.typname, t.typcategory
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attgenerated = ''
ORDER BY a.attnum
"""

_PRIMARY_KEY = """
SELECT a.attname
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = to_regclass($1) AND i.indisprimary
ORDER BY array_position(i.indkey, a.attnum)
"""

# SQLSTATE classes where the statement or its data are at fault: sending
# the same rows again gives the same answer.
_PERMANENT_CLASSES = {"22", "23", "42", "2B", "44"}

# Column types whose values asyncpg takes from the payload as they are.
_AS_IS = {"json", "jsonb", "array"}
_INTEGERS = {"int2", "int4", "int8"}
_FLOATS = {"float4", "float8"}
_TEXT = {"text", "varchar", "bpchar", "name", "citext"}

# Value types that _convert returns unchanged, so the call can be skipped.
_EXACT_TEXT: frozenset[type] = frozenset({str, type(None)})
_EXACT_OTHER: frozenset[type] = frozenset(
    {
        int,
        float,
        bool,
        type(None),
        bytes,
        dt.datetime,
        dt.date,
        dt.time,
        decimal.Decimal,
        uuid.UUID,
    }
)
_EXACT_NUMERIC = _EXACT_OTHER - {float}


class PostgresBackend:
    """Rows into PostgreSQL through an asyncpg pool."""

    placeholder = "dollar"

    def __init__(self, settings: DatabaseSettings) -> None:
        self._settings = settings
        self.max_batches = settings.pool_size
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        settings = self._settings
        password = settings.password.get_secret_value() if settings.password else None
        self._pool = await asyncpg.create_pool(
            dsn=settings.connection_string,
            host=settings.host,
            port=settings.port,
            user=settings.user,
            password=password,
            database=settings.database,
            min_size=1,
            max_size=settings.pool_size,
            timeout=settings.connect_timeout,
            init=_init_connection,
            reset=_keep_session,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the database connector is not started"
        return self._pool

    async def run_script(self, sql: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(sql)
            # What the script set for its session (SET, LISTEN) must not
            # stay on one pooled connection: see _keep_session.
            await conn.reset()

    async def table_info(self, table: TableName) -> TableInfo | None:
        try:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(_COLUMNS, table.quoted())
                key = await conn.fetch(_PRIMARY_KEY, table.quoted())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DeliveryError(
                f"cannot read the columns of table {str(table)!r}: {exc}"
            ) from exc
        if not rows:
            return None
        columns = {
            r["attname"]: Column(
                r["attname"], "array" if r["typcategory"] == "A" else r["typname"]
            )
            for r in rows
        }
        return TableInfo(table, columns, tuple(r["attname"] for r in key))

    def converter(self, column: Column) -> Converter | None:
        if column.type in _AS_IS:
            return None
        if column.type in _TEXT:
            exact = _EXACT_TEXT
        elif column.type == "numeric":
            exact = _EXACT_NUMERIC
        else:
            exact = _EXACT_OTHER
        return Converter(functools.partial(_convert, column.type), exact)

    async def write(
        self, statement: Statement, rows: Sequence[tuple[Any, ...]]
    ) -> None:
        sql = statement.sql("dollar")
        try:
            # One statement, or one executemany: each is atomic on its own
            # (an implicit transaction), so no BEGIN and COMMIT round trips.
            async with self.pool.acquire() as conn:
                if len(rows) == 1:
                    await conn.execute(sql, *rows[0])
                else:
                    await conn.executemany(sql, rows)
        except asyncpg.PostgresError as exc:
            state = exc.sqlstate or ""
            raise DeliveryError(
                f"table {str(statement.table)!r}: {_message(exc)}",
                permanent=state[:2] in _PERMANENT_CLASSES,
            ) from exc
        except (ValueError, TypeError) as exc:
            # asyncpg refused a value before sending it: the row's fault.
            raise DeliveryError(
                f"table {str(statement.table)!r}: {exc}", permanent=True
            ) from exc
        except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise DeliveryError(
                f"table {str(statement.table)!r}: connection failed: {exc}"
            ) from exc
        except Exception as exc:  # driver boundary: asyncpg's internal errors
            # (InternalClientError on a connection the server dropped, say)
            # are not the rows' fault: transient, so the flow retries them.
            raise DeliveryError(
                f"table {str(statement.table)!r}: connection failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What the pool does to a connection handed back: nothing more.

    asyncpg rolls back a transaction left open either way; its default
    reset also sends ``RESET ALL``, ``UNLISTEN *`` and the like, one round
    trip per batch written, for session state that the connector's own
    statements never change (``init_sql``, which may, is reset in full).

    """


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name,
            encoder=_dump_json,
            decoder=json.loads,
            schema="pg_catalog",
        )


def _dump_json(value: Any) -> str:
    """``json.dumps(value, default=str, separators=(",", ":"))``, faster.

    json.dumps with arguments builds a JSONEncoder per call; the encoder
    here is built once. It skips the check for circular references, which
    a payload that came as JSON cannot have; one that does fails with
    ValueError all the same.

    """
    try:
        return "".join(_encode(value, 0))
    except RecursionError as exc:
        raise ValueError("a circular reference cannot be written as JSON") from exc


def _json_encoder() -> Callable[[Any, int], Iterable[str]]:
    # The standard library's C encoder when it has one (CPython does).
    make = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed
    if make is not None:
        encode: Callable[[Any, int], Iterable[str]] = make(
            None,  # no circular check: see _dump_json
            str,
            json.encoder.encode_basestring_ascii,
            None,
            ":",
            ",",
            False,
            False,
            True,
        )
        return encode
    encoder = json.JSONEncoder(default=str, separators=(",", ":"))
    return lambda value, _: (encoder.encode(value),)


_encode = _json_encoder()


def _message(exc: asyncpg.PostgresError) -> str:
    detail = getattr(exc, "detail", None)
    text = getattr(exc, "message", None) or str(exc)
    return f"{text} ({detail})" if detail else text


def _convert(type_name: str, value: Any) -> Any:
    """A JSON-ish payload value as asyncpg binds it to a column type."""
    if value is None or type_name in ("json", "jsonb", "array"):
        return value
    if isinstance(value, dict | list):
        if type_name in _TEXT:
            return _dump_json(value)
        raise ValueError(
            f"an object or list needs a json or jsonb column, not {type_name}"
        )
    if type_name in _TEXT:
        return value if isinstance(value, str) else _scalar_text(value)
    if not isinstance(value, str):
        if type_name == "numeric" and isinstance(value, float):
            return decimal.Decimal(repr(value))
        return value
    return _parse_text(type_name, value)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)


def _parse_text(type_name: str, value: str) -> Any:
    try:
        if type_name in ("timestamptz", "timestamp"):
            return dt.datetime.fromisoformat(value)
        if type_name == "date":
            return dt.date.fromisoformat(value)
        if type_name in ("time", "timetz"):
            return dt.time.fromisoformat(value)
        if type_name == "numeric":
            return decimal.Decimal(value)
        if type_name in _INTEGERS:
            return int(value)
        if type_name in _FLOATS:
            return float(value)
        if type_name == "uuid":
            return uuid.UUID(value)
        if type_name == "bool":
            return {"true": True, "false": False}[value.lower()]
    except (ValueError, KeyError, decimal.InvalidOperation) as exc:
        raise ValueError(f"{value!r} is not a valid {type_name}") from exc
    return value
