"""A decoder of pgoutput, PostgreSQL's logical replication protocol.

Protocol version 1, text format: Begin, Commit, Origin, Relation, Type,
Insert, Update, Delete, Truncate and logical decoding messages (see
"Logical Replication Message Formats" in the PostgreSQL manual). No
maintained Python decoder exists on the package index, hence this one.

The decoder turns each change straight into the event a flow receives (one
dict per row, see the README for its fields) and pairs it with the targets
the connector routes that table and operation to; a table and operation
nobody reads is not decoded beyond its header. A Commit becomes the LSN up
to which the slot may be confirmed once everything before it is done.

Work per change is kept small on purpose: the WAL sender is usually the
bottleneck, and anything the decoder spends per row comes off throughput.

"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ._types import Converter

__all__ = [
    "Change",
    "DecodeError",
    "Decoder",
    "Relation",
    "format_lsn",
    "parse_lsn",
    "relation_type_oids",
]

_H = struct.Struct(">h")
_I = struct.Struct(">i")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_RELATION_HEAD = struct.Struct(">I")

POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

OPERATIONS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")


class DecodeError(ValueError):
    """A pgoutput message this decoder cannot read."""


def format_lsn(lsn: int) -> str:
    """``0x16B3748`` -> ``"0/16B3748"``, the way PostgreSQL writes LSNs."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """``"0/16B3748"`` -> ``0x16B3748``."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def timestamp_text(micros: int) -> str:
    """Microseconds since 2000-01-01 UTC as ISO 8601."""
    return (POSTGRES_EPOCH + timedelta(microseconds=micros)).isoformat()


Targets = Sequence[Any]
"""Whatever the connector routes a change to (opaque to the decoder)."""

Route = Callable[[str, str], Mapping[str, Targets]]
"""(schema, table) -> {operation: targets}; empty when nobody reads it."""

ConverterFor = Callable[[int], Converter | None]


@dataclass
class Relation:
    """A table as the last Relation message described it."""

    oid: int
    schema: str
    name: str
    replica_identity: str
    names: list[str]
    type_oids: list[int]
    converters: list[Converter | None]
    key_names: list[str]
    routes: Mapping[str, Targets] = field(default_factory=dict)
    columns: list[tuple[str, Converter | None]] = field(default_factory=list)
    """(name, converter) per column, in order: what decoding walks."""

    insert_targets: Targets = ()
    """``routes["INSERT"]``, looked up once: inserts are the common case."""

    read_tuple: TupleReader = field(init=False, repr=False)
    """Reads this table's TupleData: see :func:`compile_tuple_reader`."""

    def __post_init__(self) -> None:
        self.columns = list(zip(self.names, self.converters, strict=True))
        self.insert_targets = self.routes.get("INSERT", ())
        self.read_tuple = compile_tuple_reader(self.name, self.columns)


TupleReader = Callable[[bytes, int], tuple[dict[str, Any], list[str] | None, int]]
"""``(data, pos) -> (row, unchanged TOASTed columns or None, next pos)``."""

Change = tuple[dict[str, Any], Targets]
"""One decoded change: the event payload and the targets it goes to (a
plain tuple: one is built per row)."""


def _string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(0, pos)
    return data[pos:end].decode(), end + 1


def relation_type_oids(data: bytes) -> list[int]:
    """The column type OIDs of a Relation message (to resolve them first)."""
    pos = 5
    _, pos = _string(data, pos)
    _, pos = _string(data, pos)
    pos += 1
    (count,) = _H.unpack_from(data, pos)
    pos += 2
    oids = []
    for _ in range(count):
        pos += 1
        _, pos = _string(data, pos)
        (oid,) = _I.unpack_from(data, pos)
        oids.append(oid & 0xFFFFFFFF)
        pos += 8
    return oids


class Decoder:
    """Decodes the pgoutput messages of one replication session.

    ``route`` says which targets read a table's operations; ``converter``
    gives the converter of a type OID (the connector resolves unknown OIDs
    before a Relation message reaches :meth:`decode`). Relations are
    forgotten with :meth:`reset`, at each new session, since the server
    sends them again.

    """

    def __init__(self, route: Route, converter: ConverterFor) -> None:
        self._route = route
        self._converter = converter
        self.relations: dict[int, Relation] = {}
        self.in_transaction = False
        self._xid = 0
        self._commit_lsn = ""
        self._commit_time = ""
        self._meta: dict[tuple[int, str], dict[str, Any]] = {}
        self._lsn_high = 0
        self._lsn_prefix = "0/"

    def reset(self) -> None:
        self.relations.clear()
        self.in_transaction = False

    def decode(self, data: bytes, lsn: int, out: list[Change | int]) -> None:
        """Decode one message (the payload of an XLogData at ``lsn``).

        Appends a :data:`Change` per routed row change, and the end LSN of
        each Commit, to ``out``.

        """
        tag = data[0]
        if tag == 73:  # "I"
            self._insert(data, lsn, out)
        elif tag == 85:  # "U"
            self._update(data, lsn, out)
        elif tag == 68:  # "D"
            self._delete(data, lsn, out)
        elif tag == 66:  # "B"
            final_lsn, micros, xid = _BEGIN.unpack_from(data, 1)
            self._xid = xid
            self._commit_lsn = format_lsn(final_lsn)
            self._commit_time = timestamp_text(micros)
            self._meta.clear()
            self.in_transaction = True
        elif tag == 67:  # "C"
            _, _, end_lsn, _ = _COMMIT.unpack_from(data, 1)
            self.in_transaction = False
            out.append(end_lsn)
        elif tag == 82:  # "R"
            self._relation(data)
        elif tag == 84:  # "T"
            self._truncate(data, lsn, out)
        elif tag in (89, 79, 77):  # "Y" type, "O" origin, "M" message
            # Types are resolved from pg_type by OID, origins and logical
            # decoding messages carry nothing a flow reads.
            return
        else:
            raise DecodeError(f"unknown pgoutput message {chr(tag)!r} at {lsn:#x}")

    # -- messages -----------------------------------------------------------

    def _relation(self, data: bytes) -> None:
        (oid,) = _RELATION_HEAD.unpack_from(data, 1)
        schema, pos = _string(data, 5)
        name, pos = _string(data, pos)
        identity = chr(data[pos])
        pos += 1
        (count,) = _H.unpack_from(data, pos)
        pos += 2
        names: list[str] = []
        oids: list[int] = []
        keys: list[str] = []
        for _ in range(count):
            flags = data[pos]
            column, pos = _string(data, pos + 1)
            (type_oid,) = _I.unpack_from(data, pos)
            pos += 8  # type OID and type modifier
            names.append(column)
            oids.append(type_oid & 0xFFFFFFFF)
            if flags & 1:
                keys.append(column)
        self.relations[oid] = Relation(
            oid=oid,
            schema=schema,
            name=name,
            replica_identity=identity,
            names=names,
            type_oids=oids,
            converters=[self._converter(o) for o in oids],
            key_names=keys,
            routes=self._route(schema, name),
        )

    def _relation_for(self, data: bytes) -> Relation:
        (oid,) = _RELATION_HEAD.unpack_from(data, 1)
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodeError(f"change for unknown relation {oid}") from None

    def _event(
        self, rel: Relation, operation: str, lsn: int, row: dict[str, Any]
    ) -> dict[str, Any]:
        # The fields shared by every change of this table and operation in
        # this transaction are built once and merged in one step.
        key = (rel.oid, operation)
        meta = self._meta.get(key)
        if meta is None:
            meta = self._meta[key] = {
                "_operation": operation,
                "_table": rel.name,
                "_schema": rel.schema,
                "_commit_lsn": self._commit_lsn,
                "_commit_time": self._commit_time,
                "_xid": self._xid,
            }
        row.update(meta)
        high = lsn >> 32
        if high != self._lsn_high:
            self._lsn_high = high
            self._lsn_prefix = f"{high:X}/"
        row["_lsn"] = self._lsn_prefix + format(lsn & 0xFFFFFFFF, "X")
        return row

    def _insert(self, data: bytes, lsn: int, out: list[Change | int]) -> None:
        rel = self.relations.get(_RELATION_HEAD.unpack_from(data, 1)[0])
        if rel is None:
            rel = self._relation_for(data)  # raises the error
        targets = rel.insert_targets
        if not targets:
            return
        row, unchanged, _ = self._tuple(data, 6, rel)
        event = self._event(rel, "INSERT", lsn, row)
        event["_old"] = None
        event["_unchanged_toast"] = unchanged or []
        out.append((event, targets))

    def _update(self, data: bytes, lsn: int, out: list[Change | int]) -> None:
        rel = self._relation_for(data)
        targets = rel.routes.get("UPDATE")
        if not targets:
            return

        # An old tuple comes first when the key changed ("K") or the table
        # has REPLICA IDENTITY FULL ("O").
        kind = data[5]
        old: dict[str, Any] | None = None
        if kind in (75, 79):  # "K", "O"
            old, _, pos = self._tuple(data, 6, rel)
            if kind == 75:
                old = {k: old[k] for k in rel.key_names if k in old}
            kind = data[pos]
            pos += 1
        else:
            pos = 6
        if kind != 78:  # "N"
            raise DecodeError(f"update without a new tuple at {lsn:#x}")
        row, unchanged, _ = self._tuple(data, pos, rel)

        # Without an old tuple the key did not change: the key columns of
        # the new row are the old key.
        if old is None:
            old = {k: row[k] for k in rel.key_names if k in row}

        # An unchanged TOASTed value is known when the old row carried it.
        missing: list[str] = []
        if unchanged:
            for column in unchanged:
                if column in old:
                    row[column] = old[column]
                else:
                    missing.append(column)
        event = self._event(rel, "UPDATE", lsn, row)
        event["_old"] = old
        event["_unchanged_toast"] = missing
        out.append((event, targets))

    def _delete(self, data: bytes, lsn: int, out: list[Change | int]) -> None:
        rel = self._relation_for(data)
        targets = rel.routes.get("DELETE")
        if not targets:
            return
        kind = data[5]
        if kind not in (75, 79):  # "K", "O"
            raise DecodeError(f"delete without an old tuple at {lsn:#x}")
        old, unchanged, _ = self._tuple(data, 6, rel)
        if kind == 75:
            old = {k: old[k] for k in rel.key_names if k in old}
        event = self._event(rel, "DELETE", lsn, dict(old))
        event["_old"] = old
        event["_unchanged_toast"] = unchanged or []
        out.append((event, targets))

    def _truncate(self, data: bytes, lsn: int, out: list[Change | int]) -> None:
        (count,) = _I.unpack_from(data, 1)
        options = data[5]
        for index in range(count):
            (oid,) = _I.unpack_from(data, 6 + 4 * index)
            rel = self.relations.get(oid & 0xFFFFFFFF)
            if rel is None:
                raise DecodeError(f"truncate of unknown relation {oid}")
            targets = rel.routes.get("TRUNCATE")
            if not targets:
                continue
            event = self._event(rel, "TRUNCATE", lsn, {})
            event["_old"] = None
            event["_unchanged_toast"] = []
            event["_cascade"] = bool(options & 1)
            event["_restart_identity"] = bool(options & 2)
            out.append((event, targets))

    def _tuple(
        self, data: bytes, pos: int, rel: Relation
    ) -> tuple[dict[str, Any], list[str] | None, int]:
        (count,) = _H.unpack_from(data, pos)
        if count != len(rel.columns):
            raise DecodeError(
                f"{rel.name!r} has {len(rel.columns)} columns, a tuple has {count}"
            )
        return rel.read_tuple(data, pos + 2)


_TAKES_BYTES = (int, float)
"""Converters that parse the value's bytes as well as its text."""


def compile_tuple_reader(
    table: str, columns: Sequence[tuple[str, Converter | None]]
) -> TupleReader:
    """A function that reads one TupleData of this table, column by column.

    This is the hot loop of the connector: a loop over the columns spends
    about as long on its own bookkeeping (unpacking the column's name and
    converter, testing for a converter) as on the values. The reader is
    therefore generated per Relation message as straight-line code, one
    block per column, with each column's name and converter bound in
    advance. Column names reach the generated source only through
    ``repr``; converters and the table's name only as bound names.

    Each value: ``t`` text (converted; text kept when the converter
    refuses it), ``n`` null, ``u`` an unchanged TOASTed value (named in
    the second result, left out of the row).

    """
    namespace: dict[str, Any] = {
        "unpack": _I.unpack_from,
        "DecodeError": DecodeError,
        "table": table,
    }
    lines = ["def read_tuple(data, pos):", "    row = {}", "    unchanged = None"]
    for index, (name, convert) in enumerate(columns):
        key = repr(name)
        namespace[f"convert{index}"] = convert
        lines += [
            "    kind = data[pos]",
            "    if kind == 116:",
            "        end = pos + 5 + unpack(data, pos + 1)[0]",
        ]
        if convert is None:
            lines.append(f"        row[{key}] = data[pos + 5 : end].decode()")
        elif convert in _TAKES_BYTES:
            lines += [
                "        try:",
                f"            row[{key}] = convert{index}(data[pos + 5 : end])",
                "        except ValueError:",
                f"            row[{key}] = data[pos + 5 : end].decode()",
            ]
        else:
            lines += [
                "        text = data[pos + 5 : end].decode()",
                "        try:",
                f"            row[{key}] = convert{index}(text)",
                "        except ValueError:",
                f"            row[{key}] = text",
            ]
        lines += [
            "        pos = end",
            "    elif kind == 110:",
            f"        row[{key}] = None",
            "        pos += 1",
            "    elif kind == 117:",
            "        if unchanged is None:",
            "            unchanged = []",
            f"        unchanged.append({key})",
            "        pos += 1",
            "    else:",
            "        raise DecodeError(",
            "            f'unexpected column kind {chr(kind)!r} in {table!r}'",
            "        )",
        ]
    lines.append("    return row, unchanged, pos")
    exec("\n".join(lines), namespace)
    reader: TupleReader = namespace["read_tuple"]
    return reader
