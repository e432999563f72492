"""Settings of ``type = "cdc"`` and the operations it offers."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from mycel import Duration, Operation, Settings

__all__ = [
    "SOURCE_OPERATIONS",
    "CdcSettings",
    "qualified",
    "split_operation",
    "table_key",
]

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]{0,62}")
_TABLE = re.compile(r"(?:([A-Za-z_][A-Za-z0-9_$]*)\.)?([A-Za-z_][A-Za-z0-9_$]*)")

SOURCE_OPERATIONS = (
    Operation("TABLE.*", "every INSERT, UPDATE and DELETE of TABLE", r"[^\s]+\.\*"),
    Operation("TABLE.INSERT", "rows inserted into TABLE", r"[^\s]+\.INSERT"),
    Operation("TABLE.UPDATE", "rows updated in TABLE", r"[^\s]+\.UPDATE"),
    Operation("TABLE.DELETE", "rows deleted from TABLE", r"[^\s]+\.DELETE"),
    Operation("TABLE.TRUNCATE", "TABLE truncated (not part of TABLE.*)",
              r"[^\s]+\.TRUNCATE"),
)  # fmt: skip


class CdcSettings(Settings):
    """Settings of ``type = "cdc"``: PostgreSQL logical replication."""

    driver: Literal["postgres"] = "postgres"
    """The database; only ``postgres`` (logical replication, pgoutput)."""

    connection_string: str = Field(min_length=1)
    """libpq URL or ``key=value`` string; the role needs REPLICATION."""

    tables: list[str] = Field(min_length=1)
    """Tables to capture, ``name`` (schema ``public``) or ``schema.name``."""

    slot_name: str | None = None
    """Replication slot; default ``mycel_<connector name>``. Created if missing."""

    publication: str | None = None
    """Publication; default ``mycel_<connector name>``. Created if missing."""

    status_interval: Duration = Field(default=10.0, gt=0)
    """Longest time between two status updates to the server (a moving
    position is reported sooner); keep it well below the server's
    ``wal_sender_timeout``."""

    @field_validator("tables")
    @classmethod
    def _tables_are_names(cls, tables: list[str]) -> list[str]:
        for table in tables:
            if _TABLE.fullmatch(table) is None:
                raise ValueError(
                    f"{table!r} is not a table name; write name or schema.name"
                )
        if len(set(tables)) != len(tables):
            raise ValueError("a table is listed twice")
        return tables

    @field_validator("slot_name", "publication")
    @classmethod
    def _is_identifier(cls, value: str | None) -> str | None:
        if value is not None and _IDENTIFIER.fullmatch(value) is None:
            raise ValueError(
                f"{value!r} is not a valid name: use lowercase letters, digits "
                "and underscores, at most 63 characters"
            )
        return value


def table_key(schema: str, name: str) -> str:
    """How ``tables`` and operations name a table: ``name`` in ``public``."""
    return name if schema == "public" else f"{schema}.{name}"


def qualified(table: str) -> tuple[str, str]:
    """``"orders"`` -> ``("public", "orders")``."""
    schema, _, name = table.rpartition(".")
    return schema or "public", name


def split_operation(operation: str) -> tuple[str, str]:
    """``"orders.INSERT"`` -> ``("orders", "INSERT")``."""
    table, _, kind = operation.rpartition(".")
    return table, kind
