"""Mycel's ``database`` connector: flows write rows to PostgreSQL or SQLite.

See the distribution's README for settings, the target grammar, the type
mapping and the delivery guarantees.

"""

from __future__ import annotations

from ._connector import DatabaseConnector
from ._settings import DatabaseSettings, DatabaseToOptions

__all__ = ["DatabaseConnector", "DatabaseSettings", "DatabaseToOptions"]
