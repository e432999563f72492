"""PostgreSQL change data capture for Mycel (``type = "cdc"``).

Streams row changes of the listed tables through logical replication
(pgoutput) into flows, in commit order and at least once. See the README
of the ``mycel-cdc`` distribution for settings, event fields and types.

"""

from __future__ import annotations

from ._connector import CdcConnector
from ._pgoutput import DecodeError, Decoder, format_lsn, parse_lsn
from ._settings import CdcSettings
from ._types import parse_array

__all__ = [
    "CdcConnector",
    "CdcSettings",
    "DecodeError",
    "Decoder",
    "format_lsn",
    "parse_array",
    "parse_lsn",
]
