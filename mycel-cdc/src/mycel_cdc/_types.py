"""From PostgreSQL's text output to Python values.

pgoutput (protocol version 1) sends every column in its text form, written
by the type's output function in the WAL sender. The replication connection
fixes the settings that shape that text (``DateStyle=ISO``,
``TimeZone=UTC``, ``IntervalStyle=iso_8601``, ``extra_float_digits=3``,
``bytea_output=hex``), so one converter per type OID suffices:

============================  ============================================
PostgreSQL                    event value
============================  ============================================
smallint, integer, bigint     ``int``
real, double precision        ``float`` (``NaN`` and infinities included)
numeric                       ``decimal.Decimal``, exact
boolean                       ``bool``
text, varchar, char, name     ``str``
uuid                          ``str``, canonical lowercase form
json, jsonb                   the parsed JSON (object, list, ...)
date                          ``str``, ISO 8601 ``2024-05-01``
time, timetz                  ``str``, ISO 8601 ``13:45:00``/``13:45:00+02:00``
timestamp                     ``str``, ISO 8601 ``2024-05-01T13:45:00.5``
timestamptz                   ``str``, ISO 8601 in UTC ``...T11:45:00+00:00``
interval                      ``str``, ISO 8601 duration ``P1DT2H``
bytea                         ``str``, PostgreSQL's hex form ``\\x0102``
arrays of the above           ``list`` (nested for several dimensions)
domains                       as their base type
enums and anything else       ``str``, as PostgreSQL writes it
============================  ============================================

``infinity``/``-infinity`` dates and timestamps stay those words.

"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

__all__ = [
    "ARRAY_ELEMENTS",
    "Converter",
    "array_converter",
    "parse_array",
    "scalar_converter",
]

Converter = Callable[[str], Any]
"""Turns one column's text into its event value."""


def _bool(text: str) -> bool:
    return text == "t"


def _timestamp(text: str) -> str:
    return text.replace(" ", "T", 1)


def _with_offset(text: str) -> str:
    # PostgreSQL writes a whole-hour offset as "+02"; ISO 8601 wants "+02:00".
    if len(text) > 3 and text[-3] in "+-" and text[-2:].isdigit():
        return text + ":00"
    return text


def _timestamptz(text: str) -> str:
    if text[-3] == "+" and text[-2:] == "00":  # UTC, the session time zone
        return text[:10] + "T" + text[11:] + ":00"
    return _with_offset(text.replace(" ", "T", 1))


_SCALARS: dict[int, Converter] = {
    16: _bool,  # bool
    20: int,  # int8
    21: int,  # int2
    23: int,  # int4
    26: int,  # oid
    114: json.loads,  # json
    3802: json.loads,  # jsonb
    700: float,  # float4
    701: float,  # float8
    1700: Decimal,  # numeric
    1114: _timestamp,  # timestamp
    1184: _timestamptz,  # timestamptz
    1266: _with_offset,  # timetz
}
"""Types whose text needs converting; every other type stays text."""

ARRAY_ELEMENTS: dict[int, int] = {
    1000: 16, 1001: 17, 1002: 18, 1003: 19, 1016: 20, 1005: 21, 1007: 23,
    1009: 25, 1028: 26, 199: 114, 143: 142, 651: 650, 1041: 869, 1040: 829,
    791: 790, 1021: 700, 1022: 701, 1014: 1042, 1015: 1043, 1182: 1082,
    1183: 1083, 1115: 1114, 1185: 1184, 1187: 1186, 1270: 1266, 1231: 1700,
    2951: 2950, 3807: 3802, 1561: 1560, 1563: 1562,
}  # fmt: skip
"""Array type OID -> element type OID for the built-in types."""


def scalar_converter(oid: int) -> Converter | None:
    """The converter of a built-in scalar type; None means keep the text."""
    return _SCALARS.get(oid)


def array_converter(element: Converter | None) -> Converter:
    """A converter for arrays whose elements convert with ``element``."""

    def convert(text: str) -> Any:
        return parse_array(text, element)

    return convert


def parse_array(text: str, element: Converter | None = None) -> list[Any]:
    """Parse PostgreSQL's array text (``{1,2,NULL}``) into a list.

    Nested braces give nested lists; ``NULL`` (unquoted) gives None; quoted
    elements are unescaped and never NULL. A ``[1:2]={...}`` bounds prefix
    is dropped: lists always start at index 0.

    >>> parse_array('{{1,2},{3,NULL}}', int)
    [[1, 2], [3, None]]

    """
    if text.startswith("["):
        text = text[text.index("=") + 1 :]
    if not text.startswith("{"):
        raise ValueError(f"not an array literal: {text!r}")
    root: list[Any] = []
    stack: list[list[Any]] = []
    current = root
    pos = 1
    length = len(text)
    while pos < length:
        char = text[pos]
        if char == "{":
            child: list[Any] = []
            current.append(child)
            stack.append(current)
            current = child
            pos += 1
        elif char == "}":
            if not stack:
                return root
            current = stack.pop()
            pos += 1
        elif char == ",":
            pos += 1
        elif char == '"':
            # A quoted element: backslash escapes the next character.
            pos += 1
            parts: list[str] = []
            while True:
                quote = text.index('"', pos)
                slash = text.find("\\", pos, quote)
                if slash == -1:
                    parts.append(text[pos:quote])
                    pos = quote + 1
                    break
                parts.append(text[pos:slash])
                parts.append(text[slash + 1])
                pos = slash + 2
            value = "".join(parts)
            current.append(element(value) if element is not None else value)
        else:
            end = pos
            while end < length and text[end] not in ",}":
                end += 1
            token = text[pos:end].strip()
            if token.upper() == "NULL":
                current.append(None)
            else:
                current.append(element(token) if element is not None else token)
            pos = end
    raise ValueError(f"unterminated array literal: {text!r}")
