"""Target grammar, identifier checks and the SQL written from them.

A ``to`` block's target reads ``TABLE``, ``INSERT TABLE`` or ``UPSERT
TABLE``, where TABLE is ``name`` or ``schema.name``, each part an SQL
identifier of letters, digits and underscores not starting with a digit.
Identifiers are always quoted in the SQL written, and values are always
bound as parameters, never spliced into the text.

"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Statement", "TableName", "TargetSpec", "parse_target", "quote"]

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]{0,62}"
_TARGET = re.compile(
    rf"\s*(?:(?P<verb>INSERT|UPSERT)\s+)?(?P<table>{_IDENTIFIER}(?:\.{_IDENTIFIER})?)\s*",
    re.IGNORECASE,
)

Verb = Literal["insert", "upsert"]


@dataclass(frozen=True)
class TableName:
    """A checked table name, with an optional schema."""

    schema: str | None
    name: str

    def __str__(self) -> str:
        return self.name if self.schema is None else f"{self.schema}.{self.name}"

    def quoted(self) -> str:
        if self.schema is None:
            return quote(self.name)
        return f"{quote(self.schema)}.{quote(self.name)}"


@dataclass(frozen=True)
class TargetSpec:
    """What a rendered target asks for: a verb and a table."""

    verb: Verb | None
    table: TableName


def parse_target(target: str) -> TargetSpec:
    """``"INSERT audit_log"`` -> TargetSpec("insert", audit_log).

    Raises ValueError with a message for users when the target does not
    follow the grammar.

    """
    match = _TARGET.fullmatch(target)
    if match is None:
        raise ValueError(
            f"target {target!r} is not TABLE, INSERT TABLE or UPSERT TABLE "
            "(TABLE: letters, digits and _, optionally schema.table)"
        )
    verb = match.group("verb")
    schema, _, name = match.group("table").rpartition(".")
    return TargetSpec(
        verb.lower() if verb else None,  # type: ignore[arg-type]
        TableName(schema or None, name),
    )


def quote(identifier: str) -> str:
    """Quote an SQL identifier: ``a"b`` -> ``"a""b"``."""
    return '"' + identifier.replace('"', '""') + '"'


@dataclass(frozen=True)
class Statement:
    """One INSERT (or upsert) statement for one set of columns.

    Rows of a batch share a statement: the same table, verb, conflict key
    and columns in the same order.

    """

    table: TableName
    verb: Verb
    columns: tuple[str, ...]
    key: tuple[str, ...] = ()

    def sql(self, placeholder: Literal["dollar", "qmark"]) -> str:
        """The SQL text, with ``$1`` (PostgreSQL) or ``?`` (SQLite) markers."""
        names = ", ".join(quote(c) for c in self.columns)
        if placeholder == "dollar":
            marks = ", ".join(f"${i}" for i in range(1, len(self.columns) + 1))
        else:
            marks = ", ".join("?" for _ in self.columns)
        if self.columns:
            text = f"INSERT INTO {self.table.quoted()} ({names}) VALUES ({marks})"
        else:
            text = f"INSERT INTO {self.table.quoted()} DEFAULT VALUES"
        if self.verb == "upsert":
            text += _on_conflict(self.key, self.columns)
        return text


def _on_conflict(key: Sequence[str], columns: Sequence[str]) -> str:
    conflict = ", ".join(quote(c) for c in key)
    updates = [c for c in columns if c not in key]
    if not updates:
        return f" ON CONFLICT ({conflict}) DO NOTHING"
    sets = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in updates)
    return f" ON CONFLICT ({conflict}) DO UPDATE SET {sets}"
